//! Property-based fuzzing of the upload endpoint against a running operator on
//! the real test API server: whatever the body and options, the answer is 201 or
//! a 4xx with a message — never a 5xx, never a dead server — and every 201 is
//! a `PostcodeImport` that exists. `PROPTEST_CASES` sets the number of cases.
#![allow(clippy::too_many_lines)] // the 80-line limit is for non-test code

mod common;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use common::{kube_harness::*, *};
use k8s_openapi::api::core::v1::Secret;
use kube::{api::PostParams, Api};
use proptest::prelude::*;
use serde_json::json;

fn query_value() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9-]{1,12}",
        "[A-Za-z0-9_.%;'\" -]{0,30}",
        (0u32..100).prop_map(|n| n.to_string()),
        Just("-1".to_string()),
        Just("NaN".to_string()),
        Just("1e309".to_string()),
        Just("%00".to_string()),
    ]
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..512),
        "(lat,lon\n)?([-0-9.,a-z;\t\"]{0,20}\n){0,20}".prop_map(String::into_bytes),
        Just(b"lat,lon\n51.5,-0.1\n".to_vec()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_upload_gets_201_or_a_4xx_and_the_server_stays_up() {
    let client = test_client().await;
    let ns = fresh_namespace(&client).await;
    let db = fresh_pg().await;
    let secret: Secret = serde_json::from_value(
        json!({"metadata": {"name": "postcode-operator-database"}, "stringData": {"url": db}}),
    )
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_postcode-operator"))
        .arg("run")
        .envs([
            ("LISTEN_ADDR", "127.0.0.1:0"),
            ("METRICS_ADDR", "127.0.0.1:0"),
            // Options and bodies are fuzzed here; access control is upload_auth.rs'.
            ("UPLOAD_AUTH", "none"),
            ("DATABASE_URL", db.as_str()),
            ("POD_NAMESPACE", ns.as_str()),
            ("WATCH_NAMESPACE", ns.as_str()),
            ("MAX_UPLOAD_BYTES", "4096"),
            ("RUST_LOG", "warn,postcode_operator=info"),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            for what in ["upload API listening on ", "metrics and probes listening on "] {
                if let Some(i) = line.find(what) {
                    let _ = tx.send((what, line[i + what.len()..].trim().to_string()));
                }
            }
        }
    });
    let mut url = String::new();
    let mut metrics_url = String::new();
    while url.is_empty() || metrics_url.is_empty() {
        let (what, u) = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("operator started");
        if what.starts_with("upload") {
            url = u;
        } else {
            metrics_url = u;
        }
    }
    let cases: u32 = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150);
    let http = reqwest::Client::new();
    let handle = tokio::runtime::Handle::current();
    let ns2 = ns.clone();
    let result = tokio::task::spawn_blocking(move || {
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
            cases,
            failure_persistence: None,
            ..ProptestConfig::default()
        });
        let strategy = (
            proptest::collection::vec(
                (
                    "(name|shards|quotaRps|maxRequests|latColumn|lonColumn|delimiter|namespace|x)",
                    query_value(),
                ),
                0..4,
            ),
            body(),
            any::<bool>(),
        );
        runner.run(&strategy, |(params, body, multipart)| {
            let mut q: Vec<(String, String)> = params;
            if !q.iter().any(|(k, _)| k == "namespace") {
                q.push(("namespace".into(), ns2.clone()));
            }
            let (status, text) = handle.block_on(async {
                let mut req = http.post(format!("{url}/v1/imports")).query(&q);
                req = if multipart {
                    req.multipart(reqwest::multipart::Form::new().part(
                        "file",
                        reqwest::multipart::Part::bytes(body.clone()).file_name("f.csv"),
                    ))
                } else {
                    req.header("content-type", "text/csv").body(body.clone())
                };
                let r = req.send().await.expect("the server answers");
                (r.status().as_u16(), r.text().await.unwrap_or_default())
            });
            prop_assert!(
                status == 201 || (400..500).contains(&status),
                "{} {} for {:?}",
                status,
                text,
                q
            );
            if status != 201 {
                prop_assert!(!text.is_empty(), "a refusal says why");
            }
            let healthy = handle.block_on(async {
                http.get(format!("{metrics_url}/healthz"))
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            });
            prop_assert_eq!(healthy.ok(), Some(200));
            Ok(())
        })
    })
    .await
    .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    if let Err(e) = result {
        panic!("{e}");
    }
}
