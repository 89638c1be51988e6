//! Helpers shared by the end-to-end tests: paths, a fresh PostgreSQL database
//! per test, running `postcode-operator local`, reading its output.
#![allow(dead_code)]

pub mod operator;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::Arc,
};

use pipeline::offline::OfflineIndex;
use sqlx::Connection;

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The directory of the full data set (`postcodesgeo.csv`, the real 100,000-row
/// input, and `nspl-latlon.csv.gz`, the ONS NSPL postcodes): `POSTCODE_DATA_DIR`
/// when set, else `../shared/data` beside the checkout; `None` when neither
/// holds both files. Without it the tests run on the shipped samples
/// ([`postcodes_file`], [`real_input`]) and say so once.
pub fn full_data_dir() -> Option<PathBuf> {
    static DIR: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::var_os("POSTCODE_DATA_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo().join("../shared/data"));
        let full = ["postcodesgeo.csv", "nspl-latlon.csv.gz"].iter().all(|f| dir.join(f).exists());
        if full {
            eprintln!("test data: the full data set in {}", dir.display());
        } else {
            eprintln!(
                "test data: {} lacks the full data set; using the samples in samples/ and an input made from them",
                dir.display()
            );
        }
        full.then_some(dir)
    })
    .clone()
}

/// The postcode file for the offline provider: the full NSPL, else `samples/postcodes-sample.csv`.
pub fn postcodes_file() -> PathBuf {
    match full_data_dir() {
        Some(d) => d.join("nspl-latlon.csv.gz"),
        None => repo().join("samples/postcodes-sample.csv"),
    }
}

/// Rows of [`real_input`].
pub const REAL_ROWS: usize = 100_000;

/// The 100,000-row input: the real file, else one made from the sample
/// postcodes ([`synthetic_input`]).
pub fn real_input() -> PathBuf {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| match full_data_dir() {
        Some(d) => d.join("postcodesgeo.csv"),
        None => {
            let path = std::env::temp_dir().join(format!("pco-synthetic-{}.csv", std::process::id()));
            std::fs::write(&path, synthetic_input(REAL_ROWS)).unwrap();
            path
        }
    })
    .clone()
}

/// A `lat,lon` CSV of `rows` rows shaped like the real file, made from the
/// sample postcodes: points up to about 110 m from a sample postcode, every
/// 11th row repeating the one before (identical coordinates share one
/// answer), every 97th at (0,0) (no_match). Deterministic.
pub fn synthetic_input(rows: usize) -> String {
    let text = std::fs::read_to_string(repo().join("samples/postcodes-sample.csv")).unwrap();
    let centres: Vec<(f64, f64)> = text
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            Some((f.get(1)?.parse().ok()?, f.get(2)?.parse().ok()?))
        })
        .collect();
    let mut out = String::from("lat,lon\n");
    let mut last = (0.0, 0.0);
    for i in 0..rows {
        let point = if i % 97 == 96 {
            (0.0, 0.0)
        } else if i % 11 == 10 {
            last
        } else {
            let (lat, lon) = centres[(i * 7919) % centres.len()];
            let d = |k: usize| ((i * k) % 201) as f64 * 1e-5 - 0.001;
            (lat + d(37), lon + d(53))
        };
        out.push_str(&format!("{:.6},{:.6}\n", point.0, point.1));
        last = point;
    }
    out
}

/// The directory holding all binaries of this build.
pub fn bin_dir() -> PathBuf {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_postcode-operator"));
    let dir = exe.parent().unwrap().to_path_buf();
    for b in ["reader-job", "enricher-job"] {
        assert!(
            dir.join(b).exists(),
            "{b} not built in {}: run `cargo build --workspace` first (make test does)",
            dir.display()
        );
    }
    dir
}

/// A new, empty PostgreSQL database on the test server (`TEST_DATABASE_URL`,
/// set by `make test`); returns its URL. Fails when no server is configured.
pub async fn fresh_pg() -> String {
    let base = std::env::var("TEST_DATABASE_URL")
        .expect("TEST_DATABASE_URL is not set: run the tests with `make test`, which starts PostgreSQL");
    let name = format!("t_{}", uuid_like());
    let mut conn = sqlx::PgConnection::connect(&base)
        .await
        .expect("connect to the test PostgreSQL");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .unwrap();
    let (prefix, _) = base.rsplit_once('/').unwrap();
    format!("{prefix}/{name}")
}

fn uuid_like() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let n = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    format!("{:x}{:x}", n, std::process::id())
}

/// A fresh temporary directory for one test.
pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pco-test-{tag}-{}", uuid_like()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A `postcode-operator local` command with the build's binaries.
pub fn local_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_postcode-operator"));
    c.arg("local")
        .args(args)
        .env("POSTCODE_OPERATOR_BIN_DIR", bin_dir())
        .env_remove("DATABASE_URL");
    c
}

pub fn run_local(args: &[&str]) -> Output {
    let out = local_cmd(args).output().expect("run postcode-operator");
    eprintln!(
        "--- local {args:?} exit {:?}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The enriched CSV as (header, rows of field maps).
pub fn read_output(path: &Path) -> (Vec<String>, Vec<HashMap<String, String>>) {
    let mut r = csv::ReaderBuilder::new().flexible(true).from_path(path).unwrap();
    let header: Vec<String> = r.headers().unwrap().iter().map(str::to_string).collect();
    let rows = r
        .records()
        .map(|rec| {
            let rec = rec.unwrap();
            header
                .iter()
                .cloned()
                .zip(rec.iter().map(str::to_string))
                .collect()
        })
        .collect();
    (header, rows)
}

/// Rows by status.
pub fn by_status(rows: &[HashMap<String, String>]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for r in rows {
        *m.entry(r["status"].clone()).or_default() += 1;
    }
    m
}

/// The real postcode index, loaded once per test process.
pub fn nspl() -> Arc<OfflineIndex> {
    static INDEX: std::sync::OnceLock<Arc<OfflineIndex>> = std::sync::OnceLock::new();
    INDEX
        .get_or_init(|| Arc::new(OfflineIndex::load(&postcodes_file()).unwrap()))
        .clone()
}

/// Writes the first `n` data rows of [`real_input`] to a file.
pub fn head_of_real_file(n: usize, dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(real_input()).unwrap();
    let out = dir.join(format!("first-{n}.csv"));
    let body: Vec<&str> = text.lines().take(n + 1).collect();
    std::fs::write(&out, body.join("\n") + "\n").unwrap();
    out
}
pub mod kube_harness;
