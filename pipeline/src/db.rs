//! Storage: PostgreSQL in a cluster, a SQLite file for the local runner; one
//! schema, migrations for both (`migrations/postgres`, `migrations/sqlite`).
//!
//! Tables: `uploads`/`upload_chunks` (CSV bytes), `imports`, `points` (every
//! input row, its fields and load status), `lookups` (one per distinct coordinate:
//! the unit of enrichment work and its result), `quotas` (the shared request
//! quota). The view `point_results` gives every row with its final status.

use std::{str::FromStr, time::Duration};

use futures::TryStreamExt;
use sqlx::{
    postgres::{PgPool, PgPoolOptions},
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous},
    Postgres, Row as _,
};
use tokio::sync::mpsc;

use crate::{
    csv_input::{Layout, Row},
    geo::shard_of,
    lookup::{Area, Match},
    quota::{interval_s, Slot},
    sqlite_bulk,
};

/// A database connection pool of either kind.
#[derive(Clone, Debug)]
pub enum Store {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// Runs `$body` with `$pool` bound to whichever pool the store holds.
macro_rules! on_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match $store {
            Store::Postgres($pool) => $body,
            Store::Sqlite($pool) => $body,
        }
    };
}

/// An import as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportRecord {
    pub id: i64,
    pub uid: String,
    pub name: String,
    pub source: String,
    pub source_sha256: Option<String>,
    pub shards: i32,
    pub phase: String,
    /// The user's column names (JSON in the table), `None` when headerless.
    pub header: Option<Vec<String>>,
    pub width: Option<i32>,
    pub lat_index: Option<i32>,
    pub lon_index: Option<i32>,
    pub rows_total: i64,
    pub rows_invalid: i64,
    pub error: Option<String>,
}

/// A coordinate claimed for enrichment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Claimed {
    pub lat: f64,
    pub lon: f64,
    pub stage: i16,
    pub attempts: i32,
}

/// A batch of claimed coordinates; on PostgreSQL the claim holds the rows locked
/// (`FOR UPDATE SKIP LOCKED`) until [`Store::save`] commits or the claim is dropped.
pub struct Claim {
    tx: Option<sqlx::Transaction<'static, Postgres>>,
    import_id: i64,
    pub items: Vec<Claimed>,
}

/// What became of one claimed coordinate.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // one per saved coordinate, moved once into a batch
pub enum Outcome {
    Enriched(Match),
    /// Nothing in range at this stage; try the next stage later.
    NextStage(i16),
    NoMatch,
    /// Not answered this time (e.g. missing from a response); stays pending.
    Retry(String),
    Failed(String),
}

/// The result of one claimed coordinate; `attempts` is the total requests made for it so far.
#[derive(Debug, Clone, PartialEq)]
pub struct Saved {
    pub lat: f64,
    pub lon: f64,
    pub attempts: i32,
    pub outcome: Outcome,
}

/// Row and coordinate counts by status.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub rows_total: i64,
    pub rows_invalid: i64,
    pub rows_pending: i64,
    pub rows_enriched: i64,
    pub rows_no_match: i64,
    pub rows_failed: i64,
    pub coordinates_total: i64,
    pub coordinates_done: i64,
}

/// Progress of one shard.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ShardCounts {
    pub shard: i32,
    pub rows: i64,
    pub done: i64,
    pub failed: i64,
}

/// The import's request counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct QuotaCounters {
    pub requests: i64,
    pub retries: i64,
    pub throttled: i64,
}

/// The lookups of one planned shard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShardPlan {
    /// Distinct coordinates (lookups) in the shard.
    pub coordinates: i64,
    /// Valid rows in the shard.
    pub rows: i64,
}

pub(crate) const PLANNED: &str =
    "SELECT coordinates, rows FROM shard_plans WHERE import_id = $1 AND shard = $2";
/// Inserts the shard's lookups (`$1` import, `$2` shard).
pub(crate) const PLAN: &str = "INSERT INTO lookups (import_id, lat, lon, shard, rows) SELECT import_id, lat, lon, shard, COUNT(*) FROM points WHERE import_id = $1 AND shard = $2 AND status = 'pending' GROUP BY import_id, shard, lat, lon ON CONFLICT DO NOTHING";
/// (coordinates, rows) of the shard's lookups.
pub(crate) const PLAN_COUNT: &str =
    "SELECT COUNT(*), COALESCE(SUM(rows), 0) FROM lookups WHERE import_id = $1 AND shard = $2";
pub(crate) const RECORD_PLAN: &str = "INSERT INTO shard_plans (import_id, shard, coordinates, rows) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING";

/// Rows written by a load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadCounts {
    pub rows: i64,
    pub invalid: i64,
}

fn now_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

const PG_TEXT_NULL: &str = "\\N";

/// Appends a value to a PostgreSQL COPY text-format line, escaped.
fn copy_text(buf: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => buf.push_str("\\\\"),
            '\t' => buf.push_str("\\t"),
            '\n' => buf.push_str("\\n"),
            '\r' => buf.push_str("\\r"),
            c => buf.push(c),
        }
    }
}

impl Store {
    /// Connects to `postgres://…`, `sqlite://…` or a plain file path (SQLite,
    /// created if missing, WAL journal). Does not migrate.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let pool = PgPoolOptions::new()
                .max_connections(8)
                .acquire_timeout(Duration::from_secs(30))
                .connect(url)
                .await
                .map_err(|e| anyhow::anyhow!("cannot connect to PostgreSQL: {e}"))?;
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

    /// Applies the migrations of this store's kind.
    pub async fn migrate(&self) -> anyhow::Result<()> {
        match self {
            Store::Postgres(p) => sqlx::migrate!("./migrations/postgres").run(p).await?,
            Store::Sqlite(p) => sqlx::migrate!("./migrations/sqlite").run(p).await?,
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

    // ---------------------------------------------------------------- imports

    /// Creates the import if it does not exist (by uid) and returns it.
    pub async fn ensure_import(
        &self,
        uid: &str,
        name: &str,
        source: &str,
        shards: i32,
    ) -> anyhow::Result<ImportRecord> {
        const SQL: &str = "INSERT INTO imports (uid, name, source, shards) VALUES ($1, $2, $3, $4) ON CONFLICT (uid) DO NOTHING";
        on_pool!(self, p => sqlx::query(SQL).bind(uid).bind(name).bind(source).bind(shards).execute(p).await.map(drop))?;
        self.import(uid)
            .await?
            .ok_or_else(|| anyhow::anyhow!("import {uid} vanished"))
    }

    /// The import with this uid, if any.
    pub async fn import(&self, uid: &str) -> anyhow::Result<Option<ImportRecord>> {
        const SQL: &str = "SELECT id, uid, name, source, source_sha256, shards, phase, header, width, lat_index, lon_index, rows_total, rows_invalid, error FROM imports WHERE uid = $1";
        macro_rules! get {
            ($row:expr) => {{
                let r = $row;
                let header: Option<String> = r.try_get("header")?;
                ImportRecord {
                    id: r.try_get("id")?,
                    uid: r.try_get("uid")?,
                    name: r.try_get("name")?,
                    source: r.try_get("source")?,
                    source_sha256: r.try_get("source_sha256")?,
                    shards: r.try_get("shards")?,
                    phase: r.try_get("phase")?,
                    header: header.map(|h| serde_json::from_str(&h)).transpose()?,
                    width: r.try_get("width")?,
                    lat_index: r.try_get("lat_index")?,
                    lon_index: r.try_get("lon_index")?,
                    rows_total: r.try_get("rows_total")?,
                    rows_invalid: r.try_get("rows_invalid")?,
                    error: r.try_get("error")?,
                }
            }};
        }
        let rec = on_pool!(self, p => match sqlx::query(SQL).bind(uid).fetch_optional(p).await? {
            Some(r) => Some(get!(r)),
            None => None,
        });
        Ok(rec)
    }

    /// Sets the source (and shard count) of an import that has not loaded yet, or is to be reloaded.
    pub async fn set_import_source(&self, id: i64, source: &str, shards: i32) -> anyhow::Result<()> {
        const SQL: &str = "UPDATE imports SET source = $2, shards = $3 WHERE id = $1";
        on_pool!(self, p => sqlx::query(SQL).bind(id).bind(source).bind(shards).execute(p).await.map(drop))?;
        Ok(())
    }

    /// Marks the import failed with a message for the user.
    pub async fn fail_import(&self, id: i64, message: &str) -> anyhow::Result<()> {
        const SQL: &str = "UPDATE imports SET phase = 'Failed', error = $2 WHERE id = $1";
        on_pool!(self, p => sqlx::query(SQL).bind(id).bind(message).execute(p).await.map(drop))?;
        Ok(())
    }

    /// Deletes the import and everything stored for it (rows, lookups, quota).
    pub async fn delete_import(&self, uid: &str) -> anyhow::Result<()> {
        let Some(imp) = self.import(uid).await? else {
            return Ok(());
        };
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            for sql in ["DELETE FROM points WHERE import_id = $1", "DELETE FROM lookups WHERE import_id = $1", "DELETE FROM shard_plans WHERE import_id = $1", "DELETE FROM quotas WHERE import_id = $1", "DELETE FROM imports WHERE id = $1"] {
                sqlx::query(sql).bind(imp.id).execute(&mut *tx).await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    // ---------------------------------------------------------------- load

    /// Replaces the import's rows with the batches received on `rows`: deletes
    /// what an earlier load wrote (rows, lookups, shard plans), writes every row
    /// (PostgreSQL `COPY` in one transaction; SQLite prepared inserts, committed
    /// in chunks while the phase says `Loading`) with its shard ([`shard_of`]),
    /// and sets the phase to `Loaded`. The lookups (one per distinct coordinate)
    /// are made by each shard's enricher: see [`Store::plan_shard`].
    #[allow(clippy::too_many_lines)] // TODO(issue 15): split in the store/provider redesign
    pub async fn load(
        &self,
        import: &ImportRecord,
        layout: &Layout,
        width: usize,
        done: impl std::future::Future<Output = anyhow::Result<String>>,
        mut rows: mpsc::Receiver<Vec<Row>>,
    ) -> anyhow::Result<LoadCounts> {
        let id = import.id;
        let shards = u32::try_from(import.shards.max(1)).unwrap_or(1);
        let header = layout.header.as_ref().map(serde_json::to_string).transpose()?;
        let delim = (layout.delimiter as char).to_string();
        const START: &str = "UPDATE imports SET phase = 'Loading', error = NULL, delimiter = $2, header = $3, width = $4, lat_index = $5, lon_index = $6, rows_total = 0, rows_invalid = 0 WHERE id = $1";
        const DELETES: [&str; 3] = [
            "DELETE FROM points WHERE import_id = $1",
            "DELETE FROM lookups WHERE import_id = $1",
            "DELETE FROM shard_plans WHERE import_id = $1",
        ];
        const DONE: &str = "UPDATE imports SET phase = 'Loaded', rows_total = $2, rows_invalid = $3, source_sha256 = $4 WHERE id = $1";
        let mut counts = LoadCounts::default();
        let count = |counts: &mut LoadCounts, r: &Row| {
            counts.rows += 1;
            if r.coordinate.is_err() {
                counts.invalid += 1;
            }
        };
        match self {
            Store::Postgres(p) => {
                let mut tx = p.begin().await?;
                sqlx::query(START)
                    .bind(id)
                    .bind(&delim)
                    .bind(&header)
                    .bind(width as i32)
                    .bind(layout.lat_index as i32)
                    .bind(layout.lon_index as i32)
                    .execute(&mut *tx)
                    .await?;
                for sql in DELETES {
                    sqlx::query(sql).bind(id).execute(&mut *tx).await?;
                }
                {
                    let mut copy = tx
                        .copy_in_raw("COPY points (import_id, row_number, line, fields, lat, lon, shard, status, error) FROM STDIN WITH (FORMAT text)")
                        .await?;
                    let mut buf = String::with_capacity(1 << 20);
                    while let Some(batch) = rows.recv().await {
                        for r in &batch {
                            count(&mut counts, r);
                            use std::fmt::Write;
                            let _ = write!(buf, "{id}\t{}\t{}\t", r.row_number, r.line);
                            copy_text(&mut buf, &r.fields);
                            match &r.coordinate {
                                Ok((lat, lon)) => {
                                    let _ = writeln!(
                                        buf,
                                        "\t{lat}\t{lon}\t{}\tpending\t{PG_TEXT_NULL}",
                                        shard_of(*lat, *lon, shards)
                                    );
                                }
                                Err(e) => {
                                    let _ = write!(
                                        buf,
                                        "\t{PG_TEXT_NULL}\t{PG_TEXT_NULL}\t{PG_TEXT_NULL}\tinvalid\t"
                                    );
                                    copy_text(&mut buf, e);
                                    buf.push('\n');
                                }
                            }
                        }
                        if buf.len() >= 1 << 20 {
                            copy.send(buf.as_bytes()).await?;
                            buf.clear();
                        }
                    }
                    if !buf.is_empty() {
                        copy.send(buf.as_bytes()).await?;
                    }
                    copy.finish().await?;
                }
                let sha = done.await?;
                sqlx::query(DONE)
                    .bind(id)
                    .bind(counts.rows)
                    .bind(counts.invalid)
                    .bind(sha)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
            }
            Store::Sqlite(p) => {
                let mut tx = p.begin().await?;
                sqlx::query(START)
                    .bind(id)
                    .bind(&delim)
                    .bind(&header)
                    .bind(width as i32)
                    .bind(layout.lat_index as i32)
                    .bind(layout.lon_index as i32)
                    .execute(&mut *tx)
                    .await?;
                for sql in DELETES {
                    sqlx::query(sql).bind(id).execute(&mut *tx).await?;
                }
                tx.commit().await?;
                let path = sqlite_bulk::path_of(p);
                let (conn, written) =
                    tokio::task::spawn_blocking(move || sqlite_bulk::insert_points(&path, id, shards, rows))
                        .await??;
                counts = written;
                let sha = done.await?;
                tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                    // `$n` are named parameters in SQLite, numbered by first appearance: bind by name.
                    conn.execute(DONE, rusqlite::named_params! {"$1": id, "$2": counts.rows, "$3": counts.invalid, "$4": sha})?;
                    Ok(())
                })
                .await??;
            }
        }
        Ok(counts)
    }

    // ---------------------------------------------------------------- quota

    /// Sets the import's quota (requests per second, optional total budget);
    /// keeps the counters and the reservation state.
    pub async fn set_quota(
        &self,
        import_id: i64,
        requests_per_second: f64,
        max_requests: Option<i64>,
    ) -> anyhow::Result<()> {
        const SQL: &str = "INSERT INTO quotas (import_id, requests_per_second, max_requests) VALUES ($1, $2, $3) ON CONFLICT (import_id) DO UPDATE SET requests_per_second = excluded.requests_per_second, max_requests = excluded.max_requests";
        on_pool!(self, p => sqlx::query(SQL).bind(import_id).bind(requests_per_second).bind(max_requests).execute(p).await.map(drop))?;
        Ok(())
    }

    /// Creates the import's quota row if it has none (an enricher started
    /// without the operator or the local runner having set one).
    pub async fn ensure_quota(
        &self,
        import_id: i64,
        requests_per_second: f64,
        max_requests: Option<i64>,
    ) -> anyhow::Result<()> {
        const SQL: &str = "INSERT INTO quotas (import_id, requests_per_second, max_requests) VALUES ($1, $2, $3) ON CONFLICT (import_id) DO NOTHING";
        on_pool!(self, p => sqlx::query(SQL).bind(import_id).bind(requests_per_second).bind(max_requests).execute(p).await.map(drop))?;
        Ok(())
    }

    /// Reserves the next request slot of the import's quota (one atomic
    /// statement; see [`crate::quota`]). PostgreSQL uses the database clock, so
    /// shards on different machines agree.
    pub async fn reserve(&self, import_id: i64) -> anyhow::Result<Slot> {
        let row: Option<(f64, f64)> = match self {
            Store::Postgres(p) => sqlx::query_as(
                "WITH c AS (SELECT extract(epoch FROM clock_timestamp())::float8 AS now)
                 UPDATE quotas q SET next_at = GREATEST(c.now, q.next_at, q.paused_until) + $2 / q.requests_per_second, requests = q.requests + 1
                 FROM c WHERE q.import_id = $1 AND (q.max_requests IS NULL OR q.requests < q.max_requests)
                 RETURNING q.next_at - $2 / q.requests_per_second, c.now",
            )
            .bind(import_id)
            .bind(interval_s(1.0))
            .fetch_optional(p)
            .await?,
            Store::Sqlite(p) => {
                let now = now_s();
                sqlx::query_as(
                    "UPDATE quotas SET next_at = max($2, next_at, paused_until) + $3 / requests_per_second, requests = requests + 1
                     WHERE import_id = $1 AND (max_requests IS NULL OR requests < max_requests)
                     RETURNING next_at - $3 / requests_per_second, $2",
                )
                .bind(import_id)
                .bind(now)
                .bind(interval_s(1.0))
                .fetch_optional(p)
                .await?
            }
        };
        Ok(match row {
            Some((at, now)) => Slot::At { at, now },
            None => Slot::Exhausted,
        })
    }

    /// Gives back a reserved slot that was not used (its request was not sent):
    /// the request counter and budget get it back; the slot's time stays spent.
    pub async fn release_slot(&self, import_id: i64) -> anyhow::Result<()> {
        const SQL: &str = "UPDATE quotas SET requests = requests - 1 WHERE import_id = $1 AND requests > 0";
        on_pool!(self, p => sqlx::query(SQL).bind(import_id).execute(p).await.map(drop))?;
        Ok(())
    }

    /// Pauses every shard of the import for `seconds` (a 429's Retry-After).
    pub async fn pause(&self, import_id: i64, seconds: f64) -> anyhow::Result<()> {
        match self {
            Store::Postgres(p) => {
                sqlx::query("UPDATE quotas SET paused_until = GREATEST(paused_until, extract(epoch FROM clock_timestamp())::float8 + $2) WHERE import_id = $1")
                    .bind(import_id).bind(seconds).execute(p).await?;
            }
            Store::Sqlite(p) => {
                sqlx::query("UPDATE quotas SET paused_until = max(paused_until, $2) WHERE import_id = $1")
                    .bind(import_id)
                    .bind(now_s() + seconds)
                    .execute(p)
                    .await?;
            }
        }
        Ok(())
    }

    /// Adds to the import's retry and 429 counters.
    pub async fn count_retries(&self, import_id: i64, retries: i64, throttled: i64) -> anyhow::Result<()> {
        const SQL: &str =
            "UPDATE quotas SET retries = retries + $2, throttled = throttled + $3 WHERE import_id = $1";
        on_pool!(self, p => sqlx::query(SQL).bind(import_id).bind(retries).bind(throttled).execute(p).await.map(drop))?;
        Ok(())
    }

    /// The import's request counters (zero when it has no quota row).
    pub async fn quota_counters(&self, import_id: i64) -> anyhow::Result<QuotaCounters> {
        const SQL: &str = "SELECT requests, retries, throttled FROM quotas WHERE import_id = $1";
        let row: Option<(i64, i64, i64)> =
            on_pool!(self, p => sqlx::query_as(SQL).bind(import_id).fetch_optional(p).await)?;
        Ok(row
            .map(|(requests, retries, throttled)| QuotaCounters {
                requests,
                retries,
                throttled,
            })
            .unwrap_or_default())
    }

    /// Whether the import's request budget is spent.
    pub async fn budget_spent(&self, import_id: i64) -> anyhow::Result<bool> {
        const SQL: &str = "SELECT COUNT(*) FROM quotas WHERE import_id = $1 AND max_requests IS NOT NULL AND requests >= max_requests";
        let (n,): (i64,) = on_pool!(self, p => sqlx::query_as(SQL).bind(import_id).fetch_one(p).await)?;
        Ok(n > 0)
    }

    // ---------------------------------------------------------------- enrichment

    /// [`Store::plan_shard`] for a provider that answers at once (the offline
    /// index): on SQLite the shard's coordinates are written already answered
    /// (see [`sqlite_bulk::plan_shard_answered`]); elsewhere this just plans.
    pub async fn plan_shard_answered(
        &self,
        import_id: i64,
        shard: i32,
        answer: impl Fn(&[Claimed]) -> Vec<Saved> + Send + 'static,
    ) -> anyhow::Result<ShardPlan> {
        match self {
            Store::Sqlite(p) => {
                let path = sqlite_bulk::path_of(p);
                let done = tokio::task::spawn_blocking(move || {
                    sqlite_bulk::plan_shard_answered(&path, import_id, shard, answer)
                })
                .await??;
                match done {
                    Some(plan) => Ok(plan),
                    None => self.plan_shard(import_id, shard).await,
                }
            }
            Store::Postgres(_) => self.plan_shard(import_id, shard).await,
        }
    }

    /// Plans a shard once: creates one pending lookup per distinct coordinate of
    /// the shard's valid rows (with its row count) and records the plan, in one
    /// transaction. Later calls (a resumed enricher) return the recorded plan.
    pub async fn plan_shard(&self, import_id: i64, shard: i32) -> anyhow::Result<ShardPlan> {
        match self {
            Store::Postgres(p) => {
                let mut tx = p.begin().await?;
                // Serialises two enrichers of one shard (a Job's replacement pod) until commit.
                sqlx::query("SELECT pg_advisory_xact_lock($1, $2)")
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
                let (coordinates, rows): (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(
                    PLAN_COUNT.replace("SUM(rows)", "SUM(rows)::int8"),
                ))
                .bind(import_id)
                .bind(shard)
                .fetch_one(&mut *tx)
                .await?;
                sqlx::query(RECORD_PLAN)
                    .bind(import_id)
                    .bind(shard)
                    .bind(coordinates)
                    .bind(rows)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(ShardPlan { coordinates, rows })
            }
            Store::Sqlite(p) => {
                let path = sqlite_bulk::path_of(p);
                tokio::task::spawn_blocking(move || sqlite_bulk::plan_shard(&path, import_id, shard)).await?
            }
        }
    }

    /// How many pending coordinates of the shard are at `stage`, counting at most `cap`.
    pub async fn pending_at_stage(
        &self,
        import_id: i64,
        shard: i32,
        stage: i16,
        cap: i64,
    ) -> anyhow::Result<i64> {
        const SQL: &str = "SELECT COUNT(*) FROM (SELECT 1 FROM lookups WHERE import_id = $1 AND shard = $2 AND status = 'pending' AND stage = $3 LIMIT $4) t";
        let (n,): (i64,) = on_pool!(self, p => sqlx::query_as(SQL).bind(import_id).bind(shard).bind(stage).bind(cap).fetch_one(p).await)?;
        Ok(n)
    }

    /// Claims up to `limit` pending coordinates of the shard at `stage`, in
    /// (latitude, longitude) order.
    pub async fn claim(&self, import_id: i64, shard: i32, stage: i16, limit: i64) -> anyhow::Result<Claim> {
        const SQL: &str = "SELECT lat, lon, stage, attempts FROM lookups WHERE import_id = $1 AND shard = $2 AND status = 'pending' AND stage = $3 ORDER BY lat, lon LIMIT $4";
        match self {
            Store::Postgres(p) => {
                let mut tx = p.begin().await?;
                let rows: Vec<(f64, f64, i16, i32)> =
                    sqlx::query_as(sqlx::AssertSqlSafe(format!("{SQL} FOR UPDATE SKIP LOCKED")))
                        .bind(import_id)
                        .bind(shard)
                        .bind(stage)
                        .bind(limit)
                        .fetch_all(&mut *tx)
                        .await?;
                let items = rows
                    .into_iter()
                    .map(|(lat, lon, stage, attempts)| Claimed {
                        lat,
                        lon,
                        stage,
                        attempts,
                    })
                    .collect();
                Ok(Claim {
                    tx: Some(tx),
                    import_id,
                    items,
                })
            }
            Store::Sqlite(p) => {
                // Without table statistics SQLite walks the primary key for the ORDER BY,
                // scanning every finished row on each claim; the claim index gives the same order.
                let sql = SQL.replace("FROM lookups", "FROM lookups INDEXED BY lookups_claim");
                let rows: Vec<(f64, f64, i16, i32)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
                    .bind(import_id)
                    .bind(shard)
                    .bind(stage)
                    .bind(limit)
                    .fetch_all(p)
                    .await?;
                let items = rows
                    .into_iter()
                    .map(|(lat, lon, stage, attempts)| Claimed {
                        lat,
                        lon,
                        stage,
                        attempts,
                    })
                    .collect();
                Ok(Claim {
                    tx: None,
                    import_id,
                    items,
                })
            }
        }
    }

    /// Writes a claimed batch's results in one transaction (and releases the claim).
    pub async fn save(&self, claim: Claim, results: &[Saved]) -> anyhow::Result<()> {
        let import_id = claim.import_id;
        match self {
            Store::Postgres(p) => {
                let mut tx = match claim.tx {
                    Some(tx) => tx,
                    None => p.begin().await?,
                };
                let mut sql = String::from(
                    "UPDATE lookups l SET status = v.status, stage = COALESCE(v.stage, l.stage), attempts = v.attempts, postcode = v.postcode, distance_m = v.distance_m, result = v.result, error = v.error",
                );
                for a in Area::COLUMNS {
                    sql.push_str(&format!(", {a} = v.{a}"));
                }
                sql.push_str(" FROM unnest($2::float8[], $3::float8[], $4::int4[], $5::text[], $6::int2[], $7::text[], $8::float8[], $9::text[], $10::text[]");
                for i in 0..Area::COLUMNS.len() {
                    sql.push_str(&format!(", ${}::text[]", 11 + i));
                }
                sql.push_str(") AS v(lat, lon, attempts, status, stage, postcode, distance_m, result, error");
                for a in Area::COLUMNS {
                    sql.push_str(&format!(", {a}"));
                }
                sql.push_str(") WHERE l.import_id = $1 AND l.lat = v.lat AND l.lon = v.lon");
                for chunk in results.chunks(5000) {
                    let c: Vec<Cols> = chunk.iter().map(Cols::of).collect();
                    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                        .bind(import_id)
                        .bind(chunk.iter().map(|s| s.lat).collect::<Vec<f64>>())
                        .bind(chunk.iter().map(|s| s.lon).collect::<Vec<f64>>())
                        .bind(chunk.iter().map(|s| s.attempts).collect::<Vec<i32>>())
                        .bind(c.iter().map(|c| c.status).collect::<Vec<&str>>())
                        .bind(c.iter().map(|c| c.stage).collect::<Vec<Option<i16>>>())
                        .bind(
                            c.iter()
                                .map(|c| c.m.map(|m| m.postcode.as_str()))
                                .collect::<Vec<Option<&str>>>(),
                        )
                        .bind(
                            c.iter()
                                .map(|c| c.m.map(|m| m.distance_m))
                                .collect::<Vec<Option<f64>>>(),
                        )
                        .bind(
                            c.iter()
                                .map(|c| c.m.and_then(|m| m.raw.as_deref()))
                                .collect::<Vec<Option<&str>>>(),
                        )
                        .bind(c.iter().map(|c| c.error).collect::<Vec<Option<&str>>>());
                    for i in 0..Area::COLUMNS.len() {
                        q = q.bind(c.iter().map(|c| c.area(i)).collect::<Vec<Option<&str>>>());
                    }
                    q.execute(&mut *tx).await?;
                }
                tx.commit().await?;
            }
            Store::Sqlite(p) => {
                let (path, results) = (sqlite_bulk::path_of(p), results.to_vec());
                tokio::task::spawn_blocking(move || sqlite_bulk::save(&path, import_id, &results)).await??;
            }
        }
        Ok(())
    }
}

/// The columns a [`Saved`] result writes.
pub(crate) struct Cols<'a> {
    pub(crate) status: &'static str,
    pub(crate) stage: Option<i16>,
    pub(crate) m: Option<&'a Match>,
    pub(crate) error: Option<&'a str>,
}

impl<'a> Cols<'a> {
    pub(crate) fn of(s: &'a Saved) -> Self {
        match &s.outcome {
            Outcome::Enriched(m) => Cols {
                status: "enriched",
                stage: None,
                m: Some(m),
                error: None,
            },
            Outcome::NextStage(st) => Cols {
                status: "pending",
                stage: Some(*st),
                m: None,
                error: None,
            },
            Outcome::NoMatch => Cols {
                status: "no_match",
                stage: None,
                m: None,
                error: None,
            },
            Outcome::Retry(e) => Cols {
                status: "pending",
                stage: None,
                m: None,
                error: Some(e),
            },
            Outcome::Failed(e) => Cols {
                status: "failed",
                stage: None,
                m: None,
                error: Some(e),
            },
        }
    }

    pub(crate) fn area(&self, i: usize) -> Option<&'a str> {
        self.m.and_then(|m| m.area.values()[i].as_deref())
    }
}

/// One row of the enriched output, as read from `point_results`.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ResultRow {
    pub row_number: i64,
    pub fields: String,
    pub status: String,
    pub postcode: Option<String>,
    pub distance_m: Option<f64>,
    pub outcode: Option<String>,
    pub incode: Option<String>,
    pub country: Option<String>,
    pub region: Option<String>,
    pub admin_district: Option<String>,
    pub admin_county: Option<String>,
    pub admin_ward: Option<String>,
    pub parish: Option<String>,
    pub parliamentary_constituency: Option<String>,
    pub lsoa: Option<String>,
    pub msoa: Option<String>,
    pub error: Option<String>,
}

impl Store {
    /// Row and coordinate counts of the import by status.
    pub async fn counts(&self, import: &ImportRecord) -> anyhow::Result<Counts> {
        const SQL: &str = "SELECT status, COUNT(*), COALESCE(SUM(rows), 0) FROM lookups WHERE import_id = $1 GROUP BY status";
        let rows: Vec<(String, i64, i64)> = match self {
            Store::Postgres(p) => {
                sqlx::query_as(sqlx::AssertSqlSafe(SQL.replace("SUM(rows)", "SUM(rows)::int8")))
                    .bind(import.id)
                    .fetch_all(p)
                    .await?
            }
            Store::Sqlite(p) => sqlx::query_as(SQL).bind(import.id).fetch_all(p).await?,
        };
        let (total, invalid): (i64, i64) = on_pool!(self, p => sqlx::query_as("SELECT rows_total, rows_invalid FROM imports WHERE id = $1").bind(import.id).fetch_one(p).await)?;
        let mut c = Counts {
            rows_total: total,
            rows_invalid: invalid,
            ..Counts::default()
        };
        for (status, coords, rows) in rows {
            c.coordinates_total += coords;
            match status.as_str() {
                "pending" => {}
                "enriched" => c.rows_enriched += rows,
                "no_match" => c.rows_no_match += rows,
                _ => c.rows_failed += rows,
            }
            if status != "pending" {
                c.coordinates_done += coords;
            }
        }
        // Rows of shards not planned yet have no lookup: count them as pending too.
        c.rows_pending = (total - invalid - c.rows_enriched - c.rows_no_match - c.rows_failed).max(0);
        Ok(c)
    }

    /// Rows, finished rows and failed rows per shard.
    pub async fn shard_counts(&self, import_id: i64) -> anyhow::Result<Vec<ShardCounts>> {
        const SQL: &str = "SELECT shard, COALESCE(SUM(rows), 0), COALESCE(SUM(CASE WHEN status <> 'pending' THEN rows ELSE 0 END), 0), COALESCE(SUM(CASE WHEN status = 'failed' THEN rows ELSE 0 END), 0) FROM lookups WHERE import_id = $1 GROUP BY shard ORDER BY shard";
        let rows: Vec<(i32, i64, i64, i64)> = match self {
            Store::Postgres(p) => {
                sqlx::query_as(sqlx::AssertSqlSafe(SQL.replace("), 0)", ")::int8, 0)")))
                    .bind(import_id)
                    .fetch_all(p)
                    .await?
            }
            Store::Sqlite(p) => sqlx::query_as(SQL).bind(import_id).fetch_all(p).await?,
        };
        Ok(rows
            .into_iter()
            .map(|(shard, rows, done, failed)| ShardCounts {
                shard,
                rows,
                done,
                failed,
            })
            .collect())
    }

    /// Number of pending coordinates in the shard (all of them when `shard` is
    /// `None`); for a shard not planned yet, its pending rows.
    pub async fn pending(&self, import_id: i64, shard: Option<i32>) -> anyhow::Result<i64> {
        if let Some(shard) = shard {
            let planned: Option<(i64, i64)> = on_pool!(self, p => sqlx::query_as(PLANNED).bind(import_id).bind(shard).fetch_optional(p).await)?;
            if planned.is_none() {
                const ROWS: &str =
                    "SELECT COUNT(*) FROM points WHERE import_id = $1 AND shard = $2 AND status = 'pending'";
                let (n,): (i64,) =
                    on_pool!(self, p => sqlx::query_as(ROWS).bind(import_id).bind(shard).fetch_one(p).await)?;
                return Ok(n);
            }
        }
        const SQL: &str = "SELECT COUNT(*) FROM lookups WHERE import_id = $1 AND status = 'pending' AND ($2 IS NULL OR shard = $2)";
        let (n,): (i64,) = match self {
            Store::Postgres(p) => {
                sqlx::query_as(sqlx::AssertSqlSafe(SQL.replace("$2 IS NULL", "$2::int4 IS NULL")))
                    .bind(import_id)
                    .bind(shard)
                    .fetch_one(p)
                    .await?
            }
            Store::Sqlite(p) => {
                sqlx::query_as(SQL)
                    .bind(import_id)
                    .bind(shard)
                    .fetch_one(p)
                    .await?
            }
        };
        Ok(n)
    }

    /// Puts the import's `failed` coordinates back to `pending` (attempts reset,
    /// search stage kept) and returns how many; finished work is never touched.
    pub async fn requeue_failed(&self, import_id: i64) -> anyhow::Result<u64> {
        const SQL: &str = "UPDATE lookups SET status = 'pending', attempts = 0, error = NULL WHERE import_id = $1 AND status = 'failed'";
        let r = on_pool!(self, p => sqlx::query(SQL).bind(import_id).execute(p).await?.rows_affected());
        Ok(r)
    }

    /// Streams the import's rows in row order to `sink`.
    pub async fn for_each_result(
        &self,
        import_id: i64,
        mut sink: impl FnMut(ResultRow) -> anyhow::Result<()>,
    ) -> anyhow::Result<u64> {
        const SQL: &str = "SELECT row_number, fields, status, postcode, distance_m, outcode, incode, country, region, admin_district, admin_county, admin_ward, parish, parliamentary_constituency, lsoa, msoa, error FROM point_results WHERE import_id = $1 ORDER BY row_number";
        let mut n = 0u64;
        match self {
            Store::Postgres(p) => {
                let mut stream = sqlx::query_as::<_, ResultRow>(SQL).bind(import_id).fetch(p);
                while let Some(row) = stream.try_next().await? {
                    sink(row)?;
                    n += 1;
                }
            }
            Store::Sqlite(p) => {
                const PAGE: usize = 4096;
                let path = sqlite_bulk::path_of(p);
                let (tx, mut pages) = mpsc::channel(4);
                let reader = tokio::task::spawn_blocking(move || {
                    let mut page = Vec::with_capacity(PAGE);
                    crate::sqlite_export::results(
                        &path,
                        import_id,
                        crate::sqlite_export::JOIN_BUDGET_BYTES,
                        |row| {
                            page.push(ResultRow::from(row));
                            Ok(page.len() < PAGE
                                || tx
                                    .blocking_send(std::mem::replace(&mut page, Vec::with_capacity(PAGE)))
                                    .is_ok())
                        },
                    )?;
                    if !page.is_empty() {
                        let _ = tx.blocking_send(page);
                    }
                    anyhow::Ok(())
                });
                while let Some(page) = pages.recv().await {
                    for row in page {
                        sink(row)?;
                        n += 1;
                    }
                }
                reader.await??;
            }
        }
        Ok(n)
    }

    /// Up to `limit` rows after row number `after`, in row order (keyset
    /// pagination on the primary key, for streaming an export in pages).
    pub async fn results_page(
        &self,
        import_id: i64,
        after: i64,
        limit: i64,
    ) -> anyhow::Result<Vec<ResultRow>> {
        const SQL: &str = "SELECT row_number, fields, status, postcode, distance_m, outcode, incode, country, region, admin_district, admin_county, admin_ward, parish, parliamentary_constituency, lsoa, msoa, error FROM point_results WHERE import_id = $1 AND row_number > $2 ORDER BY row_number LIMIT $3";
        let rows = on_pool!(self, p => sqlx::query_as::<_, ResultRow>(SQL).bind(import_id).bind(after).bind(limit).fetch_all(p).await?);
        Ok(rows)
    }

    // ---------------------------------------------------------------- uploads

    /// Starts an upload with this id.
    pub async fn create_upload(&self, id: &str) -> anyhow::Result<()> {
        on_pool!(self, p => sqlx::query("INSERT INTO uploads (id) VALUES ($1)").bind(id).execute(p).await.map(drop))?;
        Ok(())
    }

    /// Appends chunk number `seq` (0-based) of an upload.
    pub async fn append_upload_chunk(&self, id: &str, seq: i32, data: &[u8]) -> anyhow::Result<()> {
        const SQL: &str = "INSERT INTO upload_chunks (upload_id, seq, data) VALUES ($1, $2, $3)";
        on_pool!(self, p => sqlx::query(SQL).bind(id).bind(seq).bind(data).execute(p).await.map(drop))?;
        Ok(())
    }

    /// Marks an upload complete with its size in bytes and SHA-256 (hex).
    pub async fn finish_upload(&self, id: &str, size_bytes: i64, sha256: &str) -> anyhow::Result<()> {
        const SQL: &str = "UPDATE uploads SET size_bytes = $2, sha256 = $3, complete = TRUE WHERE id = $1";
        on_pool!(self, p => sqlx::query(SQL).bind(id).bind(size_bytes).bind(sha256).execute(p).await.map(drop))?;
        Ok(())
    }

    /// Deletes an upload and its chunks.
    pub async fn delete_upload(&self, id: &str) -> anyhow::Result<()> {
        on_pool!(self, p => {
            sqlx::query("DELETE FROM upload_chunks WHERE upload_id = $1").bind(id).execute(p).await?;
            sqlx::query("DELETE FROM uploads WHERE id = $1").bind(id).execute(p).await?;
        });
        Ok(())
    }

    /// Chunk `seq` of a complete upload, `None` past the end; errors when the upload is missing or incomplete.
    pub async fn upload_chunk(&self, id: &str, seq: i32) -> anyhow::Result<Option<Vec<u8>>> {
        if seq == 0 {
            let complete: Option<(bool,)> = on_pool!(self, p => sqlx::query_as("SELECT complete FROM uploads WHERE id = $1").bind(id).fetch_optional(p).await)?;
            match complete {
                None => anyhow::bail!("upload {id} does not exist"),
                Some((false,)) => anyhow::bail!("upload {id} is not complete"),
                Some((true,)) => {}
            }
        }
        const SQL: &str = "SELECT data FROM upload_chunks WHERE upload_id = $1 AND seq = $2";
        let row: Option<(Vec<u8>,)> =
            on_pool!(self, p => sqlx::query_as(SQL).bind(id).bind(seq).fetch_optional(p).await)?;
        Ok(row.map(|r| r.0))
    }
}

#[cfg(test)]
mod tests {
    use super::copy_text;

    #[test]
    fn copy_text_escapes_what_copy_would_misread() {
        let mut s = String::new();
        copy_text(&mut s, "a\tb\\c\nd\re");
        assert_eq!(s, "a\\tb\\\\c\\nd\\re");
    }
}
