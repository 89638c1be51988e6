//! [`Store`]: leases on an upstream API's concurrency limit and the limit's
//! adjustment (the scheme is in [`crate::concurrency`]). Each runs as one
//! transaction whose first statement writes the API's `api_quotas` row, so
//! it holds that row's lock (PostgreSQL) or the write lock (SQLite) from its
//! start: two clients never both see a free unit and both take it.
//!
//! Lease expiry is read on the client's clock ([`now_s`]): it only ends the
//! leases of vanished clients, [`crate::concurrency::LEASE_GRACE`] after their
//! request's timeout, so seconds of skew between machines do not matter.

use std::time::Duration;

use super::{on_pool, quota::api_key, Store};
use crate::{
    answer_cache::now_s,
    concurrency::{next_limit, next_min_latency, Ended},
};

/// Creates the API's row when missing and locks it: returns its limit and baseline.
const LOCK_API: &str = "INSERT INTO api_quotas (api_url) VALUES ($1)
     ON CONFLICT (api_url) DO UPDATE SET concurrency_limit = api_quotas.concurrency_limit
     RETURNING concurrency_limit, min_latency_s";

impl Store {
    /// Takes a lease on one unit of the concurrency limit of the API at
    /// `base_url`, held at most `hold` unless ended sooner: `(lease id,
    /// leases held including it)`, or `None` while the API has as many
    /// requests in flight as its limit.
    pub async fn take_lease(&self, base_url: &str, hold: Duration) -> anyhow::Result<Option<(i64, i64)>> {
        const EXPIRED: &str = "DELETE FROM api_leases WHERE api_url = $1 AND expires_at < $2";
        const HELD: &str = "SELECT COUNT(*) FROM api_leases WHERE api_url = $1";
        const TAKE: &str = "INSERT INTO api_leases (api_url, expires_at) VALUES ($1, $2) RETURNING id";
        let (api, now) = (api_key(base_url), now_s());
        // A read first: a client waiting for a unit does not take the write
        // lock (SQLite) or the row lock (PostgreSQL) on every try.
        if let Some((limit, held)) = self.api_concurrency(base_url).await? {
            if held as f64 >= limit.floor().max(1.0) {
                return Ok(None);
            }
        }
        on_pool!(self, p => async {
            let mut tx = p.begin().await?;
            let (limit, _): (f64, Option<f64>) = sqlx::query_as(LOCK_API).bind(api).fetch_one(&mut *tx).await?;
            sqlx::query(EXPIRED).bind(api).bind(now).execute(&mut *tx).await?;
            let (held,): (i64,) = sqlx::query_as(HELD).bind(api).fetch_one(&mut *tx).await?;
            if held as f64 >= limit.floor().max(1.0) {
                return Ok(None);
            }
            let (id,): (i64,) = sqlx::query_as(TAKE)
                .bind(api)
                .bind(now + hold.as_secs_f64())
                .fetch_one(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(Some((id, held + 1)))
        }.await)
    }

    /// Ends lease `id` now (`keep` zero), or `keep` from now (a timed-out
    /// request the server is presumably still working on).
    pub async fn end_lease(&self, id: i64, keep: Duration) -> anyhow::Result<()> {
        const END: &str = "DELETE FROM api_leases WHERE id = $1";
        const KEEP: &str = "UPDATE api_leases SET expires_at = $2 WHERE id = $1";
        if keep.is_zero() {
            on_pool!(self, p => sqlx::query(END).bind(id).execute(p).await.map(drop))?;
        } else {
            let until = now_s() + keep.as_secs_f64();
            on_pool!(self, p => sqlx::query(KEEP).bind(id).bind(until).execute(p).await.map(drop))?;
        }
        Ok(())
    }

    /// Adjusts the concurrency limit of the API at `base_url` after a request
    /// that ended as `ended`, sent with `in_flight` leases held
    /// ([`crate::concurrency::next_limit`]); returns the new limit.
    pub async fn adjust_limit(&self, base_url: &str, ended: Ended, in_flight: i64) -> anyhow::Result<f64> {
        const SET: &str =
            "UPDATE api_quotas SET concurrency_limit = $2, min_latency_s = $3 WHERE api_url = $1";
        let api = api_key(base_url);
        on_pool!(self, p => async {
            let mut tx = p.begin().await?;
            let (limit, min): (f64, Option<f64>) = sqlx::query_as(LOCK_API).bind(api).fetch_one(&mut *tx).await?;
            let min = match ended {
                Ended::Answered { latency_s } => Some(next_min_latency(min, latency_s)),
                Ended::TimedOut => min,
            };
            let next = next_limit(limit, min.unwrap_or(f64::MAX), ended, in_flight);
            sqlx::query(SET).bind(api).bind(next).bind(min).execute(&mut *tx).await?;
            tx.commit().await?;
            Ok(next)
        }.await)
    }

    /// The concurrency limit of the API at `base_url` and the leases held now
    /// (expired ones not counted): `None` when no client has used it.
    pub async fn api_concurrency(&self, base_url: &str) -> anyhow::Result<Option<(f64, i64)>> {
        const SQL: &str = "SELECT q.concurrency_limit, (SELECT COUNT(*) FROM api_leases l WHERE l.api_url = q.api_url AND l.expires_at >= $2) FROM api_quotas q WHERE q.api_url = $1";
        let row: Option<(f64, i64)> = on_pool!(self, p => sqlx::query_as(SQL).bind(api_key(base_url)).bind(now_s()).fetch_optional(p).await)?;
        Ok(row)
    }
}
