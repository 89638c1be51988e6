//! [`Store`]: the import's request quota and counters, and the quota of each
//! upstream API shared by all imports on the database (the scheme is in
//! [`crate::quota`]; the reservation, which reads a clock, is per dialect).

use super::{on_pool, postgres, records::QuotaCounters, sqlite, Store};
use std::{future::Future, sync::LazyLock};

/// The rate an API's quota stands at: the lower of the operator's and
/// `local`'s, whichever are written (requests/second).
const API_RATE: &str = "(CASE WHEN operator_rps IS NULL THEN local_rps WHEN local_rps IS NULL OR operator_rps < local_rps THEN operator_rps ELSE local_rps END)";

/// Takes the API's next slot no earlier than the import's: `$1` API URL, `$2`
/// the import's earliest slot, `$3` [`crate::quota::SPACING_MARGIN`]; returns
/// the slot and the API's rate (`* 1.0`: SQLite may hand back a whole REAL as
/// an INTEGER). No row (or no rate) when the API has no quota.
pub(super) static API_SLOT: LazyLock<String> = LazyLock::new(|| {
    let free = "(CASE WHEN next_at > paused_until THEN next_at ELSE paused_until END)";
    format!(
        "UPDATE api_quotas SET next_at = (CASE WHEN $2 > {free} THEN $2 ELSE {free} END) + $3 / {API_RATE}
         WHERE api_url = $1 AND {API_RATE} > 0
         RETURNING next_at - $3 / {API_RATE}, {API_RATE} * 1.0"
    )
});

/// The own quotas (requests/second) of the imports using the API `$1` that
/// reserved a slot after `$2` (now minus [`crate::quota::ACTIVE_WINDOW_S`]):
/// those its rate is shared among ([`crate::quota::share_rps`]).
pub(super) const API_ACTIVE: &str =
    "SELECT requests_per_second * 1.0 FROM quotas WHERE api_url = $1 AND active_at > $2";

/// Moves the import's `next_at` one interval past the slot taken and records
/// the rate it was spaced at: `$1` import, `$2` slot, `$3` interval (seconds),
/// `$4` the import's share (requests/second).
pub(super) const IMPORT_NEXT: &str =
    "UPDATE quotas SET next_at = $2 + $3, share_rps = $4 WHERE import_id = $1";

/// Who writes an API's quota ([`Store::set_api_quota`]); the lower of the two stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaWriter {
    /// The operator, from its `--api-quota` flag (Helm value `apiQuotas`).
    Operator,
    /// `postcode-operator local --quota-rps`.
    Local,
}

/// An API's quota key: its base URL without a trailing `/`.
pub fn api_key(base_url: &str) -> &str {
    base_url.trim_end_matches('/')
}

use crate::quota::{QuotaStore, Slot};

impl Store {
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

    /// Writes the quota of the API at `base_url` (requests per second, all
    /// imports on this database together) as `writer` sets it; the API's
    /// reservation state is kept.
    pub async fn set_api_quota(
        &self,
        base_url: &str,
        writer: QuotaWriter,
        requests_per_second: f64,
    ) -> anyhow::Result<()> {
        const OPERATOR: &str = "INSERT INTO api_quotas (api_url, operator_rps) VALUES ($1, $2) ON CONFLICT (api_url) DO UPDATE SET operator_rps = excluded.operator_rps";
        const LOCAL: &str = "INSERT INTO api_quotas (api_url, local_rps) VALUES ($1, $2) ON CONFLICT (api_url) DO UPDATE SET local_rps = excluded.local_rps";
        let sql = match writer {
            QuotaWriter::Operator => OPERATOR,
            QuotaWriter::Local => LOCAL,
        };
        on_pool!(self, p => sqlx::query(sql).bind(api_key(base_url)).bind(requests_per_second).execute(p).await.map(drop))?;
        Ok(())
    }

    /// The rate the quota of the API at `base_url` stands at (requests per
    /// second), `None` when none was written.
    pub async fn api_quota(&self, base_url: &str) -> anyhow::Result<Option<f64>> {
        static SQL: LazyLock<String> =
            LazyLock::new(|| format!("SELECT {API_RATE} FROM api_quotas WHERE api_url = $1"));
        let row: Option<(Option<f64>,)> = on_pool!(self, p => sqlx::query_as(SQL.as_str()).bind(api_key(base_url)).fetch_optional(p).await)?;
        Ok(row.and_then(|(r,)| r))
    }

    /// Makes every request of the import also take a slot of the quota of
    /// the API at `base_url` (when that API has one).
    pub async fn use_api_quota(&self, import_id: i64, base_url: &str) -> anyhow::Result<()> {
        const SQL: &str = "UPDATE quotas SET api_url = $2 WHERE import_id = $1";
        on_pool!(self, p => sqlx::query(SQL).bind(import_id).bind(api_key(base_url)).execute(p).await.map(drop))?;
        Ok(())
    }

    /// Reserves the next request slot of the import's quota and of its API's
    /// (one transaction; see [`crate::quota`]). PostgreSQL uses the database clock, so
    /// shards on different machines agree.
    pub async fn reserve(&self, import_id: i64) -> anyhow::Result<Slot> {
        let row = match self {
            Store::Postgres(p) => postgres::reserve(p, import_id).await?,
            Store::Sqlite(p) => sqlite::reserve(p, import_id).await?,
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
            Store::Postgres(p) => postgres::pause(p, import_id, seconds).await,
            Store::Sqlite(p) => sqlite::pause(p, import_id, seconds).await,
        }
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
        const SQL: &str = "SELECT requests, retries, throttled, share_rps FROM quotas WHERE import_id = $1";
        let row: Option<(i64, i64, i64, Option<f64>)> =
            on_pool!(self, p => sqlx::query_as(SQL).bind(import_id).fetch_optional(p).await)?;
        Ok(row
            .map(|(requests, retries, throttled, share_rps)| QuotaCounters {
                requests,
                retries,
                throttled,
                share_rps,
            })
            .unwrap_or_default())
    }

    /// Whether the import's request budget is spent.
    pub async fn budget_spent(&self, import_id: i64) -> anyhow::Result<bool> {
        const SQL: &str = "SELECT COUNT(*) FROM quotas WHERE import_id = $1 AND max_requests IS NOT NULL AND requests >= max_requests";
        let (n,): (i64,) = on_pool!(self, p => sqlx::query_as(SQL).bind(import_id).fetch_one(p).await)?;
        Ok(n > 0)
    }
}

/// [`crate::quota::Quota`] paces requests with these statements.
impl QuotaStore for Store {
    fn reserve(&self, import_id: i64) -> impl Future<Output = anyhow::Result<Slot>> + Send {
        Store::reserve(self, import_id)
    }

    fn release_slot(&self, import_id: i64) -> impl Future<Output = anyhow::Result<()>> + Send {
        Store::release_slot(self, import_id)
    }

    fn pause(&self, import_id: i64, seconds: f64) -> impl Future<Output = anyhow::Result<()>> + Send {
        Store::pause(self, import_id, seconds)
    }
}
