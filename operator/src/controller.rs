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
use pipeline::{
    model::ImportPhase,
    store::{Counts, ImportRecord, QuotaCounters, Store},
};
use postcode_resource::{Phase, PostcodeImport, PostcodeImportStatus, API_VERSION, FINALIZER};
use serde_json::json;

use crate::{
    jobs::{
        database_secret_name, job, job_state, last_pod_failure, JobSettings, DATABASE_CA_KEY, IMPORT_LABEL,
        MANAGED_BY,
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

/// The state of the Job `name`, `None` when it does not exist. A failed
/// Job's message says why its last pod ended ([`last_pod_failure`]).
async fn job_state_of(jobs: &Api<Job>, ctx: &Context, name: &str) -> Result<Option<JobState>> {
    let Some(job) = jobs.get_opt(name).await? else {
        return Ok(None);
    };
    let mut state = job_state(&job);
    if let JobState::Failed { message, .. } = &mut state {
        let ns = job.namespace().unwrap_or_default();
        if let Some(pod) = last_pod_failure(&ctx.client, &ns, name).await {
            message.push_str(&format!("; {pod}"));
        }
    }
    Ok(Some(state))
}

/// What [`lifecycle::decide`] looks at, read from the API server and the database.
async fn observe(
    imp: &PostcodeImport,
    ctx: &Context,
    jobs: &Api<Job>,
) -> Result<(Observed, Option<ImportRecord>)> {
    let old = imp.status.clone().unwrap_or_default();
    let plan = plan_for(imp);
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
        ttl_seconds_after_finished: imp.spec.ttl_seconds_after_finished,
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
        o.load = Load::NotLoaded {
            error: record.as_ref().and_then(|r| r.error.clone()),
        };
        o.reader = job_state_of(jobs, ctx, &reader_job(plan).name).await?;
        return Ok((o, record));
    }
    let r = record.as_ref().expect("loaded");
    o.load = Load::Loaded {
        warnings: r.warnings.clone(),
    };
    for spec in enricher_jobs(plan) {
        o.enrichers.push(job_state_of(jobs, ctx, &spec.name).await?);
    }
    o.budget_spent = ctx.store.budget_spent(r.id).await?;
    o.counts = ctx.store.counts(r).await?;
    o.shard_pending = pending_by_shard(plan.shards, &ctx.store.shard_counts(r.id).await?);
    Ok((o, record))
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
            let n = ctx.store.requeue_failed(r.id).await?;
            tracing::info!(import = %imp.name_any(), "{n} failed coordinates requeued");
        }
    }
    for name in &d.delete {
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
        let patch = json!({"spec": {"suspend": suspend}});
        jobs.patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await?;
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
    use crate::lifecycle::want;

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
