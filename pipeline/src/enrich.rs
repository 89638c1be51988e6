//! The enricher: one shard's pending coordinates → nearest postcodes, within the
//! import's quota, with retries, resumable at any point.
//!
//! Work is claimed in batches of distinct coordinates (the provider's batch
//! size: 100 for postcodes.io, its bulk limit); each batch's results are
//! written in one transaction, so a killed enricher loses at most the batch in
//! flight. How a batch is answered is the provider's and the search ladder's
//! ([`crate::provider`], [`crate::ladder`]): a provider that answers locally
//! climbs the whole ladder at once, and on SQLite answers the shard while
//! planning it; one asked by request is asked one stage a request, each
//! request within the quota ([`crate::quota`]) and the API's concurrency limit
//! and timeout ([`crate::concurrency`]), and retried by [`crate::retry`]'s rules.

use std::{sync::Arc, time::Duration};

use crate::{
    answer_cache::{now_s, AnswerCache},
    concurrency::{Concurrency, ConcurrencyConfig},
    geo::LatLon,
    ladder::{self, stage_to_claim},
    lookup::SearchPlan,
    model::Stage,
    provider::{Answer, CallError, Provider},
    quota::{Acquired, Quota},
    retry::{RetryBudget, RetryPolicy, Tries, Verdict},
    store::{Claimed, Outcome, Saved, Store},
};

/// What one enricher does.
#[derive(Debug, Clone)]
pub struct ShardConfig {
    pub import_id: i64,
    pub shard: i32,
    pub plan: SearchPlan,
    pub retry: RetryPolicy,
    /// Answers reused from earlier imports and kept for later ones (a
    /// provider asked by request only); `None` disables both.
    pub cache: Option<AnswerCache>,
    /// The API's concurrency limit and adaptive timeouts (a provider asked by
    /// request); `None`: requests are bounded by the client's timeout alone.
    pub concurrency: Option<ConcurrencyConfig>,
}

/// How an enricher run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// No pending coordinate left in the shard.
    Done,
    /// The import's request budget is spent; unfinished coordinates stay pending.
    QuotaExhausted,
}

/// What this run of the enricher did (not cumulative across runs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RunStats {
    pub batches: u64,
    pub coordinates: u64,
    pub requests: u64,
    pub retries: u64,
    pub throttled: u64,
    /// Request slots given back because the sender woke too late.
    pub late_slots: u64,
    /// Coordinates answered from the answer cache, without a request.
    pub reused: u64,
}

/// Plans the shard if no run has yet ([`Store::plan_shard`]), then runs it to
/// completion (or until the budget is spent), calling `progress` after every saved batch.
pub async fn run_shard(
    store: &Store,
    provider: Arc<dyn Provider>,
    cfg: &ShardConfig,
    mut progress: impl FnMut(&RunStats),
) -> anyhow::Result<Finish> {
    tracing::debug!(shard = cfg.shard, provider = provider.name(), "enriching");
    plan(store, &provider, cfg).await?;
    let mut stats = RunStats::default();
    let cache = cfg.cache.as_ref().filter(|_| !provider.answers_locally());
    if let Some(cache) = cache {
        stats.reused = store
            .reuse_answers(cfg.import_id, cfg.shard, cache, now_s())
            .await?;
        tracing::info!(
            shard = cfg.shard,
            reused = stats.reused,
            "answers reused from earlier imports"
        );
    }
    let mut pace = Pacing {
        quota: Quota::new(store, cfg.import_id),
        budget: RetryBudget::default(),
        concurrency: cfg.concurrency.as_ref().map(|c| Concurrency::new(store, c)),
    };
    let batch = provider.batch_size() as i64;
    let pending = |stage, cap| store.pending_at_stage(cfg.import_id, cfg.shard, stage, cap);
    while let Some(stage) = stage_to_claim(batch, pending).await? {
        let claim = store.claim(cfg.import_id, cfg.shard, stage, batch).await?;
        if claim.items.is_empty() {
            // Another worker holds these rows (SKIP LOCKED); let it finish them.
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let results = if provider.answers_locally() {
            ladder::climb(&*provider, &cfg.plan, &claim.items).await
        } else {
            let asked = ask(&mut pace, store, &*provider, cfg, stage, &claim.items, &mut stats).await?;
            stats.late_slots = pace.quota.late_slots();
            let Some(results) = asked else {
                drop(claim); // rolls back: the batch stays pending for a later run
                return Ok(Finish::QuotaExhausted);
            };
            results
        };
        stats.batches += 1;
        stats.coordinates += results
            .iter()
            .filter(|r| !matches!(r.outcome, Outcome::NextStage(_) | Outcome::Retry(_)))
            .count() as u64;
        store.save(claim, &results).await?;
        progress(&stats);
    }
    if let Some(cache) = cache {
        store
            .keep_answers(cfg.import_id, cfg.shard, cache, now_s())
            .await?;
    }
    store.settle_shard_tallies(cfg.import_id, cfg.shard).await?;
    Ok(Finish::Done)
}

/// Plans the shard: for a provider that answers locally, answering its
/// coordinates in the same pass where the store can ([`Store::plan_shard_answered`]).
async fn plan(store: &Store, provider: &Arc<dyn Provider>, cfg: &ShardConfig) -> anyhow::Result<()> {
    if provider.answers_locally() {
        let (provider, plan) = (provider.clone(), cfg.plan);
        // Called on a blocking thread of the runtime, where waiting is allowed.
        let runtime = tokio::runtime::Handle::current();
        store
            .plan_shard_answered(cfg.import_id, cfg.shard, move |items| {
                runtime.block_on(ladder::climb(&*provider, &plan, items))
            })
            .await?;
    } else {
        store.plan_shard(cfg.import_id, cfg.shard).await?;
    }
    Ok(())
}

/// What paces one enricher's requests: the quota (import and API), the
/// retry budget ([`RetryBudget`]) and the API's concurrency limit.
struct Pacing<'a> {
    quota: Quota<'a, Store>,
    budget: RetryBudget,
    concurrency: Option<Concurrency<'a>>,
}

impl Pacing<'_> {
    /// Sends one request within the API's concurrency limit and timeout (when
    /// set): a lease first, then the quota's slot (a slot must not wait for a
    /// lease, or its send would be late). `None` when the request budget is
    /// spent; with the answer, how long a retry must wait at least (a
    /// timed-out request's server is still busy with it). The retry budget
    /// counts the request when it is sent (`retry`: it re-sends a failed one).
    async fn send(
        &mut self,
        provider: &dyn Provider,
        ats: &[LatLon],
        radius: crate::lookup::Radius,
        retry: bool,
    ) -> anyhow::Result<Option<(Result<Vec<Answer>, CallError>, Duration)>> {
        let Some(c) = self.concurrency.as_mut() else {
            if self.quota.acquire().await? == Acquired::Exhausted {
                return Ok(None);
            }
            self.budget.sent(tokio::time::Instant::now(), retry);
            return Ok(Some((provider.answer(ats, radius).await, Duration::ZERO)));
        };
        let lease = c.acquire().await?;
        if self.quota.acquire().await? == Acquired::Exhausted {
            c.failed(lease).await?;
            return Ok(None);
        }
        self.budget.sent(tokio::time::Instant::now(), retry);
        let timeout = c.timeout();
        let sent = tokio::time::Instant::now();
        let answer = match tokio::time::timeout(timeout, provider.answer(ats, radius)).await {
            Err(_) => {
                let wait = c.timed_out(lease, timeout).await?;
                let msg = format!("timeout: no answer within {:.1} s", timeout.as_secs_f64());
                return Ok(Some((Err(CallError::Transient(msg)), wait)));
            }
            Ok(answer) => answer,
        };
        match &answer {
            Err(CallError::Transient(_)) => c.failed(lease).await?,
            _ => c.answered(lease, sent.elapsed()).await?,
        }
        Ok(Some((answer, Duration::ZERO)))
    }
}

/// Asks a provider that answers by request for one batch at `stage`: each
/// request within the quota, failed ones retried. `None` when the request
/// budget ran out before an answer.
async fn ask(
    pace: &mut Pacing<'_>,
    store: &Store,
    provider: &dyn Provider,
    cfg: &ShardConfig,
    stage: Stage,
    items: &[Claimed],
    stats: &mut RunStats,
) -> anyhow::Result<Option<Vec<Saved>>> {
    let ats: Vec<LatLon> = items
        .iter()
        .map(|c| LatLon {
            lat: c.lat,
            lon: c.lon,
        })
        .collect();
    let radius = cfg.plan.radius(stage);
    let mut tries = Tries::new(cfg.retry);
    let answer = loop {
        let retry = tries.requests() > 0;
        let Some((answer, busy)) = pace.send(provider, &ats, radius, retry).await? else {
            count_tries(store, cfg, &tries, stats).await?;
            return Ok(None);
        };
        tries.sent();
        stats.requests += 1;
        let err = match answer {
            Ok(answers) => break Ok(answers),
            Err(e) => e,
        };
        let Verdict::Retry { wait, pause_all } = tries.failed(&err, rand::random()) else {
            break Err(err);
        };
        let wait = match pause_all {
            Some(pause) => {
                pace.quota.pause(pause).await?; // the next reservation honours it
                wait
            }
            // Over the retry budget, a retry waits for it (a failing server is not stormed).
            None => wait.max(pace.budget.wait_for_retry(tokio::time::Instant::now())),
        }
        .max(busy);
        stats.retries += 1;
        tracing::warn!(shard = cfg.shard, stage = stage.as_i16(), attempt = tries.attempts(), error = %err, "request failed; retrying in {:.2}s", wait.as_secs_f64());
        tokio::time::sleep(wait).await;
    };
    count_tries(store, cfg, &tries, stats).await?;
    Ok(Some(saved(cfg, stage, items, answer, tries.requests())))
}

/// Adds a batch's retries and 429s to the import's counters and this run's.
async fn count_tries(
    store: &Store,
    cfg: &ShardConfig,
    tries: &Tries,
    stats: &mut RunStats,
) -> anyhow::Result<()> {
    stats.throttled += u64::from(tries.throttled());
    if tries.retries() > 0 || tries.throttled() > 0 {
        let (retries, throttled) = (i64::from(tries.retries()), i64::from(tries.throttled()));
        store.count_retries(cfg.import_id, retries, throttled).await?;
    }
    Ok(())
}

/// What becomes of a batch asked at `stage` after `requests` requests: each
/// answer's step on the ladder, a coordinate left out asked again while it has
/// attempts left, every coordinate `failed` when the batch got no answer.
fn saved(
    cfg: &ShardConfig,
    stage: Stage,
    items: &[Claimed],
    answer: Result<Vec<Answer>, CallError>,
    requests: u32,
) -> Vec<Saved> {
    let made = i32::try_from(requests).unwrap_or(i32::MAX);
    let answers = match answer {
        Ok(answers) => answers,
        Err(e) => {
            let failed = Outcome::Failed(format!("{e} (after {made} requests)"));
            return items.iter().map(|c| saved_one(c, made, failed.clone())).collect();
        }
    };
    items
        .iter()
        .zip(answers)
        .map(|(c, a)| {
            let attempts = c.attempts.saturating_add(made);
            let outcome = match a {
                Answer::Found(m) => cfg.plan.step(stage, Some(m)).into(),
                Answer::NoPostcode => cfg.plan.step(stage, None).into(),
                Answer::Missing if cfg.retry.asks_again(attempts) => {
                    Outcome::Retry("not in the response".into())
                }
                Answer::Missing => Outcome::Failed(format!("not answered after {attempts} requests")),
            };
            saved_one(c, made, outcome)
        })
        .collect()
}

fn saved_one(c: &Claimed, made: i32, outcome: Outcome) -> Saved {
    Saved {
        lat: c.lat,
        lon: c.lon,
        attempts: c.attempts.saturating_add(made),
        outcome,
    }
}
