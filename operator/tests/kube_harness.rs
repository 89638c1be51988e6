//! Proves the test cluster (`.ci/controlplane.sh` with the pod agent,
//! tools/pod-agent) at the pod level: the real Job controller creates Pods, the
//! agent binds them and runs them with runc from the `testbox` image (sh, sleep,
//! cat… from the host, made by tools/image-rootfs.sh), and a Pod behaves as on
//! a kubelet: environment, volumes, securityContext, memory limit, status,
//! graceful deletion.
#![allow(clippy::too_many_lines)] // the 80-line limit is for non-test code

mod common;

use std::time::Duration;

use common::kube_harness::*;
use k8s_openapi::api::{
    batch::v1::Job,
    core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Secret},
};
use kube::{
    api::{DeleteParams, Patch, PatchParams, PostParams},
    Api, Client,
};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);

/// A one-container Job of the testbox image running `command`, as PodSecurity
/// `restricted` admits it.
fn job(name: &str, command: &[&str], backoff_limit: i32, extra_spec: Value) -> Job {
    let mut spec = json!({
        "backoffLimit": backoff_limit,
        "template": { "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 5,
            "containers": [restricted(json!({ "name": "job", "image": "testbox", "command": command }))],
        }},
    });
    for (k, v) in extra_spec.as_object().unwrap() {
        spec[k] = v.clone();
    }
    serde_json::from_value(json!({ "metadata": { "name": name }, "spec": spec })).unwrap()
}

fn container_mut(j: &mut Job) -> &mut k8s_openapi::api::core::v1::Container {
    &mut j
        .spec
        .as_mut()
        .unwrap()
        .template
        .spec
        .as_mut()
        .unwrap()
        .containers[0]
}

struct Env {
    client: Client,
    ns: String,
    jobs: Api<Job>,
    pods: Pods,
}

async fn setup() -> Env {
    let client = test_client().await;
    let ns = fresh_namespace(&client).await;
    Env {
        jobs: Api::namespaced(client.clone(), &ns),
        pods: Pods::new(&client, &ns),
        client,
        ns,
    }
}

impl Env {
    async fn create(&self, job: Job) {
        self.jobs.create(&PostParams::default(), &job).await.unwrap();
    }

    async fn wait_finished(&self, name: &str) -> Job {
        wait_for(&self.jobs, name, T, job_finished).await
    }
}

fn status(j: &Job) -> k8s_openapi::api::batch::v1::JobStatus {
    j.status.clone().unwrap_or_default()
}

/// (active, succeeded, failed): the apiserver omits zero counters.
fn counts(j: &Job) -> (i32, i32, i32) {
    let s = status(j);
    (
        s.active.unwrap_or(0),
        s.succeeded.unwrap_or(0),
        s.failed.unwrap_or(0),
    )
}

fn terminated(p: &Pod) -> Value {
    let s = serde_json::to_value(p.status.clone().unwrap_or_default()).unwrap();
    s["containerStatuses"][0]["state"]["terminated"].clone()
}

#[tokio::test]
async fn a_job_runs_as_a_pod_under_runc_and_completes() {
    let env = setup().await;
    env.create(job("ok", &["sh", "-c", "id; sleep 1"], 6, json!({})))
        .await;
    let j = env.wait_finished("ok").await;
    let s = status(&j);
    assert!(job_condition(&j, "Complete"), "{s:#?}\n{}", env.pods.logs("ok"));
    assert!(job_condition(&j, "SuccessCriteriaMet"), "{s:#?}");
    assert_eq!(counts(&j), (0, 1, 0), "{s:#?}");
    let runs = env.pods.of_job("ok");
    assert_eq!(runs.len(), 1);
    let log = runs[0].log("job");
    assert!(log.contains("uid=65532"), "{log}");
    let rt = runs[0].runtime("job").expect("runtime record");
    assert_eq!(rt["runtime"], "runc");
    assert_eq!(rt["uid"][1], "65532", "{rt:#}");
    assert_eq!(rt["seccomp"], "2", "a seccomp filter: {rt:#}");
    assert_eq!(rt["noNewPrivs"], "1", "{rt:#}");
    assert_eq!(rt["capEff"], "0000000000000000", "{rt:#}");
    assert_eq!(rt["rootReadOnly"], false, "{rt:#}");
    // The Pod object as a kubelet leaves it.
    let pod: Pod = Api::namespaced(env.client.clone(), &env.ns)
        .get(&runs[0].name)
        .await
        .unwrap();
    let st = pod.status.clone().unwrap();
    assert_eq!(st.phase.as_deref(), Some("Succeeded"));
    let t = terminated(&pod);
    assert_eq!(
        (t["exitCode"].as_i64(), t["reason"].as_str()),
        (Some(0), Some("Completed")),
        "{t}"
    );
    assert_eq!(pod.spec.unwrap().node_name.as_deref(), Some("pod-agent"));
}

#[tokio::test]
async fn a_failing_job_is_retried_until_its_backoff_limit() {
    let env = setup().await;
    env.create(job(
        "bad",
        &["sh", "-c", "echo attempt on $HOSTNAME; exit 1"],
        1,
        json!({}),
    ))
    .await;
    let j = wait_for(&env.jobs, "bad", Duration::from_secs(120), job_finished).await;
    let failed = find_job_condition(&j, "Failed").unwrap_or_else(|| panic!("{:#?}", status(&j)));
    assert_eq!(failed.reason.as_deref(), Some("BackoffLimitExceeded"));
    assert_eq!(counts(&j), (0, 0, 2), "{:#?}", status(&j));
    let runs = env.pods.of_job("bad");
    assert_eq!(runs.len(), 2);
    for r in runs {
        assert_eq!(r.log("job").trim(), format!("attempt on {}", r.name));
    }
}

#[tokio::test]
async fn an_exit_code_matching_a_fail_job_rule_fails_the_job_at_once() {
    let env = setup().await;
    let policy = json!({ "podFailurePolicy": { "rules": [
        { "action": "FailJob", "onExitCodes": { "operator": "In", "values": [3, 42] } },
    ]}});
    env.create(job("permanent", &["sh", "-c", "exit 42"], 6, policy))
        .await;
    let j = env.wait_finished("permanent").await;
    let failed = find_job_condition(&j, "Failed").unwrap_or_else(|| panic!("not failed: {:#?}", status(&j)));
    assert_eq!(failed.reason.as_deref(), Some("PodFailurePolicy"));
    assert!(
        failed.message.as_deref().unwrap().contains("exit code 42"),
        "{failed:?}"
    );
    assert_eq!(env.pods.runs("permanent"), 1);
}

#[tokio::test]
async fn env_and_volumes_come_from_the_api_server() {
    let env = setup().await;
    let pp = PostParams::default();
    let secret: Secret =
        serde_json::from_value(json!({"metadata": {"name": "creds"}, "stringData": {"x": "secret-value"}}))
            .unwrap();
    Api::<Secret>::namespaced(env.client.clone(), &env.ns)
        .create(&pp, &secret)
        .await
        .unwrap();
    let cm: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "conf"}, "data": {"y": "config-value"}})).unwrap();
    Api::<ConfigMap>::namespaced(env.client.clone(), &env.ns)
        .create(&pp, &cm)
        .await
        .unwrap();
    let pvc: PersistentVolumeClaim = serde_json::from_value(json!({"metadata": {"name": "data"}, "spec": {
        "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}))
    .unwrap();
    Api::<PersistentVolumeClaim>::namespaced(env.client.clone(), &env.ns)
        .create(&pp, &pvc)
        .await
        .unwrap();

    let check = r#"set -e
test "$X" = secret-value; test "$Y" = config-value; test "$PLAIN" = plain; test "$REF" = plain-ref
test "$NS" = "$(cat /var/run/secrets/kubernetes.io/serviceaccount/namespace)"
test "$POD" = "$HOSTNAME"
test "$KUBERNETES_SERVICE_HOST" = 127.0.0.1; test -n "$KUBERNETES_SERVICE_PORT"
test -s /var/run/secrets/kubernetes.io/serviceaccount/token
test -s /var/run/secrets/kubernetes.io/serviceaccount/ca.crt
test "$(cat /etc/creds/x)" = secret-value; test "$(cat /etc/conf/y)" = config-value
echo scratch > /scratch/f; echo kept > /data/f
if echo no > /x 2>/dev/null; then echo "root is writable"; exit 1; fi
if echo no > /etc/creds/z 2>/dev/null; then echo "secret volume is writable"; exit 1; fi
echo "all good" > /dev/termination-log; sleep 1
"#;
    let mut j = job("envvol", &["sh", "-c", check], 0, json!({}));
    let c = container_mut(&mut j);
    c.env = Some(
        serde_json::from_value(json!([
            { "name": "X", "valueFrom": { "secretKeyRef": { "name": "creds", "key": "x" } } },
            { "name": "Y", "valueFrom": { "configMapKeyRef": { "name": "conf", "key": "y" } } },
            { "name": "PLAIN", "value": "plain" },
            { "name": "REF", "value": "$(PLAIN)-ref" },
            { "name": "NS", "valueFrom": { "fieldRef": { "fieldPath": "metadata.namespace" } } },
            { "name": "POD", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } },
        ]))
        .unwrap(),
    );
    c.security_context.as_mut().unwrap().read_only_root_filesystem = Some(true);
    c.volume_mounts = Some(
        serde_json::from_value(json!([
            {"name": "creds", "mountPath": "/etc/creds"}, {"name": "conf", "mountPath": "/etc/conf"},
            {"name": "scratch", "mountPath": "/scratch"}, {"name": "data", "mountPath": "/data"},
        ]))
        .unwrap(),
    );
    j.spec.as_mut().unwrap().template.spec.as_mut().unwrap().volumes = Some(
        serde_json::from_value(json!([
            {"name": "creds", "secret": {"secretName": "creds"}},
            {"name": "conf", "configMap": {"name": "conf"}},
            {"name": "scratch", "emptyDir": {}},
            {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
        ]))
        .unwrap(),
    );
    env.create(j).await;
    let j = env.wait_finished("envvol").await;
    assert!(
        job_condition(&j, "Complete"),
        "{:#?}\n{}",
        status(&j),
        env.pods.logs("envvol")
    );
    let run = &env.pods.of_job("envvol")[0];
    let pod: Pod = Api::namespaced(env.client.clone(), &env.ns)
        .get(&run.name)
        .await
        .unwrap();
    assert_eq!(terminated(&pod)["message"], "all good\n");
    let kept = agent_state_dir().join("volumes").join(&env.ns).join("data/f");
    assert_eq!(
        std::fs::read_to_string(kept).unwrap(),
        "kept\n",
        "the claim's directory outlives the pod"
    );
    assert_eq!(run.runtime("job").unwrap()["rootReadOnly"], true);
}

#[tokio::test]
async fn a_container_over_its_memory_limit_is_oom_killed() {
    let env = setup().await;
    let mut j = job("hungry", &["tail", "/dev/zero"], 0, json!({}));
    container_mut(&mut j).resources = Some(
        serde_json::from_value(json!({"limits": {"memory": "32Mi"}, "requests": {"memory": "32Mi"}}))
            .unwrap(),
    );
    env.create(j).await;
    let j = env.wait_finished("hungry").await;
    assert!(job_condition(&j, "Failed"), "{:#?}", status(&j));
    let run = &env.pods.of_job("hungry")[0];
    let pod: Pod = Api::namespaced(env.client.clone(), &env.ns)
        .get(&run.name)
        .await
        .unwrap();
    let t = terminated(&pod);
    assert_eq!(
        (t["exitCode"].as_i64(), t["reason"].as_str()),
        (Some(137), Some("OOMKilled")),
        "{t}"
    );
}

#[tokio::test]
async fn pods_that_cannot_start_say_why() {
    let env = setup().await;
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    let pod = |name: &str, image: &str, extra: Value| -> Pod {
        let mut c = restricted(json!({"name": "job", "image": image, "command": ["true"]}));
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        serde_json::from_value(
            json!({"metadata": {"name": name}, "spec": {"containers": [c], "restartPolicy": "Never"}}),
        )
        .unwrap()
    };
    let pp = PostParams::default();
    pods.create(&pp, &pod("noimage", "example.invalid/nothing:1", json!({})))
        .await
        .unwrap();
    pods.create(
        &pp,
        &pod(
            "nosecret",
            "testbox",
            json!({"env": [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "missing", "key": "a"}}}]}),
        ),
    )
    .await
    .unwrap();
    pods.create(
        &pp,
        &pod(
            "huge",
            "testbox",
            json!({"resources": {"requests": {"memory": "100Ti"}}}),
        ),
    )
    .await
    .unwrap();
    let waiting = |p: &Pod| -> Option<String> {
        let s = serde_json::to_value(p.status.clone().unwrap_or_default()).unwrap();
        s["containerStatuses"][0]["state"]["waiting"]["reason"]
            .as_str()
            .map(str::to_string)
    };
    wait_for(&pods, "noimage", T, |p| {
        waiting(p).as_deref() == Some("ErrImagePull")
    })
    .await;
    wait_for(&pods, "nosecret", T, |p| {
        waiting(p).as_deref() == Some("CreateContainerConfigError")
    })
    .await;
    let huge = wait_for(&pods, "huge", T, |p| {
        p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c.type_ == "PodScheduled" && c.reason.as_deref() == Some("Unschedulable"))
            })
    })
    .await;
    let msg = format!("{:?}", huge.status.unwrap().conditions);
    assert!(msg.contains("Insufficient memory"), "{msg}");
    // PodSecurity `restricted` is enforced: a root container is refused at admission.
    let root: Pod = serde_json::from_value(json!({"metadata": {"name": "root"}, "spec": {
        "containers": [{"name": "c", "image": "testbox", "command": ["true"]}]}}))
    .unwrap();
    let err = pods.create(&pp, &root).await.unwrap_err().to_string();
    assert!(err.contains("violates PodSecurity \"restricted"), "{err}");
}

#[tokio::test]
async fn suspending_a_running_job_stops_its_pod_gracefully_and_resuming_runs_a_new_one() {
    let env = setup().await;
    let script = "trap 'echo got TERM; exit 0' TERM; echo started; while :; do sleep 0.2; done";
    env.create(job("long", &["sh", "-c", script], 0, json!({}))).await;
    env.pods.wait_running("long", T).await;

    let suspend = |v: bool| Patch::Merge(json!({ "spec": { "suspend": v } }));
    env.jobs
        .patch("long", &PatchParams::default(), &suspend(true))
        .await
        .unwrap();
    let j = wait_for(&env.jobs, "long", T, |j| job_condition(j, "Suspended")).await;
    env.pods.wait_idle("long", T).await;
    assert_eq!(counts(&j).2, 0, "a suspension is no failure: {:#?}", status(&j));
    assert!(
        env.pods.of_job("long")[0].log("job").contains("got TERM"),
        "SIGTERM first"
    );

    env.jobs
        .patch("long", &PatchParams::default(), &suspend(false))
        .await
        .unwrap();
    env.pods.wait_running("long", T).await;
    assert_eq!(env.pods.runs("long"), 2);
    env.jobs
        .delete("long", &DeleteParams::foreground())
        .await
        .unwrap();
    env.pods.wait_idle("long", T).await;
}

#[tokio::test]
async fn a_killed_container_is_a_failed_attempt_and_retried() {
    let env = setup().await;
    assert!(!env.pods.kill("dying").await, "nothing runs yet");
    env.create(job("dying", &["sleep", "300"], 1, json!({}))).await;
    env.pods.wait_running("dying", T).await;
    assert!(env.pods.kill("dying").await);
    // The retry (after the Job controller's 10 s backoff): one failure counted, a new pod running.
    let j = wait_for(&env.jobs, "dying", T, |j| counts(j).2 == 1 && counts(j).0 == 1).await;
    assert!(!job_finished(&j), "{:#?}", status(&j));
    env.pods.wait_running("dying", T).await;
    assert_eq!(env.pods.runs("dying"), 2);
    let first = &env.pods.of_job("dying")[0];
    let pod: Pod = Api::namespaced(env.client.clone(), &env.ns)
        .get(&first.name)
        .await
        .unwrap();
    assert_eq!(terminated(&pod)["exitCode"], 137);
    env.jobs
        .delete("dying", &DeleteParams::foreground())
        .await
        .unwrap();
    env.pods.wait_idle("dying", T).await;
}
