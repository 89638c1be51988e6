//! [`super::Store::plan_shard_answered`] on PostgreSQL: a shard planned and
//! answered in one pass, its lookups written finished with one `COPY`.
//!
//! The claim loop it replaces for the offline provider cost about 45 s a shard
//! at 1M rows (planning every coordinate pending, then per 4096-coordinate
//! batch a `FOR UPDATE SKIP LOCKED` claim and an `UPDATE … FROM unnest(…)` of
//! 23 arrays, each updated row a new heap tuple and a new entry in both indexes
//! of `lookups`). Here each lookup is written once, already answered, in key
//! order: PostgreSQL streams the shard's distinct coordinates (`GROUP BY lat,
//! lon ORDER BY lat, lon`) on one connection, a blocking thread answers them
//! 4096 at a time and encodes `COPY` text, and the other connection `COPY`s it
//! into `lookups` — the three overlap.
//!
//! Resuming: the lookups and the shard's plan commit in one transaction (under
//! the shard's advisory lock, as [`super::postgres::plan_shard`]), so a killed
//! enricher leaves either the whole shard answered and planned or nothing, and
//! the next run starts the pass again. With the offline index a shard's pass
//! takes seconds, so losing one is cheap.

use futures::TryStreamExt;
use sqlx::postgres::PgPool;
use tokio::sync::mpsc;

use super::{
    columns,
    pg_binary::Tuples,
    records::{AnswerColumns, Claimed, Saved, ShardPlan},
    tallies::{self, Tally},
};
use crate::{lookup::Area, model::Stage};

/// Coordinates answered and encoded at a time (the offline provider's batch).
const BATCH: usize = 4096;

/// Plans and answers the shard; `None` when it was planned already.
pub(super) async fn plan_shard_answered(
    pool: &PgPool,
    import_id: i64,
    shard: i32,
    answer: impl Fn(&[Claimed]) -> Vec<Saved> + Send + 'static,
) -> anyhow::Result<Option<ShardPlan>> {
    const LOCK: &str = "SELECT pg_advisory_xact_lock($1, $2)";
    const PLANNED: &str = "SELECT 1 FROM shard_plans WHERE import_id = $1 AND shard = $2";
    // No lookup of an unplanned shard exists (a plan commits with its lookups);
    // deleting makes the COPY safe even so.
    const CLEAR: &str = "DELETE FROM lookups WHERE import_id = $1 AND shard = $2";
    const RECORD: &str =
        "INSERT INTO shard_plans (import_id, shard, coordinates, rows) VALUES ($1, $2, $3, $4)";
    let mut tx = pool.begin().await?;
    sqlx::query(LOCK)
        .bind(import_id as i32)
        .bind(shard)
        .execute(&mut *tx)
        .await?;
    let planned: Option<(i32,)> = sqlx::query_as(PLANNED)
        .bind(import_id)
        .bind(shard)
        .fetch_optional(&mut *tx)
        .await?;
    if planned.is_some() {
        return Ok(None);
    }
    sqlx::query(CLEAR)
        .bind(import_id)
        .bind(shard)
        .execute(&mut *tx)
        .await?;
    let (coords_tx, coords_rx) = mpsc::channel(2);
    let (text_tx, mut text_rx) = mpsc::channel::<Vec<u8>>(2);
    let encoder = tokio::task::spawn_blocking(move || encode(import_id, shard, answer, coords_rx, text_tx));
    let read = read_coordinates(pool, import_id, shard, coords_tx);
    let copy = async {
        let mut copy = tx.copy_in_raw(&copy_sql()).await?;
        while let Some(bytes) = text_rx.recv().await {
            copy.send(bytes).await?;
        }
        copy.finish().await?;
        anyhow::Ok(())
    };
    let (read, copied) = tokio::join!(read, copy);
    let (plan, tally) = encoder.await??; // the encoder's error first: it explains a closed channel
    read?;
    copied?;
    sqlx::query(tallies::RECOUNT_SHARD[0])
        .bind(import_id)
        .bind(shard)
        .execute(&mut *tx)
        .await?;
    for (shard, status, coordinates, rows) in tally.entries() {
        sqlx::query(tallies::ADD)
            .bind(import_id)
            .bind(shard)
            .bind(status)
            .bind(coordinates)
            .bind(rows)
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query(RECORD)
        .bind(import_id)
        .bind(shard)
        .bind(plan.coordinates)
        .bind(plan.rows)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Some(plan))
}

/// A batch of distinct coordinates and their row counts.
type Batch = (Vec<Claimed>, Vec<i64>);

/// Streams the shard's distinct pending coordinates in (latitude, longitude)
/// order, with their row counts, to `out` in batches of [`BATCH`]. On a
/// connection of its own (the rows of `points` do not change after the load).
async fn read_coordinates(
    pool: &PgPool,
    import_id: i64,
    shard: i32,
    out: mpsc::Sender<Batch>,
) -> anyhow::Result<()> {
    const DISTINCT: &str = "SELECT lat, lon, COUNT(*) FROM points WHERE import_id = $1 AND shard = $2 AND status = 'pending' GROUP BY lat, lon ORDER BY lat, lon";
    let mut conn = pool.acquire().await?;
    let mut rows = sqlx::query_as::<_, (f64, f64, i64)>(DISTINCT)
        .bind(import_id)
        .bind(shard)
        .fetch(&mut *conn);
    let mut batch: Batch = (Vec::with_capacity(BATCH), Vec::with_capacity(BATCH));
    while let Some((lat, lon, n)) = rows.try_next().await? {
        batch.0.push(Claimed {
            lat,
            lon,
            stage: Stage::Radius,
            attempts: 0,
        });
        batch.1.push(n);
        if batch.0.len() == BATCH {
            let full = std::mem::replace(&mut batch, (Vec::with_capacity(BATCH), Vec::with_capacity(BATCH)));
            if out.send(full).await.is_err() {
                return Ok(()); // the encoder stopped; its error is reported
            }
        }
    }
    if !batch.0.is_empty() {
        let _ = out.send(batch).await;
    }
    Ok(())
}

/// `COPY lookups (import_id, shard, lat, lon, rows, attempts, stage, <answer>) FROM STDIN`.
fn copy_sql() -> String {
    format!(
        "COPY lookups (import_id, shard, lat, lon, rows, attempts, stage, {}) FROM STDIN (FORMAT binary)",
        columns::ANSWER.join(", ")
    )
}

/// On a blocking thread: answers each batch and encodes its lookups as
/// binary `COPY` tuples (`pg_binary.rs`); returns the plan's counts and the
/// shard's tallies.
fn encode(
    import_id: i64,
    shard: i32,
    answer: impl Fn(&[Claimed]) -> Vec<Saved>,
    mut batches: mpsc::Receiver<Batch>,
    out: mpsc::Sender<Vec<u8>>,
) -> anyhow::Result<(ShardPlan, Tally)> {
    let (mut plan, mut tally) = (ShardPlan::default(), Tally::default());
    let mut tuples = Tuples::new(BATCH * 200);
    while let Some((coords, rows)) = batches.blocking_recv() {
        let results = answer(&coords);
        anyhow::ensure!(results.len() == coords.len(), "an answer for every coordinate");
        plan.coordinates += coords.len() as i64;
        plan.rows += rows.iter().sum::<i64>();
        for (s, n) in results.iter().zip(&rows) {
            push_lookup(&mut tuples, import_id, shard, *n, s);
            tally.add(shard, AnswerColumns::of(s).status, 1, *n);
        }
        if out.blocking_send(tuples.take()).is_err() {
            return Ok((plan, tally)); // the COPY failed; its error is reported
        }
    }
    let _ = out.blocking_send(tuples.finish());
    Ok((plan, tally))
}

/// Appends one finished lookup as a binary `COPY` tuple of [`copy_sql`]'s columns.
fn push_lookup(t: &mut Tuples, import_id: i64, shard: i32, rows: i64, s: &Saved) {
    let c = AnswerColumns::of(s);
    t.tuple(7 + columns::ANSWER.len() as i16);
    t.int8(import_id);
    t.int4(shard);
    t.float8(Some(s.lat));
    t.float8(Some(s.lon));
    t.int8(rows);
    t.int4(s.attempts);
    t.int2(c.stage().unwrap_or(Stage::Radius.as_i16()));
    t.text(Some(c.status.as_str()));
    t.text(c.postcode());
    t.float8(c.distance_m());
    t.text(c.raw());
    t.text(c.error);
    for i in 0..Area::COLUMNS.len() {
        t.text(c.area(i));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{pg_binary, Outcome};

    #[test]
    fn a_tuple_has_a_value_for_every_copied_column() {
        let s = Saved {
            lat: 51.5,
            lon: -0.25,
            attempts: 0,
            outcome: Outcome::NoMatch,
        };
        let mut t = Tuples::new(0);
        t.take(); // the header
        push_lookup(&mut t, 7, 2, 3, &s);
        let columns = copy_sql().matches(", ").count() + 1;
        let mut seen = 0;
        pg_binary::each_tuple(&t.buf, columns, |v| {
            seen += 1;
            assert_eq!(pg_binary::integer(v[0])?, 7);
            assert_eq!((pg_binary::float(v[2])?, pg_binary::float(v[3])?), (51.5, -0.25));
            assert_eq!(pg_binary::text(v[7])?, Some("no_match"));
            assert_eq!((v[8], v[9]), (None, None));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, 1);
    }
}
