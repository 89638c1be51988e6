//! The PostgreSQL dialect of the store: the statements whose PostgreSQL text
//! differs from SQLite's (casts of `SUM`, the database clock, `FOR UPDATE SKIP
//! LOCKED`, advisory locks, `unnest` arrays) and the bulk paths (`COPY` load,
//! streamed results). Called by the [`super::Store`] facade only.

use std::{future::Future, sync::LazyLock};

use futures::TryStreamExt;
use sqlx::{postgres::PgPool, Postgres, Transaction};
use tokio::sync::mpsc;

use super::{
    columns,
    pg_binary::Tuples,
    records::{AnswerColumns, Claim, Claimed, LoadCounts, LoadEnd, LoadStart, ResultRow, Saved, ShardPlan},
    tallies,
};
use crate::{
    csv_input::Row,
    geo::shard_of,
    lookup::Area,
    model::{ImportPhase, RowStatus, Stage},
    quota::{interval_s, share_rps, ACTIVE_WINDOW_S},
};

// ---------------------------------------------------------------- load

/// [`super::Store::load`]: the start, the `COPY` of every row and the end in one transaction.
pub(super) async fn load(
    pool: &PgPool,
    start: &LoadStart,
    done: impl Future<Output = anyhow::Result<LoadEnd>>,
    mut rows: mpsc::Receiver<Vec<Row>>,
) -> anyhow::Result<LoadCounts> {
    const START: &str = "UPDATE imports SET phase = $7, error = NULL, delimiter = $2, header = $3, width = $4, lat_index = $5, lon_index = $6, rows_total = 0, rows_invalid = 0 WHERE id = $1";
    const DELETES: [&str; 4] = [
        "DELETE FROM points WHERE import_id = $1",
        "DELETE FROM lookups WHERE import_id = $1",
        tallies::DELETE_IMPORT,
        "DELETE FROM shard_plans WHERE import_id = $1",
    ];
    const DONE: &str = "UPDATE imports SET phase = $5, rows_total = $2, rows_invalid = $3, source_sha256 = $4, warnings = $6 WHERE id = $1";
    let id = start.id;
    let mut tx = pool.begin().await?;
    sqlx::query(START)
        .bind(id)
        .bind(&start.delimiter)
        .bind(&start.header)
        .bind(start.width)
        .bind(start.lat_index)
        .bind(start.lon_index)
        .bind(ImportPhase::Loading.as_str())
        .execute(&mut *tx)
        .await?;
    for sql in DELETES {
        sqlx::query(sql).bind(id).execute(&mut *tx).await?;
    }
    let counts = copy_points(&mut tx, id, start.shards, &mut rows).await?;
    let end = done.await?;
    sqlx::query(DONE)
        .bind(id)
        .bind(counts.rows)
        .bind(counts.invalid)
        .bind(end.sha256)
        .bind(ImportPhase::Loaded.as_str())
        .bind(end.warnings)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(counts)
}

/// `COPY`s every row received on `rows` into `points`, in the binary format
/// (`pg_binary.rs`), about 1 MiB a message.
async fn copy_points(
    tx: &mut Transaction<'static, Postgres>,
    id: i64,
    shards: u32,
    rows: &mut mpsc::Receiver<Vec<Row>>,
) -> anyhow::Result<LoadCounts> {
    const COPY: &str = "COPY points (import_id, row_number, line, fields, lat, lon, shard, status, error) FROM STDIN (FORMAT binary)";
    let mut counts = LoadCounts::default();
    let mut copy = tx.copy_in_raw(COPY).await?;
    let mut out = Tuples::new((1 << 20) + (1 << 16));
    while let Some(batch) = rows.recv().await {
        for r in &batch {
            counts.rows += 1;
            if r.coordinate.is_err() {
                counts.invalid += 1;
            }
            copy_tuple(&mut out, id, shards, r)?;
        }
        if out.len() >= 1 << 20 {
            copy.send(out.take()).await?;
        }
    }
    copy.send(out.finish()).await?;
    copy.finish().await?;
    Ok(counts)
}

/// Appends one row of `points` as a binary `COPY` tuple. Errors: a row or
/// line number past `BIGINT`.
fn copy_tuple(out: &mut Tuples, id: i64, shards: u32, r: &Row) -> anyhow::Result<()> {
    out.tuple(9);
    out.int8(id);
    out.int8(i64::try_from(r.row_number)?);
    out.int8(i64::try_from(r.line)?);
    out.text(Some(&r.fields));
    match &r.coordinate {
        Ok((lat, lon)) => {
            out.float8(Some(*lat));
            out.float8(Some(*lon));
            out.int4(shard_of(*lat, *lon, shards) as i32);
            out.text(Some(RowStatus::Pending.as_str()));
            out.null();
        }
        Err(e) => {
            out.float8(None);
            out.float8(None);
            out.null();
            out.text(Some(RowStatus::Invalid.as_str()));
            out.text(Some(e));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- quota

/// [`super::Store::reserve`] on the database clock: `(slot, now)`, `None` when
/// the budget is spent. The import's row first (its lock orders every
/// reservation of the import), then its API's ([`super::quota::API_SLOT`]).
pub(super) async fn reserve(pool: &PgPool, import_id: i64) -> anyhow::Result<Option<(f64, f64)>> {
    const IMPORT: &str = "UPDATE quotas q SET requests = q.requests + 1, active_at = c.now
         FROM (SELECT extract(epoch FROM clock_timestamp())::float8 AS now) c
         WHERE q.import_id = $1 AND (q.max_requests IS NULL OR q.requests < q.max_requests)
         RETURNING GREATEST(c.now, q.next_at, q.paused_until), c.now, q.api_url, q.requests_per_second * 1.0";
    let mut tx = pool.begin().await?;
    let Some((earliest, now, api, own_rps)): Option<(f64, f64, Option<String>, f64)> = sqlx::query_as(IMPORT)
        .bind(import_id)
        .fetch_optional(&mut *tx)
        .await?
    else {
        return Ok(None);
    };
    let (at, share) = match api {
        Some(api) => {
            let active: Vec<f64> = sqlx::query_scalar(super::quota::API_ACTIVE)
                .bind(&api)
                .bind(now - ACTIVE_WINDOW_S)
                .fetch_all(&mut *tx)
                .await?;
            let slot: Option<(f64, f64)> = sqlx::query_as(super::quota::API_SLOT.as_str())
                .bind(api)
                .bind(earliest)
                .bind(interval_s(1.0))
                .fetch_optional(&mut *tx)
                .await?;
            let rate = slot.map(|(_, rate)| rate);
            (
                slot.map_or(earliest, |(at, _)| at),
                share_rps(own_rps, rate, &active),
            )
        }
        None => (earliest, own_rps),
    };
    sqlx::query(super::quota::IMPORT_NEXT)
        .bind(import_id)
        .bind(at)
        .bind(interval_s(share))
        .bind(share)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Some((at, now)))
}

/// [`super::Store::pause`] on the database clock.
pub(super) async fn pause(pool: &PgPool, import_id: i64, seconds: f64) -> anyhow::Result<()> {
    const SQL: &str = "UPDATE quotas SET paused_until = GREATEST(paused_until, extract(epoch FROM clock_timestamp())::float8 + $2) WHERE import_id = $1";
    const API: &str = "UPDATE api_quotas SET paused_until = GREATEST(paused_until, extract(epoch FROM clock_timestamp())::float8 + $2) WHERE api_url = (SELECT api_url FROM quotas WHERE import_id = $1)";
    for sql in [SQL, API] {
        sqlx::query(sql)
            .bind(import_id)
            .bind(seconds)
            .execute(pool)
            .await?;
    }
    Ok(())
}

// ---------------------------------------------------------------- claims

/// [`super::Store::plan_shard`]: an advisory lock serialises two enrichers of
/// one shard (a Job's replacement pod) until the plan commits.
pub(super) async fn plan_shard(pool: &PgPool, import_id: i64, shard: i32) -> anyhow::Result<ShardPlan> {
    const LOCK: &str = "SELECT pg_advisory_xact_lock($1, $2)";
    const PLANNED: &str = "SELECT coordinates, rows FROM shard_plans WHERE import_id = $1 AND shard = $2";
    const PLAN: &str = "INSERT INTO lookups (import_id, lat, lon, shard, rows) SELECT import_id, lat, lon, shard, COUNT(*) FROM points WHERE import_id = $1 AND shard = $2 AND status = 'pending' GROUP BY import_id, shard, lat, lon ON CONFLICT DO NOTHING";
    const RECORD: &str = "INSERT INTO shard_plans (import_id, shard, coordinates, rows) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING";
    let mut tx = pool.begin().await?;
    sqlx::query(LOCK)
        .bind(import_id as i32)
        .bind(shard)
        .execute(&mut *tx)
        .await?;
    let planned: Option<(i64, i64)> = sqlx::query_as(PLANNED)
        .bind(import_id)
        .bind(shard)
        .fetch_optional(&mut *tx)
        .await?;
    if let Some((coordinates, rows)) = planned {
        return Ok(ShardPlan { coordinates, rows });
    }
    sqlx::query(PLAN)
        .bind(import_id)
        .bind(shard)
        .execute(&mut *tx)
        .await?;
    for sql in tallies::RECOUNT_SHARD {
        sqlx::query(sql)
            .bind(import_id)
            .bind(shard)
            .execute(&mut *tx)
            .await?;
    }
    let (coordinates, rows): (i64, i64) = sqlx::query_as(tallies::SHARD_TOTAL)
        .bind(import_id)
        .bind(shard)
        .fetch_one(&mut *tx)
        .await?;
    sqlx::query(RECORD)
        .bind(import_id)
        .bind(shard)
        .bind(coordinates)
        .bind(rows)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(ShardPlan { coordinates, rows })
}

/// [`super::Store::claim`]: the claimed rows stay locked (`SKIP LOCKED` for
/// other claims) in the claim's transaction.
pub(super) async fn claim(
    pool: &PgPool,
    import_id: i64,
    shard: i32,
    stage: Stage,
    limit: i64,
) -> anyhow::Result<Claim> {
    const SQL: &str = "SELECT lat, lon, stage, attempts FROM lookups WHERE import_id = $1 AND shard = $2 AND status = 'pending' AND stage = $3 ORDER BY lat, lon LIMIT $4 FOR UPDATE SKIP LOCKED";
    let mut tx = pool.begin().await?;
    let rows: Vec<(f64, f64, i16, i32)> = sqlx::query_as(SQL)
        .bind(import_id)
        .bind(shard)
        .bind(stage.as_i16())
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
    Ok(Claim {
        tx: Some(tx),
        import_id,
        items: rows
            .into_iter()
            .map(Claimed::from_row)
            .collect::<anyhow::Result<_>>()?,
    })
}

/// [`super::Store::save`]: one `UPDATE … FROM unnest(…)` of arrays per 5000
/// results, in the claim's transaction: $1 import, $2 lat, $3 lon, $4
/// attempts, $5 stage, then [`columns::ANSWER`] from $6. Only pending
/// lookups change, and their tallies move in the same statement
/// ([`tallies::pg_moving`]).
static SAVE: LazyLock<String> = LazyLock::new(|| {
    let answer = &*columns::ANSWER;
    let pg_type = |c: &str| if c == "distance_m" { "float8" } else { "text" };
    let set: Vec<String> = answer.iter().map(|c| format!("{c} = v.{c}")).collect();
    let arrays: Vec<String> = answer
        .iter()
        .enumerate()
        .map(|(i, c)| format!("${}::{}[]", 6 + i, pg_type(c)))
        .collect();
    let update = format!(
        "UPDATE lookups l SET stage = COALESCE(v.stage, l.stage), attempts = v.attempts, {} FROM unnest($2::float8[], $3::float8[], $4::int4[], $5::int2[], {}) AS v(lat, lon, attempts, stage, {}) WHERE l.import_id = $1 AND l.lat = v.lat AND l.lon = v.lon AND l.status = 'pending'",
        set.join(", "),
        arrays.join(", "),
        answer.join(", ")
    );
    tallies::pg_moving(&update, "l", RowStatus::Pending)
});

pub(super) async fn save(pool: &PgPool, claim: Claim, results: &[Saved]) -> anyhow::Result<()> {
    let mut tx = match claim.tx {
        Some(tx) => tx,
        None => pool.begin().await?,
    };
    for chunk in results.chunks(5000) {
        let c: Vec<AnswerColumns> = chunk.iter().map(AnswerColumns::of).collect();
        let mut q = sqlx::query(SAVE.as_str())
            .bind(claim.import_id)
            .bind(chunk.iter().map(|s| s.lat).collect::<Vec<f64>>())
            .bind(chunk.iter().map(|s| s.lon).collect::<Vec<f64>>())
            .bind(chunk.iter().map(|s| s.attempts).collect::<Vec<i32>>())
            .bind(c.iter().map(AnswerColumns::stage).collect::<Vec<Option<i16>>>())
            .bind(c.iter().map(|c| c.status.as_str()).collect::<Vec<&str>>())
            .bind(texts(&c, AnswerColumns::postcode))
            .bind(
                c.iter()
                    .map(AnswerColumns::distance_m)
                    .collect::<Vec<Option<f64>>>(),
            )
            .bind(texts(&c, AnswerColumns::raw))
            .bind(texts(&c, |c| c.error));
        for i in 0..Area::COLUMNS.len() {
            q = q.bind(texts(&c, |c| c.area(i)));
        }
        q.execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// One text column of a chunk of answers, as an array.
fn texts<'a>(
    c: &[AnswerColumns<'a>],
    f: impl Fn(&AnswerColumns<'a>) -> Option<&'a str>,
) -> Vec<Option<&'a str>> {
    c.iter().map(f).collect()
}

// ---------------------------------------------------------------- results

/// Pending lookups of the import, of one shard or all.
pub(super) async fn pending_lookups(
    pool: &PgPool,
    import_id: i64,
    shard: Option<i32>,
) -> anyhow::Result<i64> {
    const SQL: &str = "SELECT COUNT(*) FROM lookups WHERE import_id = $1 AND status = 'pending' AND ($2::int4 IS NULL OR shard = $2)";
    let (n,): (i64,) = sqlx::query_as(SQL)
        .bind(import_id)
        .bind(shard)
        .fetch_one(pool)
        .await?;
    Ok(n)
}

static RESULTS: LazyLock<String> = LazyLock::new(|| columns::select_results("$1", "ORDER BY row_number"));

/// [`super::Store::for_each_result`]: the rows streamed from `point_results`.
pub(super) async fn for_each_result(
    pool: &PgPool,
    import_id: i64,
    mut sink: impl FnMut(ResultRow) -> anyhow::Result<()>,
) -> anyhow::Result<u64> {
    let mut stream = sqlx::query_as::<_, ResultRow>(RESULTS.as_str())
        .bind(import_id)
        .fetch(pool);
    let mut n = 0u64;
    while let Some(row) = stream.try_next().await? {
        sink(row)?;
        n += 1;
    }
    Ok(n)
}
