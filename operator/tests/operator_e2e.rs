//! The operator against the test cluster (started by `make test`: kube-apiserver,
//! the real Job controller, the pod agent running every Pod with runc from the
//! image's root filesystem), with a real PostgreSQL and the upload API over
//! HTTP. The Jobs run as the Job ServiceAccount, in namespaces where PodSecurity
//! `restricted` is enforced.
#![allow(clippy::too_many_lines)] // the 80-line limit is for non-test code

mod common;
#[path = "../../pipeline/tests/support/tls_postgres.rs"]
mod tls_postgres;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use common::{
    kube_harness::*,
    operator::{metric, metric_sum, Operator},
    *,
};
use futures::StreamExt;
use k8s_openapi::api::{batch::v1::Job, core::v1::Secret};
use kube::{
    api::{ApiResource, DeleteParams, DynamicObject, ListParams, PostParams},
    runtime::WatchStreamExt,
    Api, Client, ResourceExt,
};
use postcodes_io_test_server::{Faults, TestServer};
use serde_json::{json, Value};

fn imports_api(client: &Client, ns: &str) -> Api<DynamicObject> {
    let ar = ApiResource {
        group: "postcodes.dev".into(),
        version: "v1alpha1".into(),
        api_version: "postcodes.dev/v1alpha1".into(),
        kind: "PostcodeImport".into(),
        plural: "postcodeimports".into(),
    };
    Api::namespaced_with(client.clone(), ns, &ar)
}

fn phase(o: &DynamicObject) -> String {
    o.data
        .pointer("/status/phase")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

fn status_i64(o: &DynamicObject, key: &str) -> i64 {
    o.data
        .pointer(&format!("/status/{key}"))
        .and_then(Value::as_i64)
        .unwrap_or(-1)
}

/// The Job ServiceAccount (JOB_SERVICE_ACCOUNT's default).
const JOB_SA: &str = "postcode-operator-job";

/// A namespace with the database Secret the operator copies for its Jobs and
/// the Job ServiceAccount with the chart's Role; what the pod agent runs there.
async fn setup() -> (Client, String, String, Pods) {
    setup_with_jobs_on(fresh_pg().await).await
}

/// [`setup`] with the database Secret holding `db`.
async fn setup_with_jobs_on(db: String) -> (Client, String, String, Pods) {
    let (client, ns, db) = setup_on(db).await;
    create_job_service_account(&client, &ns, JOB_SA).await;
    let pods = Pods::new(&client, &ns);
    (client, ns, db, pods)
}

async fn upload(url: &str, file: &std::path::Path, query: &str) -> Value {
    let body = tokio::fs::read(file).await.unwrap();
    let resp = reqwest::Client::new()
        .post(format!("{url}/v1/imports?{query}"))
        .header("content-type", "text/csv")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(status.as_u16(), 201, "{v}");
    v
}

async fn results(url: &str, ns: &str, name: &str) -> Vec<std::collections::HashMap<String, String>> {
    let text = reqwest::get(format!("{url}/v1/imports/{ns}/{name}/results.csv"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let dir = temp_dir("results");
    let p = dir.join("r.csv");
    std::fs::write(&p, text).unwrap();
    read_output(&p).1
}

fn kubectl_get(ns: &str) -> String {
    let out = Command::new("kubectl")
        .args(["get", "postcodeimports", "-n", ns])
        .output();
    match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout).to_string(),
        Err(e) => format!("(kubectl not available: {e})"),
    }
}

/// Serves one file over HTTP on loopback (the reader Job fetches `source.url`).
async fn serve_file(path: std::path::PathBuf) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route(
        "/input.csv",
        axum::routing::get(move || {
            let path = path.clone();
            async move { tokio::fs::read(path).await.unwrap() }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/input.csv")
}

/// A PersistentVolume (hostPath: the shared data directory, read-only) and a
/// claim bound to it: how the NSPL file reaches the enricher pods.
async fn nspl_claim(client: &Client, ns: &str) -> String {
    postcodes_claim(client, ns, postcodes_file().parent().unwrap()).await
}

/// A claim `nspl` in `ns` bound to a hostPath PersistentVolume of `dir`.
async fn postcodes_claim(client: &Client, ns: &str, dir: &std::path::Path) -> String {
    use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
    let dir = dir.canonicalize().unwrap();
    let pv: PersistentVolume = serde_json::from_value(json!({
        "metadata": {"name": format!("nspl-{ns}")},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadOnlyMany"],
                 "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": dir},
                 "claimRef": {"namespace": ns, "name": "nspl"}},
    }))
    .unwrap();
    Api::<PersistentVolume>::all(client.clone())
        .create(&PostParams::default(), &pv)
        .await
        .unwrap();
    let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": "nspl"},
        "spec": {"accessModes": ["ReadOnlyMany"], "resources": {"requests": {"storage": "1Gi"}},
                 "volumeName": format!("nspl-{ns}"), "storageClassName": ""},
    }))
    .unwrap();
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &pvc)
        .await
        .unwrap();
    "nspl".into()
}

/// Rows enriched and no_match when `local` enriches [`real_input`] offline
/// (99,648 and 352 on the real file with the full NSPL).
fn offline_counts() -> (usize, usize) {
    let dir = temp_dir("e2e-offline-reference");
    let out = dir.join("out.csv");
    let o = run_local(&[
        real_input().to_str().unwrap(),
        "--offline-postcodes",
        postcodes_file().to_str().unwrap(),
        "--db",
        dir.join("ref.db").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let s = by_status(&read_output(&out).1);
    (
        s.get("enriched").copied().unwrap_or(0),
        s.get("no_match").copied().unwrap_or(0),
    )
}

/// `n` distinct made-up postcodes (`pcd,lat,long`) spread over Great Britain.
fn write_many_postcodes(path: &std::path::Path, n: usize) {
    use std::io::Write;
    let mut w = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    writeln!(w, "pcd,lat,long").unwrap();
    let letter = |i: usize| char::from(b'A' + (i % 26) as u8);
    for i in 0..n {
        let (area, rest) = (i % 676, i / 676);
        let (district, sector, unit) = (rest % 99 + 1, rest / 99 % 10, rest / 990);
        writeln!(
            w,
            "{}{}{district} {sector}{}{},{:.5},{:.5}",
            letter(area / 26),
            letter(area),
            letter(unit / 26),
            letter(unit),
            50.5 + (i % 1000) as f64 * 0.007,
            -4.5 + (i / 1000 % 1000) as f64 * 0.006,
        )
        .unwrap();
    }
    w.flush().unwrap();
}

/// The pod template that mounts the NSPL claim at /data.
fn nspl_pod_template(claim: &str) -> Value {
    json!({
        "volumes": [{"name": "nspl", "persistentVolumeClaim": {"claimName": claim, "readOnly": true}}],
        "volumeMounts": [{"name": "nspl", "mountPath": "/data", "readOnly": true}],
    })
}

/// Creates a PostcodeImport as `kubectl apply` would.
async fn create_import(client: &Client, ns: &str, name: &str, spec: Value) {
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "postcodes.dev/v1alpha1", "kind": "PostcodeImport",
        "metadata": {"name": name, "namespace": ns}, "spec": spec,
    }))
    .unwrap();
    imports_api(client, ns)
        .create(&PostParams::default(), &obj)
        .await
        .unwrap();
}

/// A namespace with the database Secret only: no Job ServiceAccount.
async fn setup_without_job_service_account() -> (Client, String, String) {
    setup_on(fresh_pg().await).await
}

/// A fresh namespace whose database Secret holds `db`.
async fn setup_on(db: String) -> (Client, String, String) {
    let client = test_client().await;
    let ns = fresh_namespace(&client).await;
    let secret: Secret = serde_json::from_value(
        json!({"metadata": {"name": "postcode-operator-database"}, "stringData": {"url": db}}),
    )
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    (client, ns, db)
}

/// Checks from the pod agent's records that every pod of the import ran under
/// runc as 65532 with a read-only root and a seccomp filter; returns how many ran.
fn assert_pods_ran_confined(pods: &Pods, jobs: &[String]) -> usize {
    let mut n = 0;
    for job in jobs {
        for run in pods.of_job(job).iter().filter(|r| r.started("job")) {
            let rt = run
                .runtime("job")
                .unwrap_or_else(|| panic!("no runtime record for pod {}: {}", run.name, run.log("job")));
            assert_eq!(rt["runtime"], "runc", "{rt:#}");
            assert_eq!(
                rt["uid"],
                json!(["65532", "65532", "65532", "65532"]),
                "{}: {rt:#}",
                run.name
            );
            assert_eq!(rt["rootReadOnly"], true, "{}: {rt:#}", run.name);
            assert_eq!(rt["seccomp"], "2", "{}: {rt:#}", run.name);
            assert_eq!(rt["capEff"], "0000000000000000", "{}: {rt:#}", run.name);
            n += 1;
        }
    }
    n
}

/// The `make e2e` run: the real 100,000-row file, 4 shards, offline provider
/// with the NSPL file reaching the enricher pods through a volume of the
/// import's pod template. Prints `E2E PASSED …` (or panics with `E2E FAILED …`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_upload_the_real_file_and_read_the_results() {
    let started = Instant::now();
    let (client, ns, db, pods) = setup().await;
    let op = Operator::start(&ns, &db, &[]);
    let claim = nspl_claim(&client, &ns).await;
    let url = serve_file(real_input()).await;
    create_import(
        &client,
        &ns,
        "trips",
        json!({
            "source": {"url": url},
            "shards": 4,
            "offlinePostcodes": format!("/data/{}", postcodes_file().file_name().unwrap().to_string_lossy()),
            "podTemplate": nspl_pod_template(&claim),
        }),
    )
    .await;
    let api = imports_api(&client, &ns);
    // Live progress as a user sees it, while it runs.
    let watcher_ns = ns.clone();
    let progress = tokio::spawn(async move {
        let mut seen = vec![];
        loop {
            let out = tokio::task::spawn_blocking({
                let ns = watcher_ns.clone();
                move || kubectl_get(&ns)
            })
            .await
            .unwrap();
            if seen.last() != Some(&out) {
                eprintln!("$ kubectl get postcodeimports -n {watcher_ns}\n{out}");
                seen.push(out.clone());
            }
            if out.contains("Succeeded") || out.contains("Failed") {
                break seen;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let done = wait_for(&api, "trips", Duration::from_secs(600), |o| {
        matches!(phase(o).as_str(), "Succeeded" | "Failed")
    })
    .await;
    let _ = progress.await;
    let rows = results(&op.url, &ns, "trips").await;
    let s = by_status(&rows);
    let get = |k: &str| s.get(k).copied().unwrap_or(0);
    let jobs: Vec<String> = std::iter::once("trips-reader".to_string())
        .chain((0..4).map(|i| format!("trips-enricher-{i}")))
        .collect();
    let all_logs: String = jobs.iter().map(|j| pods.logs(j)).collect();
    let n_pods = if phase(&done) == "Succeeded" {
        assert_pods_ran_confined(&pods, &jobs)
    } else {
        0
    };
    let line = format!(
        "import=trips phase={} rows={} enriched={} no_match={} invalid={} failed={} pods={} runtime=runc seconds={:.0}",
        phase(&done),
        rows.len(),
        get("enriched"),
        get("no_match"),
        get("invalid"),
        get("failed"),
        n_pods,
        started.elapsed().as_secs_f64()
    );
    let (want_enriched, want_no_match) = offline_counts();
    let ok = phase(&done) == "Succeeded"
        && rows.len() == REAL_ROWS
        && get("enriched") == want_enriched
        && get("no_match") == want_no_match
        && get("invalid") == 0
        && get("failed") == 0;
    if !ok {
        panic!(
            "E2E FAILED {line}\nstatus: {:#}\noperator log:\n{}\npod logs:\n{all_logs}",
            done.data["status"],
            op.log()
        );
    }
    assert_eq!(
        status_i64(&done, "rowsEnriched"),
        want_enriched as i64,
        "status counts: {:#?}",
        done.data["status"]
    );
    for job in &jobs {
        assert_eq!(pods.runs(job), 1, "{job}: {}", pods.logs(job));
    }
    // The enrichers' status patches were made as the Job ServiceAccount, never as admin.
    let sa_user = format!("system:serviceaccount:{ns}:{JOB_SA}");
    let patches: Vec<(String, String)> = audit_events(&ns)
        .iter()
        .filter(|e| {
            e["objectRef"]["resource"] == "postcodeimports"
                && e["objectRef"]["subresource"] == "status"
                && e["verb"] == "patch"
                && e["stage"] == "ResponseComplete"
        })
        .map(|e| {
            (
                e["user"]["username"].as_str().unwrap_or("").to_string(),
                e["userAgent"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let by_jobs: Vec<&(String, String)> = patches.iter().filter(|(u, _)| *u == sa_user).collect();
    assert!(
        by_jobs.len() >= 4,
        "the enrichers' status patches as {sa_user}: {patches:?}"
    );
    assert!(
        patches.iter().all(|(u, _)| *u == sa_user || u == "admin"),
        "status patched by someone else: {patches:?}"
    );
    println!("E2E PASSED {line}");
    op.kill();
}

/// A small import over the HTTP path, slow enough (quota) to act on mid-run.
/// The test server's base URL by name: `api.baseUrl` may not be a loopback
/// address literal (the CRD's CEL rule); `localhost` resolves in the pods
/// (they share the host's /etc/hosts and network).
fn api_url(server: &TestServer) -> String {
    server.url().replace("127.0.0.1", "localhost")
}

async fn start_slow_import(op_url: &str, ns: &str, name: &str, server: &TestServer, rows: usize) {
    let dir = temp_dir("slow");
    let file = head_of_real_file(rows, &dir);
    upload(
        op_url,
        &file,
        &format!(
            "name={name}&namespace={ns}&shards=2&quotaRps=8&apiUrl={}",
            api_url(server)
        ),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_import_mid_run_removes_its_jobs_and_rows() {
    let server = TestServer::start(nspl(), Faults::default()).await.unwrap();
    let (client, ns, db, pods) = setup().await;
    let op = Operator::start(&ns, &db, &[]);
    start_slow_import(&op.url, &ns, "doomed", &server, 5_000).await;
    let api = imports_api(&client, &ns);
    let running = wait_for(&api, "doomed", Duration::from_secs(120), |o| {
        phase(o) == "Enriching"
    })
    .await;
    let uid = running.metadata.uid.clone().unwrap();
    pods.wait_running("doomed-enricher-0", Duration::from_secs(60))
        .await;
    api.delete("doomed", &DeleteParams::default()).await.unwrap();
    kube::runtime::wait::await_condition(
        api.clone(),
        "doomed",
        kube::runtime::wait::conditions::is_deleted(&uid),
    )
    .await
    .unwrap();
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let left = jobs
        .list(&ListParams::default().labels("postcodes.dev/import=doomed"))
        .await
        .unwrap();
    assert!(
        left.items.is_empty(),
        "Jobs left: {:?}",
        left.items
            .iter()
            .map(|j| j.metadata.name.clone())
            .collect::<Vec<_>>()
    );
    pods.wait_idle("doomed-enricher-0", Duration::from_secs(60)).await;
    pods.wait_idle("doomed-enricher-1", Duration::from_secs(60)).await;
    let store = pipeline::store::Store::connect(&db).await.unwrap();
    assert!(
        store.import(&uid).await.unwrap().is_none(),
        "rows of the deleted import remain"
    );
    drop(op);
}

/// Waits (up to 2 minutes) until the test server has answered `n` requests.
async fn answered(server: &TestServer, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while server.state.stats().requests < n {
        assert!(Instant::now() < deadline, "fewer than {n} batches answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_operator_reattaches_and_a_killed_pod_is_retried() {
    let server = TestServer::start(nspl(), Faults::default()).await.unwrap();
    let (client, ns, db, pods) = setup().await;
    let op = Operator::start(&ns, &db, &[]);
    start_slow_import(&op.url, &ns, "sturdy", &server, 8_000).await;
    let api = imports_api(&client, &ns);
    wait_for(&api, "sturdy", Duration::from_secs(120), |o| {
        phase(o) == "Enriching"
    })
    .await;
    pods.wait_running("sturdy-enricher-1", Duration::from_secs(60))
        .await;
    // Let it finish some batches first: wait until the server has answered 10.
    answered(&server, 10).await;
    // The import's current share of the API shows in its status: alone on
    // the API, its own quota.
    wait_for(&api, "sturdy", Duration::from_secs(60), |o| {
        o.data.pointer("/status/apiShareRps").and_then(Value::as_f64) == Some(8.0)
    })
    .await;
    // The operator dies mid-run; a new one takes over.
    op.kill();
    let before = server.state.stats().requests;
    // A pod is SIGKILLed too: the Job controller runs a new one and the shard resumes.
    assert!(pods.kill("sturdy-enricher-1").await);
    let op2 = Operator::start(&ns, &db, &[]);
    let done = wait_for(&api, "sturdy", Duration::from_secs(300), |o| {
        matches!(phase(o).as_str(), "Succeeded" | "Failed")
    })
    .await;
    assert_eq!(
        phase(&done),
        "Succeeded",
        "{:#?}\n{}",
        done.data["status"],
        op2.log()
    );
    assert_eq!(
        done.data.pointer("/status/apiShareRps"),
        None,
        "a share is shown only while enriching"
    );
    assert_eq!(pods.runs("sturdy-reader"), 1, "the reader ran twice");
    assert_eq!(pods.runs("sturdy-enricher-0"), 1, "a Job was created again");
    assert_eq!(
        pods.runs("sturdy-enricher-1"),
        2,
        "the killed pod was not retried exactly once"
    );
    let st = server.state.stats();
    // At most the batch in flight when the pod died is asked again.
    assert!(st.repeated_batches <= 1, "finished batches asked twice: {st:?}");
    assert!(st.requests > before);
    let rows = results(&op2.url, &ns, "sturdy").await;
    assert_eq!(rows.len(), 8_000);
    assert_eq!(by_status(&rows).get("pending"), None);
    let shards = done
        .data
        .pointer("/status/shards")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        shards.len(),
        2,
        "per-shard progress from the enrichers: {shards:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_with_leader_election_reconcile_each_import_once() {
    let server = TestServer::start(nspl(), Faults::default()).await.unwrap();
    let (client, ns, db, pods) = setup().await;
    let a = Operator::start(
        &ns,
        &db,
        &[("LEADER_ELECTION", "true"), ("POD_NAME", "replica-a")],
    );
    let b = Operator::start(
        &ns,
        &db,
        &[("LEADER_ELECTION", "true"), ("POD_NAME", "replica-b")],
    );
    start_slow_import(&b.url, &ns, "shared", &server, 3_000).await;
    let api = imports_api(&client, &ns);
    let done = wait_for(&api, "shared", Duration::from_secs(300), |o| {
        matches!(phase(o).as_str(), "Succeeded" | "Failed")
    })
    .await;
    assert_eq!(phase(&done), "Succeeded");
    for j in ["shared-reader", "shared-enricher-0", "shared-enricher-1"] {
        assert_eq!(pods.runs(j), 1, "{j}");
    }
    let leading: Vec<bool> = [&a, &b]
        .iter()
        .map(|o| o.log().contains("leading: starting the controller"))
        .collect();
    assert_eq!(
        leading.iter().filter(|l| **l).count(),
        1,
        "exactly one replica leads: {leading:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_upload_fails_the_import_with_the_reason_and_no_retries() {
    let (client, ns, db, pods) = setup().await;
    let op = Operator::start(&ns, &db, &[]);
    let dir = temp_dir("binary");
    let file = dir.join("sheet.xlsx");
    std::fs::write(&file, b"PK\x03\x04\x14\x00\x06\x00binary spreadsheet").unwrap();
    upload(&op.url, &file, &format!("name=sheet&namespace={ns}")).await;
    let api = imports_api(&client, &ns);
    let done = wait_for(&api, "sheet", Duration::from_secs(120), |o| phase(o) == "Failed").await;
    let msg = done
        .data
        .pointer("/status/message")
        .and_then(Value::as_str)
        .unwrap_or("");
    assert!(msg.contains("looks binary"), "{msg}");
    let failed = done
        .data
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Failed")
        .cloned()
        .unwrap();
    assert_eq!(failed["status"], "True");
    // The reader exited 2: the Job's podFailurePolicy fails it at once.
    assert_eq!(
        pods.runs("sheet-reader"),
        1,
        "a permanent input error must not be retried"
    );
    let reader: Job = Api::namespaced(client.clone(), &ns)
        .get("sheet-reader")
        .await
        .unwrap();
    let failed = find_job_condition(&reader, "Failed").expect("the reader Job failed");
    assert_eq!(failed.reason.as_deref(), Some("PodFailurePolicy"), "{failed:?}");
    assert!(
        failed.message.as_deref().unwrap_or("").contains("exit code 2"),
        "{failed:?}"
    );
    assert_eq!(pods.runs("sheet-enricher-0"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_api_checks_tokens_sizes_and_names() {
    let client = test_client().await;
    let ns = fresh_namespace(&client).await;
    let db = fresh_pg().await;
    let op = Operator::start(
        &ns,
        &db,
        &[
            ("UPLOAD_AUTH", "token"),
            ("UPLOAD_TOKEN", "s3cret"),
            ("MAX_UPLOAD_BYTES", "1000"),
            ("UPLOAD_IDLE_TIMEOUT_S", "1"),
        ],
    );
    let http = reqwest::Client::new();
    let post = |q: String, body: Vec<u8>, token: Option<&str>| {
        let mut r = http
            .post(format!("{}/v1/imports?{q}", op.url))
            .header("content-type", "text/csv")
            .body(body);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    let small = b"lat,lon\n51.5,-0.1\n".to_vec();
    assert_eq!(
        post(format!("namespace={ns}"), small.clone(), None)
            .await
            .unwrap()
            .status()
            .as_u16(),
        401
    );
    assert_eq!(
        post(format!("namespace={ns}"), small.clone(), Some("wrong"))
            .await
            .unwrap()
            .status()
            .as_u16(),
        403
    );
    assert_eq!(
        post(format!("namespace={ns}"), vec![b'1'; 5000], Some("s3cret"))
            .await
            .unwrap()
            .status()
            .as_u16(),
        413
    );
    let bad_queries = [
        format!("name=Bad_Name&namespace={ns}"),
        format!("name=a%27%3B%20DROP%20TABLE%20points&namespace={ns}"),
        "namespace=..%2Fkube-system".to_string(),
        format!("shards=0&namespace={ns}"),
        format!("shards=65&namespace={ns}"),
        format!("quotaRps=0&namespace={ns}"),
    ];
    for q in bad_queries {
        let r = post(q.clone(), small.clone(), Some("s3cret")).await.unwrap();
        assert_eq!(r.status().as_u16(), 400, "{q}: {}", r.text().await.unwrap());
    }
    assert_eq!(
        post(format!("namespace={ns}"), vec![], Some("s3cret"))
            .await
            .unwrap()
            .status()
            .as_u16(),
        400
    );
    // a stalled upload: one chunk, then nothing
    let stalled = futures::stream::once(async { Ok::<_, std::io::Error>(b"lat,lon\n".to_vec()) })
        .chain(futures::stream::pending());
    let r = http
        .post(format!("{}/v1/imports?namespace={ns}", op.url))
        .bearer_auth("s3cret")
        .body(reqwest::Body::wrap_stream(stalled))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 408);
    // multipart works, and nothing was left behind by the refused uploads
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(small.clone()).file_name("x.csv"),
    );
    let r = http
        .post(format!("{}/v1/imports?name=multi&namespace={ns}", op.url))
        .bearer_auth("s3cret")
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201, "{}", r.text().await.unwrap());
    // a taken name: 409 before the file is stored
    let r = http
        .post(format!("{}/v1/imports?name=multi&namespace={ns}", op.url))
        .bearer_auth("s3cret")
        .header("content-type", "text/csv")
        .body(small.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 409);
    let msg = r.text().await.unwrap();
    assert!(
        msg.contains("already exists") && msg.contains("another name"),
        "{msg}"
    );
    let store = pipeline::store::Store::connect(&db).await.unwrap();
    let pipeline::store::Store::Postgres(pool) = &store else {
        unreachable!()
    };
    let (uploads,): (i64,) = sqlx::query_as("SELECT count(*) FROM uploads")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(uploads, 1, "refused uploads must not stay in the database");
    let r = http
        .get(format!("{}/v1/imports/{ns}/multi", op.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = http
        .get(format!("{}/v1/imports/{ns}/multi", op.url))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // The probes and metrics are on their own port, and only there.
    assert_eq!(
        http.get(format!("{}/healthz", op.metrics_url))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    let ready = http
        .get(format!("{}/readyz", op.metrics_url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status().as_u16(), 200, "{}", ready.text().await.unwrap());
    let metrics = http
        .get(format!("{}/metrics", op.metrics_url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("postcode_operator_reconciles_total"),
        "{metrics}"
    );
    for path in ["/metrics", "/healthz", "/readyz"] {
        let r = http.get(format!("{}{path}", op.url)).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 404, "{path} on the upload port");
    }
    // Delete through the API (the shared token may do everything).
    let r = http
        .delete(format!("{}/v1/imports/{ns}/multi", op.url))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert!(
        [200, 202].contains(&r.status().as_u16()),
        "{}",
        r.text().await.unwrap()
    );
    // gone once the operator's finalizer has run
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = http
            .get(format!("{}/v1/imports/{ns}/multi", op.url))
            .bearer_auth("s3cret")
            .send()
            .await
            .unwrap();
        assert!(
            r.headers().contains_key("x-request-id"),
            "every answer has a request id"
        );
        if r.status().as_u16() == 404 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still there: {}",
            r.text().await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!op.log().contains("s3cret"), "the token leaked into the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_stops_the_enrichers_and_resume_finishes_the_import() {
    let server = TestServer::start(nspl(), Faults::default()).await.unwrap();
    let (client, ns, db, pods) = setup().await;
    let op = Operator::start(&ns, &db, &[]);
    start_slow_import(&op.url, &ns, "pausable", &server, 6_000).await;
    let api = imports_api(&client, &ns);
    wait_for(&api, "pausable", Duration::from_secs(120), |o| {
        phase(o) == "Enriching"
    })
    .await;
    pods.wait_running("pausable-enricher-0", Duration::from_secs(60))
        .await;
    let patch = kube::api::Patch::Merge(json!({"spec": {"suspend": true}}));
    api.patch("pausable", &kube::api::PatchParams::default(), &patch)
        .await
        .unwrap();
    let suspended = wait_for(&api, "pausable", Duration::from_secs(60), |o| {
        o.data
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Suspended" && c["status"] == "True")
            })
    })
    .await;
    assert_eq!(phase(&suspended), "Enriching");
    // The Jobs' spec.suspend: the Job controller deletes their pods (SIGTERM first).
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    for j in ["pausable-enricher-0", "pausable-enricher-1"] {
        let job = jobs.get(j).await.unwrap();
        assert_eq!(job.spec.unwrap().suspend, Some(true), "{j}");
        pods.wait_idle(j, Duration::from_secs(60)).await;
    }
    // The shards' status entries say so (not the old run's `Running`).
    wait_for(&api, "pausable", Duration::from_secs(60), |o| {
        o.data
            .pointer("/status/shards")
            .and_then(Value::as_array)
            .is_some_and(|ss| !ss.is_empty() && ss.iter().all(|s| s["phase"] == "Suspended"))
    })
    .await;
    let paused_at = server.state.stats().requests;
    api.patch(
        "pausable",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(json!({"spec": {"suspend": false}})),
    )
    .await
    .unwrap();
    let done = wait_for(&api, "pausable", Duration::from_secs(300), |o| {
        matches!(phase(o).as_str(), "Succeeded" | "Failed")
    })
    .await;
    assert_eq!(phase(&done), "Succeeded", "{:#?}", done.data["status"]);
    assert!(server.state.stats().requests > paused_at);
    assert!(
        server.state.stats().repeated_batches <= 2,
        "{:?}",
        server.state.stats()
    );
    // immutable spec fields are refused by the API server (CEL)
    let err = api
        .patch(
            "pausable",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"shards": 3}})),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("shards is immutable"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enricher_over_its_memory_limit_is_oom_killed_and_the_import_says_so() {
    let (client, ns, db, pods) = setup().await;
    let op = Operator::start(&ns, &db, &[]);
    // A postcode file whose index needs far more than the limit below, made
    // here so that the test does not depend on the full NSPL being present.
    let postcodes = temp_dir("oom-postcodes");
    write_many_postcodes(&postcodes.join("many-postcodes.csv"), 1_000_000);
    let claim = postcodes_claim(&client, &ns, &postcodes).await;
    let dir = temp_dir("oom");
    let url = serve_file(head_of_real_file(500, &dir)).await;
    let mut template = nspl_pod_template(&claim);
    // Enough for the reader, far too little for the offline index of the enrichers.
    template["resources"] = json!({"limits": {"memory": "24Mi"}, "requests": {"memory": "24Mi"}});
    create_import(
        &client,
        &ns,
        "small",
        json!({
            "source": {"url": url},
            "shards": 1,
            "backoffLimit": 0,
            "offlinePostcodes": "/data/many-postcodes.csv",
            "podTemplate": template,
        }),
    )
    .await;
    let api = imports_api(&client, &ns);
    let done = wait_for(&api, "small", Duration::from_secs(180), |o| {
        matches!(phase(o).as_str(), "Succeeded" | "Failed")
    })
    .await;
    let msg = done
        .data
        .pointer("/status/message")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    assert_eq!(
        phase(&done),
        "Failed",
        "{:#}\n{}\n{}",
        done.data["status"],
        pods.logs("small-enricher-0"),
        op.log()
    );
    assert!(msg.contains("OOMKilled (exit code 137)"), "{msg}");
    let run = &pods.of_job("small-enricher-0")[0];
    assert_eq!(
        run.runtime("job").map(|r| r["memoryLimitBytes"].clone()),
        Some(json!(24 * 1024 * 1024)),
        "the limit reached the container"
    );
}

/// Serves `body` at every path on `ip` (a loopback address other than
/// 127.0.0.1 stands for a public host the policy allows).
async fn serve_on(ip: &str, body: Vec<u8>) -> String {
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(move || {
        let body = body.clone();
        async move { body }
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

/// Answers every request with a redirect to `location`.
async fn redirect_on(ip: &str, location: String) -> String {
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(move || {
        let location = location.clone();
        async move { axum::response::Redirect::temporary(&location) }
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/input.csv")
}

/// Rows stored for the import `uid`.
async fn rows_stored(db: &str, uid: &str) -> i64 {
    let pool = sqlx::PgPool::connect(db).await.unwrap();
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM points p JOIN imports i ON i.id = p.import_id WHERE i.uid = $1",
    )
    .bind(uid)
    .fetch_one(&pool)
    .await
    .unwrap();
    pool.close().await;
    n
}

/// Waits for `name` to fail; returns its status message after checking that
/// no row was stored and the reader (or the enrichers) ran once, not retried.
async fn failed_with(client: &Client, ns: &str, db: &str, pods: &Pods, name: &str, job: &str) -> String {
    let api = imports_api(client, ns);
    let done = wait_for(&api, name, Duration::from_secs(120), |o| phase(o) == "Failed").await;
    let msg = done
        .data
        .pointer("/status/message")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let uid = done.metadata.uid.clone().unwrap();
    if job.ends_with("reader") {
        assert_eq!(rows_stored(db, &uid).await, 0, "{name}: rows stored: {msg}");
    }
    assert_eq!(
        pods.runs(job),
        1,
        "{name}: a refused source or API is not retried: {msg}"
    );
    msg
}

/// Issue 18: an import cannot be turned against the cluster. Against the real
/// API server (CEL) and the pod-level test cluster (the Jobs enforce the
/// operator's egress policy). 127.0.0.2 stands for an allowed public host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_cannot_reach_what_the_egress_policy_refuses() {
    let server = TestServer::start(nspl(), Faults::default()).await.unwrap();
    let (client, ns, db, pods) = setup().await;
    let allowed_api = api_url(&server);
    let op = Operator::start(
        &ns,
        &db,
        &[
            ("JOB_EGRESS_ALLOW_SOURCE_CIDRS", "127.0.0.2/32"),
            ("JOB_EGRESS_ALLOWED_API_URLS", allowed_api.as_str()),
        ],
    );
    let api = imports_api(&client, &ns);
    let obj = |name: &str, spec: Value| -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "postcodes.dev/v1alpha1", "kind": "PostcodeImport",
            "metadata": {"name": name, "namespace": ns}, "spec": spec,
        }))
        .unwrap()
    };

    // The API server refuses a path (any path) as a source, and a private API URL.
    for (i, path) in [
        "/etc/passwd",
        "file:///etc/passwd",
        "etc/passwd",
        "/var/run/secrets/kubernetes.io/serviceaccount/token",
        "ftp://example.org/x.csv",
        "http:///x.csv",
    ]
    .iter()
    .enumerate()
    {
        let err = api
            .create(
                &PostParams::default(),
                &obj(&format!("path-{i}"), json!({"source": {"url": path}})),
            )
            .await
            .expect_err(path);
        assert!(
            err.to_string()
                .contains("source.url must be an http:// or https:// URL"),
            "{path}: {err}"
        );
    }
    for (i, base) in [
        "http://10.0.0.1",
        "http://169.254.169.254/",
        "http://127.0.0.1:8080",
        "http://[::1]/",
        "/var/run",
    ]
    .iter()
    .enumerate()
    {
        let err = api
            .create(
                &PostParams::default(),
                &obj(
                    &format!("api-{i}"),
                    json!({"source": {"url": "https://example.org/x.csv"}, "api": {"baseUrl": base}}),
                ),
            )
            .await
            .expect_err(base);
        assert!(err.to_string().contains("api.baseUrl must"), "{base}: {err}");
    }

    // The upload API refuses an API URL or offline file the policy refuses (400).
    let file = temp_dir("egress-upload").join("x.csv");
    std::fs::write(&file, "lat,lon\n51.5,-0.1\n").unwrap();
    for query in [
        "apiUrl=http://10.0.0.1".to_string(),
        "apiUrl=http://localhost:9".to_string(),
        "offlinePostcodes=/etc/passwd".to_string(),
        "offlinePostcodes=/data/../etc/passwd".to_string(),
    ] {
        let resp = reqwest::Client::new()
            .post(format!(
                "{}/v1/imports?name=refused&namespace={ns}&{query}",
                op.url
            ))
            .header("content-type", "text/csv")
            .body(std::fs::read(&file).unwrap())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap();
        assert_eq!(status, 400, "{query}: {body}");
        assert!(body.contains("refused by the egress policy"), "{query}: {body}");
    }

    // Sources the policy refuses fail the import with the reason, once, no rows.
    let input = std::fs::read(head_of_real_file(50, &temp_dir("egress-input"))).unwrap();
    let loopback = serve_file(head_of_real_file(50, &temp_dir("egress-loopback"))).await;
    let port = loopback
        .split(':')
        .nth(2)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let public = serve_on("127.0.0.2", input.clone()).await;
    let cases = [
        (
            "metadata",
            "http://169.254.169.254/latest/meta-data/iam/x.csv".to_string(),
            "169.254.169.254 is a link-local address",
        ),
        ("loopback", loopback.clone(), "127.0.0.1 is a loopback address"),
        (
            "dns",
            format!("https://localhost:{port}/input.csv"),
            "localhost resolves to 127.0.0.1 is a loopback address",
        ),
        (
            "redirect",
            redirect_on("127.0.0.2", loopback.clone()).await,
            "redirect to http://127.0.0.1",
        ),
    ];
    for (name, url, _) in &cases {
        create_import(
            &client,
            &ns,
            name,
            json!({"source": {"url": url}, "shards": 1, "api": {"baseUrl": allowed_api}}),
        )
        .await;
    }
    for (name, url, reason) in &cases {
        let msg = failed_with(&client, &ns, &db, &pods, name, &format!("{name}-reader")).await;
        assert!(
            msg.contains("refused by the egress policy") && msg.contains(reason),
            "{name} ({url}): {msg}"
        );
    }

    // API URLs and offline files the policy refuses fail the import at the enrichers.
    create_import(&client, &ns, "other-api", json!({"source": {"url": format!("{public}/in.csv")}, "shards": 1, "api": {"baseUrl": "http://localhost:9"}})).await;
    create_import(&client, &ns, "offline-out", json!({"source": {"url": format!("{public}/in.csv")}, "shards": 1, "offlinePostcodes": "/etc/passwd"})).await;
    let msg = failed_with(&client, &ns, &db, &pods, "other-api", "other-api-enricher-0").await;
    assert!(
        msg.contains("API URL http://localhost:9 is not one of the allowed API URLs"),
        "{msg}"
    );
    let msg = failed_with(&client, &ns, &db, &pods, "offline-out", "offline-out-enricher-0").await;
    assert!(
        msg.contains("offline postcode files are not allowed") || msg.contains("is not inside"),
        "{msg}"
    );

    // A header that is not coordinates is quoted as an 80-character excerpt at most.
    let secret = "hunter2-".repeat(30);
    let leaky = serve_on(
        "127.0.0.2",
        format!("user,password\u{1b}[2J,{secret}\n1,2,3\n").into_bytes(),
    )
    .await;
    create_import(&client, &ns, "leaky", json!({"source": {"url": format!("{leaky}/users.csv")}, "shards": 1, "api": {"baseUrl": allowed_api}})).await;
    let msg = failed_with(&client, &ns, &db, &pods, "leaky", "leaky-reader").await;
    assert!(
        msg.contains("no latitude/longitude columns found in header [user, password\\u{1b}[2J, hunter2-"),
        "{msg}"
    );
    assert!(!msg.contains(&secret[..100]) && !msg.contains('\u{1b}'), "{msg}");

    // An allowed source and API still work.
    create_import(
        &client,
        &ns,
        "allowed",
        json!({"source": {"url": format!("{public}/in.csv")}, "shards": 1, "api": {"baseUrl": allowed_api}}),
    )
    .await;
    let done = wait_for(&api, "allowed", Duration::from_secs(180), |o| {
        phase(o) == "Succeeded" || phase(o) == "Failed"
    })
    .await;
    assert_eq!(phase(&done), "Succeeded", "{:?}", done.data.pointer("/status"));
    assert_eq!(status_i64(&done, "rowsTotal"), 50);
    assert!(
        status_i64(&done, "rowsEnriched") > 0,
        "{:?}",
        done.data.pointer("/status")
    );

    // No event quotes more of any input than the excerpt.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns);
    for e in events.list(&ListParams::default()).await.unwrap() {
        let note = e.note.clone().unwrap_or_default();
        assert!(
            !note.contains(&secret[..100]) && !note.contains('\u{1b}'),
            "{note}"
        );
    }
    // Reader pods carry no ServiceAccount token; enricher pods do (status reports).
    let pod_list: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), &ns);
    for p in pod_list
        .list(&ListParams::default().labels("postcodes.dev/role"))
        .await
        .unwrap()
    {
        let role = p.metadata.labels.as_ref().unwrap()["postcodes.dev/role"].clone();
        let automount = p.spec.as_ref().unwrap().automount_service_account_token;
        assert_eq!(
            automount,
            Some(role == "enricher"),
            "{role} pod {:?}",
            p.metadata.name
        );
    }
    drop(op);
}

// ---- Issue 11: ready for a real cluster -------------------------------------

/// A condition of an import: (status, reason, message).
fn import_condition(o: &DynamicObject, type_: &str) -> Option<(String, String, String)> {
    let cs = o.data.pointer("/status/conditions")?.as_array()?;
    let c = cs.iter().find(|c| c["type"] == type_)?;
    let s = |k: &str| c[k].as_str().unwrap_or("").to_string();
    Some((s("status"), s("reason"), s("message")))
}

/// Waits until the import `name` is Succeeded or Failed; returns it.
async fn finished(client: &Client, ns: &str, name: &str, timeout: Duration) -> DynamicObject {
    wait_for(&imports_api(client, ns), name, timeout, |o| {
        matches!(phase(o).as_str(), "Succeeded" | "Failed")
    })
    .await
}

/// Waits until the import `name` (seen with `uid`) is gone from the API server.
async fn gone(client: &Client, ns: &str, name: &str, uid: &str, timeout: Duration) {
    let cond = kube::runtime::conditions::is_deleted(uid);
    tokio::time::timeout(
        timeout,
        kube::runtime::wait::await_condition(imports_api(client, ns), name, cond),
    )
    .await
    .unwrap_or_else(|_| panic!("{name} not deleted within {timeout:?}"))
    .unwrap();
}

/// An import of the shipped sample over the HTTP path.
fn sample_spec(source: &str, server: &TestServer, extra: Value) -> Value {
    let mut spec = json!({
        "source": {"url": source},
        "api": {"baseUrl": api_url(server)},
        "quota": {"requestsPerSecond": 50},
        "shards": 2,
    });
    spec.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    spec
}

/// Every field of `spec.podTemplate` reaches the reader's and each
/// enricher's pod as the API server stores them; a hostPath volume is
/// refused by the API server (CEL), a volume outside the chart's allowlist by
/// the operator, with a message naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_template_fields_reach_every_job_pod_and_volumes_are_bounded() {
    let server = TestServer::start(nspl(), Faults::default()).await.unwrap();
    let (client, ns, db, _pods) = setup().await;
    let op = Operator::start(&ns, &db, &[]);
    let source = serve_file(repo().join("samples/trips.csv")).await;
    let template = json!({
        "labels": {"team": "geo"},
        "annotations": {"cost-centre": "42"},
        "volumes": [{"name": "scratch", "emptyDir": {}}],
        "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "batch", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 1, "preference": {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}}]}},
        "imagePullSecrets": [{"name": "registry"}],
    });
    let extra = json!({"podTemplate": template, "activeDeadlineSeconds": 600});
    create_import(&client, &ns, "templated", sample_spec(&source, &server, extra)).await;
    let done = finished(&client, &ns, "templated", Duration::from_secs(180)).await;
    assert_eq!(phase(&done), "Succeeded", "{:#?}", done.data["status"]);
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), &ns);
    let mut seen = std::collections::BTreeSet::new();
    for p in pods.list(&ListParams::default()).await.unwrap() {
        let job = p.labels()["batch.kubernetes.io/job-name"].clone();
        let v = serde_json::to_value(&p).unwrap();
        for key in ["nodeSelector", "affinity", "imagePullSecrets"] {
            assert_eq!(v["spec"][key], template[key], "{job}: {key}");
        }
        // The DefaultTolerationSeconds admission plugin adds the not-ready and
        // unreachable tolerations after the template's.
        let tolerations = v["spec"]["tolerations"].as_array().unwrap();
        assert_eq!(tolerations[0], template["tolerations"][0], "{job}: tolerations");
        assert_eq!(
            v["spec"]["containers"][0]["resources"], template["resources"],
            "{job}"
        );
        assert!(
            v["spec"]["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|vol| vol["name"] == "scratch"),
            "{job}"
        );
        assert_eq!(v["metadata"]["labels"]["team"], "geo", "{job}");
        assert_eq!(v["metadata"]["annotations"]["cost-centre"], "42", "{job}");
        assert_eq!(v["spec"]["serviceAccountName"], JOB_SA, "{job}");
        seen.insert(job);
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["templated-enricher-0", "templated-enricher-1", "templated-reader"]
    );
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let reader = jobs.get("templated-reader").await.unwrap();
    assert_eq!(reader.spec.unwrap().active_deadline_seconds, Some(600));
    // hostPath: refused by the API server.
    let host = json!({"podTemplate": {"volumes": [{"name": "h", "hostPath": {"path": "/etc"}}]}});
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "postcodes.dev/v1alpha1", "kind": "PostcodeImport",
        "metadata": {"name": "hostpath", "namespace": ns},
        "spec": sample_spec(&source, &server, host),
    }))
    .unwrap();
    let err = imports_api(&client, &ns)
        .create(&PostParams::default(), &obj)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("hostPath volumes are never allowed"),
        "{err}"
    );
    // A Secret volume: not on the chart's default allowlist.
    let secret = json!({"podTemplate": {"volumes": [{"name": "s", "secret": {"secretName": "postcode-operator-database"}}]}});
    create_import(&client, &ns, "secretvol", sample_spec(&source, &server, secret)).await;
    let refused = finished(&client, &ns, "secretvol", Duration::from_secs(60)).await;
    let (_, reason, msg) = import_condition(&refused, "Failed").unwrap();
    assert_eq!(reason, "PodTemplateRefused", "{msg}");
    assert!(
        msg.contains("podTemplate.volumes[0] (secret/postcode-operator-database) is not allowed"),
        "{msg}"
    );
    assert!(
        jobs.get_opt("secretvol-reader").await.unwrap().is_none(),
        "no Job for a refused template"
    );
    op.kill();
}

/// Pods that cannot start show within a minute: here the namespace has no
/// Job ServiceAccount, so the Job controller cannot create the reader's pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_whose_pods_cannot_be_created_says_why() {
    let server = TestServer::start(nspl(), Faults::default()).await.unwrap();
    let (client, ns, db) = setup_without_job_service_account().await;
    let op = Operator::start(&ns, &db, &[]);
    let source = serve_file(repo().join("samples/trips.csv")).await;
    create_import(&client, &ns, "nosa", sample_spec(&source, &server, json!({}))).await;
    let o = wait_for(&imports_api(&client, &ns), "nosa", Duration::from_secs(60), |o| {
        import_condition(o, "JobsReady").is_some_and(|(s, _, _)| s == "False")
    })
    .await;
    let (_, reason, msg) = import_condition(&o, "JobsReady").unwrap();
    assert_eq!(reason, "FailedCreate", "{msg}");
    assert!(msg.contains("nosa-reader") && msg.contains(JOB_SA), "{msg}");
    assert_eq!(phase(&o), "Loading");
    // Once the ServiceAccount exists the Job controller's retry creates the pod.
    create_job_service_account(&client, &ns, JOB_SA).await;
    let done = finished(&client, &ns, "nosa", Duration::from_secs(300)).await;
    assert_eq!(phase(&done), "Succeeded", "{:#?}", done.data["status"]);
    op.kill();
}

/// A namespace with a compute ResourceQuota admits only pods with requests
/// and limits: the chart's default Job resources make the import succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_in_a_namespace_with_a_compute_quota_succeeds() {
    use k8s_openapi::api::core::v1::ResourceQuota;
    let server = TestServer::start(nspl(), Faults::default()).await.unwrap();
    let (client, ns, db, _pods) = setup().await;
    let quota: ResourceQuota = serde_json::from_value(json!({
        "metadata": {"name": "compute"},
        "spec": {"hard": {"requests.cpu": "4", "requests.memory": "8Gi", "limits.cpu": "8", "limits.memory": "16Gi"}},
    }))
    .unwrap();
    let quotas: Api<ResourceQuota> = Api::namespaced(client.clone(), &ns);
    quotas.create(&PostParams::default(), &quota).await.unwrap();
    // The quota controller fills in its status before the admission plugin uses it.
    wait_for(&quotas, "compute", Duration::from_secs(60), |q| {
        q.status.as_ref().is_some_and(|s| s.hard.is_some())
    })
    .await;
    let op = Operator::start(&ns, &db, &[]);
    let source = serve_file(repo().join("samples/trips.csv")).await;
    create_import(&client, &ns, "quoted", sample_spec(&source, &server, json!({}))).await;
    let done = finished(&client, &ns, "quoted", Duration::from_secs(180)).await;
    assert_eq!(phase(&done), "Succeeded", "{:#?}", done.data["status"]);
    op.kill();
}

/// The operator's `postcode_operator_reconciles_total`.
async fn reconciles(metrics_url: &str) -> u64 {
    metric(metrics_url, "postcode_operator_reconciles_total").await
}

/// Waits until the operator has reconciled `n` more times (it looks at a
/// loading import every few seconds).
async fn reconciled_n_more(metrics_url: &str, n: u64) {
    let start = reconciles(metrics_url).await;
    tokio::time::timeout(Duration::from_secs(60), async {
        while reconciles(metrics_url).await < start + n {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the operator keeps reconciling");
}

/// Kueue creates the Jobs it manages suspended and lifts `spec.suspend` when
/// it admits them. A stand-in watcher suspends every Job labelled with a
/// queue name until released: the operator leaves them suspended, and the
/// import finishes once they are released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_held_by_a_queue_stay_suspended_until_it_releases_them() {
    let server = TestServer::start(nspl(), Faults::default()).await.unwrap();
    let (client, ns, db, _pods) = setup().await;
    let op = Operator::start(&ns, &db, &[]);
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let released = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let holder = {
        let (jobs, released) = (jobs.clone(), released.clone());
        let cfg = kube::runtime::watcher::Config::default().labels("kueue.x-k8s.io/queue-name");
        tokio::spawn(async move {
            let stream = kube::runtime::watcher(jobs.clone(), cfg).applied_objects();
            let mut stream = std::pin::pin!(stream);
            while let Some(Ok(j)) = stream.next().await {
                let suspended = j.spec.as_ref().and_then(|s| s.suspend) == Some(true);
                if !released.load(std::sync::atomic::Ordering::SeqCst) && !suspended {
                    let patch = kube::api::Patch::Merge(json!({"spec": {"suspend": true}}));
                    let _ = jobs.patch(&j.name_any(), &Default::default(), &patch).await;
                }
            }
        })
    };
    let source = serve_file(repo().join("samples/trips.csv")).await;
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "postcodes.dev/v1alpha1", "kind": "PostcodeImport",
        "metadata": {"name": "queued", "namespace": ns, "labels": {"kueue.x-k8s.io/queue-name": "batch"}},
        "spec": sample_spec(&source, &server, json!({})),
    }))
    .unwrap();
    imports_api(&client, &ns)
        .create(&PostParams::default(), &obj)
        .await
        .unwrap();
    wait_for(&jobs, "queued-reader", Duration::from_secs(60), |j| {
        j.spec.as_ref().and_then(|s| s.suspend) == Some(true)
    })
    .await;
    // Steady reconciles read the reader Job from the watch cache, never from
    // the API server (issue 17: the operator's cost per import).
    reconciled_n_more(&op.metrics_url, 1).await;
    let job_reads = |from: &'static str| {
        let url = op.metrics_url.clone();
        async move {
            metric(
                &url,
                &format!("postcode_operator_job_reads_total{{from=\"{from}\"}}"),
            )
            .await
        }
    };
    let (from_api, from_cache) = (job_reads("api").await, job_reads("cache").await);
    reconciled_n_more(&op.metrics_url, 3).await;
    assert!(
        job_reads("cache").await >= from_cache + 3,
        "reconciles read the Job from the cache"
    );
    assert_eq!(
        job_reads("api").await,
        from_api,
        "a steady reconcile asks the API server for no Job"
    );
    let reader = jobs.get("queued-reader").await.unwrap();
    assert_eq!(
        reader.spec.unwrap().suspend,
        Some(true),
        "the operator lifted the queue's hold"
    );
    let o = imports_api(&client, &ns).get("queued").await.unwrap();
    assert_eq!(phase(&o), "Loading");
    released.store(true, std::sync::atomic::Ordering::SeqCst);
    let patch = kube::api::Patch::Merge(json!({"spec": {"suspend": false}}));
    jobs.patch("queued-reader", &Default::default(), &patch)
        .await
        .unwrap();
    let done = finished(&client, &ns, "queued", Duration::from_secs(180)).await;
    assert_eq!(phase(&done), "Succeeded", "{:#?}", done.data["status"]);
    holder.abort();
    op.kill();
}

/// Two 60-character names that differ in their last character, 12 shards
/// each: distinct Jobs, both succeed. A 70-character name succeeds and can
/// be deleted. A Job of a planned name made by someone else is left alone
/// and the import fails with `JobNameConflict`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_names_never_collide_and_a_foreign_job_is_never_adopted() {
    let server = TestServer::start(nspl(), Faults::default()).await.unwrap();
    let (client, ns, db, _pods) = setup().await;
    let op = Operator::start(&ns, &db, &[]);
    let source = serve_file(repo().join("samples/trips.csv")).await;
    let small =
        json!({"shards": 12, "podTemplate": {"resources": {"requests": {"cpu": "10m", "memory": "32Mi"}}}});
    let a = format!("{}a", "n".repeat(59));
    let b = format!("{}b", "n".repeat(59));
    let long = "l".repeat(70);
    for name in [&a, &b, &long] {
        create_import(&client, &ns, name, sample_spec(&source, &server, small.clone())).await;
    }
    for name in [&a, &b, &long] {
        let done = finished(&client, &ns, name, Duration::from_secs(600)).await;
        assert_eq!(phase(&done), "Succeeded", "{name}: {:#?}", done.data["status"]);
    }
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let all = jobs.list(&ListParams::default()).await.unwrap();
    let names: std::collections::HashSet<_> = all.iter().map(|j| j.name_any()).collect();
    assert_eq!(names.len(), 3 * 13, "{names:?}");
    let o = imports_api(&client, &ns).get(&long).await.unwrap();
    let uid = o.metadata.uid.clone().unwrap();
    imports_api(&client, &ns)
        .delete(&long, &DeleteParams::default())
        .await
        .unwrap();
    gone(&client, &ns, &long, &uid, Duration::from_secs(120)).await;
    assert_eq!(rows_stored(&db, &uid).await, 0);
    // A Job named like a planned one, not owned by the import.
    let foreign: Job = serde_json::from_value(json!({
        "metadata": {"name": "taken-reader"},
        "spec": {"suspend": true, "template": {"spec": {"restartPolicy": "Never",
            "containers": [restricted(json!({"name": "c", "image": "testbox", "command": ["true"]}))]}}},
    }))
    .unwrap();
    jobs.create(&PostParams::default(), &foreign).await.unwrap();
    create_import(&client, &ns, "taken", sample_spec(&source, &server, json!({}))).await;
    let failed = finished(&client, &ns, "taken", Duration::from_secs(60)).await;
    let (_, reason, msg) = import_condition(&failed, "Failed").unwrap();
    assert_eq!(reason, "JobNameConflict", "{msg}");
    assert!(msg.contains("taken-reader"), "{msg}");
    let still = jobs.get("taken-reader").await.unwrap();
    assert!(still.owner_references().is_empty(), "not adopted");
    assert_eq!(still.spec.unwrap().suspend, Some(true), "untouched");
    op.kill();
}

/// A Failed import with `ttlSecondsAfterFinished` is deleted with its rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_import_expires_with_its_rows() {
    let server = TestServer::start(nspl(), Faults::default()).await.unwrap();
    let (client, ns, db, _pods) = setup().await;
    // The test server's URL is not on this operator's API allowlist: the
    // enrichers fail at once (exit 2) after the rows are loaded.
    let op = Operator::start(
        &ns,
        &db,
        &[("JOB_EGRESS_ALLOWED_API_URLS", "https://api.postcodes.io")],
    );
    let source = serve_file(repo().join("samples/trips.csv")).await;
    create_import(
        &client,
        &ns,
        "expiring",
        sample_spec(&source, &server, json!({"ttlSecondsAfterFinished": 5})),
    )
    .await;
    let failed = finished(&client, &ns, "expiring", Duration::from_secs(120)).await;
    assert_eq!(phase(&failed), "Failed", "{:#?}", failed.data["status"]);
    let uid = failed.metadata.uid.clone().unwrap();
    assert!(rows_stored(&db, &uid).await > 0, "the rows were loaded");
    gone(&client, &ns, "expiring", &uid, Duration::from_secs(60)).await;
    assert_eq!(rows_stored(&db, &uid).await, 0);
    op.kill();
}

/// Deleting an import while its reader loads: the operator stops the Jobs
/// and waits for their pods to end before deleting the rows, so a reader
/// that finishes its load meanwhile leaves nothing behind. The source sends
/// part of the file, then the rest as soon as the import is being deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_import_while_it_loads_leaves_no_rows() {
    let (client, ns, db, pods) = setup().await;
    let op = Operator::start(&ns, &db, &[]);
    let body = synthetic_input(200_000);
    let cut = body[..body.len() / 2].rfind('\n').unwrap() + 1;
    let (first, rest) = (body[..cut].to_string(), body[cut..].to_string());
    let go = std::sync::Arc::new(tokio::sync::Notify::new());
    let source = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let go = go.clone();
        let app = axum::Router::new().route(
            "/input.csv",
            axum::routing::get(move || {
                let (first, rest, go) = (first.clone(), rest.clone(), go.clone());
                async move {
                    let s = futures::stream::once(async move { Ok::<_, std::io::Error>(first) }).chain(
                        futures::stream::once(async move {
                            go.notified().await;
                            Ok(rest)
                        }),
                    );
                    axum::body::Body::from_stream(s)
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}/input.csv")
    };
    create_import(
        &client,
        &ns,
        "loading",
        json!({"source": {"url": source}, "api": {"baseUrl": "http://localhost:9"}}),
    )
    .await;
    pods.wait_running("loading-reader", Duration::from_secs(60)).await;
    let api = imports_api(&client, &ns);
    let o = wait_for(&api, "loading", Duration::from_secs(60), |o| {
        phase(o) == "Loading"
    })
    .await;
    let uid = o.metadata.uid.clone().unwrap();
    api.delete("loading", &DeleteParams::default()).await.unwrap();
    wait_for(&api, "loading", Duration::from_secs(30), |o| {
        o.metadata.deletion_timestamp.is_some()
    })
    .await;
    go.notify_waiters();
    go.notify_one();
    gone(&client, &ns, "loading", &uid, Duration::from_secs(120)).await;
    pods.wait_idle("loading-reader", Duration::from_secs(60)).await;
    let pool = sqlx::PgPool::connect(&db).await.unwrap();
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM points")
        .fetch_one(&pool)
        .await
        .unwrap();
    let imports: i64 = sqlx::query_scalar("SELECT count(*) FROM imports")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!((left, imports), (0, 0), "rows left behind by a deleted import");
    op.kill();
}

/// A shard whose Job fails while its siblings run (issue 11, "terminal
/// states"): the operator suspends the siblings and turns the import Failed
/// only once their pods are gone, so the counts in its status are the
/// database's final ones; `retryFailed` then re-runs the shards with pending
/// rows and the import succeeds with every row answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_shard_stops_its_siblings_and_the_failed_counts_are_final() {
    let server = TestServer::start(nspl(), Faults::default()).await.unwrap();
    let (client, ns, db, pods) = setup().await;
    let op = Operator::start(&ns, &db, &[]);
    let dir = temp_dir("shard-fails");
    std::fs::write(dir.join("in.csv"), synthetic_input(12_000)).unwrap();
    let source = serve_file(dir.join("in.csv")).await;
    // One pod per Job (backoffLimit 0) and a slow quota: the siblings still
    // have most of their work when shard 0's pod dies.
    let spec = json!({
        "source": {"url": source},
        "api": {"baseUrl": api_url(&server)},
        "quota": {"requestsPerSecond": 4},
        "shards": 3,
        "backoffLimit": 0,
    });
    create_import(&client, &ns, "frail", spec).await;
    for j in ["frail-enricher-0", "frail-enricher-1", "frail-enricher-2"] {
        pods.wait_running(j, Duration::from_secs(120)).await;
    }
    answered(&server, 6).await;
    assert!(
        pods.kill("frail-enricher-0").await,
        "shard 0's pod was not running"
    );

    let failed = finished(&client, &ns, "frail", Duration::from_secs(180)).await;
    assert_eq!(
        phase(&failed),
        "Failed",
        "{:#?}\n{}",
        failed.data["status"],
        op.log()
    );
    let message = failed
        .data
        .pointer("/status/message")
        .and_then(Value::as_str)
        .unwrap_or("");
    assert!(message.contains("frail-enricher-0"), "{message}");
    // Failed only once the siblings are stopped: suspended, no pod left.
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    for j in ["frail-enricher-1", "frail-enricher-2"] {
        let job = jobs.get(j).await.unwrap();
        assert_eq!(job.spec.unwrap().suspend, Some(true), "{j} was not suspended");
        assert!(pods.running(j).await.is_empty(), "{j} still has a running pod");
    }
    // The status's counts are the database's.
    let store = pipeline::store::Store::connect(&db).await.unwrap();
    let uid = failed.metadata.uid.clone().unwrap();
    let record = store.import(&uid).await.unwrap().unwrap();
    let c = store.counts(&record).await.unwrap();
    let status: Vec<i64> = [
        "rowsTotal",
        "rowsInvalid",
        "rowsEnriched",
        "rowsNoMatch",
        "rowsFailed",
        "rowsPending",
    ]
    .iter()
    .map(|k| status_i64(&failed, k))
    .collect();
    assert_eq!(
        status,
        vec![
            c.rows_total,
            c.rows_invalid,
            c.rows_enriched,
            c.rows_no_match,
            c.rows_failed,
            c.rows_pending
        ],
        "status counts differ from the database's"
    );
    assert_eq!(c.rows_total, 12_000);
    assert!(
        c.rows_pending > 0,
        "the siblings finished before they were stopped: {c:?}"
    );

    // retryFailed runs the unfinished shards again; every row ends answered.
    let api = imports_api(&client, &ns);
    let patch = kube::api::Patch::Merge(json!({"spec": {"retryFailed": 1}}));
    api.patch("frail", &kube::api::PatchParams::default(), &patch)
        .await
        .unwrap();
    let done = wait_for(&api, "frail", Duration::from_secs(300), |o| {
        phase(o) == "Succeeded"
    })
    .await;
    let c = store.counts(&record).await.unwrap();
    assert_eq!((c.rows_pending, c.rows_failed), (0, 0), "{c:?}");
    assert_eq!(status_i64(&done, "rowsEnriched"), c.rows_enriched);
    assert_eq!(pods.runs("frail-enricher-0"), 2, "shard 0 was not run again");
    store.close().await;
    op.kill();
}

/// The Job pods reach a PostgreSQL that accepts TLS only (`hostssl` lines,
/// a test CA): the operator's CA (`PGSSLROOTCERT`, `PGSSLMODE=verify-full`)
/// is copied into the import's database Secret and mounted in the reader's
/// and the enrichers' pods at the operator's path, so they connect with the
/// certificate checked; a plaintext connection would be refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_pods_connect_to_a_tls_only_database_with_the_operators_ca() {
    let certs = temp_dir("tls-certs");
    tls_postgres::make_ca(&certs, "ca");
    tls_postgres::make_server_cert(&certs);
    let pg = tls_postgres::Server::start(
        &temp_dir("tls-server"),
        Some((&certs.join("server.crt"), &certs.join("server.key"))),
    );
    let db = pg.url("localhost", "");
    let (client, ns, _, pods) = setup_with_jobs_on(db.clone()).await;
    let ca = certs.join("ca.crt").display().to_string();
    let env = [("PGSSLROOTCERT", ca.as_str()), ("PGSSLMODE", "verify-full")];
    let op = Operator::start(&ns, &db, &env);
    let server = TestServer::start(nspl(), Faults::default()).await.unwrap();
    let source = serve_file(repo().join("samples/trips.csv")).await;
    create_import(&client, &ns, "sealed", sample_spec(&source, &server, json!({}))).await;
    let done = finished(&client, &ns, "sealed", Duration::from_secs(180)).await;
    assert_eq!(
        phase(&done),
        "Succeeded",
        "{:#?}\n{}\n{}",
        done.data["status"],
        pods.logs("sealed-reader"),
        op.log()
    );
    assert!(status_i64(&done, "rowsEnriched") > 0);
    // Each pod had the CA at the operator's path and verify-full.
    let jobs = ["sealed-reader", "sealed-enricher-0", "sealed-enricher-1"];
    for job in jobs {
        let runs = pods.of_job(job);
        assert!(!runs.is_empty(), "{job} ran no pod");
        for run in runs {
            let config = run.oci_config("job").expect("the container's OCI config");
            let env: Vec<&str> = config["process"]["env"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(Value::as_str)
                .collect();
            assert!(
                env.contains(&format!("PGSSLROOTCERT={ca}").as_str()),
                "{job}: {env:?}"
            );
            assert!(env.contains(&"PGSSLMODE=verify-full"), "{job}: {env:?}");
            let mounts = config["mounts"].as_array().unwrap();
            assert!(
                mounts
                    .iter()
                    .any(|m| m["destination"] == certs.display().to_string()),
                "{job}: the CA is not mounted at {}: {mounts:?}",
                certs.display()
            );
        }
    }
    // And the server takes nothing else: a plaintext connection is refused.
    let plain = pipeline::store::Store::connect(&pg.url("localhost", "sslmode=disable")).await;
    assert!(plain.is_err(), "the test database accepts plaintext");
    op.kill();
    let _ = std::fs::remove_dir_all(&certs);
}

/// The operator's CPU time so far (user + system), from `/proc/PID/stat`.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5): 11 and 12 after the name.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Duration::from_secs_f64(ticks as f64 / hz)
}

/// `(transactions, blocks read or hit, tuples returned)` of database `db` so
/// far, from `pg_stat_database` (every statement the operator sends outside a
/// transaction is one).
async fn database_work(db: &str) -> (i64, i64, i64) {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(db).await.unwrap();
    // The statistics of other backends reach the view within a second or so;
    // this connection's own are left out by reading before it does anything.
    sqlx::query_as("SELECT (xact_commit + xact_rollback)::int8, (blks_hit + blks_read)::int8, tup_returned::int8 FROM pg_stat_database WHERE datname = current_database()")
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

/// What the counts cost before issue 17 on the import `id`: the two `GROUP BY`
/// statements over its lookups each reconcile ran, from `EXPLAIN (ANALYZE,
/// BUFFERS)`, against the statements reading the tallies now.
async fn group_by_cost(db: &str, id: i64) -> String {
    use sqlx::Connection;
    async fn explain(conn: &mut sqlx::PgConnection, id: i64, sql: &str) -> (i64, f64) {
        {
            let lines: Vec<(String,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "EXPLAIN (ANALYZE, BUFFERS) {}",
                sql.replace("$1", &id.to_string())
            )))
            .fetch_all(conn)
            .await
            .unwrap();
            // The first `Buffers:` line is the top node's (it counts its children).
            let number = |line: &str, key: &str| -> f64 {
                line.split(key)
                    .nth(1)
                    .and_then(|v| v.split(|c: char| !(c.is_ascii_digit() || c == '.')).next())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0.0)
            };
            let buffers = lines.iter().find(|(l,)| l.trim_start().starts_with("Buffers:"));
            let blocks = buffers.map_or(0.0, |(l,)| number(l, "hit=") + number(l, "read="));
            let time = lines
                .iter()
                .find(|(l,)| l.starts_with("Execution Time:"))
                .map_or(0.0, |(l,)| number(l, "Time: "));
            (blocks as i64, time)
        }
    }
    let mut conn = sqlx::PgConnection::connect(db).await.unwrap();
    let conn = &mut conn;
    let before = [
        explain(conn, id, "SELECT status, COUNT(*), COALESCE(SUM(rows)::int8, 0) FROM lookups WHERE import_id = $1 GROUP BY status").await,
        explain(conn, id, "SELECT shard, COALESCE(SUM(rows)::int8, 0), COALESCE(SUM(CASE WHEN status <> 'pending' THEN rows ELSE 0 END)::int8, 0), COALESCE(SUM(CASE WHEN status = 'failed' THEN rows ELSE 0 END)::int8, 0) FROM lookups WHERE import_id = $1 GROUP BY shard ORDER BY shard").await,
    ];
    let after = [
        explain(conn, id, "SELECT status, CAST(SUM(coordinates) AS BIGINT), CAST(SUM(rows) AS BIGINT) FROM lookup_tallies WHERE import_id = $1 GROUP BY status").await,
        explain(conn, id, "SELECT shard, CAST(SUM(rows) AS BIGINT), CAST(SUM(CASE WHEN status <> 'pending' THEN rows ELSE 0 END) AS BIGINT), CAST(SUM(CASE WHEN status = 'failed' THEN rows ELSE 0 END) AS BIGINT) FROM lookup_tallies WHERE import_id = $1 GROUP BY shard ORDER BY shard").await,
    ];
    let sum = |c: &[(i64, f64)]| {
        (
            c.iter().map(|x| x.0).sum::<i64>(),
            c.iter().map(|x| x.1).sum::<f64>(),
        )
    };
    let ((bb, bt), (ab, at)) = (sum(&before), sum(&after));
    format!("{bb} blocks, {bt:.1} ms|{ab} blocks, {at:.2} ms|")
}

/// Benchmark (BENCHMARKS.md §8, `make bench`): the operator's steady cost per
/// import in `Enriching`, with 1, 10 and 50 imports in flight and with one
/// import of 1,000,000 rows. The enricher Jobs are held suspended by a
/// stand-in queue (as Kueue would) and their API URL never answers, so the
/// only work is the operator's polling. Over a 60 s window each: reconciles,
/// requests to the API server (the operator's own count, by verb), database
/// transactions and blocks touched (`pg_stat_database` of the test's own
/// database), and the operator's CPU time, all per import per minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run by bench/run.sh (make bench)"]
async fn bench_operator_cost_per_import_in_flight() {
    // An API that accepts connections and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("http://localhost:{}", silent.local_addr().unwrap().port());
    let _silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let (client, ns, db, _pods) = setup().await;
    let op = Operator::start(&ns, &db, &[]);
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let holder = {
        let jobs = jobs.clone();
        tokio::spawn(async move {
            let stream = kube::runtime::watcher(jobs.clone(), Default::default()).applied_objects();
            let mut stream = std::pin::pin!(stream);
            while let Some(Ok(j)) = stream.next().await {
                let suspended = j.spec.as_ref().and_then(|s| s.suspend) == Some(true);
                if j.name_any().contains("-enricher-") && !suspended {
                    let patch = kube::api::Patch::Merge(json!({"spec": {"suspend": true}}));
                    let _ = jobs.patch(&j.name_any(), &Default::default(), &patch).await;
                }
            }
        })
    };
    let small = serve_file(repo().join("samples/trips.csv")).await;
    let dir = temp_dir("cost");
    std::fs::write(dir.join("large.csv"), synthetic_input(1_000_000)).unwrap();
    let large = serve_file(dir.join("large.csv")).await;
    let api = imports_api(&client, &ns);
    let create = |name: String, source: String| {
        let (api, ns, url) = (api.clone(), ns.clone(), silent_url.clone());
        async move {
            let obj: DynamicObject = serde_json::from_value(json!({
                "apiVersion": "postcodes.dev/v1alpha1", "kind": "PostcodeImport",
                "metadata": {"name": name, "namespace": ns, "labels": {"kueue.x-k8s.io/queue-name": "held"}},
                "spec": {"source": {"url": source}, "api": {"baseUrl": url}, "shards": 4,
                         "quota": {"requestsPerSecond": 5}},
            }))
            .unwrap();
            api.create(&PostParams::default(), &obj).await.unwrap();
            wait_for(&api, &name, Duration::from_secs(600), |o| phase(o) == "Enriching").await;
        }
    };
    let mut in_flight = 0;
    let mut lines = Vec::new();
    for (label, tag, n, source) in [
        ("samples/trips.csv", "small", 1, &small),
        ("samples/trips.csv", "small", 10, &small),
        ("samples/trips.csv", "small", 50, &small),
        ("1,000,000 rows", "large", 1, &large),
    ] {
        if tag == "large" {
            api.delete_collection(&DeleteParams::default(), &ListParams::default())
                .await
                .unwrap();
            tokio::time::timeout(Duration::from_secs(600), async {
                while !api.list(&ListParams::default()).await.unwrap().items.is_empty() {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            })
            .await
            .expect("imports deleted");
            in_flight = 0;
        }
        let names: Vec<String> = (in_flight..n).map(|i| format!("cost-{tag}-{i}")).collect();
        futures::future::join_all(names.iter().map(|name| create(name.clone(), source.clone()))).await;
        in_flight = n;
        if tag == "large" {
            // Its shards planned, as its enrichers would at their start: about
            // 900,000 pending lookups for the counts to be read over.
            let store = pipeline::store::Store::connect(&db).await.unwrap();
            let uid = api.get(&names[0]).await.unwrap().uid().unwrap();
            let record = store.import(&uid).await.unwrap().unwrap();
            for shard in 0..4 {
                store.plan_shard(record.id, shard).await.unwrap();
            }
            eprintln!("BENCH before|{}", group_by_cost(&db, record.id).await);
        }
        // Settle: the last import's first looks (Job creation, status) are
        // done, and no vacuum of the load is left for the window.
        reconciled_n_more(&op.metrics_url, 2 * n as u64).await;
        {
            use sqlx::Connection;
            let mut conn = sqlx::PgConnection::connect(&db).await.unwrap();
            sqlx::query("VACUUM (ANALYZE)").execute(&mut conn).await.unwrap();
        }
        let window = Duration::from_secs(60);
        let pid = op.child.id();
        let (r0, k0, c0, d0) = (
            reconciles(&op.metrics_url).await,
            metric_sum(&op.metrics_url, "postcode_operator_kube_requests_total").await,
            cpu_time(pid),
            database_work(&db).await,
        );
        tokio::time::sleep(window).await; // the measurement window itself
        let (r1, k1, c1, d1) = (
            reconciles(&op.metrics_url).await,
            metric_sum(&op.metrics_url, "postcode_operator_kube_requests_total").await,
            cpu_time(pid),
            database_work(&db).await,
        );
        let per = |x: f64| x / n as f64 / (window.as_secs_f64() / 60.0);
        let reconciles_n = (r1 - r0) as f64;
        let line = format!(
            "|{label}|{n}|{:.1}|{:.1}|{:.1}|{:.0}|{:.0}|{:.2} s|{:.1} %|",
            per(reconciles_n),
            per((k1 - k0) as f64),
            per((d1.0 - d0.0) as f64),
            per((d1.1 - d0.1) as f64),
            (d1.1 - d0.1) as f64 / reconciles_n.max(1.0),
            per((c1 - c0).as_secs_f64()),
            100.0 * (c1 - c0).as_secs_f64() / window.as_secs_f64(),
        );
        eprintln!("BENCH cost{line}");
        lines.push(line);
        assert!(r1 > r0, "the operator kept polling");
    }
    holder.abort();
    op.kill();
    println!("{}", lines.join("\n"));
}
