//! Proves the Kubernetes test harness (`common::kube_harness`) against the real
//! kube-apiserver of the test control plane (`KUBECONFIG`, set by `make test`):
//! the fake kubelet runs Jobs as local processes and writes a Job status the
//! apiserver accepts, like the real Job controller.

mod common;

use std::{path::PathBuf, time::Duration};

use common::kube_harness::*;
use k8s_openapi::api::{batch::v1::Job, core::v1::Secret};
use kube::{
    api::{DeleteParams, Patch, PatchParams, PostParams},
    Api, Client,
};
use serde_json::json;

const T: Duration = Duration::from_secs(20);

/// The directory of this build's binaries (the harness tests need none of them).
fn build_bin_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_postcode-operator"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A one-container Job running `command`.
fn job(name: &str, command: &[&str], backoff_limit: i32, extra_spec: serde_json::Value) -> Job {
    let mut spec = json!({
        "backoffLimit": backoff_limit,
        "template": { "spec": {
            "restartPolicy": "Never",
            "containers": [{ "name": "job", "image": "example.invalid/none", "command": command }],
        }},
    });
    for (k, v) in extra_spec.as_object().unwrap() {
        spec[k] = v.clone();
    }
    serde_json::from_value(json!({ "metadata": { "name": name }, "spec": spec })).unwrap()
}

struct Env {
    client: Client,
    ns: String,
    jobs: Api<Job>,
    kubelet: FakeKubelet,
}

async fn setup(bin_dir: PathBuf, extra_env: Vec<(String, String)>) -> Env {
    let client = test_client().await;
    let ns = fresh_namespace(&client).await;
    let kubelet = FakeKubelet::start(client.clone(), &ns, bin_dir, extra_env);
    Env {
        jobs: Api::namespaced(client.clone(), &ns),
        client,
        ns,
        kubelet,
    }
}

impl Env {
    async fn create(&self, job: Job) {
        self.jobs.create(&PostParams::default(), &job).await.unwrap();
    }

    async fn wait_finished(&self, name: &str) -> Job {
        wait_for(&self.jobs, name, T, job_finished).await
    }

    fn assert_no_harness_errors(&self) {
        assert!(
            self.kubelet.errors().is_empty(),
            "harness errors: {:#?}",
            self.kubelet.errors()
        );
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

fn active(j: &Job) -> i32 {
    counts(j).0
}

fn failed(j: &Job) -> i32 {
    counts(j).2
}

#[tokio::test]
async fn a_job_running_true_completes() {
    let env = setup(build_bin_dir(), vec![]).await;
    env.create(job("ok", &["true"], 6, json!({}))).await;
    let j = env.wait_finished("ok").await;
    let s = status(&j);
    assert!(job_condition(&j, "Complete"), "{s:#?}");
    assert!(job_condition(&j, "SuccessCriteriaMet"), "{s:#?}");
    assert!(!job_condition(&j, "Failed"), "{s:#?}");
    assert_eq!(counts(&j), (0, 1, 0), "{s:#?}");
    assert!(s.start_time.is_some() && s.completion_time.is_some(), "{s:#?}");
    assert_eq!(env.kubelet.runs("ok"), 1);
    assert!(env.kubelet.log_path("ok", 1).exists());
    env.assert_no_harness_errors();
    env.kubelet.stop().await;
}

#[tokio::test]
async fn a_failing_job_is_retried_until_its_backoff_limit() {
    let env = setup(build_bin_dir(), vec![]).await;
    env.create(job(
        "bad",
        &["sh", "-c", "echo attempt on $HOSTNAME; exit 1"],
        2,
        json!({}),
    ))
    .await;
    let j = env.wait_finished("bad").await;
    let s = status(&j);
    assert!(
        job_condition(&j, "Failed") && job_condition(&j, "FailureTarget"),
        "{s:#?}"
    );
    assert!(!job_condition(&j, "Complete"), "{s:#?}");
    let failed = find_job_condition(&j, "Failed").unwrap();
    assert_eq!(failed.reason.as_deref(), Some("BackoffLimitExceeded"));
    assert!(
        failed.message.as_deref().unwrap().contains("exit code 1"),
        "{failed:?}"
    );
    assert_eq!(counts(&j), (0, 0, 3), "{s:#?}");
    assert!(s.completion_time.is_none(), "{s:#?}");
    assert_eq!(env.kubelet.runs("bad"), 3);
    // One log per attempt, each with its own pod name.
    for attempt in 1..=3 {
        let log = std::fs::read_to_string(env.kubelet.log_path("bad", attempt)).unwrap();
        assert_eq!(log.trim(), format!("attempt on bad-{attempt}"));
    }
    env.assert_no_harness_errors();
}

#[tokio::test]
async fn an_exit_code_matching_a_fail_job_rule_fails_the_job_at_once() {
    let env = setup(build_bin_dir(), vec![]).await;
    let policy = json!({ "podFailurePolicy": { "rules": [
        { "action": "FailJob", "onExitCodes": { "operator": "In", "values": [3, 42] } },
    ]}});
    env.create(job("permanent", &["sh", "-c", "exit 42"], 6, policy))
        .await;
    let j = env.wait_finished("permanent").await;
    let s = status(&j);
    let failed = find_job_condition(&j, "Failed").unwrap_or_else(|| panic!("not failed: {s:#?}"));
    assert_eq!(failed.status, "True");
    assert_eq!(failed.reason.as_deref(), Some("PodFailurePolicy"));
    assert!(
        failed.message.as_deref().unwrap().contains("exit code 42"),
        "{failed:?}"
    );
    assert_eq!(counts(&j), (0, 0, 1), "{s:#?}");
    assert_eq!(env.kubelet.runs("permanent"), 1);
    env.assert_no_harness_errors();
}

#[tokio::test]
async fn env_comes_from_secrets_fields_values_and_extra_env() {
    let env = setup(build_bin_dir(), vec![("EXTRA".into(), "from-the-test".into())]).await;
    let secret: Secret = serde_json::from_value(json!({
        "metadata": { "name": "creds" },
        "stringData": { "x": "secret-value" },
    }))
    .unwrap();
    Api::<Secret>::namespaced(env.client.clone(), &env.ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();

    let mut j = job(
        "secret",
        &["sh", "-c", r#"test "$X" = secret-value"#],
        0,
        json!({}),
    );
    j.spec
        .as_mut()
        .unwrap()
        .template
        .spec
        .as_mut()
        .unwrap()
        .containers[0]
        .env = Some(
        serde_json::from_value(json!([
            { "name": "X", "valueFrom": { "secretKeyRef": { "name": "creds", "key": "x" } } },
        ]))
        .unwrap(),
    );
    env.create(j).await;

    let check = format!(
        r#"set -e; test "$PLAIN" = plain; test "$NS" = {ns}; test "$POD" = fields-1; test "$EXTRA" = from-the-test; test -z "$CARGO_PKG_NAME""#,
        ns = env.ns
    );
    let mut j = job("fields", &["sh", "-c", &check], 0, json!({}));
    j.spec
        .as_mut()
        .unwrap()
        .template
        .spec
        .as_mut()
        .unwrap()
        .containers[0]
        .env = Some(
        serde_json::from_value(json!([
            { "name": "PLAIN", "value": "plain" },
            { "name": "NS", "valueFrom": { "fieldRef": { "fieldPath": "metadata.namespace" } } },
            { "name": "POD", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } },
        ]))
        .unwrap(),
    );
    env.create(j).await;

    for name in ["secret", "fields"] {
        let j = env.wait_finished(name).await;
        assert!(
            job_condition(&j, "Complete"),
            "{name}: {:#?}\n{}",
            status(&j),
            env.kubelet.logs(name)
        );
        assert_eq!(env.kubelet.runs(name), 1);
    }
    env.assert_no_harness_errors();
}

#[tokio::test]
async fn commands_come_from_the_bin_dir() {
    let bin = common::temp_dir("harness-bin");
    let script = bin.join("probe-job");
    std::fs::write(&script, "#!/bin/sh\necho \"probe $*\"\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let env = setup(bin, vec![]).await;
    let mut j = job("probe", &["probe-job", "a"], 0, json!({}));
    j.spec
        .as_mut()
        .unwrap()
        .template
        .spec
        .as_mut()
        .unwrap()
        .containers[0]
        .args = Some(vec!["b".into(), "c d".into()]);
    env.create(j).await;
    let j = env.wait_finished("probe").await;
    assert!(
        job_condition(&j, "Complete"),
        "{:#?}\n{}",
        status(&j),
        env.kubelet.logs("probe")
    );
    assert_eq!(
        std::fs::read_to_string(env.kubelet.log_path("probe", 1)).unwrap(),
        "probe a b c d\n"
    );
    env.assert_no_harness_errors();
}

#[tokio::test]
async fn a_suspended_job_runs_only_once_resumed() {
    let env = setup(build_bin_dir(), vec![]).await;
    env.create(job("later", &["true"], 6, json!({ "suspend": true })))
        .await;
    // The kubelet marks it Suspended once it has seen it: from then on, it would have run.
    let j = wait_for(&env.jobs, "later", T, |j| job_condition(j, "Suspended")).await;
    assert_eq!(env.kubelet.runs("later"), 0);
    assert_eq!(active(&j), 0);

    env.jobs
        .patch(
            "later",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "suspend": false } })),
        )
        .await
        .unwrap();
    let j = env.wait_finished("later").await;
    assert!(job_condition(&j, "Complete"), "{:#?}", status(&j));
    let suspended = find_job_condition(&j, "Suspended").unwrap();
    assert_eq!(
        (suspended.status.as_str(), suspended.reason.as_deref()),
        ("False", Some("JobResumed"))
    );
    assert_eq!(env.kubelet.runs("later"), 1);
    env.assert_no_harness_errors();
}

#[tokio::test]
async fn suspending_a_running_job_kills_it_and_resuming_runs_it_again() {
    let env = setup(build_bin_dir(), vec![]).await;
    env.create(job("long", &["sh", "-c", "sleep 30"], 0, json!({})))
        .await;
    wait_for(&env.jobs, "long", T, |j| active(j) == 1).await;
    assert!(env.kubelet.running("long"));

    env.jobs
        .patch(
            "long",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "suspend": true } })),
        )
        .await
        .unwrap();
    let j = wait_for(&env.jobs, "long", T, |j| job_condition(j, "Suspended")).await;
    let s = status(&j);
    assert_eq!(counts(&j), (0, 0, 0), "a suspension is no failure: {s:#?}");
    assert!(s.start_time.is_none(), "{s:#?}");
    assert!(!env.kubelet.running("long"));

    env.jobs
        .patch(
            "long",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "suspend": false } })),
        )
        .await
        .unwrap();
    wait_for(&env.jobs, "long", T, |j| {
        active(j) == 1 && !job_condition(j, "Suspended")
    })
    .await;
    assert_eq!(env.kubelet.runs("long"), 2);

    // Deleting the Job kills its process.
    env.jobs
        .delete("long", &DeleteParams::background())
        .await
        .unwrap();
    env.kubelet.wait_idle("long", T).await;
    assert_eq!(env.kubelet.runs("long"), 2);
    env.assert_no_harness_errors();
}

#[tokio::test]
async fn a_killed_process_is_a_failed_attempt_and_retried() {
    let env = setup(build_bin_dir(), vec![]).await;
    assert!(!env.kubelet.kill("dying"), "nothing runs yet");
    env.create(job("dying", &["sh", "-c", "sleep 30"], 1, json!({})))
        .await;
    wait_for(&env.jobs, "dying", T, |j| active(j) == 1).await;
    assert!(env.kubelet.kill("dying"));

    // The retry: one failure counted, a new process running.
    let j = wait_for(&env.jobs, "dying", T, |j| failed(j) == 1 && active(j) == 1).await;
    assert!(!job_finished(&j), "{:#?}", status(&j));
    assert_eq!(env.kubelet.runs("dying"), 2);

    // Killed again: past backoffLimit 1, with the SIGKILL exit code 137.
    assert!(env.kubelet.kill("dying"));
    let j = env.wait_finished("dying").await;
    let failed = find_job_condition(&j, "Failed").unwrap();
    assert_eq!(failed.reason.as_deref(), Some("BackoffLimitExceeded"));
    assert!(
        failed.message.as_deref().unwrap().contains("exit code 137"),
        "{failed:?}"
    );
    assert_eq!(counts(&j), (0, 0, 2));
    assert_eq!(env.kubelet.runs("dying"), 2);
    env.assert_no_harness_errors();
}
