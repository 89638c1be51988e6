//! Shared pieces of the postcode enrichment pipeline, used by `reader-job`,
//! `enricher-job` and `postcode-operator`: the CSV input rules, storage, the
//! providers (postcodes.io and the offline ONS index) and the search ladder,
//! quota and retry policy, and the enriched-CSV export.
//!
//! How a lookup is answered: [`provider`] (the interface; [`postcodes_io`] and
//! [`offline`] implement it) and [`ladder`] (the search stages), driven by
//! [`enrich`]; how the quota works: [`quota`]; when a request is retried: [`retry`].

pub mod answer_cache;
pub mod areas;
pub mod concurrency;
pub mod csv_input;
pub mod degrees;
pub mod egress;
pub mod enrich;
pub mod exit;
pub mod export;
pub mod geo;
pub mod grid;
pub mod ladder;
pub mod load;
pub mod lookup;
pub mod model;
pub mod offline;
pub mod postcode;
pub mod postcodes_io;
pub mod provider;
pub mod quota;
pub mod retry;
pub mod slab;
pub mod store;

/// Exit code of a Job that failed for a reason a retry will not fix (bad input,
/// bad configuration): [`exit::JobExit::Permanent`].
pub const EXIT_PERMANENT: i32 = exit::JobExit::Permanent.code();
/// Exit code of an enricher that stopped because the import's request budget
/// is spent: [`exit::JobExit::QuotaExhausted`].
pub const EXIT_QUOTA_EXHAUSTED: i32 = exit::JobExit::QuotaExhausted.code();

/// Process-wide setup of every binary: the `tracing` subscriber (`RUST_LOG`,
/// default `info`) and the TLS crypto provider. Two rustls providers are linked
/// (kube uses ring, reqwest aws-lc-rs), so rustls cannot pick one by itself.
pub fn init_process() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,sqlx=error".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Where Kubernetes reads a container's termination message (the default
/// `terminationMessagePath`).
pub const TERMINATION_MESSAGE_PATH: &str = "/dev/termination-log";

/// For the Job binaries: writes why the process is ending to
/// [`TERMINATION_MESSAGE_PATH`] when it exists (in a pod; never created
/// elsewhere), so the Job's pod status, and from it the import's
/// `status.message`, says why (the kubelet keeps 4 KiB at most).
pub fn write_termination_message(msg: &str) {
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(TERMINATION_MESSAGE_PATH)
    {
        let cut: String = msg.chars().take(1024).collect();
        let _ = f.write_all(cut.as_bytes());
    }
}

/// For the Job binaries: SIGTERM ends the process at once with 143 (128 +
/// SIGTERM), as it ends a process without a handler. Needed because in a
/// container the Job is PID 1, and the kernel ignores signals PID 1 has no
/// handler for: a suspended or deleted Job's pod would run on through its whole
/// grace period (30 s), finishing work the suspension meant to stop. Call from
/// inside the Tokio runtime.
pub fn exit_on_sigterm() {
    if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        tokio::spawn(async move {
            term.recv().await;
            eprintln!("SIGTERM: stopping");
            std::process::exit(143);
        });
    }
}

/// FNV-1a 64 of `bytes` started from `seed` (the standard offset basis is
/// [`FNV1A_OFFSET`]): a stable, dependency-free hash for ids and cache names,
/// not for anything adversarial.
pub fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(seed, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// The FNV-1a 64 offset basis.
pub const FNV1A_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
