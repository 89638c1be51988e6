//! End-to-end test harness for a REAL kube-apiserver without kubelet, scheduler
//! or Job controller (`.ci/controlplane.sh`): a client from `KUBECONFIG`, fresh
//! namespaces, [`wait_for`] an object to reach a state, and [`FakeKubelet`], which
//! plays kubelet + Job controller for the `batch/v1` Jobs of one namespace by
//! running their container as a local child process and writing the Job status
//! the way the real Job controller does (and the v1.36 apiserver accepts).
//!
//! Job status the apiserver (v1.36) accepts, as written here:
//! - running: `startTime` (immutable while the Job is not suspended), `active: 1`;
//! - succeeded: `succeeded: 1`, `active: 0`, `completionTime` (>= `startTime`) and
//!   the conditions `SuccessCriteriaMet=True` then `Complete=True` (reason
//!   `CompletionsReached`): `Complete` without `SuccessCriteriaMet` is rejected;
//! - failed: `active: 0`, no `completionTime`, the conditions `FailureTarget=True`
//!   then `Failed=True` (same reason, e.g. `BackoffLimitExceeded` or
//!   `PodFailurePolicy`): `Failed` without `FailureTarget` is rejected;
//! - suspended: `active: 0`, `startTime` removed, `Suspended=True` (`JobSuspended`);
//!   resumed: `Suspended=False` (`JobResumed`) and a new `startTime`.
//!
//! Reading it back: the apiserver omits zero counters (`active`, `succeeded`,
//! `failed` come back as `None`, not `Some(0)`).
#![allow(dead_code)]

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Debug,
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::{
    api::{
        batch::v1::{Job, JobCondition, JobStatus},
        core::v1::{ConfigMap, Container, Namespace, Secret},
    },
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};
use kube::{
    api::{Patch, PatchParams, PostParams},
    runtime::{
        watcher::{self, watcher, Event},
        WatchStreamExt,
    },
    Api, Client, Resource, ResourceExt,
};
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::{
    process::{Child, Command},
    sync::{mpsc, watch},
    task::JoinHandle,
    time::Instant,
};

/// Pause between a failed attempt and the next one (the real Job controller
/// backs off 10 s, doubling; tests want it short).
pub const RETRY_DELAY: Duration = Duration::from_millis(200);

/// How often a Job whose container cannot be configured yet (a missing Secret or
/// ConfigMap, like `CreateContainerConfigError`) is looked at again.
const PENDING_RETRY: Duration = Duration::from_millis(500);

/// A client for the test control plane, from `KUBECONFIG` (set by `make test`).
/// Panics without it: these tests fail rather than skip.
pub async fn test_client() -> Client {
    match std::env::var_os("KUBECONFIG") {
        Some(v) if !v.is_empty() => {}
        _ => panic!("KUBECONFIG is not set: run the tests with `make test`, which starts the control plane"),
    }
    // Both rustls providers (ring via kube, aws-lc-rs via reqwest) are compiled in,
    // so rustls cannot pick one itself; an Err means one is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = kube::Config::from_kubeconfig(&kube::config::KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("cannot load KUBECONFIG={:?}: {e}", std::env::var("KUBECONFIG")));
    Client::try_from(config).expect("build a client for the test control plane")
}

/// Creates a namespace with a unique name (`t-…`) and returns the name.
pub async fn fresh_namespace(client: &Client) -> String {
    let name = format!("t-{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
    let ns: Namespace = serde_json::from_value(json!({
        "metadata": { "name": name, "labels": { "postcodes.dev/test": "true" } }
    }))
    .unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
    name
}

/// Waits, watching the object, until `cond` holds for `name`; returns it. Panics
/// with the last seen version of the object when `timeout` passes first.
pub async fn wait_for<K, F>(api: &Api<K>, name: &str, timeout: Duration, cond: F) -> K
where
    K: Resource + Clone + Debug + DeserializeOwned + Send + 'static,
    F: Fn(&K) -> bool,
{
    let mut last: Option<K> = None;
    let stream = kube::runtime::watcher::watch_object(api.clone(), name).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let found = tokio::time::timeout(timeout, async {
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(Some(obj)) if cond(&obj) => return Some(obj),
                Ok(Some(mut obj)) => {
                    obj.meta_mut().managed_fields = None; // noise in the panic message
                    last = Some(obj);
                }
                Ok(None) => {} // not there (yet), or deleted: keep the last seen version
                Err(e) => eprintln!("[wait_for {name}] watch error (retrying): {e}"),
            }
        }
        None
    })
    .await;
    match found {
        Ok(Some(obj)) => obj,
        _ => match &last {
            Some(obj) => panic!(
                "timed out after {timeout:?} waiting for {} {name}; last seen:\n{obj:#?}",
                std::any::type_name::<K>()
            ),
            None => panic!(
                "timed out after {timeout:?} waiting for {} {name}: it was never seen",
                std::any::type_name::<K>()
            ),
        },
    }
}

/// A Job's condition `type_` is `True`.
pub fn job_condition(job: &Job, type_: &str) -> bool {
    conditions_true(
        job.status
            .as_ref()
            .and_then(|s| s.conditions.as_deref())
            .unwrap_or_default(),
        type_,
    )
}

/// The condition of that type, if any.
pub fn find_job_condition<'a>(job: &'a Job, type_: &str) -> Option<&'a JobCondition> {
    job.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
}

/// The Job has a `Complete=True` or `Failed=True` condition.
pub fn job_finished(job: &Job) -> bool {
    job_condition(job, "Complete") || job_condition(job, "Failed")
}

fn conditions_true(conds: &[JobCondition], type_: &str) -> bool {
    conds.iter().any(|c| c.type_ == type_ && c.status == "True")
}

/// Per Job name: what the tests can ask about and how to reach its supervisor.
#[derive(Default)]
struct Track {
    /// Processes started for this name (across re-creations of the Job).
    runs: u32,
    /// A process of it is running now.
    running: bool,
    /// The Job object (uid) the supervisor below belongs to.
    uid: String,
    update: Option<watch::Sender<Option<Job>>>,
    kill: Option<mpsc::UnboundedSender<()>>,
    task: Option<JoinHandle<()>>,
}

struct Ctx {
    client: Client,
    namespace: String,
    bin_dir: PathBuf,
    extra_env: Vec<(String, String)>,
    log_dir: PathBuf,
    jobs: Mutex<HashMap<String, Track>>,
    errors: Mutex<Vec<String>>,
    /// Bumped whenever a Track changes, for [`FakeKubelet::wait_until`].
    changed: watch::Sender<()>,
}

impl Ctx {
    fn error(&self, msg: String) {
        eprintln!("[fake-kubelet {}] {msg}", self.namespace);
        self.errors.lock().unwrap().push(msg);
    }

    /// Marks whether a process of Job `name` (object `uid`) runs; a supervisor of
    /// an older object under the same name no longer counts.
    fn set_running(&self, name: &str, uid: &str, running: bool) {
        self.with_track(name, |t| {
            if t.uid == uid || t.uid.is_empty() {
                t.running = running;
            }
        })
    }

    fn with_track<R>(&self, name: &str, f: impl FnOnce(&mut Track) -> R) -> R {
        let r = f(self.jobs.lock().unwrap().entry(name.to_string()).or_default());
        self.changed.send_replace(());
        r
    }
}

/// Plays kubelet + Job controller for the `batch/v1` Jobs of one namespace: each
/// Job that is neither suspended nor finished gets its single container run as a
/// local child process (`command[0]` from `bin_dir`, else from `PATH`), retried
/// per `backoffLimit` and `podFailurePolicy` (`FailJob`/`Ignore`/`Count` on exit
/// codes), and its status written through the status subresource. Dropping it
/// (or [`FakeKubelet::stop`]) stops the watch and kills the children.
pub struct FakeKubelet {
    ctx: Arc<Ctx>,
    watch_task: JoinHandle<()>,
}

impl FakeKubelet {
    /// Starts watching the Jobs of `namespace`. `extra_env` is added to every
    /// container's environment (after the container's own `env`, so it wins),
    /// e.g. `KUBECONFIG` so the process reaches the API server.
    pub fn start(
        client: Client,
        namespace: &str,
        bin_dir: PathBuf,
        extra_env: Vec<(String, String)>,
    ) -> FakeKubelet {
        let log_dir = std::env::temp_dir().join(format!(
            "fake-kubelet-{namespace}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ));
        std::fs::create_dir_all(&log_dir).unwrap();
        let ctx = Arc::new(Ctx {
            client: client.clone(),
            namespace: namespace.to_string(),
            bin_dir,
            extra_env,
            log_dir,
            jobs: Mutex::new(HashMap::new()),
            errors: Mutex::new(Vec::new()),
            changed: watch::channel(()).0,
        });
        let watch_task = tokio::spawn(watch_jobs(ctx.clone()));
        FakeKubelet { ctx, watch_task }
    }

    /// The directory holding one log file per attempt (see [`Self::log_path`]).
    pub fn log_dir(&self) -> &Path {
        &self.ctx.log_dir
    }

    /// The stdout+stderr log of attempt `attempt` (1-based, counted per Job name).
    pub fn log_path(&self, job: &str, attempt: u32) -> PathBuf {
        log_path(&self.ctx.log_dir, job, attempt)
    }

    /// All attempts' logs of a Job, concatenated with headers (for assertion messages).
    pub fn logs(&self, job: &str) -> String {
        let mut out = String::new();
        for attempt in 1..=self.runs(job) {
            let p = self.log_path(job, attempt);
            out += &format!(
                "--- {} ---\n{}\n",
                p.display(),
                std::fs::read_to_string(&p).unwrap_or_default()
            );
        }
        out
    }

    /// SIGKILLs the running process of that Job (a pod dying): counts as a failed
    /// attempt, retried per `backoffLimit`. False when none is running.
    pub fn kill(&self, job: &str) -> bool {
        let jobs = self.ctx.jobs.lock().unwrap();
        match jobs.get(job) {
            Some(t) if t.running => t.kill.as_ref().is_some_and(|k| k.send(()).is_ok()),
            _ => false,
        }
    }

    /// How many processes were started for that Job name (across re-creations).
    pub fn runs(&self, job: &str) -> u32 {
        self.ctx.jobs.lock().unwrap().get(job).map_or(0, |t| t.runs)
    }

    /// A process of that Job is running now.
    pub fn running(&self, job: &str) -> bool {
        self.ctx.jobs.lock().unwrap().get(job).is_some_and(|t| t.running)
    }

    /// Waits until `cond` holds for this kubelet's bookkeeping (runs, running),
    /// woken by its changes; panics after `timeout`.
    pub async fn wait_until(&self, timeout: Duration, what: &str, cond: impl Fn(&FakeKubelet) -> bool) {
        let mut changes = self.ctx.changed.subscribe();
        let waited = tokio::time::timeout(timeout, async {
            while !cond(self) {
                changes
                    .changed()
                    .await
                    .expect("the kubelet's change channel lives as long as it");
            }
        })
        .await;
        if waited.is_err() {
            panic!(
                "timed out after {timeout:?} waiting until {what}; harness errors: {:?}",
                self.errors()
            );
        }
    }

    /// Waits until no process of that Job runs (e.g. after deleting or suspending it).
    pub async fn wait_idle(&self, job: &str, timeout: Duration) {
        self.wait_until(timeout, &format!("no process of Job {job} runs"), |k| {
            !k.running(job)
        })
        .await
    }

    /// Problems of the harness itself (rejected status writes, unrunnable specs).
    pub fn errors(&self) -> Vec<String> {
        self.ctx.errors.lock().unwrap().clone()
    }

    /// Stops watching and kills all children (waiting until they are gone).
    pub async fn stop(self) {
        self.watch_task.abort();
        let tasks: Vec<JoinHandle<()>> = self
            .ctx
            .jobs
            .lock()
            .unwrap()
            .values_mut()
            .filter_map(|t| t.task.take())
            .collect();
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await; // the aborted task drops its process: the group is killed
        }
        // `self` drops here; Drop finds nothing left to do.
    }
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        self.watch_task.abort();
        if let Ok(mut jobs) = self.ctx.jobs.lock() {
            for t in jobs.values_mut() {
                if let Some(task) = t.task.take() {
                    task.abort();
                }
            }
        }
    }
}

fn log_path(dir: &Path, job: &str, attempt: u32) -> PathBuf {
    dir.join(format!("{job}-{attempt}.log"))
}

/// The watch loop: hands every version of each Job to its supervisor task.
async fn watch_jobs(ctx: Arc<Ctx>) {
    let api: Api<Job> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    let mut stream = std::pin::pin!(stream);
    // Names seen since the last (re)list, to notice deletions missed meanwhile.
    let mut listed: Option<Vec<String>> = None;
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(Event::Init) => listed = Some(Vec::new()),
            Ok(Event::InitApply(job)) => {
                if let Some(l) = listed.as_mut() {
                    l.push(job.name_any());
                }
                dispatch(&ctx, job);
            }
            Ok(Event::InitDone) => {
                let seen = listed.take().unwrap_or_default();
                let gone: Vec<String> = ctx
                    .jobs
                    .lock()
                    .unwrap()
                    .keys()
                    .filter(|n| !seen.contains(n))
                    .cloned()
                    .collect();
                for name in gone {
                    deleted(&ctx, &name);
                }
            }
            Ok(Event::Apply(job)) => dispatch(&ctx, job),
            Ok(Event::Delete(job)) => deleted(&ctx, &job.name_any()),
            Err(e) => eprintln!("[fake-kubelet {}] watch error (retrying): {e}", ctx.namespace),
        }
    }
}

fn dispatch(ctx: &Arc<Ctx>, job: Job) {
    let name = job.name_any();
    let uid = job.uid().unwrap_or_default();
    let mut jobs = ctx.jobs.lock().unwrap();
    let t = jobs.entry(name.clone()).or_default();
    if t.uid == uid {
        if let Some(u) = &t.update {
            u.send_replace(Some(job));
        }
        return;
    }
    // A new Job (or a new one under an old name): the old supervisor, if any, ends.
    if let Some(u) = t.update.take() {
        u.send_replace(None);
    }
    let (update_tx, update_rx) = watch::channel(Some(job));
    let (kill_tx, kill_rx) = mpsc::unbounded_channel();
    t.uid = uid;
    t.update = Some(update_tx);
    t.kill = Some(kill_tx);
    t.running = false;
    t.task = Some(tokio::spawn(supervise(ctx.clone(), name, update_rx, kill_rx)));
}

fn deleted(ctx: &Ctx, name: &str) {
    let mut jobs = ctx.jobs.lock().unwrap();
    if let Some(t) = jobs.get_mut(name) {
        if let Some(u) = t.update.take() {
            u.send_replace(None);
        }
        t.uid.clear();
        t.kill = None;
    }
}

/// The status the supervisor owns and writes (a merge patch of all of it).
struct Status {
    start_time: Option<Time>,
    completion_time: Option<Time>,
    active: i32,
    ready: i32,
    succeeded: i32,
    failed: i32,
    conditions: Vec<JobCondition>,
}

impl Status {
    fn from_job(job: &Job) -> Status {
        let s = job.status.clone().unwrap_or_default();
        Status {
            start_time: s.start_time,
            completion_time: s.completion_time,
            active: s.active.unwrap_or(0),
            ready: s.ready.unwrap_or(0),
            succeeded: s.succeeded.unwrap_or(0),
            failed: s.failed.unwrap_or(0),
            conditions: s.conditions.unwrap_or_default(),
        }
    }

    fn is_true(&self, type_: &str) -> bool {
        conditions_true(&self.conditions, type_)
    }

    fn finished(&self) -> bool {
        self.is_true("Complete") || self.is_true("Failed")
    }

    /// Sets a condition like the Job controller: the transition time changes only
    /// when the status does.
    fn set_condition(&mut self, type_: &str, status: bool, reason: &str, message: &str) {
        let status = if status { "True" } else { "False" };
        let now = Time(Timestamp::now());
        match self.conditions.iter_mut().find(|c| c.type_ == type_) {
            Some(c) => {
                if c.status != status {
                    c.last_transition_time = Some(now.clone());
                }
                c.status = status.into();
                c.reason = Some(reason.into());
                c.message = Some(message.into());
                c.last_probe_time = Some(now);
            }
            None => self.conditions.push(JobCondition {
                type_: type_.into(),
                status: status.into(),
                reason: Some(reason.into()),
                message: Some(message.into()),
                last_probe_time: Some(now.clone()),
                last_transition_time: Some(now),
            }),
        }
    }

    fn patch(&self) -> serde_json::Value {
        let st = JobStatus {
            start_time: self.start_time.clone(),
            completion_time: self.completion_time.clone(),
            active: Some(self.active),
            ready: Some(self.ready),
            terminating: Some(0),
            succeeded: Some(self.succeeded),
            failed: Some(self.failed),
            conditions: Some(self.conditions.clone()),
            ..JobStatus::default()
        };
        let mut v = serde_json::to_value(st).unwrap();
        // Absent fields would be left alone by a merge patch: remove them explicitly.
        let o = v.as_object_mut().unwrap();
        for key in ["startTime", "completionTime"] {
            o.entry(key).or_insert(serde_json::Value::Null);
        }
        json!({ "status": v })
    }
}

/// What the podFailurePolicy says about an exit code.
#[derive(Debug, PartialEq)]
enum Verdict {
    FailJob(usize),
    Ignore,
    Count,
}

fn pod_failure_verdict(job: &Job, container: &str, code: i32) -> Verdict {
    let Some(policy) = job.spec.as_ref().and_then(|s| s.pod_failure_policy.as_ref()) else {
        return Verdict::Count;
    };
    for (i, rule) in policy.rules.iter().enumerate() {
        let Some(req) = &rule.on_exit_codes else { continue }; // onPodConditions: no pod conditions here
        if req.container_name.as_deref().is_some_and(|c| c != container) || code == 0 {
            continue;
        }
        let listed = req.values.contains(&code);
        let matches = match req.operator.as_str() {
            "In" => listed,
            "NotIn" => !listed,
            _ => false,
        };
        if matches {
            return match rule.action.as_str() {
                "FailJob" => Verdict::FailJob(i),
                "Ignore" => Verdict::Ignore,
                _ => Verdict::Count, // Count; FailIndex needs indexed Jobs
            };
        }
    }
    Verdict::Count
}

/// Runs and tracks one Job object until it finishes or goes away.
async fn supervise(
    ctx: Arc<Ctx>,
    name: String,
    mut updates: watch::Receiver<Option<Job>>,
    mut kills: mpsc::UnboundedReceiver<()>,
) {
    let api: Api<Job> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let Some(first) = updates.borrow().clone() else {
        return;
    };
    let uid = first.uid().unwrap_or_default();
    let shape = first
        .spec
        .as_ref()
        .map(|s| (s.completions.unwrap_or(1), s.parallelism.unwrap_or(1)));
    if shape != Some((1, 1)) {
        ctx.error(format!(
            "Job {name}: {UNSUPPORTED}(completions, parallelism) = {shape:?}; only (1, 1) is"
        ));
        return;
    }
    let mut st = Status::from_job(&first);
    let mut child: Option<Proc> = None;
    // When the next attempt may start (after a failure, or while its container config is missing).
    let mut not_before: Option<Instant> = None;
    let mut kill_requested = false;
    let mut reported_unsupported = false;

    let write = |st: &Status| {
        let (api, ctx, name, patch) = (api.clone(), ctx.clone(), name.clone(), st.patch());
        async move {
            match api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {} // deleted meanwhile
                Err(e) => ctx.error(format!("status of Job {name} rejected: {e}\npatch: {patch}")),
            }
        }
    };

    loop {
        let job = updates.borrow_and_update().clone();
        let job = match job {
            Some(j) if j.metadata.deletion_timestamp.is_none() => j,
            _ => break, // deleted: the child is killed below
        };
        if st.finished() || job_finished(&job) {
            break;
        }
        let spec = job.spec.clone().unwrap_or_default();
        let container = spec
            .template
            .spec
            .as_ref()
            .and_then(|p| p.containers.first())
            .cloned()
            .unwrap_or_default();

        if kill_requested {
            kill_requested = false;
            if let Some(p) = child.as_ref() {
                p.kill();
            }
        }

        if spec.suspend == Some(true) {
            if let Some(p) = child.take() {
                p.kill_and_reap().await; // a suspended Job's pods are deleted
                ctx.set_running(&name, &uid, false);
            }
            not_before = None;
            if !st.is_true("Suspended") || st.active != 0 || st.start_time.is_some() {
                st.active = 0;
                st.ready = 0;
                st.start_time = None;
                st.set_condition("Suspended", true, "JobSuspended", "Job suspended");
                write(&st).await;
            }
        } else if child.is_none() && not_before.is_none_or(|t| t <= Instant::now()) {
            not_before = None;
            if st.is_true("Suspended") {
                st.set_condition("Suspended", false, "JobResumed", "Job resumed");
            }
            if st.start_time.is_none() {
                st.start_time = Some(Time(Timestamp::now()));
            }
            let attempt = ctx.with_track(&name, |t| t.runs) + 1;
            let pod = format!("{name}-{attempt}");
            match prepare(&ctx, &container, &pod).await {
                Err(Pending(why)) => {
                    // Like CreateContainerConfigError: the pod exists but does not run yet.
                    if why.starts_with(UNSUPPORTED) && !reported_unsupported {
                        reported_unsupported = true;
                        ctx.error(format!("Job {name}: {why}"));
                    } else {
                        eprintln!(
                            "[fake-kubelet {}] Job {name}: container not ready to start: {why}",
                            ctx.namespace
                        );
                    }
                    not_before = Some(Instant::now() + PENDING_RETRY);
                    if st.active != 1 || st.ready != 0 {
                        st.active = 1;
                        st.ready = 0;
                        write(&st).await;
                    }
                }
                Ok(mut cmd) => {
                    let log = log_path(&ctx.log_dir, &name, attempt);
                    match spawn(&mut cmd, &log) {
                        Ok(c) => {
                            ctx.with_track(&name, |t| t.runs = attempt);
                            ctx.set_running(&name, &uid, true);
                            child = Some(Proc::new(c, attempt));
                            st.active = 1;
                            st.ready = 1;
                            write(&st).await;
                        }
                        Err(e) => {
                            // Like a StartError: the attempt fails without a process.
                            ctx.error(format!("Job {name}: cannot start {cmd:?}: {e}"));
                            if finish_attempt(&ctx, &job, &container, &mut st, 128, &mut not_before) {
                                write(&st).await;
                                break;
                            }
                            write(&st).await;
                        }
                    }
                }
            }
        }

        // Wait for the next thing to react to: a new version of the Job, a kill
        // request, the process ending, or the end of a retry delay.
        let sleep_until = not_before;
        tokio::select! {
            changed = updates.changed() => {
                if changed.is_err() {
                    break; // the FakeKubelet is gone
                }
            }
            Some(()) = kills.recv() => kill_requested = true,
            (status, attempt) = wait_child(&mut child) => {
                child = None;
                ctx.set_running(&name, &uid, false);
                let code = exit_code(status);
                eprintln!("[fake-kubelet {}] Job {name} attempt {attempt} exited with {code}", ctx.namespace);
                // The latest version of the Job decides (backoffLimit is mutable).
                let job = updates.borrow().clone().unwrap_or(job);
                let done = finish_attempt(&ctx, &job, &container, &mut st, code, &mut not_before);
                write(&st).await;
                if done {
                    break;
                }
            }
            _ = tokio::time::sleep_until(sleep_until.unwrap_or_else(Instant::now)), if sleep_until.is_some() && child.is_none() => {}
        }
    }
    if let Some(p) = child.take() {
        p.kill_and_reap().await;
    }
    ctx.set_running(&name, &uid, false);
}

/// Accounts for an ended attempt with `code`; returns true when the Job is finished.
fn finish_attempt(
    ctx: &Ctx,
    job: &Job,
    container: &Container,
    st: &mut Status,
    code: i32,
    not_before: &mut Option<Instant>,
) -> bool {
    st.active = 0;
    st.ready = 0;
    let now = Time(Timestamp::now());
    if code == 0 {
        st.succeeded += 1;
        st.completion_time = Some(now);
        let msg = "Reached expected number of succeeded pods";
        st.set_condition("SuccessCriteriaMet", true, "CompletionsReached", msg);
        st.set_condition("Complete", true, "CompletionsReached", msg);
        return true;
    }
    let backoff_limit = job.spec.as_ref().and_then(|s| s.backoff_limit).unwrap_or(6);
    let fail = |st: &mut Status, reason: &str, msg: &str| {
        st.set_condition("FailureTarget", true, reason, msg);
        st.set_condition("Failed", true, reason, msg);
    };
    match pod_failure_verdict(job, &container.name, code) {
        Verdict::FailJob(i) => {
            st.failed += 1;
            let msg = format!(
                "Container {} for pod {}/{} failed with exit code {code} matching FailJob rule at index {i}",
                container.name,
                ctx.namespace,
                job.name_any()
            );
            fail(st, "PodFailurePolicy", &msg);
            true
        }
        Verdict::Ignore => {
            *not_before = Some(Instant::now() + RETRY_DELAY);
            false
        }
        Verdict::Count => {
            st.failed += 1;
            if st.failed > backoff_limit {
                let msg = format!("Job has reached the specified backoff limit (last exit code {code})");
                fail(st, "BackoffLimitExceeded", &msg);
                true
            } else {
                *not_before = Some(Instant::now() + RETRY_DELAY);
                false
            }
        }
    }
}

/// The exit code a container runtime reports: the code, or 128 + signal.
fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

async fn wait_child(child: &mut Option<Proc>) -> (ExitStatus, u32) {
    match child {
        Some(p) => (p.wait().await, p.attempt),
        None => std::future::pending().await,
    }
}

/// A container's process, the leader of its own process group: killing it kills
/// the group (like a container runtime, which also gets `sh -c 'sleep 30'`'s
/// grandchild), and so does dropping it.
struct Proc {
    child: Child,
    attempt: u32,
    pgid: Option<i32>,
}

impl Proc {
    fn new(child: Child, attempt: u32) -> Proc {
        let pgid = child.id().map(|id| id as i32);
        Proc { child, attempt, pgid }
    }

    /// SIGKILLs the process group (the leader is reaped later by `wait`).
    fn kill(&self) {
        if let Some(pgid) = self.pgid {
            // SAFETY: kill(2) with a negative pid signals the process group `pgid`;
            // it is still ours: its leader is our unreaped child (or was reaped just now).
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }

    /// Waits for the leader to exit, then kills what is left of its group.
    async fn wait(&mut self) -> ExitStatus {
        let status = self
            .child
            .wait()
            .await
            .unwrap_or_else(|_| ExitStatus::from_raw(1 << 8));
        self.kill();
        self.pgid = None;
        status
    }

    async fn kill_and_reap(mut self) {
        self.kill();
        self.wait().await;
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill(); // no-op once reaped; `kill_on_drop` also covers the leader
    }
}

fn spawn(cmd: &mut Command, log: &Path) -> std::io::Result<Child> {
    let out = std::fs::File::create(log)?;
    let err = out.try_clone()?;
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
}

/// The container cannot start yet (a Secret or ConfigMap it needs is missing, or
/// it needs what the fake kubelet does not support: then the reason starts with
/// [`UNSUPPORTED`]).
struct Pending(String);

const UNSUPPORTED: &str = "not supported by the fake kubelet: ";

/// The command of the container, with its environment resolved.
async fn prepare(ctx: &Ctx, c: &Container, pod: &str) -> Result<Command, Pending> {
    let mut argv: Vec<String> = c.command.clone().unwrap_or_default();
    argv.extend(c.args.clone().unwrap_or_default());
    if c.command.as_ref().is_none_or(|c| c.is_empty()) {
        return Err(Pending(format!(
            "{UNSUPPORTED}a container without `command` (no image entrypoint here): {}",
            c.name
        )));
    }
    let program = {
        let p = Path::new(&argv[0]);
        let in_bin = ctx.bin_dir.join(&argv[0]);
        if p.components().count() == 1 && in_bin.is_file() {
            in_bin
        } else {
            p.to_path_buf()
        }
    };
    let mut cmd = Command::new(program);
    cmd.args(&argv[1..]);
    if let Some(dir) = c.working_dir.as_deref().filter(|d| Path::new(d).is_dir()) {
        cmd.current_dir(dir);
    }

    // Like a pod: nothing from the test's environment but the basics.
    cmd.env_clear();
    for key in ["PATH", "HOME", "TMPDIR", "LANG", "RUST_BACKTRACE"] {
        if let Some(v) = std::env::var_os(key) {
            cmd.env(key, v);
        }
    }
    cmd.env("HOSTNAME", pod);
    let mut secrets: HashMap<String, Option<BTreeMap<String, String>>> = HashMap::new();
    let mut config_maps: HashMap<String, Option<BTreeMap<String, String>>> = HashMap::new();
    for from in c.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let (data, what, optional) = if let Some(s) = &from.secret_ref {
            (
                secret(ctx, &mut secrets, &s.name).await,
                format!("Secret {}", s.name),
                s.optional == Some(true),
            )
        } else if let Some(m) = &from.config_map_ref {
            (
                config_map(ctx, &mut config_maps, &m.name).await,
                format!("ConfigMap {}", m.name),
                m.optional == Some(true),
            )
        } else {
            continue;
        };
        match data {
            Some(d) => {
                for (k, v) in d {
                    cmd.env(format!("{prefix}{k}"), v);
                }
            }
            None if optional => {}
            None => return Err(Pending(format!("{what} not found"))),
        }
    }
    for var in c.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(v), _) => Some(v.clone()),
            (None, None) => Some(String::new()),
            (None, Some(from)) => {
                if let Some(r) = &from.secret_key_ref {
                    let v = secret(ctx, &mut secrets, &r.name)
                        .await
                        .and_then(|d| d.get(&r.key).cloned());
                    match v {
                        Some(v) => Some(v),
                        None if r.optional == Some(true) => None,
                        None => {
                            return Err(Pending(format!(
                                "key {} of Secret {} not found (for ${})",
                                r.key, r.name, var.name
                            )))
                        }
                    }
                } else if let Some(r) = &from.config_map_key_ref {
                    let v = config_map(ctx, &mut config_maps, &r.name)
                        .await
                        .and_then(|d| d.get(&r.key).cloned());
                    match v {
                        Some(v) => Some(v),
                        None if r.optional == Some(true) => None,
                        None => {
                            return Err(Pending(format!(
                                "key {} of ConfigMap {} not found (for ${})",
                                r.key, r.name, var.name
                            )))
                        }
                    }
                } else if let Some(f) = &from.field_ref {
                    match f.field_path.as_str() {
                        "metadata.namespace" => Some(ctx.namespace.clone()),
                        "metadata.name" => Some(pod.to_string()),
                        "spec.nodeName" => Some("fake-kubelet".to_string()),
                        "spec.serviceAccountName" => Some("default".to_string()),
                        "status.podIP" | "status.hostIP" => Some("127.0.0.1".to_string()),
                        other => {
                            return Err(Pending(format!(
                                "{UNSUPPORTED}fieldRef {other} (for ${})",
                                var.name
                            )))
                        }
                    }
                } else {
                    return Err(Pending(format!(
                        "{UNSUPPORTED}this valueFrom (for ${})",
                        var.name
                    )));
                }
            }
        };
        if let Some(v) = value {
            cmd.env(&var.name, v);
        }
    }
    for (k, v) in &ctx.extra_env {
        cmd.env(k, v);
    }
    Ok(cmd)
}

async fn secret(
    ctx: &Ctx,
    cache: &mut HashMap<String, Option<BTreeMap<String, String>>>,
    name: &str,
) -> Option<BTreeMap<String, String>> {
    if !cache.contains_key(name) {
        let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
        let data = match api.get_opt(name).await {
            Ok(s) => s.map(|s| {
                s.data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
                    .collect()
            }),
            Err(e) => {
                eprintln!("[fake-kubelet {}] read Secret {name}: {e}", ctx.namespace);
                None
            }
        };
        cache.insert(name.to_string(), data);
    }
    cache[name].clone()
}

async fn config_map(
    ctx: &Ctx,
    cache: &mut HashMap<String, Option<BTreeMap<String, String>>>,
    name: &str,
) -> Option<BTreeMap<String, String>> {
    if !cache.contains_key(name) {
        let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
        let data = match api.get_opt(name).await {
            Ok(m) => m.map(|m| m.data.unwrap_or_default()),
            Err(e) => {
                eprintln!("[fake-kubelet {}] read ConfigMap {name}: {e}", ctx.namespace);
                None
            }
        };
        cache.insert(name.to_string(), data);
    }
    cache[name].clone()
}
