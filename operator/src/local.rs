//! `postcode-operator local FILE.csv`: the embedded runtime. Runs the same Jobs
//! the operator would create, as child processes of this machine (binaries found
//! beside this executable), on a SQLite file by default, then writes the
//! enriched CSV. Re-running with the same database resumes.

use std::{
    io::IsTerminal,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use clap::Args;
use pipeline::{
    export::write_csv,
    load::sha256_file,
    lookup::SearchPlan,
    model::ImportPhase,
    store::{ImportRecord, Store},
    EXIT_PERMANENT, EXIT_QUOTA_EXHAUSTED,
};
use tokio::process::Command;

use crate::plan::{enricher_jobs, reader_job, ImportPlan, JobSpec, ProviderSpec};

/// Options of `postcode-operator local`.
#[derive(Args, Debug, Clone)]
pub struct LocalArgs {
    /// CSV of coordinates (plain or gzip): a header with lat/lon columns, or headerless `lat,lon`.
    pub file: PathBuf,
    /// Parallel enricher Jobs (1..=64). A resumed import keeps the shard count it was loaded with.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub shards: u32,
    /// Database: a SQLite file path (default) or `postgres://…`.
    #[arg(
        long,
        default_value = "postcode-operator.db",
        env = "DATABASE_URL",
        hide_env_values = true
    )]
    pub db: String,
    /// postcodes.io base URL.
    #[arg(
        long,
        default_value = "https://api.postcodes.io",
        conflicts_with = "offline_postcodes"
    )]
    pub api_url: String,
    /// Answer from an ONS postcode file (NSPL/ONSPD style CSV, plain or gzip) instead of the API.
    #[arg(long)]
    pub offline_postcodes: Option<PathBuf>,
    /// External API requests per second, all shards together.
    #[arg(long, default_value_t = 5.0)]
    pub quota_rps: f64,
    /// Total request budget for the import; when spent, unfinished rows stay pending (raise it and re-run).
    #[arg(long)]
    pub max_requests: Option<i64>,
    /// Enriched CSV to write (default: `<input stem>.enriched.csv` in the current directory).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// First search radius in metres.
    #[arg(long, default_value_t = 100.0)]
    pub radius_m: f64,
    /// Second search radius in metres (postcodes.io clamps to 2000).
    #[arg(long, default_value_t = 2000.0)]
    pub max_radius_m: f64,
    /// Do not fall back to widesearch (20 km) when nothing is within the maximum radius.
    #[arg(long)]
    pub no_widesearch: bool,
    /// Latitude column: header name or 1-based number (detected when absent).
    #[arg(long)]
    pub lat_column: Option<String>,
    /// Longitude column: header name or 1-based number (detected when absent).
    #[arg(long)]
    pub lon_column: Option<String>,
    /// Field delimiter: , ; tab | (detected when absent).
    #[arg(long)]
    pub delimiter: Option<String>,
    /// Put rows that ended `failed` back to pending and try them again.
    #[arg(long)]
    pub retry_failed: bool,
    /// Restarts of a failed Job before the run gives up (Kubernetes `backoffLimit`).
    #[arg(long, default_value_t = 3)]
    pub backoff_limit: i32,
}

/// Finds a Job's binary: `POSTCODE_OPERATOR_BIN_DIR`, else beside this executable.
fn binary(command: &str) -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("POSTCODE_OPERATOR_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => std::env::current_exe()?
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default(),
    };
    let path = dir.join(command);
    if !path.exists() {
        bail!("{} not found in {}; build all binaries with `cargo build --release` (or set POSTCODE_OPERATOR_BIN_DIR)", command, dir.display());
    }
    Ok(path)
}

/// How a local Job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobEnd {
    Succeeded,
    QuotaExhausted,
    Failed(i32),
}

/// Runs one Job to completion like a Kubernetes Job with `restartPolicy: Never`:
/// a retryable failure (any exit but 0, 2 and 3, or death by signal) starts a
/// new attempt, up to `backoff_limit` retries.
async fn run_job(spec: &JobSpec, db: &str, log_dir: &Path) -> anyhow::Result<JobEnd> {
    let bin = binary(&spec.command)?;
    let mut attempt = 0;
    loop {
        let log_path = log_dir.join(format!("{}.log", spec.name));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let status = Command::new(&bin)
            .args(&spec.args)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .env("DATABASE_URL", db)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info,sqlx=error".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .status()
            .await
            .with_context(|| format!("starting {}", bin.display()))?;
        match status.code() {
            Some(0) => return Ok(JobEnd::Succeeded),
            Some(EXIT_QUOTA_EXHAUSTED) => return Ok(JobEnd::QuotaExhausted),
            Some(EXIT_PERMANENT) => return Ok(JobEnd::Failed(EXIT_PERMANENT)),
            code => {
                attempt += 1;
                if attempt > spec.backoff_limit {
                    return Ok(JobEnd::Failed(code.unwrap_or(-1)));
                }
                tracing::warn!(job = %spec.name, ?code, attempt, "Job failed; starting it again (log: {})", log_path.display());
                tokio::time::sleep(Duration::from_millis(500 * (1 << attempt.min(5)))).await;
            }
        }
    }
}

fn last_lines(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn sanitise(name: &str) -> String {
    let s: String = name
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let s = s.trim_matches('-').to_string();
    if s.is_empty() {
        "import".into()
    } else {
        s
    }
}

/// Runs an import end to end on this machine; returns the process exit code.
pub async fn run(args: LocalArgs) -> anyhow::Result<i32> {
    let started = Instant::now();
    if !(args.quota_rps > 0.0 && args.quota_rps.is_finite()) {
        bail!("--quota-rps must be a positive number");
    }
    let path =
        std::fs::canonicalize(&args.file).with_context(|| format!("cannot open {}", args.file.display()))?;
    let stem = path.file_name().and_then(|s| s.to_str()).unwrap_or("import");
    let stem = stem
        .trim_end_matches(".gz")
        .trim_end_matches(".csv")
        .trim_end_matches(".tsv")
        .trim_end_matches(".txt");
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{stem}.enriched.csv")));
    let offline = match &args.offline_postcodes {
        Some(p) => Some(std::fs::canonicalize(p).with_context(|| format!("cannot open {}", p.display()))?),
        None => None,
    };

    let store = Store::connect(&args.db).await?;
    store.migrate().await?;
    let path_str = path.to_string_lossy().to_string();
    let uid = format!("local-{}", &path_id(&path_str)[..16]);
    let sha = tokio::task::spawn_blocking({
        let path = path.clone();
        move || sha256_file(&path)
    })
    .await??;
    let mut import = store
        .ensure_import(&uid, &sanitise(stem), &path_str, args.shards as i32)
        .await?;
    let resumed =
        import.phase == ImportPhase::Loaded && import.source_sha256.as_deref() == Some(sha.as_str());
    let shards = if resumed {
        import.shards as u32
    } else {
        args.shards
    };
    if resumed && shards != args.shards {
        eprintln!("note: resuming with the {shards} shards this import was loaded with");
    }
    let plan = ImportPlan {
        uid: uid.clone(),
        name: import.name.clone(),
        source: path_str.clone(),
        shards,
        provider: match &offline {
            Some(p) => ProviderSpec::Offline {
                postcodes: p.to_string_lossy().to_string(),
            },
            None => ProviderSpec::Api {
                base_url: args.api_url.clone(),
            },
        },
        search: SearchPlan {
            radius_m: args.radius_m,
            max_radius_m: args.max_radius_m,
            widesearch: !args.no_widesearch,
        },
        quota_rps: args.quota_rps,
        max_requests: args.max_requests,
        lat_column: args.lat_column.clone(),
        lon_column: args.lon_column.clone(),
        delimiter: args.delimiter.clone(),
        backoff_limit: args.backoff_limit,
    };
    let log_dir = std::env::temp_dir().join(format!("postcode-operator-{uid}"));
    std::fs::create_dir_all(&log_dir)?;

    // Parse the postcode file once, into the cache every enricher reads, while the reader loads.
    let warm_index = offline.clone().map(|p| {
        tokio::task::spawn_blocking(move || {
            pipeline::offline::OfflineIndex::ensure_cache(&p, &pipeline::offline::default_cache_dir())
        })
    });
    if resumed {
        eprintln!(
            "resuming {}: {} rows already loaded",
            path.display(),
            import.rows_total
        );
    } else {
        let job = reader_job(&plan);
        let load_started = Instant::now();
        match run_job(&job, &args.db, &log_dir).await? {
            JobEnd::Succeeded => {}
            end => {
                let failed = store.import(&uid).await?.and_then(|i| i.error);
                let msg = failed.unwrap_or_else(|| last_lines(&log_dir.join(format!("{}.log", job.name)), 5));
                eprintln!("error: loading {} failed ({end:?}):\n{msg}", path.display());
                return Ok(if end == JobEnd::Failed(EXIT_PERMANENT) {
                    EXIT_PERMANENT
                } else {
                    1
                });
            }
        }
        import = store.import(&uid).await?.context("import vanished")?;
        eprintln!(
            "loaded {} rows ({} invalid) in {:.1}s",
            import.rows_total,
            import.rows_invalid,
            load_started.elapsed().as_secs_f64()
        );
    }
    store
        .set_quota(import.id, args.quota_rps, args.max_requests)
        .await?;
    if args.retry_failed {
        let n = store.requeue_failed(import.id).await?;
        eprintln!("retrying {n} failed coordinates");
    }

    if let Some(warm) = warm_index {
        warm.await?.with_context(|| {
            format!(
                "cannot read the postcode file {}",
                offline
                    .as_ref()
                    .map_or(String::new(), |p| p.display().to_string())
            )
        })?;
    }
    let ends = enrich(&store, &import, &plan, &args.db, &log_dir).await?;
    let q = store.quota_counters(import.id).await?;

    let file = std::fs::File::create(&out).with_context(|| format!("cannot write {}", out.display()))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    // The export visits every row, so its tally is the import's final count.
    let tally = write_csv(&store, &import, &mut w).await?;
    drop(w);
    store.close().await;

    eprintln!(
        "\n{} rows → {}\n  enriched {}  no_match {}  invalid {}  failed {}  pending {}\n  API requests {}  retries {}  429s {}  elapsed {:.1}s",
        tally.rows,
        out.display(),
        tally.enriched,
        tally.no_match,
        tally.invalid,
        tally.failed,
        tally.pending,
        q.requests,
        q.retries,
        q.throttled,
        started.elapsed().as_secs_f64()
    );
    if tally.failed > 0 {
        eprintln!("  {} rows failed (reason in the error column); run the same command with --retry-failed to try them again", tally.failed);
    }
    if ends.contains(&JobEnd::QuotaExhausted) {
        eprintln!("  the request budget (--max-requests) is spent: {} rows left pending; raise it and run again to resume", tally.pending);
        return Ok(EXIT_QUOTA_EXHAUSTED);
    }
    if let Some(JobEnd::Failed(code)) = ends.iter().find(|e| matches!(e, JobEnd::Failed(_))) {
        eprintln!(
            "  an enricher Job failed (logs in {}); run the same command again to resume",
            log_dir.display()
        );
        return Ok(*code);
    }
    Ok(0)
}

fn path_id(s: &str) -> String {
    use std::fmt::Write;
    // FNV-1a 64 twice with different offsets: a stable, dependency-free id for a path.
    let mut out = String::new();
    for seed in [pipeline::FNV1A_OFFSET, 0x8422_2325_cbf2_9ce4u64] {
        let _ = write!(out, "{:016x}", pipeline::fnv1a(seed, s.as_bytes()));
    }
    out
}

/// Runs the enricher Jobs with a progress bar; returns how each ended.
async fn enrich(
    store: &Store,
    import: &ImportRecord,
    plan: &ImportPlan,
    db: &str,
    log_dir: &Path,
) -> anyhow::Result<Vec<JobEnd>> {
    let jobs = enricher_jobs(plan);
    let mut set = tokio::task::JoinSet::new();
    for job in jobs {
        let (db, log_dir) = (db.to_string(), log_dir.to_path_buf());
        set.spawn(async move { run_job(&job, &db, &log_dir).await });
    }
    let tty = std::io::stderr().is_terminal();
    let bar = if tty {
        let bar = indicatif::ProgressBar::new(1);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} rows {msg}",
            )
            .expect("template")
            .progress_chars("=> "),
        );
        Some(bar)
    } else {
        None
    };
    let mut ends = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(if tty { 500 } else { 10_000 }));
    loop {
        tokio::select! {
            done = set.join_next() => match done {
                Some(r) => ends.push(r??),
                None => break,
            },
            _ = tick.tick() => {
                // The database may be away for a moment (a restart): the Jobs
                // retry on their own, the progress display just waits.
                let (Ok(c), Ok(q)) = (store.counts(import).await, store.quota_counters(import.id).await) else { continue };
                match &bar {
                    Some(bar) => {
                        bar.set_length((c.rows_total - c.rows_invalid).max(1) as u64);
                        bar.set_position((c.rows_enriched + c.rows_no_match + c.rows_failed) as u64);
                        bar.set_message(format!("| rows enriched {} no_match {} failed {} | requests {}", c.rows_enriched, c.rows_no_match, c.rows_failed, q.requests));
                    }
                    None => eprintln!("progress: {}/{} rows, enriched {} no_match {} failed {}, requests {}", c.rows_enriched + c.rows_no_match + c.rows_failed, c.rows_total - c.rows_invalid, c.rows_enriched, c.rows_no_match, c.rows_failed, q.requests),
                }
            }
            _ = tokio::signal::ctrl_c() => {
                set.abort_all();
                if let Some(bar) = &bar { bar.abandon(); }
                eprintln!("interrupted: run the same command again to resume");
                std::process::exit(130);
            }
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(ends)
}
