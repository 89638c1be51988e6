//! Faults and crashes through `postcode-operator local` and the Job binaries:
//! a rate-limited, faulty API; a reader killed mid-load; PostgreSQL restarted
//! mid-run. Real processes, real PostgreSQL, the real input file.
#![allow(clippy::too_many_lines)] // the 80-line limit is for non-test code

mod common;

use std::{
    io::Write,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use common::*;
use pipeline::{model::ImportPhase, store::Store};
use postcodes_io_test_server::{Faults, TestServer};

/// The first `n` rows of the real file, enriched offline: the reference answer.
fn offline_reference(
    input: &std::path::Path,
    dir: &std::path::Path,
) -> Vec<std::collections::HashMap<String, String>> {
    let out = dir.join("reference.csv");
    let o = run_local(&[
        input.to_str().unwrap(),
        "--db",
        dir.join("ref.db").to_str().unwrap(),
        "--offline-postcodes",
        postcodes_file().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    read_output(&out).1
}

fn same_postcodes(
    got: &[std::collections::HashMap<String, String>],
    want: &[std::collections::HashMap<String, String>],
) {
    assert_eq!(got.len(), want.len());
    for (a, b) in got.iter().zip(want) {
        assert_eq!(
            (&a["row_number"], &a["status"], &a["postcode"]),
            (&b["row_number"], &b["status"], &b["postcode"])
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_faults_under_a_5_rps_limit_lose_nothing_and_quota_4_sees_no_429() {
    let dir = temp_dir("mixed");
    let input = head_of_real_file(5_000, &dir);
    let (inp, d) = (input.clone(), dir.clone());
    let reference = tokio::task::spawn_blocking(move || offline_reference(&inp, &d))
        .await
        .unwrap();

    let faults = Faults {
        rate_limit: Some(5),
        retry_after_s: Some(1),
        p_500: 0.05,
        p_garbage: 0.03,
        p_slow: 0.03,
        slow_ms: 2_000,
        p_reset: 0.03,
        ..Faults::default()
    };
    for (rps, tag) in [("5", "faulty"), ("4", "quota4")] {
        let f = if tag == "faulty" {
            faults.clone()
        } else {
            Faults {
                rate_limit: Some(5),
                retry_after_s: Some(1),
                ..Faults::default()
            }
        };
        let server = TestServer::start(nspl(), f).await.unwrap();
        let out = dir.join(format!("{tag}.csv"));
        let args: Vec<String> = [
            input.to_str().unwrap(),
            "--db",
            dir.join(format!("{tag}.db")).to_str().unwrap(),
            "--api-url",
            &server.url(),
            "--shards",
            "4",
            "--quota-rps",
            rps,
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let o = tokio::task::spawn_blocking(move || {
            run_local(&args.iter().map(String::as_str).collect::<Vec<_>>())
        })
        .await
        .unwrap();
        assert!(o.status.success());
        let (_, rows) = read_output(&out);
        same_postcodes(&rows, &reference);
        assert_eq!(by_status(&rows).get("failed"), None);
        let st = server.state.stats();
        eprintln!(
            "{tag}: {:?} requests {} max/s {}",
            st.by_status, st.requests, st.max_per_second
        );
        if tag == "faulty" {
            assert!(
                st.by_status.get(&500).copied().unwrap_or(0) + st.by_status.get(&0).copied().unwrap_or(0) > 0,
                "no fault was injected: {st:?}"
            );
        } else {
            assert_eq!(
                st.by_status.get(&429),
                None,
                "quota 4 under a limit of 5 must never be throttled: {:?}",
                st.by_status
            );
            assert!(st.max_per_second <= 4, "{}", st.max_per_second);
        }
    }
}

/// Serves a CSV over HTTP slowly, counting the bytes sent.
async fn slow_csv_server(body: Arc<Vec<u8>>, sent: Arc<AtomicU64>, delay: Duration) -> String {
    use axum::{body::Body, routing::get, Router};
    let app = Router::new().route(
        "/input.csv",
        get(move || {
            let (body, sent) = (body.clone(), sent.clone());
            async move {
                let chunks: Vec<Vec<u8>> = body.chunks(16 * 1024).map(<[u8]>::to_vec).collect();
                let stream = futures::stream::iter(chunks).then(move |c| {
                    let sent = sent.clone();
                    async move {
                        tokio::time::sleep(delay).await;
                        sent.fetch_add(c.len() as u64, Ordering::SeqCst);
                        Ok::<_, std::io::Error>(c)
                    }
                });
                Body::from_stream(stream)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/input.csv")
}

use futures::StreamExt;

async fn reader_killed_mid_load_then_rerun_is_exact(db: String) {
    let text = std::fs::read(real_input()).unwrap();
    let body = Arc::new(text);
    let sent = Arc::new(AtomicU64::new(0));
    let url = slow_csv_server(body.clone(), sent.clone(), Duration::from_millis(20)).await;
    let reader = bin_dir().join("reader-job");
    let run = |url: &str| {
        Command::new(&reader)
            .args(["--import-uid", "killed-reader", "--source", url, "--shards", "2"])
            .env("DATABASE_URL", &db)
            // the test's CSV server is on loopback, which the Jobs' egress
            // policy refuses unless the admin allows it (as here)
            .env(pipeline::egress::ENV_ALLOW_CIDRS, "127.0.0.1/32")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut child = run(&url);
    // Kill it once it has read about half the file (the server's own count).
    let half = body.len() as u64 / 2;
    while sent.load(Ordering::SeqCst) < half {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("reader-job ended ({status}) before it was killed: {err}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success());
    let store = Store::connect(&db).await.unwrap();
    let partial = store.import("killed-reader").await.unwrap();
    assert!(
        partial.as_ref().is_none_or(|i| i.phase != ImportPhase::Loaded),
        "a killed load must not look finished: {partial:?}"
    );

    // Re-run (fast this time): exactly the file's rows, once each.
    let fast = slow_csv_server(body.clone(), Arc::new(AtomicU64::new(0)), Duration::ZERO).await;
    let out = run(&fast).wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let imp = store.import("killed-reader").await.unwrap().unwrap();
    assert_eq!(
        (imp.phase, imp.rows_total, imp.rows_invalid),
        (ImportPhase::Loaded, REAL_ROWS as i64, 0)
    );
    let counts = store.counts(&imp).await.unwrap();
    assert_eq!(counts.rows_pending, REAL_ROWS as i64);
    let mut n = 0i64;
    let mut last = 0;
    store
        .for_each_result(imp.id, |r| {
            n += 1;
            assert_eq!(r.row_number, last + 1, "rows out of order or duplicated");
            last = r.row_number;
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(n, REAL_ROWS as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_killed_mid_load_reruns_exactly_on_postgres() {
    let db = fresh_pg().await;
    Store::connect(&db).await.unwrap().migrate().await.unwrap();
    reader_killed_mid_load_then_rerun_is_exact(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_killed_mid_load_reruns_exactly_on_sqlite() {
    let dir = temp_dir("reader-sqlite");
    let db = dir.join("r.db").to_string_lossy().to_string();
    let store = Store::connect(&db).await.unwrap();
    store.migrate().await.unwrap();
    store.close().await;
    reader_killed_mid_load_then_rerun_is_exact(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_mid_run_ends_correct() {
    // A PostgreSQL of this test's own, so restarting it disturbs nobody else.
    let dir = temp_dir("pg-restart");
    let pg_dir = dir.join("pg");
    let script = repo().join(".ci/postgres.sh");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let out = Command::new(&script)
        .args(["start", pg_dir.to_str().unwrap(), &port.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let db = String::from_utf8(out.stdout).unwrap().trim().to_string();
    struct Stop(std::path::PathBuf, std::path::PathBuf);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = Command::new(&self.0)
                .args(["stop", self.1.to_str().unwrap()])
                .output();
        }
    }
    let _stop = Stop(script.clone(), pg_dir.clone());

    let input = head_of_real_file(10_000, &dir);
    let (inp, d) = (input.clone(), dir.clone());
    let reference = tokio::task::spawn_blocking(move || offline_reference(&inp, &d))
        .await
        .unwrap();
    let server = TestServer::start(nspl(), Faults::default()).await.unwrap();
    let out = dir.join("out.csv");
    let child = local_cmd(&[
        input.to_str().unwrap(),
        "--db",
        &db,
        "--api-url",
        &server.url(),
        "--shards",
        "2",
        "--quota-rps",
        "10",
        "--out",
        out.to_str().unwrap(),
    ])
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    // Restart the database once enrichment is well under way.
    while server.state.stats().requests < 20 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pg_ctl = std::fs::read_dir("/usr/lib/postgresql")
        .unwrap()
        .flatten()
        .map(|e| e.path().join("bin/pg_ctl"))
        .find(|p| p.exists())
        .unwrap();
    let data = pg_dir.join("data");
    // The restarted server logs to a file: with inherited pipes, waiting for
    // pg_ctl's output would wait for the server to exit.
    let restart = Command::new("runuser")
        .args([
            "-u",
            "postgres",
            "--",
            pg_ctl.to_str().unwrap(),
            "-D",
            data.to_str().unwrap(),
            "-l",
            pg_dir.join("restart.log").to_str().unwrap(),
            "-m",
            "immediate",
            "-w",
            "restart",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(restart.success(), "pg_ctl restart failed");
    let o = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let log = String::from_utf8_lossy(&o.stderr).to_string();
    let _ = std::io::stderr().write_all(log.as_bytes());
    assert!(o.status.success(), "{log}");
    let (_, rows) = read_output(&out);
    same_postcodes(&rows, &reference);
    assert_eq!(by_status(&rows).get("failed"), None);
}
