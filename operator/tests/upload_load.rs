//! Uploads under load: many at once, and one of 1 GB, streamed through the
//! upload API into the database with flat memory. The CI test asserts only
//! correctness (every upload stored whole: its SHA-256 and its rows, read
//! back from the database); the benchmark (`bench_uploads_under_load`,
//! ignored, run by `make bench`) adds the operator's peak memory and the
//! latency of `/healthz` throughout, for BENCHMARKS.md.
//!
//! The operator watches another namespace, so the imports the uploads create
//! start no Jobs: what is measured is the upload path alone.

mod common;

use std::time::{Duration, Instant};

use common::{
    kube_harness::*,
    operator::{metric, Operator},
    *,
};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// `bytes` of CSV (header `id,lat,lon`, then rows until the size is
/// reached; the last row is cut short by the size), generated in 64 KiB
/// chunks from `seed`; yields the chunks, and the SHA-256 and line count of
/// the whole once the stream ends.
struct Generated {
    bytes: u64,
    seed: u64,
}

impl Generated {
    fn chunks(&self) -> impl Iterator<Item = Vec<u8>> {
        let (mut left, seed) = (self.bytes, self.seed);
        let mut row = 0u64;
        let mut pending: Vec<u8> = b"id,lat,lon\n".to_vec();
        std::iter::from_fn(move || {
            if left == 0 {
                return None;
            }
            let want = left.min(64 << 10) as usize;
            while pending.len() < want {
                row += 1;
                let x = (row.wrapping_mul(2_654_435_761) ^ seed) % 1_000_000;
                pending.extend_from_slice(
                    format!(
                        "{seed}-{row},{:.6},{:.6}\n",
                        50.0 + x as f64 / 125_000.0,
                        -5.0 + x as f64 / 200_000.0
                    )
                    .as_bytes(),
                );
            }
            let rest = pending.split_off(want);
            left -= want as u64;
            Some(std::mem::replace(&mut pending, rest))
        })
    }

    /// SHA-256 (hex) and number of `\n` of the whole.
    fn digest(&self) -> (String, u64) {
        let mut t = Tally::default();
        self.chunks().for_each(|c| t.add(&c));
        t.finish()
    }
}

/// SHA-256 and `\n` count of bytes seen in pieces.
#[derive(Default)]
struct Tally {
    sha: Sha256,
    lines: u64,
}

impl Tally {
    fn add(&mut self, piece: &[u8]) {
        self.lines += piece.iter().filter(|&&b| b == b'\n').count() as u64;
        self.sha.update(piece);
    }

    /// SHA-256 (hex) and line count.
    fn finish(self) -> (String, u64) {
        (hex::encode(self.sha.finalize()), self.lines)
    }
}

/// Streams `g` to `POST /v1/imports` (never whole in memory); the 201 body.
async fn upload(op_url: &str, ns: &str, g: &Generated) -> Value {
    let body = futures::stream::iter(g.chunks().map(Ok::<_, std::io::Error>));
    let resp = reqwest::Client::new()
        .post(format!("{op_url}/v1/imports?namespace={ns}"))
        .header("content-type", "text/csv")
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .unwrap();
    let code = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    assert_eq!(code, 201, "{body}");
    body
}

/// SHA-256 and line count of upload `id` as stored, read back chunk by chunk.
async fn stored(store: &pipeline::store::Store, id: &str) -> (String, u64) {
    let mut t = Tally::default();
    let mut seq = 0;
    while let Some(c) = store.upload_chunk(id, seq).await.unwrap() {
        t.add(&c);
        seq += 1;
    }
    t.finish()
}

/// Uploads `sizes` at once; checks each is stored whole. Returns the wall time.
async fn upload_all(op: &Operator, ns: &str, db: &str, sizes: &[u64]) -> Duration {
    let started = Instant::now();
    let runs: Vec<_> = sizes
        .iter()
        .enumerate()
        .map(|(i, &bytes)| {
            let (url, ns) = (op.url.clone(), ns.to_string());
            tokio::spawn(async move {
                let g = Generated {
                    bytes,
                    seed: i as u64 + 1,
                };
                let body = upload(&url, &ns, &g).await;
                (
                    body,
                    tokio::task::spawn_blocking(move || g.digest()).await.unwrap(),
                )
            })
        })
        .collect();
    let answers = futures::future::join_all(runs).await;
    let wall = started.elapsed();
    let store = pipeline::store::Store::connect(db).await.unwrap();
    for (i, a) in answers.into_iter().enumerate() {
        let (body, (sha, lines)) = a.unwrap();
        assert_eq!(body["bytes"].as_u64(), Some(sizes[i]), "upload {i}: {body}");
        assert_eq!(body["sha256"].as_str(), Some(sha.as_str()), "upload {i}: {body}");
        let id = body["uploadId"].as_str().unwrap();
        assert_eq!(stored(&store, id).await, (sha, lines), "upload {i} as stored");
    }
    wall
}

/// An operator for uploads only (it watches another namespace), storing at
/// most `slots` uploads at once (`UPLOAD_CONCURRENCY`).
async fn upload_only_operator(slots: usize) -> (Operator, String, String) {
    let client = test_client().await;
    let ns = fresh_namespace(&client).await;
    let db = fresh_pg().await;
    let slots = slots.to_string();
    let op = Operator::start(
        &ns,
        &db,
        &[
            ("WATCH_NAMESPACE", "postcode-upload-load-unwatched"),
            ("UPLOAD_CONCURRENCY", &slots),
        ],
    );
    (op, ns, db)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_uploads_are_each_stored_whole() {
    let (op, ns, db) = upload_only_operator(2).await;
    // uneven sizes: chunk boundaries (1 MiB) fall in different places
    let sizes: Vec<u64> = (0..8).map(|i| (4 << 20) + i * 77_777).collect();
    upload_all(&op, &ns, &db, &sizes).await;
    // eight at once through two slots: some waited their turn, and all were stored
    let waits = metric(&op.metrics_url, "postcode_operator_upload_slot_waits_total").await;
    assert!(waits > 0, "no upload waited for a slot");
}

/// Kibibytes of a /proc/PID/status field (`VmRSS`, `VmHWM`).
fn proc_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

/// `make bench`: 20 uploads of 10 MB and one of 1 GB at once. Prints the
/// `BENCH upload|` row of BENCHMARKS.md: wall time, throughput, the
/// operator's resident memory before and at its peak, and `/healthz`
/// latency (p50/p99/max, polled every 20 ms throughout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: make bench"]
async fn bench_uploads_under_load() {
    let (op, ns, db) = upload_only_operator(4).await;
    let pid = op.child.id();
    // warm: the pools and the first request's allocations
    upload_all(&op, &ns, &db, &[1 << 20]).await;
    let rss_before = proc_kib(pid, "VmRSS");
    let hwm_before = proc_kib(pid, "VmHWM");

    // The probe has its own thread and runtime: the test's own work
    // (generating and hashing 1.2 GB) must not delay it.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probe = {
        let (url, stop) = (format!("{}/healthz", op.metrics_url), stop.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let http = reqwest::Client::new();
                let mut ms = vec![];
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let t = Instant::now();
                    let ok = http.get(&url).send().await.is_ok_and(|r| r.status().is_success());
                    assert!(ok, "/healthz failed under load");
                    ms.push(t.elapsed().as_secs_f64() * 1000.0);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                ms
            })
        })
    };
    let mut sizes = vec![10_000_000u64; 20];
    sizes.push(1_000_000_000);
    let wall = upload_all(&op, &ns, &db, &sizes).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut ms = probe.join().unwrap();
    ms.sort_by(f64::total_cmp);
    let q = |p: f64| ms[((ms.len() - 1) as f64 * p).round() as usize];
    let peak = proc_kib(pid, "VmHWM").max(hwm_before);
    let growth_mib = (peak.saturating_sub(rss_before)) as f64 / 1024.0;
    let total: u64 = sizes.iter().sum();
    eprintln!(
        "BENCH upload|20 × 10 MB + 1 × 1 GB at once|{:.2} GB|{:.1} s|{:.0} MB/s|{:.0} MiB|{:.0} MiB|{:.0} MiB|{:.1} ms|{:.1} ms|{:.1} ms|{}|",
        total as f64 / 1e9,
        wall.as_secs_f64(),
        total as f64 / 1e6 / wall.as_secs_f64(),
        rss_before as f64 / 1024.0,
        peak as f64 / 1024.0,
        growth_mib,
        q(0.5),
        q(0.99),
        ms.last().copied().unwrap_or_default(),
        ms.len(),
    );
    // (the bound is 64 MiB; without the upload slots this run grew by 50)
    assert!(
        growth_mib < 32.0,
        "the operator's memory grew by {growth_mib:.0} MiB"
    );
}
