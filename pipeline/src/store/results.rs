//! [`Store`]: progress (counts by status, per shard, pending work, read from
//! the tallies of `tallies.rs`), the retry
//! of failed work, and the rows of the enriched output in row order.

use std::sync::LazyLock;

use super::{
    columns, on_pool, postgres, postgres_export,
    records::{Counts, ImportRecord, ResultBatch, ResultRow, ShardCounts, TallyMismatch},
    sqlite, tallies, Store,
};
use crate::model::RowStatus;

impl Store {
    /// Row and coordinate counts of the import by status.
    pub async fn counts(&self, import: &ImportRecord) -> anyhow::Result<Counts> {
        const TOTALS: &str = "SELECT rows_total, rows_invalid FROM imports WHERE id = $1";
        let groups: Vec<(String, i64, i64)> =
            on_pool!(self, p => sqlx::query_as(tallies::BY_STATUS).bind(import.id).fetch_all(p).await)?;
        let totals: (i64, i64) =
            on_pool!(self, p => sqlx::query_as(TOTALS).bind(import.id).fetch_one(p).await)?;
        Counts::of(totals, groups)
    }

    /// Why the import's `failed` rows failed: the most frequent `error` of its
    /// failed coordinates (weighted by their rows), e.g. `connection failed:
    /// … (after 8 requests)`; `None` when no row failed.
    pub async fn failure_cause(&self, import_id: i64) -> anyhow::Result<Option<String>> {
        const SQL: &str = "SELECT COALESCE(error, 'unknown') AS e FROM lookups WHERE import_id = $1 AND status = 'failed' GROUP BY e ORDER BY SUM(rows) DESC, e LIMIT 1";
        let row: Option<(String,)> =
            on_pool!(self, p => sqlx::query_as(SQL).bind(import_id).fetch_optional(p).await)?;
        Ok(row.map(|(error,)| error))
    }

    /// Rows, finished rows and failed rows per shard.
    pub async fn shard_counts(&self, import_id: i64) -> anyhow::Result<Vec<ShardCounts>> {
        let rows: Vec<(i32, i64, i64, i64)> =
            on_pool!(self, p => sqlx::query_as(tallies::BY_SHARD).bind(import_id).fetch_all(p).await)?;
        Ok(rows.into_iter().map(ShardCounts::from).collect())
    }

    /// Once the shard has no pending lookup left: when its tallies still count
    /// pending coordinates, which only a writer that did not keep them can
    /// cause (an enricher of a version before the tallies, still running
    /// through an upgrade), they are counted again from its lookups. Returns
    /// whether they were. One row read when they agree.
    pub async fn settle_shard_tallies(&self, import_id: i64, shard: i32) -> anyhow::Result<bool> {
        const PENDING: &str = "SELECT CAST(COALESCE(SUM(coordinates), 0) AS BIGINT) FROM lookup_tallies WHERE import_id = $1 AND shard = $2 AND status = 'pending'";
        let (pending,): (i64,) =
            on_pool!(self, p => sqlx::query_as(PENDING).bind(import_id).bind(shard).fetch_one(p).await)?;
        if pending == 0 {
            return Ok(false);
        }
        // Each statement sees what committed before it (PostgreSQL) or holds
        // the write lock (SQLite): a save committing meanwhile is counted once.
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            for sql in tallies::RECOUNT_SHARD {
                sqlx::query(sql).bind(import_id).bind(shard).execute(&mut *tx).await?;
            }
            tx.commit().await?;
        });
        tracing::warn!(
            import_id,
            shard,
            pending,
            "shard tallies counted again: they were not kept by every writer"
        );
        Ok(true)
    }

    /// Where the import's tallies (which [`Store::counts`] and
    /// [`Store::shard_counts`] read) differ from a recount of its lookups, as
    /// `(shard, status, tallied (coordinates, rows), counted (coordinates,
    /// rows))`; empty when they agree, as they must. A full scan of the
    /// import's lookups: for tests and diagnosis, not for polling.
    pub async fn tally_mismatches(&self, import_id: i64) -> anyhow::Result<Vec<TallyMismatch>> {
        let rows: Vec<(i32, String, i64, i64, i64, i64)> =
            on_pool!(self, p => sqlx::query_as(tallies::MISMATCHES).bind(import_id).fetch_all(p).await)?;
        Ok(rows
            .into_iter()
            .map(|(shard, status, tc, tr, cc, cr)| TallyMismatch {
                shard,
                status,
                tallied: (tc, tr),
                counted: (cc, cr),
            })
            .collect())
    }

    /// Number of pending coordinates in the shard (all of them when `shard` is
    /// `None`); for a shard not planned yet, its pending rows.
    pub async fn pending(&self, import_id: i64, shard: Option<i32>) -> anyhow::Result<i64> {
        const PLANNED: &str = "SELECT coordinates FROM shard_plans WHERE import_id = $1 AND shard = $2";
        const ROWS: &str =
            "SELECT COUNT(*) FROM points WHERE import_id = $1 AND shard = $2 AND status = 'pending'";
        if let Some(shard) = shard {
            let planned: Option<(i64,)> = on_pool!(self, p => sqlx::query_as(PLANNED).bind(import_id).bind(shard).fetch_optional(p).await)?;
            if planned.is_none() {
                let (n,): (i64,) =
                    on_pool!(self, p => sqlx::query_as(ROWS).bind(import_id).bind(shard).fetch_one(p).await)?;
                return Ok(n);
            }
        }
        match self {
            Store::Postgres(p) => postgres::pending_lookups(p, import_id, shard).await,
            Store::Sqlite(p) => sqlite::pending_lookups(p, import_id, shard).await,
        }
    }

    /// Puts the import's `failed` coordinates back to `pending` (attempts reset,
    /// search stage kept) and returns how many; finished work is never touched.
    pub async fn requeue_failed(&self, import_id: i64) -> anyhow::Result<u64> {
        const SQL: &str = "UPDATE lookups SET status = 'pending', attempts = 0, error = NULL WHERE lookups.import_id = $1 AND lookups.status = 'failed'";
        match self {
            Store::Postgres(p) => {
                static MOVING: LazyLock<String> =
                    LazyLock::new(|| tallies::pg_moving(SQL, "lookups", RowStatus::Failed));
                let (n,): (i64,) = sqlx::query_as(MOVING.as_str())
                    .bind(import_id)
                    .fetch_one(p)
                    .await?;
                Ok(n as u64)
            }
            Store::Sqlite(p) => {
                let sql = format!("{SQL} {}", tallies::SQLITE_RETURNING);
                let params = vec![rusqlite::types::Value::Integer(import_id)];
                sqlite::moving(p, import_id, sql, params, RowStatus::Failed).await
            }
        }
    }

    /// Streams the import's rows in row order to `sink`; returns how many.
    pub async fn for_each_result(
        &self,
        import_id: i64,
        mut sink: impl FnMut(ResultRow) -> anyhow::Result<()>,
    ) -> anyhow::Result<u64> {
        match self {
            Store::Postgres(p) => postgres::for_each_result(p, import_id, sink).await,
            Store::Sqlite(p) => {
                let mut n = 0u64;
                sqlite::results_in_batches(p, import_id, |page: Vec<ResultRow>| {
                    for row in page {
                        sink(row)?;
                        n += 1;
                    }
                    Ok(())
                })
                .await?;
                Ok(n)
            }
        }
    }

    /// Streams the import's rows in row order, gathered into batches of `B`,
    /// to `sink`. On SQLite the rows are read (and batched) on a blocking
    /// thread while this task takes the batches.
    pub async fn results_in_batches<B: ResultBatch>(
        &self,
        import_id: i64,
        sink: impl FnMut(B) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        match self {
            Store::Postgres(p) => postgres_export::results_in_batches(p, import_id, sink).await,
            Store::Sqlite(p) => sqlite::results_in_batches(p, import_id, sink).await,
        }
    }

    /// Up to `limit` rows after row number `after`, in row order (keyset
    /// pagination on the primary key, for streaming an export in pages).
    pub async fn results_page(
        &self,
        import_id: i64,
        after: i64,
        limit: i64,
    ) -> anyhow::Result<Vec<ResultRow>> {
        static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            columns::select_results("$1", "AND row_number > $2 ORDER BY row_number LIMIT $3")
        });
        let rows = on_pool!(self, p => sqlx::query_as(SQL.as_str()).bind(import_id).bind(after).bind(limit).fetch_all(p).await?);
        Ok(rows)
    }

    /// About `max` of the import's points, spread evenly over its rows (every
    /// `ceil(rows_total / max)`-th row, in row order): WGS84 latitude and
    /// longitude in degrees with the row's status (`enriched`, `no_match`,
    /// `failed`, `pending`, `invalid`), for a picture of the import. Rows
    /// whose coordinate did not parse have none and are left out.
    pub async fn point_sample(
        &self,
        import_id: i64,
        rows_total: i64,
        max: i64,
    ) -> anyhow::Result<Vec<(f64, f64, String)>> {
        const SQL: &str = "SELECT lat, lon, status FROM point_results WHERE import_id = $1 AND lat IS NOT NULL AND lon IS NOT NULL AND row_number % $2 = 0 ORDER BY row_number LIMIT $3";
        let max = max.max(1);
        let stride = ((rows_total.max(1) + max - 1) / max).max(1);
        let rows = on_pool!(self, p => sqlx::query_as(SQL).bind(import_id).bind(stride).bind(max).fetch_all(p).await?);
        Ok(rows)
    }
}
