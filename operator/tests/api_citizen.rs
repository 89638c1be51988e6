//! Issue 13, a good citizen of the external API, through `postcode-operator
//! local` and the Job binaries: an unreachable API makes `local` exit with its
//! own code and a `RowsFailed` condition; answers are reused across imports
//! within their maximum age; imports on one database share one quota per API.
#![allow(clippy::too_many_lines)] // the 80-line limit is for non-test code

mod common;

use common::*;

/// A port nothing listens on.
fn closed_port() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

#[test]
fn an_unreachable_api_exits_4_and_names_the_count_and_the_cause() {
    let dir = temp_dir("unreachable");
    let input = repo().join("samples/trips.csv");
    let out = dir.join("out.csv");
    let o = run_local(&[
        input.to_str().unwrap(),
        "--db",
        dir.join("t.db").to_str().unwrap(),
        "--api-url",
        &format!("http://{}", closed_port()),
        "--shards",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(pipeline::exit::LOCAL_ROWS_FAILED));
    let stderr = String::from_utf8_lossy(&o.stderr);
    let (_, rows) = read_output(&out);
    let statuses = by_status(&rows);
    let failed = statuses.get("failed").copied().unwrap_or(0);
    let invalid = statuses.get("invalid").copied().unwrap_or(0);
    assert!(failed > 0 && failed + invalid == rows.len(), "{statuses:?}");
    assert!(
        stderr.contains(&format!("{failed} rows failed (connection failed")),
        "{stderr}"
    );
}

/// Runs `local` on a blocking thread (the test server runs on this runtime).
async fn local(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || run_local(&args.iter().map(String::as_str).collect::<Vec<_>>()))
        .await
        .unwrap()
}

/// `local FILE --db DB --api-url URL --quota-rps 20 --out OUT` plus `extra`.
fn local_args(
    file: &std::path::Path,
    db: &str,
    url: &str,
    out: &std::path::Path,
    extra: &[&str],
) -> Vec<String> {
    let mut a: Vec<String> = [
        file.to_str().unwrap(),
        "--db",
        db,
        "--api-url",
        url,
        "--quota-rps",
        "20",
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// The first 5,000 rows imported under three file names: the second asks
/// the API nothing and writes the same bytes; with the maximum age 0 the
/// third asks what the first asked.
async fn a_reimport_reuses_every_answer(db: String, dir: std::path::PathBuf) {
    let server = postcodes_io_test_server::TestServer::start(nspl(), Default::default())
        .await
        .unwrap();
    let head = head_of_real_file(5_000, &dir);
    let mut outputs = vec![];
    let mut requests = vec![];
    for (name, extra) in [
        ("first", &[][..]),
        ("second", &[][..]),
        ("third", &["--answer-max-age-days", "0"][..]),
    ] {
        let file = dir.join(format!("{name}.csv"));
        std::fs::copy(&head, &file).unwrap();
        let out = dir.join(format!("{name}.enriched.csv"));
        let before = server.state.stats().requests;
        let o = local(local_args(&file, &db, &server.url(), &out, extra)).await;
        assert!(o.status.success(), "{name}");
        requests.push(server.state.stats().requests - before);
        outputs.push(std::fs::read(&out).unwrap());
    }
    eprintln!("requests of the three imports: {requests:?}");
    assert!(requests[0] > 0);
    assert_eq!(requests[1], 0, "the second import asked the API");
    assert_eq!(
        requests[2], requests[0],
        "max age 0 must ask what the first asked"
    );
    assert!(outputs[1] == outputs[0], "the reused answers gave other bytes");
    assert!(outputs[2] == outputs[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reimport_reuses_every_answer_on_sqlite() {
    let dir = temp_dir("cache-sqlite");
    let db = dir.join("t.db").to_string_lossy().to_string();
    a_reimport_reuses_every_answer(db, dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reimport_reuses_every_answer_on_postgres() {
    let dir = temp_dir("cache-pg");
    a_reimport_reuses_every_answer(fresh_pg().await, dir).await;
}

/// Rows `from..from + n` (0-based data rows) of [`real_input`], with its header.
fn slice_of_real_file(from: usize, n: usize, path: &std::path::Path) {
    let text = std::fs::read_to_string(real_input()).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    let body: Vec<&str> = std::iter::once(header).chain(lines.skip(from).take(n)).collect();
    std::fs::write(path, body.join("\n") + "\n").unwrap();
}

/// Three imports of three disjoint 20,000-row slices started together, each
/// asking 20 requests/s, against a server limiting at 20/s: one API quota of
/// 20 shared by all, so the server never sees more than 20 in a second.
async fn three_imports_share_one_api_quota(db: String, dir: std::path::PathBuf) {
    let limit = postcodes_io_test_server::Faults {
        rate_limit: Some(20),
        retry_after_s: Some(1),
        ..Default::default()
    };
    let server = postcodes_io_test_server::TestServer::start(nspl(), limit)
        .await
        .unwrap();
    let mut runs = vec![];
    let mut ends = vec![];
    let kind = if db.starts_with("postgres") {
        "PostgreSQL"
    } else {
        "SQLite"
    };
    let started = std::time::Instant::now();
    for i in 0..3 {
        let file = dir.join(format!("slice{i}.csv"));
        slice_of_real_file(i * 20_000, 20_000, &file);
        let out = dir.join(format!("slice{i}.enriched.csv"));
        let args = local_args(&file, &db, &server.url(), &out, &[]);
        runs.push((file, out, tokio::spawn(timed(local(args), started))));
    }
    for (file, out, run) in runs {
        let (o, took) = run.await.unwrap();
        ends.push(format!("{:.1} s", took.as_secs_f64()));
        assert!(o.status.success(), "{}", file.display());
        let reference = dir.join(format!(
            "{}.offline.csv",
            file.file_stem().unwrap().to_str().unwrap()
        ));
        let r = local(vec![
            file.to_string_lossy().to_string(),
            "--db".into(),
            dir.join("offline.db").to_string_lossy().to_string(),
            "--offline-postcodes".into(),
            postcodes_file().to_string_lossy().to_string(),
            "--out".into(),
            reference.to_string_lossy().to_string(),
        ])
        .await;
        assert!(r.status.success());
        let (got, want) = (read_output(&out).1, read_output(&reference).1);
        assert_eq!(got.len(), 20_000);
        for (a, b) in got.iter().zip(&want) {
            assert_eq!(
                (&a["status"], &a["postcode"]),
                (&b["status"], &b["postcode"]),
                "row {}",
                a["row_number"]
            );
        }
    }
    let st = server.state.stats();
    // A row of BENCHMARKS.md section 6 (bench/run.sh collects the `BENCH three|` lines).
    eprintln!(
        "BENCH three| {kind} | {} | {} | {} | {:.1} s | {:?} |",
        ends.join(" / "),
        st.requests,
        st.max_per_second,
        st.requests as f64 / 20.0,
        st.by_status
    );
    assert_eq!(st.by_status.get(&429), None, "{:?}", st.by_status);
    assert!(
        st.max_per_second <= 20,
        "{} requests in one second",
        st.max_per_second
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_imports_share_one_api_quota_on_sqlite() {
    let dir = temp_dir("share-sqlite");
    let db = dir.join("t.db").to_string_lossy().to_string();
    three_imports_share_one_api_quota(db, dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_imports_share_one_api_quota_on_postgres() {
    let dir = temp_dir("share-pg");
    three_imports_share_one_api_quota(fresh_pg().await, dir).await;
}

/// `run`'s output and the time from `started` to its end.
async fn timed<T>(
    run: impl std::future::Future<Output = T>,
    started: std::time::Instant,
) -> (T, std::time::Duration) {
    let out = run.await;
    (out, started.elapsed())
}

/// Benchmark for BENCHMARKS.md (not CI; needs the real file): 1, 3 and 10
/// imports of disjoint 2,000-row slices started together on one SQLite
/// database, one API quota of 20 requests/s, against a server limiting at
/// 20/s: requests, 429s, busiest second and wall time against the floor
/// (requests / quota).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: cargo test --release -p postcode-operator --test api_citizen -- --ignored bench_"]
async fn bench_imports_sharing_one_quota() {
    for n in [1, 3, 10] {
        let dir = temp_dir(&format!("bench-share-{n}"));
        let db = dir.join("t.db").to_string_lossy().to_string();
        let limit = postcodes_io_test_server::Faults {
            rate_limit: Some(20),
            retry_after_s: Some(1),
            ..Default::default()
        };
        let server = postcodes_io_test_server::TestServer::start(nspl(), limit)
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let mut runs = vec![];
        for i in 0..n {
            let file = dir.join(format!("slice{i}.csv"));
            slice_of_real_file(i * 2_000, 2_000, &file);
            let out = dir.join(format!("slice{i}.enriched.csv"));
            let args = local_args(&file, &db, &server.url(), &out, &[]);
            runs.push(tokio::spawn(timed(local(args), started)));
        }
        let mut ends = vec![];
        for run in runs {
            let (o, took) = run.await.unwrap();
            assert!(o.status.success());
            ends.push(took.as_secs_f64());
        }
        let wall = started.elapsed().as_secs_f64();
        let st = server.state.stats();
        let floor = st.requests as f64 / 20.0;
        // A row of BENCHMARKS.md section 6 (bench/run.sh collects the `BENCH share|` lines).
        eprintln!(
            "BENCH share| {n} | 2,000 | {} | {} | {} | {wall:.1} s | {floor:.1} s | {:.2} | {:.1} s / {:.1} s |",
            st.requests,
            st.by_status.get(&429).copied().unwrap_or(0),
            st.max_per_second,
            wall / floor,
            ends.iter().copied().fold(f64::MAX, f64::min),
            ends.iter().copied().fold(0.0, f64::max),
        );
    }
}

/// Benchmark for BENCHMARKS.md (not CI; needs the real file): the first
/// 5,000 real rows with default settings against a server in capacity mode
/// at 20 coordinates/s: failed rows, wasted work, and the time against the
/// floor (coordinates the server worked on / capacity).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: cargo test --release -p postcode-operator --test api_citizen -- --ignored bench_"]
async fn bench_slow_server_5000_rows() {
    let dir = temp_dir("bench-capacity");
    let faults = postcodes_io_test_server::Faults {
        capacity: Some(20),
        ..Default::default()
    };
    let server = postcodes_io_test_server::TestServer::start(nspl(), faults)
        .await
        .unwrap();
    let input = head_of_real_file(5_000, &dir);
    let out = dir.join("out.csv");
    let started = std::time::Instant::now();
    let o = local(vec![
        input.to_string_lossy().to_string(),
        "--db".into(),
        dir.join("t.db").to_string_lossy().to_string(),
        "--api-url".into(),
        server.url(),
        "--out".into(),
        out.to_string_lossy().to_string(),
    ])
    .await;
    let wall = started.elapsed().as_secs_f64();
    assert!(o.status.success());
    let (_, rows) = read_output(&out);
    let st = server.state.stats();
    // A row of BENCHMARKS.md section 6 (bench/run.sh collects the `BENCH capacity|` lines).
    eprintln!(
        "BENCH capacity| 5,000 | {} | {wall:.1} s | {:.1} s | {:.2} | {} | {} ({:.1} %) | {} | {} |",
        st.requests,
        st.worked_coordinates as f64 / 20.0,
        wall / (st.worked_coordinates as f64 / 20.0),
        st.worked_coordinates,
        st.wasted_coordinates,
        100.0 * st.wasted_coordinates as f64 / st.worked_coordinates.max(1) as f64,
        by_status(&rows).get("failed").copied().unwrap_or(0),
        st.max_queued_requests
    );
}

/// A slow server (capacity mode, 20 coordinates/s; requests queue, work on
/// requests whose client gave up goes on and counts as wasted) and the first
/// 1,000 real rows with `local`'s default settings: no row fails and at most
/// 5 % of the server's work is wasted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_server_at_20_coordinates_per_second_fails_nothing_and_wastes_little() {
    let dir = temp_dir("capacity");
    let server = postcodes_io_test_server::TestServer::start(
        nspl(),
        postcodes_io_test_server::Faults {
            capacity: Some(20),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let input = head_of_real_file(1_000, &dir);
    let out = dir.join("out.csv");
    let o = local(vec![
        input.to_string_lossy().to_string(),
        "--db".into(),
        dir.join("t.db").to_string_lossy().to_string(),
        "--api-url".into(),
        server.url(),
        "--out".into(),
        out.to_string_lossy().to_string(),
    ])
    .await;
    assert!(o.status.success());
    let (_, rows) = read_output(&out);
    assert_eq!(rows.len(), 1_000);
    assert_eq!(by_status(&rows).get("failed"), None);
    let st = server.state.stats();
    eprintln!(
        "capacity 20/s: {} requests, worked {} coordinates, wasted {}, busiest second {} coordinates, at most {} requests queued",
        st.requests, st.worked_coordinates, st.wasted_coordinates, st.busiest_second_coordinates, st.max_queued_requests
    );
    assert!(st.worked_coordinates > 0);
    assert!(
        st.wasted_coordinates * 20 <= st.worked_coordinates,
        "wasted {} of {}",
        st.wasted_coordinates,
        st.worked_coordinates
    );
}
