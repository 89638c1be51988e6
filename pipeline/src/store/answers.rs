//! [`Store`]: the answers kept across imports ([`crate::answer_cache`]). Both
//! dialects read these statements alike (SQLite ≥ 3.33 has `UPDATE … FROM`).

use std::sync::LazyLock;

use super::{on_pool, sqlite, tallies, Store};
use crate::{answer_cache::AnswerCache, lookup::Area, model::RowStatus};

/// The answer columns an `answers` row holds, in this order.
static KEPT: LazyLock<Vec<&'static str>> = LazyLock::new(|| {
    ["status", "postcode", "distance_m", "result"]
        .into_iter()
        .chain(Area::COLUMNS)
        .collect()
});

/// Pending lookups of one shard take a kept answer: `$1` import, `$2` shard,
/// `$3` provider, `$4` search, `$5` oldest `answered_at` reused. Run with
/// the tallies moved ([`tallies`]).
static REUSE: LazyLock<String> = LazyLock::new(|| {
    let set: Vec<String> = KEPT.iter().map(|c| format!("{c} = a.{c}")).collect();
    format!(
        "UPDATE lookups SET {}, error = NULL FROM answers a
         WHERE lookups.import_id = $1 AND lookups.shard = $2 AND lookups.status = 'pending'
           AND a.provider = $3 AND a.search = $4 AND a.lat = lookups.lat AND a.lon = lookups.lon
           AND a.answered_at >= $5",
        set.join(", ")
    )
});

/// A finished shard's final answers are kept: `$1` import, `$2` shard, `$3`
/// provider, `$4` search, `$5` now, `$6` oldest `answered_at` still fresh (a
/// fresh kept answer, which is where a reused one came from, keeps its age).
static KEEP: LazyLock<String> = LazyLock::new(|| {
    let cols = KEPT.join(", ");
    let set: Vec<String> = KEPT.iter().map(|c| format!("{c} = excluded.{c}")).collect();
    format!(
        "INSERT INTO answers (provider, search, lat, lon, answered_at, {cols})
         SELECT $3, $4, lat, lon, $5, {cols} FROM lookups
         WHERE import_id = $1 AND shard = $2 AND status IN ('enriched', 'no_match')
         ON CONFLICT (provider, search, lat, lon) DO UPDATE SET answered_at = excluded.answered_at, {}
         WHERE answers.answered_at < $6",
        set.join(", ")
    )
});

impl Store {
    /// Gives the shard's pending coordinates the answers `cache` holds for
    /// them, up to its maximum age at `now` (seconds since the Unix epoch);
    /// returns how many coordinates were answered so (they need no request).
    pub async fn reuse_answers(
        &self,
        import_id: i64,
        shard: i32,
        cache: &AnswerCache,
        now: f64,
    ) -> anyhow::Result<u64> {
        let oldest = cache.oldest_reused(now);
        match self {
            Store::Postgres(p) => {
                static SQL: LazyLock<String> =
                    LazyLock::new(|| tallies::pg_moving(&REUSE, "lookups", RowStatus::Pending));
                let (n,): (i64,) = sqlx::query_as(SQL.as_str())
                    .bind(import_id)
                    .bind(shard)
                    .bind(&cache.provider)
                    .bind(&cache.search)
                    .bind(oldest)
                    .fetch_one(p)
                    .await?;
                Ok(n as u64)
            }
            Store::Sqlite(p) => {
                use rusqlite::types::Value;
                let sql = format!("{} {}", *REUSE, tallies::SQLITE_RETURNING);
                let params = vec![
                    Value::Integer(import_id),
                    Value::Integer(shard.into()),
                    Value::Text(cache.provider.clone()),
                    Value::Text(cache.search.clone()),
                    Value::Real(oldest),
                ];
                sqlite::moving(p, import_id, sql, params, RowStatus::Pending).await
            }
        }
    }

    /// Keeps the shard's final answers (`enriched`, `no_match`) in `cache`,
    /// answered at `now`; an answer kept earlier and still fresh is left as it
    /// is. Returns how many were written.
    pub async fn keep_answers(
        &self,
        import_id: i64,
        shard: i32,
        cache: &AnswerCache,
        now: f64,
    ) -> anyhow::Result<u64> {
        let oldest = cache.oldest_reused(now);
        let n = on_pool!(self, p => sqlx::query(KEEP.as_str())
            .bind(import_id).bind(shard).bind(&cache.provider).bind(&cache.search).bind(now).bind(oldest)
            .execute(p).await?.rows_affected());
        Ok(n)
    }
}
