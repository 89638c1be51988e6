//! Helpers shared by the end-to-end tests: paths, a fresh PostgreSQL database
//! per test, running `postcode-operator local`, reading its output.
#![allow(dead_code)]

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

/// `../shared/data/NAME` beside the checkout.
pub fn shared(name: &str) -> PathBuf {
    let p = repo().join("../shared/data").join(name);
    assert!(
        p.exists(),
        "{} is missing: the tests read the shared data beside the checkout",
        p.display()
    );
    p
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
        .get_or_init(|| Arc::new(OfflineIndex::load(&shared("nspl-latlon.csv.gz")).unwrap()))
        .clone()
}

/// Writes the first `n` data rows of the real input to a file.
pub fn head_of_real_file(n: usize, dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(shared("postcodesgeo.csv")).unwrap();
    let out = dir.join(format!("first-{n}.csv"));
    let body: Vec<&str> = text.lines().take(n + 1).collect();
    std::fs::write(&out, body.join("\n") + "\n").unwrap();
    out
}
pub mod kube_harness;
