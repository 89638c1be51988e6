//! The enricher: one shard's pending coordinates → nearest postcodes, within the
//! import's quota, with retries, resumable at any point.
//!
//! Work is claimed in batches of distinct coordinates (100 for postcodes.io, its
//! bulk limit); each batch's results are written in one transaction, so a killed
//! enricher loses at most the batch in flight. Coordinates with nothing in range
//! move to the next search stage (maximum radius, then widesearch) and are asked
//! again in batches of their own stage, filled before partial ones are sent.

use std::{sync::Arc, time::Duration};

use rand::RngExt;

use crate::{
    geo::LatLon,
    lookup::{SearchPlan, MAX_BULK_GEOLOCATIONS},
    model::Stage,
    offline::OfflineIndex,
    postcodes_io::{Answer, CallError, PostcodesIo},
    quota::{Slot, LATE_TOLERANCE_S},
    retry::RetryPolicy,
    store::{Claimed, Outcome, Saved, Store},
};

/// Where answers come from.
#[derive(Clone)]
pub enum Provider {
    /// postcodes.io (or a compatible server), within the quota.
    Api(PostcodesIo),
    /// The offline ONS index; no requests, no quota.
    Offline(Arc<OfflineIndex>),
}

/// What one enricher does.
#[derive(Debug, Clone)]
pub struct ShardConfig {
    pub import_id: i64,
    pub shard: i32,
    pub plan: SearchPlan,
    pub retry: RetryPolicy,
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
    /// Request slots given back because the sender woke too late for them.
    pub late_slots: u64,
}

/// Slots given back in a row before a request is sent late anyway: a database
/// whose round trips always exceed the tolerance must not stop the import.
const MAX_LATE_STREAK: u32 = 20;

/// Coordinates a batch of the offline provider (no request limit applies).
const OFFLINE_BATCH: i64 = 4096;

/// The stage to claim next: a full batch of a later stage first, then stage 0,
/// then what is left of later stages; `None` when the shard is finished.
async fn next_stage(store: &Store, cfg: &ShardConfig, batch: i64) -> anyhow::Result<Option<Stage>> {
    for s in [Stage::Widesearch, Stage::MaxRadius] {
        if store.pending_at_stage(cfg.import_id, cfg.shard, s, batch).await? >= batch {
            return Ok(Some(s));
        }
    }
    for s in Stage::ALL {
        if store.pending_at_stage(cfg.import_id, cfg.shard, s, 1).await? > 0 {
            return Ok(Some(s));
        }
    }
    Ok(None)
}

/// Plans the shard if no run has yet ([`Store::plan_shard`]), then runs it to
/// completion (or until the budget is spent), calling `progress` after every saved batch.
pub async fn run_shard(
    store: &Store,
    provider: &Provider,
    cfg: &ShardConfig,
    mut progress: impl FnMut(&RunStats),
) -> anyhow::Result<Finish> {
    let mut stats = RunStats::default();
    match provider {
        Provider::Offline(index) => {
            let (index, plan) = (index.clone(), cfg.plan);
            store
                .plan_shard_answered(cfg.import_id, cfg.shard, move |items| {
                    offline_batch(&index, &plan, items)
                })
                .await?;
        }
        Provider::Api(_) => {
            store.plan_shard(cfg.import_id, cfg.shard).await?;
        }
    }
    let batch = match provider {
        Provider::Api(_) => MAX_BULK_GEOLOCATIONS as i64,
        Provider::Offline(_) => OFFLINE_BATCH,
    };
    while let Some(stage) = next_stage(store, cfg, batch).await? {
        let claim = store.claim(cfg.import_id, cfg.shard, stage, batch).await?;
        if claim.items.is_empty() {
            // Another worker holds these rows (SKIP LOCKED); let it finish them.
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let results = match provider {
            Provider::Offline(index) => offline_batch(index, &cfg.plan, &claim.items),
            Provider::Api(api) => match api_batch(store, api, cfg, stage, &claim.items, &mut stats).await? {
                Some(r) => r,
                None => {
                    drop(claim); // rolls back: the batch stays pending for a later run
                    return Ok(Finish::QuotaExhausted);
                }
            },
        };
        stats.batches += 1;
        stats.coordinates += results
            .iter()
            .filter(|r| !matches!(r.outcome, Outcome::NextStage(_) | Outcome::Retry(_)))
            .count() as u64;
        store.save(claim, &results).await?;
        progress(&stats);
    }
    Ok(Finish::Done)
}

/// Answers a batch from the offline index, running the whole search ladder at
/// once: stage by stage, each stage's coordinates asked together
/// ([`OfflineIndex::lookup_many`]).
pub fn offline_batch(index: &OfflineIndex, plan: &SearchPlan, items: &[Claimed]) -> Vec<Saved> {
    let mut stage: Vec<Option<Stage>> = items.iter().map(|c| Some(c.stage)).collect();
    let mut found: Vec<Option<crate::lookup::Match>> = vec![None; items.len()];
    // Stages only move forward (`next_stage` > the stage, or none): the loop ends.
    while let Some(s) = stage.iter().flatten().min().copied() {
        let asked: Vec<usize> = (0..items.len()).filter(|&i| stage[i] == Some(s)).collect();
        let ats: Vec<LatLon> = asked
            .iter()
            .map(|&i| LatLon {
                lat: items[i].lat,
                lon: items[i].lon,
            })
            .collect();
        for (&i, answer) in asked.iter().zip(index.lookup_many(&ats, plan.radius(s))) {
            match answer {
                Some(m) => {
                    found[i] = Some(m);
                    stage[i] = None;
                }
                None => stage[i] = plan.next_stage(s),
            }
        }
    }
    items
        .iter()
        .zip(found)
        .map(|(c, m)| Saved {
            lat: c.lat,
            lon: c.lon,
            attempts: c.attempts,
            outcome: m.map_or(Outcome::NoMatch, Outcome::Enriched),
        })
        .collect()
}

/// Asks postcodes.io for one batch, with quota, retries and backoff. `None` when
/// the request budget ran out before an answer.
#[allow(clippy::too_many_lines)] // TODO(issue 15): split in the store/provider redesign
async fn api_batch(
    store: &Store,
    api: &PostcodesIo,
    cfg: &ShardConfig,
    stage: Stage,
    items: &[Claimed],
    stats: &mut RunStats,
) -> anyhow::Result<Option<Vec<Saved>>> {
    let queries: Vec<(f64, f64)> = items.iter().map(|c| (c.lat, c.lon)).collect();
    let radius = cfg.plan.radius(stage);
    let (mut attempt, mut throttles) = (0u32, 0u32);
    let (mut retries, mut throttled) = (0i64, 0i64);
    let mut late_streak = 0u32;
    let answer = loop {
        let asked = tokio::time::Instant::now();
        let slot = store.reserve(cfg.import_id).await?;
        let answered = tokio::time::Instant::now();
        match slot {
            Slot::Exhausted => {
                store.count_retries(cfg.import_id, retries, throttled).await?;
                return Ok(None);
            }
            Slot::At { at, now } => {
                // `now` was read by the clock that reserved, somewhere between
                // `asked` and `answered`: the slot is at least `wait` after `asked`
                // and at most `wait` after `answered`. Sleep to the latter (never
                // early); the send is late by at most the time since the former.
                let wait = Duration::from_secs_f64((at - now).max(0.0));
                tokio::time::sleep_until(answered + wait).await;
                let late = tokio::time::Instant::now()
                    .duration_since(asked + wait)
                    .as_secs_f64();
                if late > LATE_TOLERANCE_S && late_streak < MAX_LATE_STREAK {
                    // Too late for this slot (a slow wake-up or a slow reservation):
                    // sending now could crowd the next second (see crate::quota).
                    // Give it back and take a new one.
                    store.release_slot(cfg.import_id).await?;
                    stats.late_slots += 1;
                    late_streak += 1;
                    continue;
                }
                if late_streak >= MAX_LATE_STREAK {
                    tracing::warn!(
                        shard = cfg.shard,
                        late_s = late,
                        "quota slots keep arriving late (slow database round trips?); sending anyway"
                    );
                }
                late_streak = 0;
            }
        }
        attempt += 1;
        stats.requests += 1;
        let err = match api.bulk_reverse(&queries, radius).await {
            Ok(answers) => break Ok(answers),
            Err(e) => e,
        };
        let jitter: f64 = rand::rng().random();
        let wait = match &err {
            CallError::Permanent(_) => break Err(err),
            CallError::Throttled { retry_after } => {
                throttles += 1;
                throttled += 1;
                // A 429 is the server asking for patience, not a fault: it counts
                // against a much larger allowance than other errors.
                if throttles > cfg.retry.max_attempts * 4 {
                    break Err(err);
                }
                attempt -= 1;
                let pause = cfg.retry.delay(throttles, *retry_after, jitter);
                store.pause(cfg.import_id, pause.as_secs_f64()).await?;
                Duration::ZERO // the reservation honours the shared pause
            }
            CallError::Transient(_) => {
                if !cfg.retry.allows(attempt + 1) {
                    break Err(err);
                }
                cfg.retry.delay(attempt, None, jitter)
            }
        };
        retries += 1;
        stats.retries += 1;
        tracing::warn!(shard = cfg.shard, stage = stage.as_i16(), attempt, error = %err, "request failed; retrying in {:.2}s", wait.as_secs_f64());
        tokio::time::sleep(wait).await;
    };
    stats.throttled += throttled as u64;
    if retries > 0 || throttled > 0 {
        store.count_retries(cfg.import_id, retries, throttled).await?;
    }
    let made = i32::try_from(attempt + throttles).unwrap_or(i32::MAX);
    Ok(Some(match answer {
        Ok(answers) => items
            .iter()
            .zip(answers)
            .map(|(c, a)| {
                let attempts = c.attempts.saturating_add(made);
                let outcome = match a {
                    Answer::Found(m) => Outcome::Enriched(m),
                    Answer::NoPostcode => cfg
                        .plan
                        .next_stage(stage)
                        .map_or(Outcome::NoMatch, Outcome::NextStage),
                    Answer::Missing if (attempts as u32) < cfg.retry.max_attempts => {
                        Outcome::Retry("not in the response".into())
                    }
                    Answer::Missing => Outcome::Failed(format!("not answered after {attempts} requests")),
                };
                Saved {
                    lat: c.lat,
                    lon: c.lon,
                    attempts,
                    outcome,
                }
            })
            .collect(),
        Err(e) => items
            .iter()
            .map(|c| Saved {
                lat: c.lat,
                lon: c.lon,
                attempts: c.attempts.saturating_add(made),
                outcome: Outcome::Failed(format!("{e} (after {made} requests)")),
            })
            .collect(),
    }))
}
