//! [`Store`]: the import's request quota and counters (the scheme is in
//! [`crate::quota`]; the reservation, which reads a clock, is per dialect).

use super::{on_pool, postgres, records::QuotaCounters, sqlite, Store};
use std::future::Future;

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

    /// Reserves the next request slot of the import's quota (one atomic
    /// statement; see [`crate::quota`]). PostgreSQL uses the database clock, so
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
