//! The operator started before its database (issue 11, point 6): it serves
//! `/healthz` (200) and `/readyz` (503) and answers uploads with 503 while it
//! retries with backoff; once PostgreSQL starts on that port it becomes ready
//! and an uploaded import reaches `Succeeded`. Runs against the test control
//! plane (`make test`) with its own PostgreSQL (`.ci/postgres.sh`) started
//! mid-test.
#![allow(clippy::too_many_lines)] // the 80-line limit is for non-test code

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use common::{kube_harness::*, operator::Operator, *};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    api::{ApiResource, DynamicObject, PostParams},
    Api,
};
use postcodes_io_test_server::{Faults, TestServer};
use serde_json::{json, Value};

const JOB_SA: &str = "postcode-operator-job";

/// A throwaway PostgreSQL on a chosen port, stopped on drop.
struct Postgres(PathBuf);

impl Postgres {
    fn start(dir: &Path, port: u16) -> Self {
        let out = Command::new(repo().join(".ci/postgres.sh"))
            .arg("start")
            .arg(dir)
            .arg(port.to_string())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        Self(dir.to_path_buf())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new(repo().join(".ci/postgres.sh"))
            .arg("stop")
            .arg(&self.0)
            .status();
    }
}

async fn get(url: &str) -> (u16, Value) {
    let r = reqwest::get(url).await.unwrap();
    let code = r.status().as_u16();
    let text = r.text().await.unwrap();
    (code, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// Polls `check` until it returns Some, or panics with `what` and the log at the deadline.
async fn poll<T, F, Fut>(op: &Operator, deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < end,
            "{what} within {deadline:?}; log:\n{}",
            op.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_started_before_its_database_waits_then_imports() {
    let server = TestServer::start(nspl(), Faults::default()).await.unwrap();
    let client = test_client().await;
    let ns = fresh_namespace(&client).await;
    create_job_service_account(&client, &ns, JOB_SA).await;
    let port = free_port();
    let db = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let secret: Secret = serde_json::from_value(
        json!({"metadata": {"name": "postcode-operator-database"}, "stringData": {"url": db}}),
    )
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();

    // Nothing listens on the port: the operator starts anyway.
    let mut op = Operator::start(&ns, &db, &[]);
    let (code, _) = get(&format!("{}/healthz", op.metrics_url)).await;
    assert_eq!(code, 200, "/healthz while the database is down");
    let (code, body) = get(&format!("{}/readyz", op.metrics_url)).await;
    assert_eq!((code, &body["database"]), (503, &json!(false)), "/readyz: {body}");
    let upload = reqwest::Client::new()
        .post(format!("{}/v1/imports?name=early&namespace={ns}", op.url))
        .header("content-type", "text/csv")
        .body("lat,lon\n51.5,-0.1\n")
        .send()
        .await
        .unwrap();
    assert_eq!(
        upload.status().as_u16(),
        503,
        "an upload before the database is up"
    );
    // It retries, and says why: two failed attempts logged.
    poll(
        &op,
        Duration::from_secs(60),
        "two failed database attempts logged",
        || {
            let n = op.log().matches("database not ready").count();
            async move { (n >= 2).then_some(()) }
        },
    )
    .await;
    assert!(
        op.log().contains(&format!("127.0.0.1:{port}")),
        "the log names the database:\n{}",
        op.log()
    );
    assert!(
        op.exited().is_none(),
        "the operator exited without its database:\n{}",
        op.log()
    );
    let (code, _) = get(&format!("{}/readyz", op.metrics_url)).await;
    assert_eq!(code, 503, "still not ready");

    // The database starts on that port: the operator becomes ready by itself.
    let _pg = Postgres::start(&temp_dir("late-pg"), port);
    let url = op.metrics_url.clone();
    poll(
        &op,
        Duration::from_secs(120),
        "/readyz 200 once PostgreSQL runs",
        || {
            let url = url.clone();
            async move { (get(&format!("{url}/readyz")).await.0 == 200).then_some(()) }
        },
    )
    .await;

    // ... and reconciles: an upload reaches Succeeded.
    let dir = temp_dir("late-pg-input");
    let file = head_of_real_file(300, &dir);
    let resp = reqwest::Client::new()
        .post(format!(
            "{}/v1/imports?name=late&namespace={ns}&shards=2&apiUrl={}",
            op.url,
            server.url().replace("127.0.0.1", "localhost")
        ))
        .header("content-type", "text/csv")
        .body(std::fs::read(&file).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201, "{}", resp.text().await.unwrap());
    let ar = ApiResource {
        group: "postcodes.dev".into(),
        version: "v1alpha1".into(),
        api_version: "postcodes.dev/v1alpha1".into(),
        kind: "PostcodeImport".into(),
        plural: "postcodeimports".into(),
    };
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &ar);
    let done = wait_for(&api, "late", Duration::from_secs(300), |o| {
        matches!(
            o.data.pointer("/status/phase").and_then(Value::as_str),
            Some("Succeeded" | "Failed")
        )
    })
    .await;
    assert_eq!(
        done.data.pointer("/status/phase").and_then(Value::as_str),
        Some("Succeeded"),
        "{:?}; log:\n{}",
        done.data.pointer("/status"),
        op.log()
    );
    assert_eq!(
        done.data.pointer("/status/rowsTotal").and_then(Value::as_i64),
        Some(300)
    );
}
