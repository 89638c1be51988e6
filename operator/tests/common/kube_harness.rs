//! End-to-end test harness for the test cluster of `.ci/controlplane.sh`: a
//! real kube-apiserver and kube-controller-manager (the Job, TTL, ServiceAccount
//! and garbage-collector controllers) and the pod agent (`tools/pod-agent`),
//! which runs every Pod with runc from the image's root filesystem. A client
//! from `KUBECONFIG`, fresh namespaces (PodSecurity `restricted` enforced),
//! [`wait_for`] an object to reach a state, and [`Pods`]: what the pod agent
//! ran for a Job (pods started, their logs and runtime records), and a way to
//! kill a running container.
#![allow(dead_code)]

use std::{
    fmt::Debug,
    path::{Path, PathBuf},
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::{
    batch::v1::{Job, JobCondition},
    core::v1::{Namespace, Pod},
};
use kube::{
    api::{ListParams, PostParams},
    runtime::WatchStreamExt,
    Api, Client, Resource,
};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

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

/// Creates a namespace with a unique name (`t-…`), PodSecurity `restricted`
/// enforced, and returns the name.
pub async fn fresh_namespace(client: &Client) -> String {
    let name = format!("t-{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
    let ns: Namespace = serde_json::from_value(json!({
        "metadata": { "name": name, "labels": {
            "postcodes.dev/test": "true",
            "pod-security.kubernetes.io/enforce": "restricted",
            "pod-security.kubernetes.io/enforce-version": "latest",
        } }
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

/// The pod agent's state directory (`POD_AGENT_STATE_DIR`, set by `make test`).
pub fn agent_state_dir() -> PathBuf {
    PathBuf::from(
        std::env::var_os("POD_AGENT_STATE_DIR").expect(
            "POD_AGENT_STATE_DIR is not set: run the tests with `make test`, which starts the pod agent",
        ),
    )
}

/// One Pod the pod agent started, from its records (they outlive the Pod object).
#[derive(Debug, Clone)]
pub struct PodRun {
    pub dir: PathBuf,
    pub name: String,
    pub uid: String,
    pub labels: serde_json::Map<String, Value>,
}

impl PodRun {
    /// stdout+stderr of the container (every run of it).
    pub fn log(&self, container: &str) -> String {
        std::fs::read_to_string(self.dir.join("containers").join(container).join("log")).unwrap_or_default()
    }

    /// What the kernel said about the container's process (see tools/pod-agent/README.md).
    pub fn runtime(&self, container: &str) -> Option<Value> {
        let b = std::fs::read(self.dir.join("containers").join(container).join("runtime.json")).ok()?;
        serde_json::from_slice(&b).ok()
    }

    /// The OCI config the container was started with.
    pub fn oci_config(&self, container: &str) -> Option<Value> {
        let b = std::fs::read(
            self.dir
                .join("containers")
                .join(container)
                .join("bundle/config.json"),
        )
        .ok()?;
        serde_json::from_slice(&b).ok()
    }

    /// The container was started (runc ran it).
    pub fn started(&self, container: &str) -> bool {
        self.dir.join("containers").join(container).join("log").exists()
    }

    /// runc's id of the container.
    pub fn container_id(&self, container: &str) -> String {
        format!("{}_{container}", self.uid)
    }
}

/// What the pod agent ran in one namespace.
#[derive(Clone)]
pub struct Pods {
    pub client: Client,
    pub ns: String,
}

impl Pods {
    pub fn new(client: &Client, ns: &str) -> Pods {
        Pods {
            client: client.clone(),
            ns: ns.to_string(),
        }
    }

    /// Every Pod the agent took on in this namespace, oldest first.
    pub fn all(&self) -> Vec<PodRun> {
        let dir = agent_state_dir().join("pods").join(&self.ns);
        let mut out = vec![];
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let Ok(b) = std::fs::read(e.path().join("pod.json")) else {
                continue;
            };
            let Ok(v) = serde_json::from_slice::<Value>(&b) else {
                continue;
            };
            let created = std::fs::metadata(e.path().join("pod.json"))
                .and_then(|m| m.modified())
                .ok();
            out.push((
                created,
                PodRun {
                    dir: e.path(),
                    name: v["name"].as_str().unwrap_or("").to_string(),
                    uid: v["uid"].as_str().unwrap_or("").to_string(),
                    labels: v["labels"].as_object().cloned().unwrap_or_default(),
                },
            ));
        }
        out.sort_by_key(|(t, _)| *t);
        out.into_iter().map(|(_, p)| p).collect()
    }

    /// The Pods of a Job the agent took on (started or not), oldest first.
    pub fn of_job(&self, job: &str) -> Vec<PodRun> {
        self.all()
            .into_iter()
            .filter(|p| {
                p.labels
                    .get("batch.kubernetes.io/job-name")
                    .and_then(Value::as_str)
                    == Some(job)
            })
            .collect()
    }

    /// How many Pods of that Job had their container started.
    pub fn runs(&self, job: &str) -> usize {
        self.of_job(job).iter().filter(|p| p.started("job")).count()
    }

    /// The Pods of that Job in phase Running now (from the API server).
    pub async fn running(&self, job: &str) -> Vec<Pod> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &self.ns);
        let lp = ListParams::default().labels(&format!("batch.kubernetes.io/job-name={job}"));
        api.list(&lp)
            .await
            .map(|l| l.items)
            .unwrap_or_default()
            .into_iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect()
    }

    /// Waits until a Pod of that Job runs; returns it.
    pub async fn wait_running(&self, job: &str, timeout: Duration) -> Pod {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(p) = self.running(job).await.into_iter().next() {
                return p;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "no Pod of Job {job} ran within {timeout:?}; pods seen: {:?}",
                    self.of_job(job)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until no Pod of that Job is running or about to run.
    pub async fn wait_idle(&self, job: &str, timeout: Duration) {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &self.ns);
        let lp = ListParams::default().labels(&format!("batch.kubernetes.io/job-name={job}"));
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let busy = api
                .list(&lp)
                .await
                .map(|l| l.items)
                .unwrap_or_default()
                .into_iter()
                .any(|p| {
                    !matches!(
                        p.status.as_ref().and_then(|s| s.phase.as_deref()),
                        Some("Succeeded") | Some("Failed")
                    )
                });
            if !busy {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("Pods of Job {job} still running after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// SIGKILLs the container of a running Pod of that Job (a Pod dying); false
    /// when none runs.
    pub async fn kill(&self, job: &str) -> bool {
        let Some(p) = self.running(job).await.into_iter().next() else {
            return false;
        };
        kill_container(&p.metadata.uid.unwrap_or_default(), "job")
    }

    /// Every Pod log of that Job, with headers (for assertion messages).
    pub fn logs(&self, job: &str) -> String {
        self.of_job(job)
            .iter()
            .map(|p| format!("--- {} ---\n{}\n", p.name, p.log("job")))
            .collect()
    }
}

/// `runc kill <id> KILL` on a container of the pod agent.
pub fn kill_container(pod_uid: &str, container: &str) -> bool {
    let root = std::env::var_os("RUNC_ROOT").expect("RUNC_ROOT is not set: run the tests with `make test`");
    std::process::Command::new("runc")
        .arg("--root")
        .arg(root)
        .args(["kill", &format!("{pod_uid}_{container}"), "KILL"])
        .status()
        .is_ok_and(|s| s.success())
}

/// A container spec the PodSecurity `restricted` profile admits: non-root
/// (65532), no privilege escalation, every capability dropped, RuntimeDefault seccomp.
pub fn restricted(mut container: Value) -> Value {
    container["securityContext"] = json!({
        "runAsNonRoot": true, "runAsUser": 65532, "allowPrivilegeEscalation": false,
        "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
    });
    container
}

/// Lines of the API server's audit log (`AUDIT_LOG`) about `namespace`.
pub fn audit_events(namespace: &str) -> Vec<Value> {
    let path = std::env::var_os("AUDIT_LOG").expect("AUDIT_LOG is not set: run the tests with `make test`");
    std::fs::read_to_string(Path::new(&path))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["objectRef"]["namespace"].as_str() == Some(namespace))
        .collect()
}

/// The Job ServiceAccount with the Role the chart gives it (charts/postcode-operator/templates/job-rbac.yaml).
pub async fn create_job_service_account(client: &Client, ns: &str, name: &str) {
    use k8s_openapi::api::{
        core::v1::ServiceAccount,
        rbac::v1::{Role, RoleBinding},
    };
    let pp = PostParams::default();
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create(&pp, &sa)
        .await
        .unwrap();
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": name},
        "rules": [
            {"apiGroups": ["postcodes.dev"], "resources": ["postcodeimports"], "verbs": ["get"]},
            {"apiGroups": ["postcodes.dev"], "resources": ["postcodeimports/status"], "verbs": ["get", "patch"]},
        ],
    }))
    .unwrap();
    Api::<Role>::namespaced(client.clone(), ns)
        .create(&pp, &role)
        .await
        .unwrap();
    let rb: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}],
    }))
    .unwrap();
    Api::<RoleBinding>::namespaced(client.clone(), ns)
        .create(&pp, &rb)
        .await
        .unwrap();
}
