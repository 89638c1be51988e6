//! `postcode-operator run` as a child process of a test, its stderr kept in
//! a log file, with the settings the pod-level test cluster needs.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use super::temp_dir;

/// A `postcode-operator run` process.
pub struct Operator {
    pub child: Child,
    /// The upload API's base URL (`http://127.0.0.1:PORT`).
    pub url: String,
    /// The base URL of `/metrics`, `/healthz` and `/readyz` (their own port).
    pub metrics_url: String,
    log: PathBuf,
}

impl Operator {
    /// Starts it for namespace `ns` and database `db`, with `extra_env`
    /// after the defaults (later values win); waits until it listens.
    ///
    /// The upload API runs with `UPLOAD_AUTH=none` unless `extra_env` says
    /// otherwise: the tests of access control (`upload_auth.rs`, the shared
    /// token in `operator_e2e.rs`) choose their mode; the rest test imports.
    pub fn start(ns: &str, db: &str, extra_env: &[(&str, &str)]) -> Self {
        let log = temp_dir("operator").join("operator.log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_postcode-operator"))
            .arg("run")
            .env("LISTEN_ADDR", "127.0.0.1:0")
            .env("METRICS_ADDR", "127.0.0.1:0")
            .env("UPLOAD_AUTH", "none")
            .env("DATABASE_URL", db)
            .env("POD_NAMESPACE", ns)
            .env("WATCH_NAMESPACE", ns)
            .env("DATABASE_SECRET_NAME", "postcode-operator-database")
            .env("RUST_LOG", "info,kube=warn,sqlx=warn,tower_http=warn")
            // The Jobs' egress policy for the test servers on loopback (the
            // chart's defaults refuse them): sources on 127.0.0.1, any API
            // URL, offline files under /data. Tests of the policy override these.
            .env("JOB_EGRESS_ALLOW_SOURCE_CIDRS", "127.0.0.1/32")
            .env("JOB_EGRESS_ALLOWED_API_URLS", "*")
            .env("JOB_EGRESS_OFFLINE_POSTCODES_DIR", "/data")
            .envs(extra_env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start postcode-operator run");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let log_path = log.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut f = std::fs::File::create(&log_path).unwrap();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                for (port, what) in [
                    (0, "upload API listening on "),
                    (1, "metrics and probes listening on "),
                ] {
                    if let Some(i) = line.find(what) {
                        let _ = tx.send((port, line[i + what.len()..].trim().to_string()));
                    }
                }
                let _ = writeln!(f, "{line}");
                let _ = f.flush();
            }
        });
        let mut urls = [None, None];
        while urls.iter().any(Option::is_none) {
            let (port, url) = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| {
                panic!(
                    "operator did not start; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            });
            urls[port] = Some(url);
        }
        let [url, metrics_url] = urls.map(Option::unwrap);
        Self {
            child,
            url,
            metrics_url,
            log,
        }
    }

    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its exit status, once it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of one series of an operator's `/metrics` at `metrics_url` (its
/// name with its labels, as printed:
/// `postcode_operator_job_reads_total{from="cache"}`); 0 before it is first
/// counted.
pub async fn metric(metrics_url: &str, series: &str) -> u64 {
    metrics_text(metrics_url)
        .await
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

/// The sum of every series of metric `name` (all its labels) on an
/// operator's `/metrics` at `metrics_url`.
#[allow(dead_code)] // used by some of the test crates that include this module
pub async fn metric_sum(metrics_url: &str, name: &str) -> u64 {
    metrics_text(metrics_url)
        .await
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>() as u64
}

async fn metrics_text(metrics_url: &str) -> String {
    reqwest::get(format!("{metrics_url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}
