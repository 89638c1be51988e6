//! The SQLite dialect of the store: the statements whose SQLite text differs
//! from PostgreSQL's (this process's clock for the quota, `INDEXED BY` for
//! claims), and the bulk paths, which run on rusqlite on a blocking thread
//! (`bulk`: load, plan, save; [`export`]: the rows of the output). Called by
//! the [`super::Store`] facade only, but for the export's join, which its
//! tests compare with the view.

mod bulk;
pub mod export;

use std::{future::Future, path::PathBuf};

use sqlx::SqlitePool;
use tokio::sync::mpsc;

use super::records::{Claim, Claimed, LoadCounts, LoadEnd, LoadStart, ResultBatch, Saved, ShardPlan};
use crate::{
    csv_input::Row,
    model::{ImportPhase, RowStatus, Stage},
    quota::{interval_s, share_rps, ACTIVE_WINDOW_S},
};

/// The database file behind a sqlx SQLite pool.
pub(super) fn path_of(pool: &SqlitePool) -> PathBuf {
    pool.connect_options().get_filename().to_path_buf()
}

/// An exclusive `flock` on the database file while migrations run, so that
/// processes opening one file at once migrate it one after another. SQLite's
/// own locks are POSIX record locks, which `flock` does not touch; closing
/// the file (dropping the lock) releases it.
pub(super) struct MigrationLock(#[allow(dead_code)] std::fs::File);

impl MigrationLock {
    /// Waits for the lock on `path` (a blocking call).
    pub(super) fn take(path: &std::path::Path) -> anyhow::Result<MigrationLock> {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::open(path)?;
        loop {
            // SAFETY: flock on a file descriptor this function owns.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(MigrationLock(file));
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e.into());
            }
        }
    }
}

/// Seconds since the Unix epoch on this machine's clock.
fn now_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Runs `f` on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f).await?
}

// ---------------------------------------------------------------- load

/// [`super::Store::load`]: the start committed first (the phase says
/// `Loading` while the rows go in, in committed chunks), then the rows, then the end.
pub(super) async fn load(
    pool: &SqlitePool,
    start: LoadStart,
    done: impl Future<Output = anyhow::Result<LoadEnd>>,
    rows: mpsc::Receiver<Vec<Row>>,
) -> anyhow::Result<LoadCounts> {
    const START: &str = "UPDATE imports SET phase = ?7, error = NULL, delimiter = ?2, header = ?3, width = ?4, lat_index = ?5, lon_index = ?6, rows_total = 0, rows_invalid = 0 WHERE id = ?1";
    const DELETES: [&str; 4] = [
        "DELETE FROM points WHERE import_id = ?1",
        "DELETE FROM lookups WHERE import_id = ?1",
        "DELETE FROM lookup_tallies WHERE import_id = ?1",
        "DELETE FROM shard_plans WHERE import_id = ?1",
    ];
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
    tx.commit().await?;
    let path = path_of(pool);
    let (conn, counts) = blocking(move || bulk::insert_points(&path, id, start.shards, rows)).await?;
    let end = done.await?;
    blocking(move || bulk::finish_load(&conn, id, counts, &end)).await?;
    Ok(counts)
}

// ---------------------------------------------------------------- quota

/// [`super::Store::reserve`] on this machine's clock (every process sharing a
/// SQLite file shares the machine): `(slot, now)`, `None` when the budget is
/// spent. The first statement writes, so the transaction holds the write lock
/// from its start (no deferred read to upgrade); then the API's slot
/// ([`super::quota::API_SLOT`]).
pub(super) async fn reserve(pool: &SqlitePool, import_id: i64) -> anyhow::Result<Option<(f64, f64)>> {
    const IMPORT: &str = "UPDATE quotas SET requests = requests + 1, active_at = $2
         WHERE import_id = $1 AND (max_requests IS NULL OR requests < max_requests)
         RETURNING max($2, next_at, paused_until), api_url, requests_per_second * 1.0";
    let now = now_s();
    let mut tx = pool.begin().await?;
    let Some((earliest, api, own_rps)): Option<(f64, Option<String>, f64)> = sqlx::query_as(IMPORT)
        .bind(import_id)
        .bind(now)
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

/// [`super::Store::pause`] on this machine's clock.
pub(super) async fn pause(pool: &SqlitePool, import_id: i64, seconds: f64) -> anyhow::Result<()> {
    const SQL: &str = "UPDATE quotas SET paused_until = max(paused_until, ?2) WHERE import_id = ?1";
    const API: &str = "UPDATE api_quotas SET paused_until = max(paused_until, ?2) WHERE api_url = (SELECT api_url FROM quotas WHERE import_id = ?1)";
    for sql in [SQL, API] {
        sqlx::query(sql)
            .bind(import_id)
            .bind(now_s() + seconds)
            .execute(pool)
            .await?;
    }
    Ok(())
}

// ---------------------------------------------------------------- claims

/// [`super::Store::plan_shard`], see [`bulk::plan_shard`].
pub(super) async fn plan_shard(pool: &SqlitePool, import_id: i64, shard: i32) -> anyhow::Result<ShardPlan> {
    let path = path_of(pool);
    blocking(move || bulk::plan_shard(&path, import_id, shard)).await
}

/// [`super::Store::plan_shard_answered`], see [`bulk::plan_shard_answered`];
/// `None` when the shard was already planned.
pub(super) async fn plan_shard_answered(
    pool: &SqlitePool,
    import_id: i64,
    shard: i32,
    answer: impl Fn(&[Claimed]) -> Vec<Saved> + Send + 'static,
) -> anyhow::Result<Option<ShardPlan>> {
    let path = path_of(pool);
    blocking(move || bulk::plan_shard_answered(&path, import_id, shard, answer)).await
}

/// [`super::Store::claim`]. Without table statistics SQLite walks the primary
/// key for the `ORDER BY`, scanning every finished row on each claim; the claim
/// index gives the same order. A SQLite claim holds no lock.
pub(super) async fn claim(
    pool: &SqlitePool,
    import_id: i64,
    shard: i32,
    stage: Stage,
    limit: i64,
) -> anyhow::Result<Claim> {
    const SQL: &str = "SELECT lat, lon, stage, attempts FROM lookups INDEXED BY lookups_claim WHERE import_id = ?1 AND shard = ?2 AND status = 'pending' AND stage = ?3 ORDER BY lat, lon LIMIT ?4";
    let rows: Vec<(f64, f64, i16, i32)> = sqlx::query_as(SQL)
        .bind(import_id)
        .bind(shard)
        .bind(stage.as_i16())
        .bind(limit)
        .fetch_all(pool)
        .await?;
    Ok(Claim {
        tx: None,
        import_id,
        items: rows
            .into_iter()
            .map(Claimed::from_row)
            .collect::<anyhow::Result<_>>()?,
    })
}

/// [`super::Store::save`], see [`bulk::save`].
pub(super) async fn save(pool: &SqlitePool, import_id: i64, results: &[Saved]) -> anyhow::Result<()> {
    let (path, results) = (path_of(pool), results.to_vec());
    blocking(move || bulk::save(&path, import_id, &results)).await
}

/// An `UPDATE lookups … RETURNING lookups.shard, lookups.status, lookups.rows`
/// of lookups whose status was `from`, with `params`, run with
/// [`bulk::moving`]; returns how many lookups changed.
pub(super) async fn moving(
    pool: &SqlitePool,
    import_id: i64,
    sql: String,
    params: Vec<rusqlite::types::Value>,
    from: RowStatus,
) -> anyhow::Result<u64> {
    let path = path_of(pool);
    blocking(move || bulk::moving(&path, import_id, &sql, params, from)).await
}

// ---------------------------------------------------------------- results

/// Pending lookups of the import, of one shard or all.
pub(super) async fn pending_lookups(
    pool: &SqlitePool,
    import_id: i64,
    shard: Option<i32>,
) -> anyhow::Result<i64> {
    const SQL: &str = "SELECT COUNT(*) FROM lookups WHERE import_id = ?1 AND status = 'pending' AND (?2 IS NULL OR shard = ?2)";
    let (n,): (i64,) = sqlx::query_as(SQL)
        .bind(import_id)
        .bind(shard)
        .fetch_one(pool)
        .await?;
    Ok(n)
}

/// [`super::Store::results_in_batches`]: the rows are read ([`export::results`])
/// and gathered into batches on a blocking thread, which hands each full batch
/// over a channel to this task, for `sink`. Both the enriched CSV and
/// [`super::Store::for_each_result`] read the rows this way.
pub(super) async fn results_in_batches<B: ResultBatch>(
    pool: &SqlitePool,
    import_id: i64,
    mut sink: impl FnMut(B) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let path = path_of(pool);
    let (tx, mut batches) = mpsc::channel::<B>(4);
    let reader = tokio::task::spawn_blocking(move || {
        let (mut batch, mut unsent) = (B::empty(), false);
        export::results(&path, import_id, export::JOIN_BUDGET_BYTES, |row| {
            unsent = !batch.push(row);
            Ok(unsent
                || tx
                    .blocking_send(std::mem::replace(&mut batch, B::empty()))
                    .is_ok())
        })?;
        if unsent {
            let _ = tx.blocking_send(batch);
        }
        anyhow::Ok(())
    });
    while let Some(batch) = batches.recv().await {
        sink(batch)?;
    }
    reader.await?
}
