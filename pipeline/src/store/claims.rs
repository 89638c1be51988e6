//! [`Store`]: enrichment work. Planning a shard (its lookups), claiming
//! batches of pending lookups by search stage, and saving their results.

use super::{
    on_pool, postgres, postgres_answered,
    records::{Claim, Claimed, Saved, ShardPlan},
    sqlite, Store,
};
use crate::model::Stage;

impl Store {
    /// [`Store::plan_shard`] for a provider that answers at once (the offline
    /// index): the shard's coordinates are written already answered (see
    /// `sqlite/bulk.rs` and `postgres_answered.rs`).
    pub async fn plan_shard_answered(
        &self,
        import_id: i64,
        shard: i32,
        answer: impl Fn(&[Claimed]) -> Vec<Saved> + Send + 'static,
    ) -> anyhow::Result<ShardPlan> {
        match self {
            Store::Sqlite(p) => match sqlite::plan_shard_answered(p, import_id, shard, answer).await? {
                Some(plan) => Ok(plan),
                None => self.plan_shard(import_id, shard).await,
            },
            Store::Postgres(p) => {
                match postgres_answered::plan_shard_answered(p, import_id, shard, answer).await? {
                    Some(plan) => Ok(plan),
                    None => self.plan_shard(import_id, shard).await,
                }
            }
        }
    }

    /// Plans a shard once: creates one pending lookup per distinct coordinate of
    /// the shard's valid rows (with its row count) and records the plan, in one
    /// transaction. Later calls (a resumed enricher) return the recorded plan.
    pub async fn plan_shard(&self, import_id: i64, shard: i32) -> anyhow::Result<ShardPlan> {
        match self {
            Store::Postgres(p) => postgres::plan_shard(p, import_id, shard).await,
            Store::Sqlite(p) => sqlite::plan_shard(p, import_id, shard).await,
        }
    }

    /// How many pending coordinates of the shard are at `stage`, counting at most `cap`.
    pub async fn pending_at_stage(
        &self,
        import_id: i64,
        shard: i32,
        stage: Stage,
        cap: i64,
    ) -> anyhow::Result<i64> {
        const SQL: &str = "SELECT COUNT(*) FROM (SELECT 1 FROM lookups WHERE import_id = $1 AND shard = $2 AND status = 'pending' AND stage = $3 LIMIT $4) t";
        let stage = stage.as_i16();
        let (n,): (i64,) = on_pool!(self, p => sqlx::query_as(SQL).bind(import_id).bind(shard).bind(stage).bind(cap).fetch_one(p).await)?;
        Ok(n)
    }

    /// Claims up to `limit` pending coordinates of the shard at `stage`, in
    /// (latitude, longitude) order.
    pub async fn claim(&self, import_id: i64, shard: i32, stage: Stage, limit: i64) -> anyhow::Result<Claim> {
        match self {
            Store::Postgres(p) => postgres::claim(p, import_id, shard, stage, limit).await,
            Store::Sqlite(p) => sqlite::claim(p, import_id, shard, stage, limit).await,
        }
    }

    /// Writes a claimed batch's results in one transaction (and releases the claim).
    pub async fn save(&self, claim: Claim, results: &[Saved]) -> anyhow::Result<()> {
        match self {
            Store::Postgres(p) => postgres::save(p, claim, results).await,
            Store::Sqlite(p) => sqlite::save(p, claim.import_id, results).await,
        }
    }
}
