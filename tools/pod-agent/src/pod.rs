//! One Pod's life on the node, as a kubelet leads it: prepare (image, volumes,
//! environment; waiting reasons while something is missing), start every
//! container with runc, report Running, report each container's end (exit code,
//! reason, termination message), the terminal phase, and on deletion: SIGTERM,
//! the grace period, SIGKILL, then the Pod deleted with grace 0.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use futures::{stream::FuturesUnordered, Future, StreamExt};
use k8s_openapi::{
    api::core::v1::{Container, Pod, PodSecurityContext, SecurityContext},
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};
use kube::{
    api::{DeleteParams, Patch, PatchParams, Preconditions},
    Api, ResourceExt,
};
use serde_json::{json, Value};
use tokio::{sync::watch, time::Instant};
use tracing::{info, warn};

use crate::{
    quantity,
    runtime::{self, Plan, Running, DEFAULT_CAPABILITIES},
    volumes::{self, waiting, Lookups, Waiting},
    Shared,
};

/// How often a Pod that cannot start yet is tried again.
const PREPARE_RETRY: Duration = Duration::from_secs(1);

fn now() -> Time {
    Time(Timestamp::now())
}

struct ContainerState {
    name: String,
    image: String,
    state: Value,
    ready: bool,
    started: bool,
    id: Option<String>,
}

/// The status this agent writes for a Pod.
struct PodState {
    phase: String,
    start_time: Time,
    containers: Vec<ContainerState>,
    /// type -> (status, reason, lastTransitionTime)
    conditions: BTreeMap<String, (String, Option<String>, Time)>,
    sandbox_ready: bool,
}

impl PodState {
    fn new(pod: &Pod) -> PodState {
        let spec = pod.spec.clone().unwrap_or_default();
        PodState {
            phase: "Pending".into(),
            start_time: pod
                .status
                .as_ref()
                .and_then(|s| s.start_time.clone())
                .unwrap_or_else(now),
            containers: spec
                .containers
                .iter()
                .map(|c| ContainerState {
                    name: c.name.clone(),
                    image: c.image.clone().unwrap_or_default(),
                    state: json!({"waiting": {"reason": "ContainerCreating"}}),
                    ready: false,
                    started: false,
                    id: None,
                })
                .collect(),
            conditions: BTreeMap::new(),
            sandbox_ready: false,
        }
    }

    fn get(&mut self, name: &str) -> &mut ContainerState {
        self.containers
            .iter_mut()
            .find(|c| c.name == name)
            .expect("a container of the pod")
    }

    fn set_waiting_all(&mut self, w: &Waiting) -> bool {
        let mut changed = false;
        for c in &mut self.containers {
            let mut s = json!({"reason": w.reason});
            if !w.message.is_empty() {
                s["message"] = json!(w.message);
            }
            let new = json!({ "waiting": s });
            if c.state != new {
                c.state = new;
                changed = true;
            }
        }
        changed
    }

    fn terminated(&self) -> bool {
        self.containers
            .iter()
            .all(|c| c.state.get("terminated").is_some())
    }

    /// Phase and conditions from the containers' states.
    fn settle(&mut self) {
        let all_done = self.terminated();
        let any_running = self.containers.iter().any(|c| c.state.get("running").is_some());
        if all_done {
            let ok = self
                .containers
                .iter()
                .all(|c| c.state["terminated"]["exitCode"].as_i64() == Some(0));
            self.phase = if ok { "Succeeded" } else { "Failed" }.into();
        } else if any_running
            || self
                .containers
                .iter()
                .any(|c| c.state.get("terminated").is_some())
        {
            self.phase = "Running".into();
        }
        let ready = !self.containers.is_empty() && self.containers.iter().all(|c| c.ready);
        let t = |b: bool| if b { "True" } else { "False" }.to_string();
        let not_ready_reason = if all_done {
            "PodCompleted"
        } else {
            "ContainersNotReady"
        };
        self.set_cond(
            "PodReadyToStartContainers",
            t(self.sandbox_ready && !all_done),
            None,
        );
        self.set_cond("Initialized", t(true), None);
        self.set_cond(
            "ContainersReady",
            t(ready),
            (!ready).then(|| not_ready_reason.to_string()),
        );
        self.set_cond("Ready", t(ready), (!ready).then(|| not_ready_reason.to_string()));
    }

    fn set_cond(&mut self, type_: &str, status: String, reason: Option<String>) {
        match self.conditions.get_mut(type_) {
            Some(c) if c.0 == status => c.1 = reason,
            _ => {
                self.conditions.insert(type_.to_string(), (status, reason, now()));
            }
        }
    }

    fn patch(&mut self) -> Value {
        self.settle();
        let unready: Vec<String> = self
            .containers
            .iter()
            .filter(|c| !c.ready)
            .map(|c| c.name.clone())
            .collect();
        let conditions: Vec<Value> = self
            .conditions
            .iter()
            .map(|(t, (s, r, at))| {
                // null removes what an earlier patch set (strategic merge keeps it otherwise)
                let mut c = json!({"type": t, "status": s, "lastTransitionTime": at, "lastProbeTime": null,
                    "reason": null, "message": null});
                if let Some(r) = r {
                    c["reason"] = json!(r);
                    if r == "ContainersNotReady" {
                        c["message"] =
                            json!(format!("containers with unready status: [{}]", unready.join(" ")));
                    }
                }
                c
            })
            .collect();
        let statuses: Vec<Value> = self
            .containers
            .iter()
            .map(|c| {
                let mut s = json!({
                    "name": c.name, "image": c.image, "imageID": "", "ready": c.ready,
                    "started": c.started, "restartCount": 0, "state": c.state, "lastState": {},
                });
                if let Some(id) = &c.id {
                    s["containerID"] = json!(format!("runc://{id}"));
                }
                s
            })
            .collect();
        json!({"status": {
            "phase": self.phase,
            "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": self.start_time,
            "conditions": conditions,
            "containerStatuses": statuses,
        }})
    }
}

struct Ctx {
    shared: Arc<Shared>,
    api: Api<Pod>,
    ns: String,
    name: String,
    uid: String,
    dir: PathBuf,
}

impl Ctx {
    async fn write(&self, st: &mut PodState) {
        let patch = st.patch();
        if let Err(e) = self
            .api
            .patch_status(&self.name, &PatchParams::default(), &Patch::Strategic(patch))
            .await
        {
            warn!("{}/{}: write status: {e}", self.ns, self.name);
        }
    }

    /// Deletes the Pod object for good (grace 0), this very Pod only.
    async fn delete_now(&self) {
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(self.uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match self.api.delete(&self.name, &dp).await {
            Ok(_) => info!("{}/{}: deleted", self.ns, self.name),
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => warn!("{}/{}: delete: {e}", self.ns, self.name),
        }
    }
}

fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded") | Some("Failed")
    )
}

/// Waits for the Pod's next version; None when it is gone.
async fn next(rx: &mut watch::Receiver<Option<Pod>>) -> Option<Pod> {
    if rx.changed().await.is_err() {
        return None;
    }
    rx.borrow_and_update().clone()
}

/// Leads one Pod bound to this node from its first version to its deletion.
pub async fn supervise(shared: Arc<Shared>, mut rx: watch::Receiver<Option<Pod>>) {
    let Some(pod) = rx.borrow_and_update().clone() else {
        return;
    };
    let ns = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    let uid = pod.uid().unwrap_or_default();
    let ctx = Ctx {
        api: Api::namespaced(shared.client.clone(), &ns),
        dir: shared
            .args
            .state_dir
            .join("pods")
            .join(&ns)
            .join(format!("{name}_{uid}")),
        shared: shared.clone(),
        ns,
        name,
        uid: uid.clone(),
    };
    if !is_terminal(&pod) {
        shared
            .bound
            .lock()
            .unwrap()
            .insert(uid.clone(), quantity::pod_requests(&pod));
        let _ = std::fs::create_dir_all(&ctx.dir);
        let _ = std::fs::write(
            ctx.dir.join("pod.json"),
            serde_json::to_vec_pretty(
                &json!({"namespace": ctx.ns, "name": ctx.name, "uid": uid, "labels": pod.labels()}),
            )
            .unwrap_or_default(),
        );
        run(&ctx, pod, &mut rx).await;
        shared.bound.lock().unwrap().remove(&uid);
        let _ = std::fs::remove_dir_all(ctx.dir.join("volumes"));
    }
    // Terminal: the object stays until someone deletes it; then it goes at once.
    let mut latest = rx.borrow().clone();
    loop {
        match latest {
            None => return,
            Some(p) if p.metadata.deletion_timestamp.is_some() => {
                ctx.delete_now().await;
                return;
            }
            Some(_) => latest = next(&mut rx).await,
        }
    }
}

type Exits =
    FuturesUnordered<Pin<Box<dyn Future<Output = (Plan, Running, std::process::ExitStatus)> + Send>>>;

/// From Pending to a terminal phase (or until the Pod is gone).
async fn run(ctx: &Ctx, pod: Pod, rx: &mut watch::Receiver<Option<Pod>>) {
    let mut st = PodState::new(&pod);
    ctx.write(&mut st).await;
    let Some((plans, pod)) = prepared(ctx, &mut st, pod, rx).await else {
        return;
    };
    let (exits, ids) = start_all(ctx, &mut st, plans).await;
    wait_all(ctx, &mut st, &pod, rx, exits, ids).await;
}

/// Prepares until everything the containers need is there (reporting why
/// they wait meanwhile); `None` when the Pod is deleted or gone first.
async fn prepared(
    ctx: &Ctx,
    st: &mut PodState,
    pod: Pod,
    rx: &mut watch::Receiver<Option<Pod>>,
) -> Option<(Vec<Plan>, Pod)> {
    let shared = &ctx.shared;
    let mut pod = pod;
    loop {
        if pod.metadata.deletion_timestamp.is_some() {
            for c in &mut st.containers {
                c.state = json!({"terminated": {"exitCode": 137, "reason": "ContainerStatusUnknown",
                    "message": "The container could not be located when the pod was deleted", "finishedAt": now()}});
            }
            ctx.write(st).await;
            return None;
        }
        match prepare(shared, &pod, &ctx.dir).await {
            Ok(plans) => return Some((plans, pod)),
            Err(w) => {
                if st.set_waiting_all(&w) {
                    info!("{}/{}: waiting: {}: {}", ctx.ns, ctx.name, w.reason, w.message);
                    ctx.write(st).await;
                }
                tokio::select! {
                    p = next(rx) => match p { Some(p) => pod = p, None => return None },
                    _ = tokio::time::sleep(PREPARE_RETRY) => {
                        if let Some(p) = rx.borrow_and_update().clone() { pod = p }
                    }
                }
            }
        }
    }
}

/// Starts every container; their exits and ids.
async fn start_all(ctx: &Ctx, st: &mut PodState, plans: Vec<Plan>) -> (Exits, HashMap<String, String>) {
    let shared = &ctx.shared;
    st.sandbox_ready = true;
    let exits: Exits = FuturesUnordered::new();
    let mut ids = HashMap::new();
    for plan in plans {
        let image = st.get(&plan.name).image.clone();
        match shared.runtime.start(&plan).await {
            Ok(mut running) => {
                info!(
                    "{}/{}: started container {} ({})",
                    ctx.ns, ctx.name, plan.name, running.id
                );
                let c = st.get(&plan.name);
                c.state = json!({"running": {"startedAt": now()}});
                c.started = true;
                c.ready = true;
                c.id = Some(running.id.clone());
                ids.insert(plan.name.clone(), running.id.clone());
                // Started means the container's own process runs (exec done), as
                // a runtime's StartContainer returns: a SIGTERM sent earlier would
                // reach `runc init`, which drops it.
                shared.runtime.inspect(&plan, &image).await;
                exits.push(Box::pin(async move {
                    let status = running.child.wait().await.unwrap_or_else(|e| {
                        warn!("wait for runc: {e}");
                        std::os::unix::process::ExitStatusExt::from_raw(1 << 8)
                    });
                    (plan, running, status)
                }));
            }
            Err(e) => {
                warn!("{}/{}: start {}: {e:#}", ctx.ns, ctx.name, plan.name);
                st.get(&plan.name).state = json!({"terminated": {"exitCode": 128, "reason": "StartError",
                    "message": format!("{e:#}"), "startedAt": Time(Timestamp::UNIX_EPOCH), "finishedAt": now()}});
            }
        }
    }
    ctx.write(st).await;
    (exits, ids)
}

/// Until every container ended: records each end, and on deletion SIGTERM,
/// the grace period, SIGKILL.
async fn wait_all(
    ctx: &Ctx,
    st: &mut PodState,
    pod: &Pod,
    rx: &mut watch::Receiver<Option<Pod>>,
    mut exits: Exits,
    mut ids: HashMap<String, String>,
) {
    let shared = &ctx.shared;
    let mut kill_at: Option<Instant> = None;
    let mut terminating = false;
    let mut gone = false;
    while !exits.is_empty() {
        tokio::select! {
            p = next(rx), if !gone => match p {
                None => {
                    gone = true;
                    for id in ids.values() { shared.runtime.kill(id, "KILL").await; }
                }
                Some(p) => {
                    if p.metadata.deletion_timestamp.is_some() && !terminating {
                        terminating = true;
                        let grace = p.metadata.deletion_grace_period_seconds.unwrap_or(30).max(0) as u64;
                        info!("{}/{}: deleted: SIGTERM, {grace}s grace period", ctx.ns, ctx.name);
                        for id in ids.values() { shared.runtime.kill(id, "TERM").await; }
                        kill_at = Some(Instant::now() + Duration::from_secs(grace));
                    }
                }
            },
            Some((plan, running, status)) = exits.next() => {
                let exit = shared.runtime.finish(&plan, status, &running.log, running.log_offset).await;
                info!("{}/{}: container {} ended: exit {} ({})", ctx.ns, ctx.name, plan.name, exit.code, exit.reason);
                ids.remove(&plan.name);
                let message = termination_message(&pod_container(pod, &plan.name), &plan, &running, &exit);
                let c = st.get(&plan.name);
                let started_at = c.state["running"]["startedAt"].clone();
                let mut t = json!({"exitCode": exit.code, "reason": exit.reason, "startedAt": started_at,
                    "finishedAt": now(), "containerID": format!("runc://{}", running.id)});
                if let Some(sig) = exit.signal { t["signal"] = json!(sig); }
                if !message.is_empty() { t["message"] = json!(message); }
                c.state = json!({"terminated": t});
                c.ready = false;
                if !gone && !exits.is_empty() {
                    ctx.write(st).await;
                }
            },
            _ = tokio::time::sleep_until(kill_at.unwrap_or_else(Instant::now)), if kill_at.is_some() => {
                kill_at = None;
                for id in ids.values() {
                    info!("{}/{}: grace period over: SIGKILL {id}", ctx.ns, ctx.name);
                    shared.runtime.kill(id, "KILL").await;
                }
            }
        }
    }
    if !gone {
        ctx.write(st).await;
    }
}

fn pod_container(pod: &Pod, name: &str) -> Container {
    pod.spec
        .as_ref()
        .and_then(|s| s.containers.iter().find(|c| c.name == name).cloned())
        .unwrap_or_default()
}

/// The termination message: the file at terminationMessagePath (4 KiB at most),
/// else for `FallbackToLogsOnError` and a failure the log's last 80 lines (2 KiB).
fn termination_message(c: &Container, plan: &Plan, running: &Running, exit: &runtime::Exit) -> String {
    if exit.reason == "StartError" {
        let log = runtime::read_from(&running.log, running.log_offset);
        return log
            .lines()
            .rev()
            .find(|l| l.contains("runc run failed") || l.starts_with("runc"))
            .unwrap_or("the container could not be started")
            .to_string();
    }
    let mut msg = std::fs::read(&plan.termination_log).unwrap_or_default();
    msg.truncate(4096);
    let msg = String::from_utf8_lossy(&msg).into_owned();
    if msg.is_empty()
        && exit.code != 0
        && c.termination_message_policy.as_deref() == Some("FallbackToLogsOnError")
    {
        let log = runtime::read_from(&running.log, running.log_offset);
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(80)..].join("\n");
        let start = tail.len().saturating_sub(2048);
        let start = (start..=tail.len())
            .find(|i| tail.is_char_boundary(*i))
            .unwrap_or(tail.len());
        return tail[start..].to_string();
    }
    msg
}

/// (uid, gid) from an image's `User` ("uid", "uid:gid", "name", "name:group").
fn image_user(image: &runtime::Image) -> Result<(i64, i64), Waiting> {
    let u = image.config.user.trim();
    if u.is_empty() {
        return Ok((0, 0));
    }
    let (user, group) = match u.split_once(':') {
        Some((a, b)) => (a, Some(b)),
        None => (u, None),
    };
    let (uid, pgid) = image.lookup_user(user).ok_or_else(|| {
        waiting(
            "CreateContainerConfigError",
            format!("unable to find user {user}: no matching entries in passwd file"),
        )
    })?;
    let gid = match group {
        Some(g) => g.parse().map_err(|_| {
            waiting(
                "CreateContainerConfigError",
                format!("image group {g:?} is not numeric"),
            )
        })?,
        None => pgid.unwrap_or(0),
    };
    Ok((uid, gid))
}

/// Everything needed to start each container of the Pod, or why not yet.
async fn prepare(shared: &Shared, pod: &Pod, dir: &Path) -> Result<Vec<Plan>, Waiting> {
    let spec = pod.spec.clone().unwrap_or_default();
    if spec.init_containers.as_ref().is_some_and(|c| !c.is_empty()) {
        return Err(waiting(
            "CreateContainerConfigError",
            "init containers are not supported by the pod agent",
        ));
    }
    let psc = spec.security_context.clone().unwrap_or_default();
    let mut images = vec![];
    for c in &spec.containers {
        images.push(shared.runtime.image(c.image.as_deref().unwrap_or(""))?);
    }
    let mut lookups = Lookups::default();
    let vols = volumes::prepare_volumes(shared, pod, &dir.join("volumes"), &mut lookups).await?;
    let mut plans = vec![];
    for (c, image) in spec.containers.iter().zip(images) {
        let sc = c.security_context.clone().unwrap_or_default();
        if sc.privileged == Some(true) {
            return Err(waiting(
                "CreateContainerConfigError",
                "privileged containers are not supported by the pod agent",
            ));
        }
        let (uid, gid) = identity(pod, c, &sc, &psc, &image)?;
        let mut additional_gids: Vec<i64> = psc.supplemental_groups.clone().unwrap_or_default();
        if let Some(fs) = psc.fs_group {
            additional_gids.push(fs);
        }
        let seccomp = seccomp(&sc, &psc)?;
        let base = kubelet_env(shared, pod, &image);
        let mut env = volumes::container_env(shared, pod, c, &mut lookups, base).await?;
        if !env.iter().any(|(k, _)| k == "HOME") {
            env.push(("HOME".into(), image.home_of(uid).unwrap_or_else(|| "/".into())));
        }
        let argv = argv(c, &image, &env)?;
        let cwd = c
            .working_dir
            .clone()
            .filter(|d| !d.is_empty())
            .or_else(|| Some(image.config.working_dir.clone()).filter(|d| !d.is_empty()))
            .unwrap_or_else(|| "/".into());
        let mounts = mounts(c, &vols, &env)?;
        let cdir = dir.join("containers").join(&c.name);
        let termination_log = runtime::termination_log(&cdir)
            .map_err(|e| waiting("ContainerCreating", format!("termination log: {e}")))?;
        plans.push(Plan {
            pod_uid: pod.uid().unwrap_or_default(),
            pod_dir: dir.to_path_buf(),
            name: c.name.clone(),
            hostname: pod.name_any(),
            image,
            argv,
            env,
            cwd,
            uid,
            gid,
            additional_gids,
            capabilities: capabilities(&sc),
            no_new_privileges: sc.allow_privilege_escalation == Some(false),
            read_only_root: sc.read_only_root_filesystem == Some(true),
            seccomp,
            mounts,
            memory_limit: quantity::resource(c, "limits", "memory").map(|b| b as u64),
            cpu_limit_millis: quantity::resource(c, "limits", "cpu").map(|v| (v * 1000.0).ceil() as u64),
            cpu_request_millis: quantity::resource(c, "requests", "cpu").map(|v| (v * 1000.0).ceil() as u64),
            termination_log,
            termination_path: c
                .termination_message_path
                .clone()
                .unwrap_or_else(|| "/dev/termination-log".into()),
        });
    }
    Ok(plans)
}

/// The container's uid and gid: runAsUser/runAsGroup (container, then pod),
/// else the image's user; runAsNonRoot refuses uid 0, as the kubelet does.
fn identity(
    pod: &Pod,
    c: &Container,
    sc: &SecurityContext,
    psc: &PodSecurityContext,
    image: &runtime::Image,
) -> Result<(i64, i64), Waiting> {
    let (img_uid, img_gid) = image_user(image)?;
    let run_as_user = sc.run_as_user.or(psc.run_as_user);
    let run_as_group = sc.run_as_group.or(psc.run_as_group);
    let (uid, gid) = match run_as_user {
        Some(u) => {
            let g = run_as_group.unwrap_or_else(|| {
                if u == img_uid {
                    img_gid
                } else {
                    image
                        .lookup_user(&u.to_string())
                        .and_then(|(_, g)| g)
                        .unwrap_or(0)
                }
            });
            (u, g)
        }
        None => (img_uid, run_as_group.unwrap_or(img_gid)),
    };
    if sc.run_as_non_root.or(psc.run_as_non_root) == Some(true) && uid == 0 {
        return Err(waiting(
            "CreateContainerConfigError",
            format!(
                "container has runAsNonRoot and image will run as root (pod: \"{}_{}({})\", container: {})",
                pod.name_any(),
                pod.namespace().unwrap_or_default(),
                pod.uid().unwrap_or_default(),
                c.name
            ),
        ));
    }
    Ok((uid, gid))
}

/// The runtime's default capabilities, less `drop` (`ALL` drops every one),
/// plus `add`.
fn capabilities(sc: &SecurityContext) -> Vec<String> {
    let caps_spec = sc.capabilities.clone().unwrap_or_default();
    let drop: Vec<String> = caps_spec
        .drop
        .unwrap_or_default()
        .iter()
        .map(|c| cap_name(c))
        .collect();
    let mut capabilities: Vec<String> = if drop.iter().any(|d| d == "CAP_ALL") {
        vec![]
    } else {
        DEFAULT_CAPABILITIES
            .iter()
            .map(|c| c.to_string())
            .filter(|c| !drop.contains(c))
            .collect()
    };
    for a in caps_spec.add.unwrap_or_default() {
        let a = cap_name(&a);
        if !capabilities.contains(&a) {
            capabilities.push(a);
        }
    }
    capabilities
}

/// Whether the runtime's default seccomp filter applies (`RuntimeDefault`);
/// `Localhost` profiles are refused.
fn seccomp(sc: &SecurityContext, psc: &PodSecurityContext) -> Result<bool, Waiting> {
    match sc
        .seccomp_profile
        .clone()
        .or(psc.seccomp_profile.clone())
        .map(|p| p.type_)
    {
        Some(t) if t == "RuntimeDefault" => Ok(true),
        Some(t) if t == "Localhost" => Err(waiting(
            "CreateContainerConfigError",
            "Localhost seccomp profiles are not supported by the pod agent",
        )),
        _ => Ok(false),
    }
}

/// The environment before the container's own: the image's, a default PATH,
/// HOSTNAME and the kubernetes Service variables a kubelet adds.
fn kubelet_env(shared: &Shared, pod: &Pod, image: &runtime::Image) -> Vec<(String, String)> {
    let mut base: Vec<(String, String)> = image
        .config
        .env
        .iter()
        .filter_map(|e| e.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    if !base.iter().any(|(k, _)| k == "PATH") {
        base.insert(
            0,
            (
                "PATH".into(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            ),
        );
    }
    base.push(("HOSTNAME".into(), pod.name_any()));
    let (h, p) = (&shared.service_host, shared.service_port);
    for (k, v) in [
        ("KUBERNETES_SERVICE_HOST", h.clone()),
        ("KUBERNETES_SERVICE_PORT", p.to_string()),
        ("KUBERNETES_SERVICE_PORT_HTTPS", p.to_string()),
        ("KUBERNETES_PORT", format!("tcp://{h}:{p}")),
        (
            &format!("KUBERNETES_PORT_{p}_TCP") as &str,
            format!("tcp://{h}:{p}"),
        ),
        (&format!("KUBERNETES_PORT_{p}_TCP_PROTO"), "tcp".into()),
        (&format!("KUBERNETES_PORT_{p}_TCP_PORT"), p.to_string()),
        (&format!("KUBERNETES_PORT_{p}_TCP_ADDR"), h.clone()),
    ] {
        base.push((k.to_string(), v));
    }
    base
}

/// argv as the kubelet builds it from the image's Entrypoint/Cmd and the
/// container's command/args, `$(VAR)` expanded.
fn argv(c: &Container, image: &runtime::Image, env: &[(String, String)]) -> Result<Vec<String>, Waiting> {
    let ex = |v: &Vec<String>| v.iter().map(|s| volumes::expand(s, env)).collect::<Vec<_>>();
    let command = c.command.clone().filter(|v| !v.is_empty());
    let args = c.args.clone().filter(|v| !v.is_empty());
    let argv = match (&command, &args) {
        (Some(cmd), Some(a)) => [ex(cmd), ex(a)].concat(),
        (Some(cmd), None) => ex(cmd),
        (None, Some(a)) => [image.config.entrypoint.clone().unwrap_or_default(), ex(a)].concat(),
        (None, None) => [
            image.config.entrypoint.clone().unwrap_or_default(),
            image.config.cmd.clone().unwrap_or_default(),
        ]
        .concat(),
    };
    if argv.is_empty() {
        return Err(waiting("CreateContainerConfigError", "no command specified"));
    }
    Ok(argv)
}

/// The container's volumeMounts as OCI mounts: tmpfs for memory emptyDirs,
/// else bind mounts of the prepared volume (or its subPath, created if
/// missing; `..` and absolute subPaths refused).
fn mounts(
    c: &Container,
    vols: &HashMap<String, volumes::HostVolume>,
    env: &[(String, String)],
) -> Result<Vec<Value>, Waiting> {
    let mut mounts = vec![];
    for vm in c.volume_mounts.iter().flatten() {
        let Some(hv) = vols.get(&vm.name) else {
            return Err(waiting(
                "CreateContainerConfigError",
                format!("volumeMount {:?}: no volume of that name", vm.name),
            ));
        };
        let ro = vm.read_only == Some(true) || hv.read_only;
        if let Some(size) = hv.tmpfs {
            let mut opts = vec!["nosuid".to_string(), "nodev".into(), "mode=1777".into()];
            if let Some(s) = size {
                opts.push(format!("size={s}"));
            }
            if ro {
                opts.push("ro".into());
            }
            mounts.push(
                json!({"destination": vm.mount_path, "type": "tmpfs", "source": "tmpfs", "options": opts}),
            );
            continue;
        }
        let sub = vm
            .sub_path
            .clone()
            .filter(|s| !s.is_empty())
            .or_else(|| vm.sub_path_expr.as_ref().map(|e| volumes::expand(e, env)));
        let mut source = hv.path.clone();
        if let Some(sub) = sub.filter(|s| !s.is_empty()) {
            if sub.split('/').any(|p| p == "..") || sub.starts_with('/') {
                return Err(waiting(
                    "CreateContainerConfigError",
                    format!("invalid subPath {sub:?}"),
                ));
            }
            source = source.join(&sub);
            if !source.exists() {
                let _ = std::fs::create_dir_all(&source);
            }
        }
        mounts.push(
            json!({"destination": vm.mount_path, "type": "bind", "source": source,
            "options": ["rbind", if ro { "ro" } else { "rw" }, "rprivate"]}),
        );
    }
    Ok(mounts)
}

fn cap_name(c: &str) -> String {
    let c = c.to_ascii_uppercase();
    if c.starts_with("CAP_") {
        c
    } else {
        format!("CAP_{c}")
    }
}
