//! The reconciler of `PostcodeImport`s: Pending → Loading (reader Job) →
//! Enriching (one enricher Job per shard) → Succeeded | Failed.
//!
//! State is read back from the API (Jobs, by deterministic name) and the
//! database (the import's load phase and row counts), so a restarted operator
//! re-attaches instead of resubmitting. Status is written by server-side apply
//! under the field manager [`MANAGER`]; the enricher Jobs own `status.shards`
//! entries under managers of their own. Conditions are the source of truth and
//! keep their `lastTransitionTime` unless their status really changes.

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::{
    api::{batch::v1::Job, core::v1::Secret},
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
    ByteString,
};
use kube::{
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    runtime::{
        controller::{Action, Controller},
        events::{Event as KubeEvent, EventType, Recorder, Reporter},
        finalizer::{finalizer, Event as Finalizer},
        reflector, watcher, WatchStreamExt,
    },
    Api, Client, Resource, ResourceExt,
};
use pipeline::{lookup::SearchPlan, model::ImportPhase, store::Store};
use serde_json::json;

use crate::{
    crd::{Phase, PostcodeImport, PostcodeImportStatus, API_VERSION, FINALIZER},
    jobs::{database_secret_name, job, job_state, JobSettings, JobState, IMPORT_LABEL, MANAGED_BY},
    plan::{enricher_jobs, reader_job, ImportPlan, ProviderSpec},
};

/// Field manager of the operator's status writes.
pub const MANAGER: &str = "postcode-operator";

/// How often a running import is looked at again (counts, Jobs).
const PROGRESS_INTERVAL: Duration = Duration::from_secs(3);

/// Everything the reconciler needs.
pub struct Context {
    pub client: Client,
    pub store: Store,
    pub jobs: JobSettings,
    /// Namespace and name of the database Secret the Job pods' copies come from.
    pub database_secret: (String, String),
    pub recorder: Recorder,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("database: {0:#}")]
    Db(#[from] anyhow::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("invalid import: {0}")]
    Invalid(String),
}

impl Error {
    fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Db(_) => "database",
            Error::Finalizer(_) => "finalizer",
            Error::Invalid(_) => "invalid",
        }
    }
}

type Result<T, E = Error> = std::result::Result<T, E>;

/// Runs the controller until the process ends. `namespace` limits it to one namespace.
pub async fn run(ctx: Arc<Context>, namespace: Option<String>) {
    let client = ctx.client.clone();
    let imports: Api<PostcodeImport> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let jobs: Api<Job> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let (reader, writer) = reflector::store();
    // Only spec changes, deletion and finalizer changes trigger a reconcile, so
    // status writes (ours and the enrichers') do not re-trigger it.
    let trigger = watcher(imports, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(
            |o: &PostcodeImport| {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                o.meta().generation.hash(&mut h);
                o.meta().deletion_timestamp.is_some().hash(&mut h);
                o.finalizers().hash(&mut h);
                Some(h.finish())
            },
            Default::default(),
        );
    let owned = watcher::Config::default().labels(&format!("{}={}", MANAGED_BY.0, MANAGED_BY.1));
    Controller::for_stream(trigger, reader)
        .owns(jobs, owned)
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!("reconcile: {e}");
            }
        })
        .await;
}

fn error_policy(imp: Arc<PostcodeImport>, err: &Error, _ctx: Arc<Context>) -> Action {
    metrics::counter!("postcode_operator_reconcile_errors_total", "error" => err.metric_label()).increment(1);
    tracing::warn!(import = %imp.name_any(), "reconcile failed: {err}");
    Action::requeue(Duration::from_secs(5))
}

async fn reconcile(imp: Arc<PostcodeImport>, ctx: Arc<Context>) -> Result<Action> {
    let started = std::time::Instant::now();
    metrics::counter!("postcode_operator_reconciles_total").increment(1);
    let ns = imp
        .namespace()
        .ok_or_else(|| Error::Invalid("PostcodeImport is namespaced".into()))?;
    let api: Api<PostcodeImport> = Api::namespaced(ctx.client.clone(), &ns);
    let action = finalizer(&api, FINALIZER, imp, |event| async {
        match event {
            Finalizer::Apply(imp) => apply(imp, &ctx).await,
            Finalizer::Cleanup(imp) => cleanup(imp, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    metrics::histogram!("postcode_operator_reconcile_duration_seconds")
        .record(started.elapsed().as_secs_f64());
    action
}

/// The plan of an import's Jobs, from its spec.
pub fn plan_for(imp: &PostcodeImport) -> Result<ImportPlan> {
    let uid = imp.uid().ok_or_else(|| Error::Invalid("no uid".into()))?;
    let s = &imp.spec;
    let source = s
        .source
        .as_arg()
        .ok_or_else(|| Error::Invalid("exactly one of source.uploadId and source.url".into()))?;
    Ok(ImportPlan {
        uid,
        name: imp.name_any(),
        source,
        shards: s.shards.clamp(1, 64),
        provider: match &s.offline_postcodes {
            Some(p) => ProviderSpec::Offline { postcodes: p.clone() },
            None => ProviderSpec::Api {
                base_url: s.api.base_url.clone(),
            },
        },
        search: SearchPlan {
            radius_m: s.api.radius_meters.into(),
            max_radius_m: s.api.max_radius_meters.into(),
            widesearch: s.api.widesearch,
        },
        quota_rps: s.quota.requests_per_second,
        max_requests: s.quota.max_requests,
        lat_column: s.csv.lat_column.clone(),
        lon_column: s.csv.lon_column.clone(),
        delimiter: s.csv.delimiter.clone(),
        backoff_limit: s.backoff_limit,
    })
}

/// A condition as the import's status should hold it now.
struct Want {
    type_: &'static str,
    status: bool,
    reason: String,
    message: String,
}

fn want(type_: &'static str, status: bool, reason: &str, message: impl Into<String>) -> Want {
    Want {
        type_,
        status,
        reason: reason.into(),
        message: message.into(),
    }
}

/// Conditions for the new status: `lastTransitionTime` kept unless the status flips.
fn conditions(old: &[Condition], wants: Vec<Want>, generation: Option<i64>) -> Vec<Condition> {
    wants
        .into_iter()
        .map(|w| {
            let status = if w.status { "True" } else { "False" }.to_string();
            let prev = old.iter().find(|c| c.type_ == w.type_);
            let last_transition_time = match prev {
                Some(p) if p.status == status => p.last_transition_time.clone(),
                _ => Time(Timestamp::now()),
            };
            Condition {
                type_: w.type_.into(),
                status,
                reason: w.reason,
                message: w.message,
                last_transition_time,
                observed_generation: generation,
            }
        })
        .collect()
}

/// Our part of the status (no `shards`: the enrichers own those entries).
fn ours(s: &PostcodeImportStatus) -> PostcodeImportStatus {
    PostcodeImportStatus {
        shards: vec![],
        ..s.clone()
    }
}

async fn write_status(
    api: &Api<PostcodeImport>,
    imp: &PostcodeImport,
    old: &PostcodeImportStatus,
    new: PostcodeImportStatus,
) -> Result<()> {
    if ours(old) == new {
        return Ok(());
    }
    let patch = json!({"apiVersion": API_VERSION, "kind": "PostcodeImport", "status": new});
    api.patch_status(
        &imp.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(patch),
    )
    .await?;
    Ok(())
}

async fn publish(ctx: &Context, imp: &PostcodeImport, type_: EventType, reason: &str, note: String) {
    let ev = KubeEvent {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &imp.object_ref(&())).await {
        tracing::debug!("event not published: {e}");
    }
}

/// Copies the database Secret into the import's namespace for its Job pods,
/// owned by the import so it goes with it.
async fn ensure_database_secret(ctx: &Context, imp: &PostcodeImport, ns: &str) -> Result<()> {
    let name = database_secret_name(imp);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    if secrets.get_opt(&name).await?.is_some() {
        return Ok(());
    }
    let (src_ns, src_name) = &ctx.database_secret;
    let src: Api<Secret> = Api::namespaced(ctx.client.clone(), src_ns);
    let key = &ctx.jobs.database_secret_key;
    let value: ByteString = src
        .get(src_name)
        .await?
        .data
        .and_then(|mut d| d.remove(key))
        .ok_or_else(|| Error::Invalid(format!("Secret {src_ns}/{src_name} has no key {key:?}")))?;
    let copy = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name),
            namespace: Some(ns.to_string()),
            labels: Some([(MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string())].into()),
            owner_references: Some(vec![imp.controller_owner_ref(&()).expect("uid")]),
            ..Default::default()
        },
        data: Some([(key.clone(), value)].into()),
        ..Secret::default()
    };
    match secrets.create(&PostParams::default(), &copy).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn job_settings_for(ctx: &Context, imp: &PostcodeImport) -> JobSettings {
    JobSettings {
        database_secret: database_secret_name(imp),
        ..ctx.jobs.clone()
    }
}

/// Creates a Job unless one of that name exists (created by an earlier run of the operator).
async fn ensure_job(jobs: &Api<Job>, j: &Job) -> Result<Job> {
    let name = j.metadata.name.clone().unwrap_or_default();
    if let Some(existing) = jobs.get_opt(&name).await? {
        return Ok(existing);
    }
    match jobs.create(&PostParams::default(), j).await {
        Ok(created) => Ok(created),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(jobs.get(&name).await?),
        Err(e) => Err(e.into()),
    }
}

async fn apply(imp: Arc<PostcodeImport>, ctx: &Context) -> Result<Action> {
    let ns = imp.namespace().expect("namespaced");
    let api: Api<PostcodeImport> = Api::namespaced(ctx.client.clone(), &ns);
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let old = imp.status.clone().unwrap_or_default();
    let generation = imp.meta().generation;
    let plan = match plan_for(&imp) {
        Ok(p) => p,
        Err(Error::Invalid(msg)) => {
            let new = PostcodeImportStatus {
                phase: Some(Phase::Failed),
                message: Some(msg.clone()),
                observed_generation: generation,
                conditions: conditions(
                    &old.conditions,
                    vec![want("Failed", true, "InvalidSpec", msg)],
                    generation,
                ),
                ..ours(&old)
            };
            write_status(&api, &imp, &old, new).await?;
            return Ok(Action::await_change());
        }
        Err(e) => return Err(e),
    };

    let retry_wanted = imp.spec.retry_failed > old.retry_failed_observed.unwrap_or(0);
    if matches!(old.phase, Some(Phase::Succeeded | Phase::Failed)) && !retry_wanted {
        return finished(&imp, ctx, &api, &old).await;
    }

    let mut new = PostcodeImportStatus {
        observed_generation: generation,
        started_at: old.started_at.clone().or_else(|| Some(Time(Timestamp::now()))),
        ..ours(&old)
    };
    ensure_database_secret(ctx, &imp, &ns).await?;
    let settings = job_settings_for(ctx, &imp);
    let record = ctx.store.import(&plan.uid).await?;
    let loaded = record.as_ref().is_some_and(|r| r.phase == ImportPhase::Loaded);

    if !loaded {
        let spec = reader_job(&plan);
        let reader = ensure_job(&jobs, &job(&spec, &imp, &settings, false)).await?;
        if old.phase.is_none() || old.phase == Some(Phase::Pending) {
            publish(
                ctx,
                &imp,
                EventType::Normal,
                "Loading",
                format!("reader Job {} started", spec.name),
            )
            .await;
        }
        match job_state(&reader) {
            JobState::Failed { reason, message } => {
                let why = record
                    .and_then(|r| r.error)
                    .unwrap_or(format!("{reason}: {message}"));
                publish(ctx, &imp, EventType::Warning, "LoadFailed", why.clone()).await;
                new.phase = Some(Phase::Failed);
                new.message = Some(why.clone());
                new.completed_at = Some(Time(Timestamp::now()));
                new.conditions = conditions(
                    &old.conditions,
                    vec![
                        want("Loaded", false, "ReaderFailed", why.clone()),
                        want("Failed", true, "ReaderFailed", why),
                    ],
                    generation,
                );
                write_status(&api, &imp, &old, new).await?;
                return Ok(Action::await_change());
            }
            JobState::Succeeded | JobState::Running => {
                new.phase = Some(Phase::Loading);
                new.message = Some(format!("reader Job {} is loading the CSV", spec.name));
                new.conditions = conditions(
                    &old.conditions,
                    vec![want(
                        "Loaded",
                        false,
                        "Loading",
                        "the reader Job is loading the CSV",
                    )],
                    generation,
                );
                write_status(&api, &imp, &old, new).await?;
                return Ok(Action::requeue(PROGRESS_INTERVAL));
            }
        }
    }
    let record = record.expect("loaded");
    ctx.store
        .set_quota(record.id, plan.quota_rps, plan.max_requests)
        .await?;

    // retryFailed: requeue failed rows, re-run only the shards that now have work.
    if retry_wanted {
        let n = ctx.store.requeue_failed(record.id).await?;
        for spec in enricher_jobs(&plan) {
            let crate::plan::Role::Enricher { shard } = spec.role else {
                continue;
            };
            if ctx.store.pending(record.id, Some(shard as i32)).await? > 0 {
                let _ = jobs.delete(&spec.name, &DeleteParams::background()).await;
            }
        }
        publish(
            ctx,
            &imp,
            EventType::Normal,
            "RetryFailed",
            format!("{n} failed coordinates requeued"),
        )
        .await;
        new.retry_failed_observed = Some(imp.spec.retry_failed);
        new.phase = Some(Phase::Enriching);
        new.completed_at = None;
        new.conditions = vec![];
        write_status(&api, &imp, &old, new).await?;
        return Ok(Action::requeue(Duration::from_secs(1)));
    }

    let budget_spent = ctx.store.budget_spent(record.id).await?;
    let mut failed: Vec<String> = vec![];
    let mut quota_stopped = 0;
    let mut all_done = true;
    for spec in enricher_jobs(&plan) {
        let j = ensure_job(&jobs, &job(&spec, &imp, &settings, imp.spec.suspend)).await?;
        if j.spec.as_ref().and_then(|s| s.suspend) != Some(imp.spec.suspend)
            && job_state(&j) == JobState::Running
        {
            let patch = json!({"spec": {"suspend": imp.spec.suspend}});
            jobs.patch(&spec.name, &PatchParams::default(), &Patch::Merge(patch))
                .await?;
        }
        match job_state(&j) {
            JobState::Succeeded => {}
            JobState::Running => all_done = false,
            JobState::Failed { reason, message } => {
                all_done = false;
                if budget_spent {
                    quota_stopped += 1;
                } else if message.contains("exit code 3") {
                    // The budget was raised since this Job stopped: run the shard again.
                    jobs.delete(&spec.name, &DeleteParams::background()).await?;
                } else {
                    failed.push(format!("Job {} failed: {reason}: {message}", spec.name));
                }
            }
        }
    }
    let counts = ctx.store.counts(&record).await?;
    let q = ctx.store.quota_counters(record.id).await?;
    new.rows_total = Some(counts.rows_total);
    new.rows_invalid = Some(counts.rows_invalid);
    new.rows_enriched = Some(counts.rows_enriched);
    new.rows_no_match = Some(counts.rows_no_match);
    new.rows_failed = Some(counts.rows_failed);
    new.rows_pending = Some(counts.rows_pending);
    new.api_requests = Some(q.requests);
    new.api_retries = Some(q.retries);
    new.throttled = Some(q.throttled);
    record_metrics(&imp, &counts, &q);

    let loaded_c = want(
        "Loaded",
        true,
        "Loaded",
        format!(
            "{} rows loaded, {} invalid",
            counts.rows_total, counts.rows_invalid
        ),
    );
    let suspended = want(
        "Suspended",
        imp.spec.suspend,
        if imp.spec.suspend { "Suspended" } else { "Running" },
        if imp.spec.suspend {
            "enricher Jobs suspended by spec.suspend"
        } else {
            ""
        },
    );
    let quota_c = want(
        "QuotaExhausted",
        quota_stopped > 0,
        if quota_stopped > 0 {
            "BudgetSpent"
        } else {
            "WithinBudget"
        },
        if quota_stopped > 0 {
            format!(
                "request budget of {} spent; {} rows pending; raise spec.quota.maxRequests to resume",
                plan.max_requests.unwrap_or(0),
                counts.rows_pending
            )
        } else {
            String::new()
        },
    );
    let action;
    if !failed.is_empty() {
        let msg = failed.join("; ");
        publish(ctx, &imp, EventType::Warning, "Failed", msg.clone()).await;
        new.phase = Some(Phase::Failed);
        new.message = Some(msg.clone());
        new.completed_at = Some(Time(Timestamp::now()));
        new.conditions = conditions(
            &old.conditions,
            vec![
                loaded_c,
                want("Enriched", false, "JobFailed", msg.clone()),
                quota_c,
                want("Failed", true, "JobFailed", msg),
            ],
            generation,
        );
        action = Action::await_change();
    } else if all_done && counts.rows_pending == 0 {
        let msg = format!(
            "{} rows: {} enriched, {} no_match, {} invalid, {} failed",
            counts.rows_total,
            counts.rows_enriched,
            counts.rows_no_match,
            counts.rows_invalid,
            counts.rows_failed
        );
        publish(ctx, &imp, EventType::Normal, "Succeeded", msg.clone()).await;
        new.phase = Some(Phase::Succeeded);
        new.message = Some(msg.clone());
        new.completed_at = Some(Time(Timestamp::now()));
        new.conditions = conditions(
            &old.conditions,
            vec![
                loaded_c,
                want("Enriched", true, "Enriched", msg),
                quota_c,
                want("Failed", false, "Succeeded", ""),
            ],
            generation,
        );
        action = match imp.spec.ttl_seconds_after_finished {
            Some(ttl) => Action::requeue(Duration::from_secs(ttl.max(0) as u64)),
            None => Action::await_change(),
        };
    } else {
        if old.phase != Some(Phase::Enriching) {
            publish(
                ctx,
                &imp,
                EventType::Normal,
                "Enriching",
                format!("{} enricher Jobs started", plan.shards),
            )
            .await;
        }
        new.phase = Some(Phase::Enriching);
        new.message = Some(format!(
            "{} of {} rows finished",
            counts.rows_total - counts.rows_pending - counts.rows_invalid,
            counts.rows_total - counts.rows_invalid
        ));
        new.conditions = conditions(
            &old.conditions,
            vec![
                loaded_c,
                want("Enriched", false, "Enriching", "enricher Jobs running"),
                suspended,
                quota_c,
            ],
            generation,
        );
        action = Action::requeue(if quota_stopped > 0 {
            Duration::from_secs(30)
        } else {
            PROGRESS_INTERVAL
        });
    }
    write_status(&api, &imp, &old, new).await?;
    Ok(action)
}

fn record_metrics(imp: &PostcodeImport, c: &pipeline::store::Counts, q: &pipeline::store::QuotaCounters) {
    let name = format!("{}/{}", imp.namespace().unwrap_or_default(), imp.name_any());
    for (status, n) in c.rows_by_status() {
        metrics::gauge!("postcode_import_rows", "import" => name.clone(), "status" => status.as_str())
            .set(n as f64);
    }
    metrics::gauge!("postcode_import_api_requests", "import" => name.clone()).set(q.requests as f64);
    metrics::gauge!("postcode_import_api_throttled", "import" => name).set(q.throttled as f64);
}

/// A finished import: delete it when its TTL has passed.
async fn finished(
    imp: &PostcodeImport,
    _ctx: &Context,
    api: &Api<PostcodeImport>,
    old: &PostcodeImportStatus,
) -> Result<Action> {
    let Some(ttl) = imp.spec.ttl_seconds_after_finished else {
        return Ok(Action::await_change());
    };
    let done = old.completed_at.as_ref().map_or_else(Timestamp::now, |t| t.0);
    let age = Timestamp::now().duration_since(done).as_secs_f64();
    if age >= ttl as f64 {
        tracing::info!(import = %imp.name_any(), "ttlSecondsAfterFinished passed; deleting");
        api.delete(&imp.name_any(), &DeleteParams::background()).await?;
        return Ok(Action::await_change());
    }
    Ok(Action::requeue(Duration::from_secs_f64(
        (ttl as f64 - age).max(1.0),
    )))
}

/// Deletes what the import owns outside Kubernetes (its rows, unless
/// `keepResults`, and its upload) and stops its Jobs. Idempotent, and fine when
/// nothing was ever created.
async fn cleanup(imp: Arc<PostcodeImport>, ctx: &Context) -> Result<Action> {
    let ns = imp.namespace().expect("namespaced");
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let lp = ListParams::default().labels(&format!("{IMPORT_LABEL}={}", imp.name_any()));
    for j in jobs.list(&lp).await? {
        if crate::jobs::is_owned_by(&j, &imp) {
            match jobs.delete(&j.name_any(), &DeleteParams::background()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    if !imp.spec.keep_results {
        if let Some(uid) = imp.uid() {
            ctx.store.delete_import(&uid).await?;
        }
        if let Some(upload) = &imp.spec.source.upload_id {
            ctx.store.delete_upload(upload).await?;
        }
    }
    publish(
        ctx,
        &imp,
        EventType::Normal,
        "Deleted",
        if imp.spec.keep_results {
            "Jobs stopped; rows kept"
        } else {
            "Jobs stopped; rows deleted"
        }
        .into(),
    )
    .await;
    Ok(Action::await_change())
}

/// The event reporter of this operator instance.
pub fn reporter() -> Reporter {
    Reporter {
        controller: MANAGER.into(),
        instance: std::env::var("POD_NAME").ok(),
    }
}

pub fn recorder(client: Client) -> Recorder {
    Recorder::new(client, reporter())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_condition_keeps_its_transition_time_until_it_flips() {
        let mut first = conditions(&[], vec![want("Loaded", false, "Loading", "")], Some(1));
        first[0].last_transition_time = Time(Timestamp::UNIX_EPOCH);
        let again = conditions(&first, vec![want("Loaded", false, "Loading", "still")], Some(2));
        assert_eq!(first[0].last_transition_time, again[0].last_transition_time);
        let flipped = conditions(&again, vec![want("Loaded", true, "Loaded", "")], Some(2));
        assert_ne!(flipped[0].last_transition_time, again[0].last_transition_time);
    }
}
