//! The reconciler of `PostcodeImport`s: Pending → Loading (reader Job) →
//! Enriching (one enricher Job per shard) → Succeeded | Failed.
//!
//! State is read back from the API (Jobs, by deterministic name, from the
//! watch cache the controller keeps: a steady reconcile sends the API server
//! no request for them) and the database (the import's load phase and row counts), so a restarted operator
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
use pipeline::{
    model::ImportPhase,
    store::{Counts, ImportRecord, QuotaCounters, Store},
};
use postcode_resource::{Phase, PostcodeImport, PostcodeImportStatus, ShardStatus, API_VERSION, FINALIZER};
use serde_json::json;

use crate::{
    jobs::{
        database_secret_name, job, job_state, last_pod_failure, JobSettings, DATABASE_CA_KEY,
        IMPORT_UID_LABEL, MANAGED_BY,
    },
    lifecycle::{decide, pending_by_shard, Decision, JobState, Load, Next, Observed, Report, Want},
    plan::{enricher_jobs, reader_job, ImportPlan},
};

/// Field manager of the operator's status writes.
pub const MANAGER: &str = "postcode-operator";

/// Everything the reconciler needs.
pub struct Context {
    pub client: Client,
    pub store: Store,
    pub jobs: JobSettings,
    /// Namespace and name of the database Secret the Job pods' copies come from.
    pub database_secret: (String, String),
    pub recorder: Recorder,
    /// The operator's Jobs (label [`MANAGED_BY`]) as the controller's watch
    /// last saw them: a reconcile reads its Jobs here instead of asking the
    /// API server for each. Filled by [`run`].
    pub job_cache: reflector::Store<Job>,
    /// Jobs this operator deleted lately (namespace, name → when): the watch
    /// may not have brought their deletion yet, so for [`RECENTLY_DELETED`]
    /// they are read from the API server, never from [`Context::job_cache`]
    /// (a retried shard's old Failed Job must not fail the import again).
    pub deleted_jobs: std::sync::Mutex<std::collections::HashMap<(String, String), std::time::Instant>>,
    /// Each import's failure cause (database id → failed rows when read, the
    /// cause): read again only when the number of failed rows changes, as the
    /// query groups all the import's failed lookups. Dropped when no row has
    /// failed, on a retry of the failed rows, while the import loads and when
    /// it is deleted.
    pub failure_causes: std::sync::Mutex<std::collections::HashMap<i64, (i64, Option<String>)>>,
}

/// How long a deleted Job is read from the API server instead of the cache.
const RECENTLY_DELETED: Duration = Duration::from_secs(60);

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
    /// Not an error: a deletion waits for the import's pods to end.
    #[error("waiting: {0}")]
    Waiting(String),
}

impl Error {
    fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Db(_) => "database",
            Error::Finalizer(_) => "finalizer",
            Error::Invalid(_) => "invalid",
            Error::Waiting(_) => "waiting",
        }
    }
}

type Result<T, E = Error> = std::result::Result<T, E>;

/// Runs the controller until the process ends. `namespace` limits it to one
/// namespace. `job_cache` is the writer of [`Context::job_cache`]: the watch
/// of the operator's Jobs that triggers reconciles also keeps it current.
pub async fn run(ctx: Arc<Context>, namespace: Option<String>, job_cache: reflector::store::Writer<Job>) {
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
    let job_events = watcher(jobs, owned)
        .default_backoff()
        .modify(|j| j.managed_fields_mut().clear())
        .reflect(job_cache)
        .touched_objects();
    Controller::for_stream(trigger, reader)
        .owns_stream(job_events)
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
    if let Error::Finalizer(f) = err {
        if let kube::runtime::finalizer::Error::CleanupFailed(Error::Waiting(why)) = f.as_ref() {
            tracing::info!(import = %imp.name_any(), "deletion {why}");
            return Action::requeue(Duration::from_secs(2));
        }
    }
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

/// The plan of an import's Jobs, or why its spec cannot be planned.
pub fn plan_for(imp: &PostcodeImport) -> std::result::Result<ImportPlan, String> {
    let uid = imp.uid().ok_or("the import has no uid")?;
    let source = imp
        .spec
        .source
        .as_arg()
        .ok_or("exactly one of source.uploadId and source.url")?;
    Ok(ImportPlan::from_spec(uid, imp.name_any(), source, &imp.spec))
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

/// Longest event note the API server accepts (events.k8s.io/v1 `note`: 1 KiB).
const MAX_EVENT_NOTE: usize = 1024;

/// `text` cut to at most `max` bytes at a character boundary, with `…` when cut.
pub fn truncate_to(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max - '…'.len_utf8();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

async fn publish(ctx: &Context, imp: &PostcodeImport, type_: EventType, reason: &str, note: String) {
    let ev = KubeEvent {
        type_,
        reason: reason.into(),
        note: Some(truncate_to(&note, MAX_EVENT_NOTE)),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &imp.object_ref(&())).await {
        tracing::debug!("event not published: {e}");
    }
}

/// Copies the database Secret into the import's namespace for its Job pods,
/// owned by the import so it goes with it. Create-only (an existing copy is
/// a 409): the operator may read no Secret but its own database Secret
/// (chart RBAC, by resourceName), only create them in the Job namespaces.
async fn ensure_database_secret(ctx: &Context, imp: &PostcodeImport, ns: &str) -> Result<()> {
    let name = database_secret_name(imp);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
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
        data: Some(database_secret_data(ctx, key, value)),
        ..Secret::default()
    };
    match secrets.create(&PostParams::default(), &copy).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The per-import database Secret's keys: the URL, and the database CA when
/// the operator has one (mounted into the Job pods, jobs.rs).
fn database_secret_data(
    ctx: &Context,
    key: &str,
    url: ByteString,
) -> std::collections::BTreeMap<String, ByteString> {
    let mut data = std::collections::BTreeMap::from([(key.to_string(), url)]);
    if let Some(ca) = &ctx.jobs.database_ca {
        data.insert(DATABASE_CA_KEY.to_string(), ByteString(ca.pem.clone()));
    }
    data
}

fn job_settings_for(ctx: &Context, imp: &PostcodeImport) -> JobSettings {
    JobSettings {
        database_secret: database_secret_name(imp),
        ..ctx.jobs.clone()
    }
}

/// Creates a Job; one of that name created meanwhile (by an earlier run of the operator) is fine.
async fn create_job(jobs: &Api<Job>, j: &Job) -> Result<()> {
    match jobs.create(&PostParams::default(), j).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The Job `name` of `jobs`' namespace: from [`Context::job_cache`] when it
/// is there (no request), else from the API server — a Job not created yet,
/// one created moments ago that the watch has not brought yet, one without
/// the operator's label (someone else's, [`JobState::NotOurs`]), or one the
/// operator deleted lately ([`Context::deleted_jobs`]).
async fn get_job(jobs: &Api<Job>, ctx: &Context, ns: &str, name: &str) -> Result<Option<Job>> {
    let key = reflector::ObjectRef::new(name).within(ns);
    let deleted_lately = {
        let mut deleted = ctx.deleted_jobs.lock().unwrap();
        deleted.retain(|_, at| at.elapsed() < RECENTLY_DELETED);
        deleted.contains_key(&(ns.to_string(), name.to_string()))
    };
    if let Some(job) = ctx.job_cache.get(&key).filter(|_| !deleted_lately) {
        metrics::counter!("postcode_operator_job_reads_total", "from" => "cache").increment(1);
        return Ok(Some(Job::clone(&job)));
    }
    metrics::counter!("postcode_operator_job_reads_total", "from" => "api").increment(1);
    Ok(jobs.get_opt(name).await?)
}

/// The state of the Job `name`, `None` when it does not exist. A failed
/// Job's message says why its last pod ended ([`last_pod_failure`]); a Job
/// the import does not own is [`JobState::NotOurs`]. The Job itself is
/// returned for [`crate::readiness`].
async fn job_state_of(
    jobs: &Api<Job>,
    ctx: &Context,
    imp: &PostcodeImport,
    name: &str,
) -> Result<Option<(JobState, Job)>> {
    let ns = imp.namespace().unwrap_or_default();
    let Some(job) = get_job(jobs, ctx, &ns, name).await? else {
        return Ok(None);
    };
    if !crate::jobs::is_owned_by(&job, imp) {
        let message = format!(
            "a Job named {name} already exists in namespace {} and is not this import's; \
             it is left untouched: delete it or create the import under another name",
            imp.namespace().unwrap_or_default()
        );
        return Ok(Some((JobState::NotOurs { message }, job)));
    }
    let mut state = job_state(&job);
    if let JobState::Failed { message, .. } = &mut state {
        let ns = job.namespace().unwrap_or_default();
        if let Some(pod) = last_pod_failure(&ctx.client, &ns, name).await {
            message.push_str(&format!("; {pod}"));
        }
    }
    Ok(Some((state, job)))
}

/// What [`lifecycle::decide`] looks at, read from the API server and the database.
async fn observe(
    imp: &PostcodeImport,
    ctx: &Context,
    jobs: &Api<Job>,
) -> Result<(Observed, Option<ImportRecord>)> {
    let old = imp.status.clone().unwrap_or_default();
    let plan = plan_for(imp).and_then(|p| {
        let template = imp.spec.pod_template.clone().unwrap_or_default();
        ctx.jobs.pods.check(&template).map(|()| p)
    });
    let previous = old.phase;
    let retry_wanted = imp.spec.retry_failed > old.retry_failed_observed.unwrap_or(0);
    let mut o = Observed {
        plan: plan.clone(),
        previous,
        suspend: imp.spec.suspend,
        retry_wanted,
        load: Load::NotLoaded { error: None },
        reader: None,
        enrichers: vec![],
        shard_pending: vec![],
        budget_spent: false,
        counts: Counts::default(),
        failure_cause: None,
        ttl_seconds_after_finished: imp.spec.ttl_seconds_after_finished,
        jobs_not_ready: None,
        jobs_stopping: Some(false),
        finished_for: old
            .completed_at
            .as_ref()
            .map(|t| Duration::from_secs_f64(Timestamp::now().duration_since(t.0).as_secs_f64().max(0.0))),
    };
    let finished = matches!(previous, Some(Phase::Succeeded | Phase::Failed)) && !retry_wanted;
    let Ok(plan) = plan.as_ref() else {
        return Ok((o, None));
    };
    if finished {
        return Ok((o, None));
    }
    let record = ctx.store.import(&plan.uid).await?;
    if record.as_ref().is_none_or(|r| r.phase != ImportPhase::Loaded) {
        if let Some(r) = &record {
            ctx.failure_causes.lock().unwrap().remove(&r.id); // a reload starts over
        }
        o.load = Load::NotLoaded {
            error: record.as_ref().and_then(|r| r.error.clone()),
        };
        let reader = job_state_of(jobs, ctx, imp, &reader_job(plan).name).await?;
        o.jobs_not_ready = crate::readiness::not_ready(&ctx.client, reader.iter().map(|(_, j)| j)).await;
        o.reader = reader.map(|(s, _)| s);
        return Ok((o, record));
    }
    let r = record.as_ref().expect("loaded");
    o.load = Load::Loaded {
        warnings: r.warnings.clone(),
    };
    let mut seen = Vec::new();
    for spec in enricher_jobs(plan) {
        let state = job_state_of(jobs, ctx, imp, &spec.name).await?;
        o.enrichers.push(state.as_ref().map(|(s, _)| s.clone()));
        seen.extend(state.map(|(_, j)| j));
    }
    o.jobs_not_ready = crate::readiness::not_ready(&ctx.client, seen.iter()).await;
    o.jobs_stopping = Some(seen.iter().any(crate::readiness::suspended_with_pods));
    o.budget_spent = ctx.store.budget_spent(r.id).await?;
    o.counts = ctx.store.counts(r).await?;
    if o.counts.rows_failed > 0 {
        o.failure_cause = failure_cause(ctx, r.id, o.counts.rows_failed).await?;
    } else {
        ctx.failure_causes.lock().unwrap().remove(&r.id);
    }
    o.shard_pending = pending_by_shard(plan.shards, &ctx.store.shard_counts(r.id).await?);
    Ok((o, record))
}

/// [`Store::failure_cause`] of the import, from [`Context::failure_causes`]
/// while its failed rows stay `rows_failed`.
async fn failure_cause(ctx: &Context, import_id: i64, rows_failed: i64) -> Result<Option<String>> {
    if let Some((n, cause)) = ctx.failure_causes.lock().unwrap().get(&import_id) {
        if *n == rows_failed {
            return Ok(cause.clone());
        }
    }
    let cause = ctx.store.failure_cause(import_id).await?;
    ctx.failure_causes
        .lock()
        .unwrap()
        .insert(import_id, (rows_failed, cause.clone()));
    Ok(cause)
}

async fn apply(imp: Arc<PostcodeImport>, ctx: &Context) -> Result<Action> {
    let ns = imp.namespace().expect("namespaced");
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let (observed, record) = observe(&imp, ctx, &jobs).await?;
    let d = decide(&observed);
    act(&imp, ctx, &jobs, &observed, record.as_ref(), &d).await?;
    Ok(match d.next {
        Next::Poll(after) => Action::requeue(after),
        Next::AwaitChange => Action::await_change(),
        Next::DeleteImport => {
            tracing::info!(import = %imp.name_any(), "ttlSecondsAfterFinished passed; deleting");
            let api: Api<PostcodeImport> = Api::namespaced(ctx.client.clone(), &ns);
            api.delete(&imp.name_any(), &DeleteParams::background()).await?;
            Action::await_change()
        }
    })
}

/// Carries out a [`Decision`]: the database first, then the Jobs, then the status.
async fn act(
    imp: &PostcodeImport,
    ctx: &Context,
    jobs: &Api<Job>,
    o: &Observed,
    record: Option<&ImportRecord>,
    d: &Decision,
) -> Result<()> {
    if let (Some(r), Ok(plan)) = (record, &o.plan) {
        if d.set_quota {
            ctx.store
                .set_quota(r.id, plan.quota_rps, plan.max_requests)
                .await?;
        }
        if d.requeue_failed {
            // The rows that fail again may fail for another cause, as many of them.
            ctx.failure_causes.lock().unwrap().remove(&r.id);
            let n = ctx.store.requeue_failed(r.id).await?;
            tracing::info!(import = %imp.name_any(), "{n} failed coordinates requeued");
        }
    }
    for name in &d.delete {
        let ns = imp.namespace().unwrap_or_default();
        ctx.deleted_jobs
            .lock()
            .unwrap()
            .insert((ns, name.clone()), std::time::Instant::now());
        match jobs.delete(name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    if !d.create.is_empty() {
        ensure_database_secret(ctx, imp, &imp.namespace().expect("namespaced")).await?;
        let settings = job_settings_for(ctx, imp);
        for (spec, suspend) in &d.create {
            create_job(jobs, &job(spec, imp, &settings, *suspend)).await?;
        }
    }
    for (name, suspend) in &d.set_suspend {
        // The annotation marks a suspension as ours, so that only ours is
        // lifted (jobs::SUSPENDED_BY_OPERATOR).
        let mark = suspend.then_some("true");
        let patch = json!({
            "metadata": {"annotations": {crate::jobs::SUSPENDED_BY_OPERATOR: mark}},
            "spec": {"suspend": suspend},
        });
        jobs.patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await?;
    }
    if let Ok(plan) = &o.plan {
        reset_shard_entries(imp, ctx, plan, o, d).await?;
    }
    if let Some(ev) = &d.event {
        let type_ = if ev.warning {
            EventType::Warning
        } else {
            EventType::Normal
        };
        publish(ctx, imp, type_, ev.reason, ev.note.clone()).await;
    }
    if let (Some(report), Some(r)) = (&d.report, record) {
        let q = ctx.store.quota_counters(r.id).await?;
        if let Some(c) = &report.counts {
            record_metrics(imp, c, &q);
        }
        return write_report(imp, ctx, report, d.requeue_failed, Some(&q)).await;
    }
    if let Some(report) = &d.report {
        return write_report(imp, ctx, report, d.requeue_failed, None).await;
    }
    observe_generation(imp, ctx).await
}

/// Keeps `status.observedGeneration` current when nothing else is reported
/// (a finished import whose spec changed, e.g. its TTL): clients wait on it.
async fn observe_generation(imp: &PostcodeImport, ctx: &Context) -> Result<()> {
    let old = imp.status.clone().unwrap_or_default();
    let generation = imp.meta().generation;
    if old.phase.is_none() || old.observed_generation == generation {
        return Ok(());
    }
    let api: Api<PostcodeImport> = Api::namespaced(ctx.client.clone(), &imp.namespace().expect("namespaced"));
    let new = PostcodeImportStatus {
        observed_generation: generation,
        ..ours(&old)
    };
    write_status(&api, imp, &old, new).await
}

/// The `status.shards[]` phase a shard should show instead of what its
/// last enricher wrote: `Pending` for a shard whose Job is re-created (a
/// retry, a raised budget), `Suspended` for a suspended Job whose entry
/// still says `Running` (its pod is gone and will not say so).
fn shard_resets(
    plan: &ImportPlan,
    o: &Observed,
    d: &Decision,
    shown: &[ShardStatus],
) -> Vec<(u32, &'static str)> {
    let shown_phase = |i: u32| shown.iter().find(|s| s.index == i).and_then(|s| s.phase.clone());
    let mut out = Vec::new();
    for (i, (spec, state)) in enricher_jobs(plan).iter().zip(&o.enrichers).enumerate() {
        let i = i as u32;
        let suspended_now = d.set_suspend.iter().any(|(n, s)| n == &spec.name && *s)
            || (matches!(state, Some(JobState::Running { suspended: true, .. }))
                && !d.set_suspend.iter().any(|(n, _)| n == &spec.name));
        let want = if d.delete.contains(&spec.name) {
            "Pending"
        } else if suspended_now {
            "Suspended"
        } else {
            continue;
        };
        let phase = shown_phase(i);
        if phase.as_deref() != Some(want) && !(want == "Suspended" && phase.is_none()) {
            out.push((i, want));
        }
    }
    out
}

/// Writes [`shard_resets`] as the shard's own field manager (`enricher-<i>`),
/// so the entry is replaced, not merged with the old run's.
async fn reset_shard_entries(
    imp: &PostcodeImport,
    ctx: &Context,
    plan: &ImportPlan,
    o: &Observed,
    d: &Decision,
) -> Result<()> {
    let shown = imp.status.as_ref().map(|s| s.shards.clone()).unwrap_or_default();
    let api: Api<PostcodeImport> = Api::namespaced(ctx.client.clone(), &imp.namespace().expect("namespaced"));
    for (index, phase) in shard_resets(plan, o, d, &shown) {
        let patch = json!({"apiVersion": API_VERSION, "kind": "PostcodeImport",
            "status": {"shards": [{"index": index, "phase": phase}]}});
        let pp = PatchParams::apply(&format!("enricher-{index}")).force();
        api.patch_status(&imp.name_any(), &pp, &Patch::Apply(patch))
            .await?;
    }
    Ok(())
}

/// Writes our part of the status from a [`Report`].
async fn write_report(
    imp: &PostcodeImport,
    ctx: &Context,
    report: &Report,
    retry_acted_on: bool,
    q: Option<&QuotaCounters>,
) -> Result<()> {
    let api: Api<PostcodeImport> = Api::namespaced(ctx.client.clone(), &imp.namespace().expect("namespaced"));
    let old = imp.status.clone().unwrap_or_default();
    let generation = imp.meta().generation;
    let mut new = PostcodeImportStatus {
        phase: Some(report.phase),
        message: Some(report.message.clone()),
        observed_generation: generation,
        started_at: old.started_at.clone().or_else(|| Some(Time(Timestamp::now()))),
        conditions: conditions(&old.conditions, report.conditions.clone(), generation),
        ..ours(&old)
    };
    if report.completed {
        new.completed_at = Some(Time(Timestamp::now()));
    }
    if report.reopened {
        new.completed_at = None;
    }
    if retry_acted_on {
        new.retry_failed_observed = Some(imp.spec.retry_failed);
    }
    if let Some(c) = &report.counts {
        new.rows_total = Some(c.rows_total);
        new.rows_invalid = Some(c.rows_invalid);
        new.rows_enriched = Some(c.rows_enriched);
        new.rows_no_match = Some(c.rows_no_match);
        new.rows_failed = Some(c.rows_failed);
        new.rows_pending = Some(c.rows_pending);
    }
    if let Some(q) = q {
        new.api_requests = Some(q.requests);
        new.api_retries = Some(q.retries);
        new.throttled = Some(q.throttled);
        new.api_share_rps = q
            .share_rps
            .filter(|_| report.phase == Phase::Enriching)
            .map(|r| (r * 100.0).round() / 100.0);
    }
    write_status(&api, imp, &old, new).await
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

/// Deletes what the import owns outside Kubernetes (its rows, unless
/// `keepResults`, and its upload) and stops its Jobs. Idempotent, and fine when
/// nothing was ever created.
async fn cleanup(imp: Arc<PostcodeImport>, ctx: &Context) -> Result<Action> {
    stop_jobs(&imp, ctx).await?;
    if let Some(uid) = imp.uid() {
        if let Some(r) = ctx.store.import(&uid).await? {
            ctx.failure_causes.lock().unwrap().remove(&r.id);
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

/// Deletes the import's Jobs (those it owns, found by its uid label) and
/// waits, as [`Error::Waiting`], until their pods are gone, so that no reader
/// or enricher still writes rows when the rows are deleted.
async fn stop_jobs(imp: &PostcodeImport, ctx: &Context) -> Result<()> {
    let ns = imp.namespace().expect("namespaced");
    let Some(uid) = imp.uid() else {
        return Ok(());
    };
    let lp = ListParams::default().labels(&format!("{IMPORT_UID_LABEL}={uid}"));
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    for j in jobs.list(&lp).await? {
        if crate::jobs::is_owned_by(&j, imp) {
            match jobs.delete(&j.name_any(), &DeleteParams::background()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let left = pods.list(&lp).await?.items.len();
    if left > 0 {
        return Err(Error::Waiting(format!(
            "waits for {left} pods of its Jobs to end"
        )));
    }
    Ok(())
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
    use crate::lifecycle::want;

    /// After a retry or a suspension, `status.shards[]` no longer shows the
    /// old run's `Running`/`Succeeded`.
    #[test]
    fn shard_entries_are_reset_for_rerun_and_suspended_shards() {
        use crate::plan::{enricher_jobs, ImportPlan, ProviderSpec};
        let plan = ImportPlan {
            uid: "u".into(),
            name: "t".into(),
            source: "upload:x".into(),
            shards: 3,
            provider: ProviderSpec::Api {
                base_url: "http://x".into(),
            },
            search: Default::default(),
            quota_rps: 5.0,
            max_requests: None,
            lat_column: None,
            lon_column: None,
            delimiter: None,
            quote: None,
            backoff_limit: 3,
            answer_max_age_days: 30,
        };
        let names: Vec<String> = enricher_jobs(&plan).into_iter().map(|j| j.name).collect();
        let held = JobState::Running {
            suspended: true,
            suspended_by_us: true,
        };
        let o = Observed {
            plan: Ok(plan.clone()),
            previous: None,
            suspend: false,
            retry_wanted: false,
            load: Load::NotLoaded { error: None },
            reader: None,
            enrichers: vec![Some(JobState::Succeeded), Some(held.clone()), Some(held)],
            shard_pending: vec![],
            budget_spent: false,
            counts: Counts::default(),
            ttl_seconds_after_finished: None,
            finished_for: None,
            jobs_not_ready: None,
            jobs_stopping: None,
            failure_cause: None,
        };
        let mut d = decide(&o);
        d.delete = vec![names[0].clone()];
        d.set_suspend = vec![(names[2].clone(), false)];
        let shown = |i: u32, p: &str| ShardStatus {
            index: i,
            phase: Some(p.into()),
            ..ShardStatus::default()
        };
        let resets = shard_resets(
            &plan,
            &o,
            &d,
            &[shown(0, "Succeeded"), shown(1, "Running"), shown(2, "Running")],
        );
        // Shard 0 re-runs, shard 1 stays suspended, shard 2 is being resumed.
        assert_eq!(resets, [(0, "Pending"), (1, "Suspended")]);
        let again = shard_resets(&plan, &o, &d, &[shown(0, "Pending"), shown(1, "Suspended")]);
        assert!(again.is_empty(), "{again:?}");
    }

    /// Event notes are cut to the API server's 1 KiB at a character
    /// boundary (a longer note is refused and the event lost).
    #[test]
    fn event_notes_fit_the_api_servers_limit() {
        let long = "é".repeat(2000);
        let cut = truncate_to(&long, MAX_EVENT_NOTE);
        assert!(cut.len() <= MAX_EVENT_NOTE && cut.ends_with('…'), "{}", cut.len());
        assert!(long.starts_with(cut.trim_end_matches('…')));
        assert_eq!(truncate_to("short", MAX_EVENT_NOTE), "short");
    }

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
