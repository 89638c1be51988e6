//! End-to-end tests of the pipeline through `postcode-operator local`: real
//! binaries as child processes, SQLite and a real PostgreSQL, the real input file,
//! and the postcodes.io-compatible test server for the HTTP path.
#![allow(clippy::too_many_lines)] // the 80-line limit is for non-test code

mod common;

use std::{collections::HashSet, path::Path, time::Duration};

use common::*;
use pipeline::geo::{distance_m, geodesic_m, LatLon, SPHERE_TO_ELLIPSOID};
use postcodes_io_test_server::{Faults, TestServer};

/// Distinct coordinates of [`real_input`] (87,064 in the real file).
fn real_distinct() -> usize {
    let text = std::fs::read_to_string(real_input()).unwrap();
    text.lines().skip(1).collect::<HashSet<_>>().len()
}

/// Brute-force geodesic distances (metres) of the postcodes within 20 km, from
/// the raw NSPL file, independent of the grid: candidates in a latitude band
/// of ±0.2° (22 km, beyond widesearch) around the query, within 20 km on the
/// sphere widened by the sphere/ellipsoid bound, measured on the ellipsoid.
struct BruteForce {
    by_lat: Vec<(f64, f64, String)>,
}

impl BruteForce {
    fn load() -> Self {
        let path = postcodes_file();
        let f = std::fs::File::open(&path).unwrap();
        let f: Box<dyn std::io::Read> = match path.extension().is_some_and(|e| e == "gz") {
            true => Box::new(flate2::read::GzDecoder::new(f)),
            false => Box::new(f),
        };
        let mut r = csv::Reader::from_reader(f);
        let mut by_lat: Vec<(f64, f64, String)> = r
            .records()
            .filter_map(|rec| {
                let rec = rec.unwrap();
                let lat: f64 = rec[1].parse().ok()?;
                let lon: f64 = rec[2].parse().ok()?;
                let pc: String = rec[0].chars().filter(|c| !c.is_whitespace()).collect();
                Some((
                    lat,
                    lon,
                    format!("{} {}", &pc[..pc.len() - 3], &pc[pc.len() - 3..]),
                ))
            })
            .collect();
        by_lat.sort_by(|a, b| a.0.total_cmp(&b.0));
        Self { by_lat }
    }

    /// Postcodes within 20 km (geodesic), nearest first.
    fn within_20km(&self, at: LatLon) -> Vec<(f64, &str)> {
        let lo = self.by_lat.partition_point(|e| e.0 < at.lat - 0.2);
        let hi = self.by_lat.partition_point(|e| e.0 <= at.lat + 0.2);
        let mut out: Vec<(f64, &str)> = self.by_lat[lo..hi]
            .iter()
            .map(|(lat, lon, pc)| (LatLon { lat: *lat, lon: *lon }, pc.as_str()))
            .filter(|(p, _)| distance_m(at, *p) <= 20_000.0 / SPHERE_TO_ELLIPSOID.0)
            .map(|(p, pc)| (geodesic_m(at, p), pc))
            .filter(|(d, _)| *d <= 20_000.0)
            .collect();
        out.sort_by(|a, b| a.0.total_cmp(&b.0));
        out
    }

    /// The nearest postcode's distance and the postcodes at it (within 1 µm).
    fn nearest(&self, at: LatLon) -> Option<(f64, Vec<&str>)> {
        let mut best: Option<(f64, Vec<&str>)> = None;
        for (d, pc) in self.within_20km(at) {
            match &mut best {
                Some((bd, pcs)) if (d - *bd).abs() < 1e-6 => pcs.push(pc),
                Some((bd, _)) if d > *bd => {}
                _ => best = Some((d, vec![pc])),
            }
        }
        best
    }
}

/// Runs the real file offline once per test process; returns the output path.
fn offline_reference() -> &'static Path {
    static OUT: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    OUT.get_or_init(|| {
        let dir = temp_dir("offline-ref");
        let out = dir.join("out.csv");
        let db = dir.join("ref.db");
        let o = run_local(&[
            real_input().to_str().unwrap(),
            "--offline-postcodes",
            postcodes_file().to_str().unwrap(),
            "--db",
            db.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success());
        out
    })
}

#[test]
fn real_file_offline_every_row_once_with_the_true_nearest_postcode() {
    let (header, rows) = read_output(offline_reference());
    assert_eq!(&header[..4], ["lat", "lon", "extra_fields", "row_number"]);
    assert_eq!(rows.len(), REAL_ROWS);
    let numbers: Vec<usize> = rows.iter().map(|r| r["row_number"].parse().unwrap()).collect();
    assert_eq!(
        numbers,
        (1..=REAL_ROWS).collect::<Vec<_>>(),
        "every row once, in order"
    );
    let s = by_status(&rows);
    if full_data_dir().is_some() {
        // The real file: 349 rows at (0,0) and 3 outside the UK.
        assert_eq!(s.get("enriched"), Some(&99_648), "{s:?}");
        assert_eq!(s.get("no_match"), Some(&352), "{s:?}");
    } else {
        // The synthetic input: its rows at (0,0), and no other, have no postcode.
        let text = std::fs::read_to_string(real_input()).unwrap();
        let at_null_island = text.lines().filter(|l| *l == "0.000000,0.000000").count();
        assert_eq!(s.get("no_match"), Some(&at_null_island), "{s:?}");
    }
    assert_eq!(s.len(), 2, "none invalid, none failed: {s:?}");

    let brute = BruteForce::load();
    let mut checked = 0;
    for (i, r) in rows.iter().enumerate() {
        // every 97th row plus every no_match row
        if i % 97 != 0 && r["status"] != "no_match" {
            continue;
        }
        let at = LatLon {
            lat: r["lat"].parse().unwrap(),
            lon: r["lon"].parse().unwrap(),
        };
        match (r["status"].as_str(), brute.nearest(at)) {
            ("enriched", Some((d, pcs))) => {
                assert!(
                    pcs.contains(&r["postcode"].as_str()),
                    "row {}: {} is not among the nearest {pcs:?}",
                    i + 1,
                    r["postcode"]
                );
                let ours: f64 = r["distance_m"].parse().unwrap();
                // the output is written to 0.1 m
                assert!(
                    (ours - d).abs() <= 0.05 + 1e-9,
                    "row {}: distance {ours} vs {d}",
                    i + 1
                );
                assert_eq!(r["outcode"], r["postcode"].split(' ').next().unwrap());
            }
            ("no_match", _) => {
                // postcodes.io's widesearch: nothing unless 10 postcodes lie within 19.5 km
                let near = brute.within_20km(at);
                assert!(
                    near.iter().filter(|(d, _)| *d <= 19_500.0).count() < 10,
                    "row {}: 10 postcodes within 19.5 km: {near:?}",
                    i + 1
                );
            }
            other => panic!("row {}: {other:?}", i + 1),
        }
        checked += 1;
    }
    assert!(checked > 1_300, "{checked}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_file_over_http_on_postgres_matches_offline_within_the_quota() {
    let server = TestServer::start(nspl(), Faults::default()).await.unwrap();
    let db = fresh_pg().await;
    let dir = temp_dir("http");
    let out = dir.join("out.csv");
    let url = server.url();
    let (input, outp) = (real_input(), out.clone());
    let o = tokio::task::spawn_blocking(move || {
        run_local(&[
            input.to_str().unwrap(),
            "--db",
            &db,
            "--api-url",
            &url,
            "--shards",
            "4",
            "--quota-rps",
            "20",
            "--out",
            outp.to_str().unwrap(),
        ])
    })
    .await
    .unwrap();
    assert!(o.status.success());
    let reference = tokio::task::spawn_blocking(|| read_output(offline_reference()).1)
        .await
        .unwrap();
    let (_, rows) = read_output(&out);
    assert_eq!(rows.len(), REAL_ROWS);
    for (a, b) in rows.iter().zip(&reference) {
        assert_eq!(
            (&a["row_number"], &a["status"], &a["postcode"]),
            (&b["row_number"], &b["status"], &b["postcode"])
        );
    }
    let st = server.state.stats();
    let first_radius = st.answered_by_radius.get("100").copied().unwrap_or_default();
    let widened: u64 = st
        .answered_by_radius
        .iter()
        .filter(|(r, _)| r.as_str() != "100")
        .map(|(_, n)| n)
        .sum();
    let distinct = real_distinct();
    let floor = distinct.div_ceil(100) as f64;
    eprintln!("server stats: {st:?}");
    assert!(
        first_radius as f64 <= 1.02 * floor,
        "{first_radius} first-radius requests for {distinct} coordinates"
    );
    assert_eq!(
        st.requests,
        first_radius + widened,
        "no request failed or was repeated"
    );
    assert!(
        st.max_per_second <= 20,
        "{} requests in one second",
        st.max_per_second
    );
    assert_eq!(st.repeated_queries, 0);
}

/// The pids of running `enricher-job` processes whose parent is `parent`.
fn enricher_children(parent: u32) -> Vec<u32> {
    let mut pids = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let ppid = stat
            .rsplit(')')
            .next()
            .and_then(|s| s.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        let cmd = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if ppid == Some(parent) && cmd.contains("enricher-job") {
            pids.push(pid);
        }
    }
    pids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_enricher_resumes_without_asking_a_finished_batch_twice() {
    let server = TestServer::start(nspl(), Faults::default()).await.unwrap();
    let dir = temp_dir("kill");
    let input = head_of_real_file(20_000, &dir);
    let db = dir.join("kill.db");
    let out = dir.join("out.csv");
    let args: Vec<String> = [
        input.to_str().unwrap(),
        "--db",
        db.to_str().unwrap(),
        "--api-url",
        &server.url(),
        "--shards",
        "2",
        "--quota-rps",
        "40",
        "--backoff-limit",
        "0",
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let child = local_cmd(&argv)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait (on the server's own count, not a clock) until the enrichers are well under way.
    let mut killed = None;
    for _ in 0..600 {
        if server.state.stats().requests >= 40 {
            if let Some(&pid) = enricher_children(child.id()).first() {
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                killed = Some(pid);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(killed.is_some(), "no enricher to kill");
    let first = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    eprintln!("{}", String::from_utf8_lossy(&first.stderr));
    assert!(
        !first.status.success(),
        "the run with a killed enricher (backoff limit 0) must not succeed"
    );
    let before = server.state.stats();

    let again = args.clone();
    let o =
        tokio::task::spawn_blocking(move || run_local(&again.iter().map(String::as_str).collect::<Vec<_>>()))
            .await
            .unwrap();
    assert!(o.status.success());
    let after = server.state.stats();
    eprintln!("before resume {before:?}\nafter resume {after:?}");
    // Only the batch in flight when the enricher died may be asked again.
    assert!(
        after.repeated_batches <= 1,
        "{} finished batches asked twice",
        after.repeated_batches
    );
    assert!(after.repeated_queries <= 100);

    // The final file equals an uninterrupted run's.
    let ref_dir = temp_dir("kill-ref");
    let ref_out = ref_dir.join("ref.csv");
    let (inp, r_db, r_out) = (input.clone(), ref_dir.join("ref.db"), ref_out.clone());
    let o = tokio::task::spawn_blocking(move || {
        run_local(&[
            inp.to_str().unwrap(),
            "--db",
            r_db.to_str().unwrap(),
            "--offline-postcodes",
            postcodes_file().to_str().unwrap(),
            "--out",
            r_out.to_str().unwrap(),
        ])
    })
    .await
    .unwrap();
    assert!(o.status.success());
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&ref_out).unwrap(),
        "resumed output differs from an uninterrupted run"
    );
}

#[test]
fn sample_resumes_as_a_no_op_and_a_changed_file_is_reloaded() {
    let dir = temp_dir("resume");
    let input = dir.join("trips.csv");
    std::fs::copy(repo().join("samples/trips.csv"), &input).unwrap();
    let db = dir.join("r.db");
    let out = dir.join("out.csv");
    let pc = repo().join("samples/postcodes-sample.csv");
    let args = [
        input.to_str().unwrap(),
        "--db",
        db.to_str().unwrap(),
        "--offline-postcodes",
        pc.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    assert!(run_local(&args).status.success());
    let first = std::fs::read(&out).unwrap();
    let again = run_local(&args);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("resuming"));
    assert_eq!(std::fs::read(&out).unwrap(), first);
    let (_, rows) = read_output(&out);
    let s = by_status(&rows);
    assert_eq!((s["enriched"], s["no_match"], s["invalid"]), (43, 2, 3), "{s:?}");

    // Changing the file reloads it: rows replaced, never duplicated.
    let text = std::fs::read_to_string(&input).unwrap();
    let fewer: Vec<&str> = text.lines().take(11).collect();
    std::fs::write(&input, fewer.join("\n") + "\n").unwrap();
    let o = run_local(&args);
    assert!(o.status.success());
    assert!(!String::from_utf8_lossy(&o.stderr).contains("resuming"));
    let (_, rows) = read_output(&out);
    assert_eq!(rows.len(), 10);
    let distinct: HashSet<&String> = rows.iter().map(|r| &r["row_number"]).collect();
    assert_eq!(distinct.len(), 10);
}

#[test]
fn unreadable_files_fail_the_import_with_a_clear_message() {
    let dir = temp_dir("bad");
    let cases: [(&str, &[u8], &str); 5] = [
        ("empty.csv", b"", "the file is empty"),
        ("blank.csv", b"\n\n", "the file is empty"),
        ("binary.csv", b"PK\x03\x04\x00\x00\x01", "looks binary"),
        (
            "names.csv",
            b"name,city\nann,leeds\n",
            "no latitude/longitude columns found in header [name, city]",
        ),
        ("three.csv", b"1,51.5,-0.1\n", "headerless file with 3 columns"),
    ];
    for (name, bytes, want) in cases {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        let db = dir.join(format!("{name}.db"));
        let o = run_local(&[
            p.to_str().unwrap(),
            "--db",
            db.to_str().unwrap(),
            "--offline-postcodes",
            repo().join("samples/postcodes-sample.csv").to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{name}: {err}");
        assert!(err.contains(want), "{name}: {err}");
        assert!(!err.contains("panicked"), "{name}: {err}");
    }
    let o = run_local(&[dir.join("missing.csv").to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot open"));
    assert!(!o.status.success());
}
