//! Storage: PostgreSQL in a cluster, a SQLite file for the local runner; one
//! schema, migrations for both (`migrations/postgres`, `migrations/sqlite`).
//!
//! Tables: `uploads`/`upload_chunks` (CSV bytes), `imports`, `points` (every
//! input row, its fields and load status), `lookups` (one per distinct coordinate:
//! the unit of enrichment work and its result), `shard_plans`, `quotas` (the
//! shared request quota), `api_quotas` and `api_leases` (each upstream API's
//! quota and concurrency limit, `leases.rs`), `answers` (finished answers reused across imports,
//! `answers.rs`), `lookup_tallies` (each shard's lookups counted by status, kept
//! by every write, `tallies.rs`). The view `point_results` gives every row with its
//! final status.
//!
//! [`Store`] is the one type callers use. Its methods are grouped by concern:
//! `imports.rs` (imports and the load), `quota.rs`, `claims.rs` (planning,
//! claiming and saving enrichment work), `results.rs` (counts and the output
//! rows), `uploads.rs`. A statement both dialects read alike is written there
//! once and run on either pool; what differs is written out in full in
//! `postgres.rs` and `sqlite.rs` (PostgreSQL's offline plan-and-answer pass in
//! `postgres_answered.rs`, its `COPY` export in `postgres_export.rs` and the
//! binary `COPY` format both use in `pg_binary.rs`; SQLite's bulk paths on
//! rusqlite in `sqlite/bulk.rs` and `sqlite/export.rs`). Both exports join in
//! memory with `joined.rs`. `records.rs` holds the types read and written,
//! `columns.rs` the column lists built from [`crate::lookup::Area::COLUMNS`].
//!
//! Module dependencies run one way: the facade → the dialects → records, columns.

mod answers;
mod claims;
mod columns;
mod imports;
mod joined;
mod leases;
mod pg_binary;
pub mod pg_connect;
mod postgres;
mod postgres_answered;
pub mod postgres_export;
mod quota;
mod records;
mod results;
pub mod sqlite;
mod tallies;
mod uploads;
pub use quota::{api_key, QuotaWriter};
pub use uploads::UploadMissing;

use std::{str::FromStr, time::Duration};

use sqlx::{
    postgres::{PgPool, PgPoolOptions},
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous},
};

pub use records::{
    Claim, Claimed, Counts, ImportRecord, LoadCounts, LoadEnd, Outcome, QuotaCounters, ResultBatch,
    ResultRef, ResultRow, Saved, ShardCounts, ShardPlan, TallyMismatch,
};

fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// The PostgreSQL pool's settings (both the eager and the lazy pool).
fn pg_pool_options() -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(30))
}

/// A database connection pool of either kind.
#[derive(Clone, Debug)]
pub enum Store {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// Runs `$body` with `$pool` bound to whichever pool the store holds: for
/// statements both dialects read alike.
macro_rules! on_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match $store {
            Store::Postgres($pool) => $body,
            Store::Sqlite($pool) => $body,
        }
    };
}
use on_pool;

impl Store {
    /// Connects to `postgres://…`, `sqlite://…` or a plain file path (SQLite,
    /// created if missing, WAL journal). Does not migrate.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        if is_postgres_url(url) {
            let opts = pg_connect::pg_options(url)?;
            let pool = pg_pool_options()
                .connect_with(opts.clone())
                .await
                .map_err(|e| pg_connect::describe_connect_error(&e, &opts))?;
            return Ok(Store::Postgres(pool));
        }
        let url = if url.starts_with("sqlite:") {
            url.to_string()
        } else {
            format!("sqlite://{url}")
        };
        let opts = SqliteConnectOptions::from_str(&url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(60))
            .pragma("cache_size", "-16384");
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(60))
            .connect_with(opts)
            .await
            .map_err(|e| anyhow::anyhow!("cannot open SQLite database {url}: {e}"))?;
        Ok(Store::Sqlite(pool))
    }

    /// Like [`Store::connect`], but a PostgreSQL pool connects on first use:
    /// for the operator, which starts (and answers `/healthz`) while the
    /// database is down. Errors only on a malformed URL or CA path.
    pub async fn connect_lazy(url: &str) -> anyhow::Result<Self> {
        if is_postgres_url(url) {
            let opts = pg_connect::pg_options(url)?;
            return Ok(Store::Postgres(pg_pool_options().connect_lazy_with(opts)));
        }
        Self::connect(url).await
    }

    /// Checks that a connection can be made now, with a plain message when
    /// not (connection refused, TLS refused, wrong CA). One attempt, outside
    /// the pool: the pool would retry until its acquire timeout and then say
    /// only that it timed out.
    pub async fn check_connection(&self) -> anyhow::Result<()> {
        use sqlx::Connection as _;
        match self {
            Store::Postgres(p) => {
                let opts = p.connect_options();
                let attempt = sqlx::PgConnection::connect_with(&opts);
                match tokio::time::timeout(Duration::from_secs(15), attempt).await {
                    Ok(Ok(c)) => {
                        let _ = c.close().await;
                        Ok(())
                    }
                    Ok(Err(e)) => Err(pg_connect::describe_connect_error(&e, &opts)),
                    Err(_) => anyhow::bail!(
                        "cannot connect to PostgreSQL at {}:{}: no answer within 15 s",
                        opts.get_host(),
                        opts.get_port()
                    ),
                }
            }
            Store::Sqlite(p) => Ok(p.acquire().await.map(drop)?),
        }
    }

    /// Whether this store's connections are encrypted (SQLite: a local file, true).
    pub async fn uses_tls(&self) -> anyhow::Result<bool> {
        match self {
            Store::Postgres(p) => Ok(sqlx::query_scalar::<_, bool>(
                "SELECT coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)",
            )
            .fetch_one(p)
            .await?),
            Store::Sqlite(_) => Ok(true),
        }
    }

    /// Applies the migrations of this store's kind.
    pub async fn migrate(&self) -> anyhow::Result<()> {
        match self {
            Store::Postgres(p) => sqlx::migrate!("./migrations/postgres").run(p).await?,
            Store::Sqlite(p) => {
                // Several `local` runs may open a new file at once; sqlx takes
                // no migration lock on SQLite, so each would apply migration 1.
                let path = sqlite::path_of(p);
                let lock = tokio::task::spawn_blocking(move || sqlite::MigrationLock::take(&path)).await??;
                sqlx::migrate!("./migrations/sqlite").run(p).await?;
                drop(lock);
            }
        }
        Ok(())
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, Store::Postgres(_))
    }

    /// Closes the pool, waiting for connections to be returned.
    pub async fn close(&self) {
        on_pool!(self, p => p.close().await)
    }
}
