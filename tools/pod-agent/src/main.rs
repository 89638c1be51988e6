//! `pod-agent`: a small kubelet for the test cluster (see README.md). It
//! registers one Node, binds unscheduled Pods to it (the Binding subresource, as
//! kube-scheduler does), and runs the containers of the Pods bound to it with
//! `runc`, writing Pod status as a kubelet does.

mod pod;
mod quantity;
mod runtime;
mod volumes;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use clap::Parser;
use futures::StreamExt;
use k8s_openapi::{
    api::core::v1::{Node, Pod},
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};
use kube::{
    api::{Patch, PatchParams, PostParams},
    runtime::{
        watcher::{self, watcher, Event},
        WatchStreamExt,
    },
    Api, Client, ResourceExt,
};
use serde_json::json;
use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

/// The agent's command line.
#[derive(Parser, Debug, Clone)]
#[command(about = "A small kubelet for the test cluster: runs the Pods bound to its Node with runc")]
pub struct Args {
    /// Credentials of the agent itself (the Pods never see them).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: PathBuf,
    /// Name of the Node this agent registers and serves.
    #[arg(long, default_value = "pod-agent")]
    pub node_name: String,
    /// Where bundles, volumes, logs and runtime records live (see README.md).
    #[arg(long)]
    pub state_dir: PathBuf,
    /// An image the agent can run: `NAME=DIR`, DIR holding `rootfs/` and
    /// `image.json` (made by tools/image-rootfs.sh). NAME matches an image
    /// reference with any tag or digest. Repeatable.
    #[arg(long = "image", value_parser = parse_image)]
    pub images: Vec<(String, PathBuf)>,
    /// Allocatable CPU of the Node.
    #[arg(long, default_value = "2")]
    pub cpu: String,
    /// Allocatable memory of the Node.
    #[arg(long, default_value = "8Gi")]
    pub memory: String,
    /// Allocatable pods of the Node.
    #[arg(long, default_value_t = 110)]
    pub max_pods: u32,
    /// The runc binary.
    #[arg(long, default_value = "runc")]
    pub runc: PathBuf,
    /// Bind Pods without a node to this Node (there is no kube-scheduler).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub bind: bool,
    /// KUBERNETES_SERVICE_HOST given to containers (default: the API server's host).
    #[arg(long)]
    pub service_host: Option<String>,
    /// KUBERNETES_SERVICE_PORT given to containers (default: the API server's port).
    #[arg(long)]
    pub service_port: Option<u16>,
}

fn parse_image(s: &str) -> Result<(String, PathBuf), String> {
    let (name, dir) = s.split_once('=').ok_or("expected NAME=DIR")?;
    Ok((name.to_string(), PathBuf::from(dir)))
}

/// What every task of the agent shares.
pub struct Shared {
    pub args: Args,
    pub client: Client,
    pub service_host: String,
    pub service_port: u16,
    pub runtime: runtime::Runtime,
    /// Requests (cpu millicores, memory bytes) of the non-terminal Pods bound here.
    pub bound: Mutex<HashMap<String, (f64, f64)>>,
}

impl Shared {
    pub fn node(&self) -> &str {
        &self.args.node_name
    }
}

struct Supervisor {
    tx: watch::Sender<Option<Pod>>,
    task: JoinHandle<()>,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .with_target(false)
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let kubeconfig = kube::config::Kubeconfig::read_from(&args.kubeconfig)
        .with_context(|| format!("read {}", args.kubeconfig.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    let url = config.cluster_url.clone();
    let service_host = args.service_host.clone().unwrap_or_else(|| {
        url.host()
            .unwrap_or("127.0.0.1")
            .trim_matches(['[', ']'])
            .to_string()
    });
    let service_port = args.service_port.unwrap_or_else(|| url.port_u16().unwrap_or(443));
    let client = Client::try_from(config)?;
    std::fs::create_dir_all(&args.state_dir)?;
    let runtime = runtime::Runtime::new(&args)?;
    runtime.clean_leftovers().await;
    let shared = Arc::new(Shared {
        args: args.clone(),
        client,
        service_host,
        service_port,
        runtime,
        bound: Mutex::new(HashMap::new()),
    });
    register_node(&shared).await.context("register the Node")?;
    info!(
        node = shared.node(),
        "node registered; containers reach the API server at {}:{}", shared.service_host, shared.service_port
    );
    tokio::spawn(heartbeat(shared.clone()));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = watch_pods(shared.clone()) => r,
        _ = term.recv() => {
            info!("SIGTERM: stopping every container");
            shared.runtime.clean_leftovers().await;
            Ok(())
        }
        _ = tokio::signal::ctrl_c() => {
            shared.runtime.clean_leftovers().await;
            Ok(())
        }
    }
}

fn node_status(shared: &Shared) -> serde_json::Value {
    let a = &shared.args;
    let now = Time(Timestamp::now());
    let resources = json!({"cpu": a.cpu, "memory": a.memory, "pods": a.max_pods.to_string(), "ephemeral-storage": "100Gi"});
    let cond = |t: &str, status: &str, reason: &str, msg: &str| {
        json!({"type": t, "status": status, "reason": reason, "message": msg,
               "lastHeartbeatTime": now, "lastTransitionTime": now})
    };
    json!({
        "capacity": resources,
        "allocatable": resources,
        "conditions": [
            cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "pod-agent has sufficient memory available"),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "pod-agent has no disk pressure"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID", "pod-agent has sufficient PID available"),
            cond("Ready", "True", "KubeletReady", "pod-agent is posting ready status"),
        ],
        "addresses": [
            {"type": "InternalIP", "address": "127.0.0.1"},
            {"type": "Hostname", "address": a.node_name},
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
        "nodeInfo": {
            "machineID": "pod-agent", "systemUUID": "pod-agent", "bootID": "pod-agent",
            "kernelVersion": runtime::kernel_version(), "osImage": "pod-agent (runc)",
            "containerRuntimeVersion": format!("runc://{}", shared.runtime.version),
            "kubeletVersion": "v0.0.0-pod-agent", "kubeProxyVersion": "",
            "operatingSystem": "linux", "architecture": "amd64",
        },
    })
}

async fn register_node(shared: &Shared) -> Result<()> {
    let nodes: Api<Node> = Api::all(shared.client.clone());
    let name = shared.node();
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {
            "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64", "node.kubernetes.io/pod-agent": "true"}},
    }))?;
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    // The TaintNodesByCondition admission plugin taints a new Node not-ready; the
    // node lifecycle controller (not run here) would lift it once Ready.
    nodes
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"taints": null}})),
        )
        .await?;
    nodes
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": node_status(shared)})),
        )
        .await?;
    Ok(())
}

async fn heartbeat(shared: Arc<Shared>) {
    let nodes: Api<Node> = Api::all(shared.client.clone());
    loop {
        tokio::time::sleep(Duration::from_secs(20)).await;
        let r = nodes
            .patch_status(
                shared.node(),
                &PatchParams::default(),
                &Patch::Merge(json!({"status": node_status(&shared)})),
            )
            .await;
        if let Err(e) = r {
            warn!("node heartbeat: {e}");
            if let Err(e) = register_node(&shared).await {
                warn!("re-register the node: {e}");
            }
        }
    }
}

/// The watch over every Pod: binds the unscheduled ones, hands each version of
/// a Pod bound here to its supervisor.
async fn watch_pods(shared: Arc<Shared>) -> Result<()> {
    let api: Api<Pod> = Api::all(shared.client.clone());
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut sups: HashMap<String, Supervisor> = HashMap::new();
    let mut unbound: BTreeMap<String, Pod> = BTreeMap::new();
    let mut listed: Option<HashSet<String>> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let ev = tokio::select! {
            ev = stream.next() => match ev { Some(ev) => ev, None => return Ok(()) },
            _ = tick.tick() => {
                sups.retain(|_, s| !s.task.is_finished());
                bind_pending(&shared, &mut unbound).await;
                continue;
            }
        };
        match ev {
            Ok(Event::Init) => listed = Some(HashSet::new()),
            Ok(Event::InitApply(p)) => {
                if let Some(l) = listed.as_mut() {
                    l.insert(p.uid().unwrap_or_default());
                }
                dispatch(&shared, &mut sups, &mut unbound, p);
            }
            Ok(Event::InitDone) => {
                let seen = listed.take().unwrap_or_default();
                for (uid, s) in sups.iter() {
                    if !seen.contains(uid) {
                        s.tx.send_replace(None);
                    }
                }
                unbound.retain(|uid, _| seen.contains(uid));
                bind_pending(&shared, &mut unbound).await;
            }
            Ok(Event::Apply(p)) => {
                dispatch(&shared, &mut sups, &mut unbound, p);
                bind_pending(&shared, &mut unbound).await;
            }
            Ok(Event::Delete(p)) => {
                let uid = p.uid().unwrap_or_default();
                unbound.remove(&uid);
                shared.bound.lock().unwrap().remove(&uid);
                if let Some(s) = sups.get(&uid) {
                    s.tx.send_replace(None);
                }
            }
            Err(e) => warn!("pod watch error (retrying): {e}"),
        }
    }
}

fn dispatch(
    shared: &Arc<Shared>,
    sups: &mut HashMap<String, Supervisor>,
    unbound: &mut BTreeMap<String, Pod>,
    pod: Pod,
) {
    let uid = pod.uid().unwrap_or_default();
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default();
    if node.is_empty() {
        let ours = pod
            .spec
            .as_ref()
            .and_then(|s| s.scheduler_name.as_deref())
            .is_none_or(|s| s == "default-scheduler");
        if shared.args.bind && ours && pod.metadata.deletion_timestamp.is_none() {
            unbound.insert(uid, pod);
        }
        return;
    }
    unbound.remove(&uid);
    if node != shared.node() {
        return;
    }
    if let Some(s) = sups.get(&uid) {
        if !s.task.is_finished() {
            s.tx.send_replace(Some(pod));
            return;
        }
    }
    if sups.contains_key(&uid) {
        return; // its supervisor is done: the Pod was handled to the end
    }
    let (tx, rx) = watch::channel(Some(pod));
    let task = tokio::spawn(pod::supervise(shared.clone(), rx));
    sups.insert(uid, Supervisor { tx, task });
}

/// Binds the Pods waiting for a node, oldest first, when their requests fit what
/// is left of the Node's allocatable; else marks them Unschedulable as the
/// scheduler would.
/// Reports a Pod that does not fit as the scheduler does: `PodScheduled`
/// False, reason Unschedulable, the scheduler's message (written once).
async fn mark_unschedulable(pods: &Api<Pod>, p: &Pod, why: &[&str]) {
    let msg = format!(
        "0/1 nodes are available: {}. preemption: 0/1 nodes are available: 1 No preemption victims found for incoming pod.",
        why.iter().map(|w| format!("1 {w}")).collect::<Vec<_>>().join(", ")
    );
    let already = p
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c.type_ == "PodScheduled" && c.message.as_deref() == Some(&msg))
        });
    if already {
        return;
    }
    let patch = json!({"status": {"conditions": [{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": msg, "lastTransitionTime": Time(Timestamp::now())}]}});
    if let Err(e) = pods
        .patch_status(&p.name_any(), &PatchParams::default(), &Patch::Strategic(patch))
        .await
    {
        warn!(
            "mark {}/{} unschedulable: {e}",
            p.namespace().unwrap_or_default(),
            p.name_any()
        );
    }
}

async fn bind_pending(shared: &Arc<Shared>, unbound: &mut BTreeMap<String, Pod>) {
    if unbound.is_empty() {
        return;
    }
    let mut order: Vec<Pod> = unbound.values().cloned().collect();
    order.sort_by_key(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0));
    let alloc_cpu = quantity::cpu_millis(&shared.args.cpu).unwrap_or(2000.0);
    let alloc_mem = quantity::bytes(&shared.args.memory).unwrap_or(8e9);
    for p in order {
        let uid = p.uid().unwrap_or_default();
        let (cpu, mem) = quantity::pod_requests(&p);
        let (used_cpu, used_mem, count) = {
            let b = shared.bound.lock().unwrap();
            b.values()
                .fold((0.0, 0.0, b.len()), |(c, m, n), (c2, m2)| (c + c2, m + m2, n))
        };
        let mut why = vec![];
        if used_cpu + cpu > alloc_cpu {
            why.push("Insufficient cpu");
        }
        if used_mem + mem > alloc_mem {
            why.push("Insufficient memory");
        }
        if count as u32 >= shared.args.max_pods {
            why.push("Too many pods");
        }
        let pods: Api<Pod> = Api::namespaced(shared.client.clone(), &p.namespace().unwrap_or_default());
        if !why.is_empty() {
            mark_unschedulable(&pods, &p, &why).await;
            continue;
        }
        let binding = json!({
            "apiVersion": "v1", "kind": "Binding",
            "metadata": {"name": p.name_any(), "namespace": p.namespace(), "uid": uid},
            "target": {"apiVersion": "v1", "kind": "Node", "name": shared.node()},
        });
        let r: Result<serde_json::Value, _> = pods
            .create_subresource("binding", &p.name_any(), &PostParams::default(), &binding)
            .await;
        match r {
            Ok(_) => {
                shared.bound.lock().unwrap().insert(uid.clone(), (cpu, mem));
                info!(
                    "bound {}/{} to {}",
                    p.namespace().unwrap_or_default(),
                    p.name_any(),
                    shared.node()
                );
                unbound.remove(&uid);
            }
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {
                unbound.remove(&uid);
            }
            Err(e) => warn!("bind {}/{}: {e}", p.namespace().unwrap_or_default(), p.name_any()),
        }
    }
}
