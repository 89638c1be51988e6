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
    exit::JobExit,
    export::write_csv,
    load::sha256_file,
    model::ImportPhase,
    store::{ImportRecord, QuotaWriter, Store},
};
use postcode_resource::{limits, ApiSpec, CsvSpec, Phase, PostcodeImportSpec, QuotaSpec};
use tokio::{process::Command, task::JoinSet};

use crate::{
    lifecycle::{decide, pending_by_shard, Decision, JobState, Load, Observed},
    plan::{ImportPlan, JobSpec},
};

/// Options of `postcode-operator local`.
#[derive(Args, Debug, Clone)]
pub struct LocalArgs {
    /// CSV of coordinates (plain or gzip): a header with lat/lon columns, or headerless `lat,lon`.
    pub file: PathBuf,
    /// Parallel enricher Jobs (1..=64). A resumed import keeps the shard count it was loaded with.
    #[arg(long, default_value_t = limits::DEFAULT_SHARDS,
          value_parser = clap::value_parser!(u32).range(limits::MIN_SHARDS as i64..=limits::MAX_SHARDS as i64))]
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
        default_value = limits::DEFAULT_API_URL,
        conflicts_with = "offline_postcodes"
    )]
    pub api_url: String,
    /// Answer from an ONS postcode file (NSPL/ONSPD style CSV, plain or gzip) instead of the API;
    /// area names from the ONS `Documents/` folder beside it or beside its folder.
    #[arg(long)]
    pub offline_postcodes: Option<PathBuf>,
    /// External API requests per second, all shards together; also the quota of
    /// this API for every import on this database (the operator's, if lower, stands).
    #[arg(long, default_value_t = limits::DEFAULT_QUOTA_RPS)]
    pub quota_rps: f64,
    /// Total request budget for the import; when spent, unfinished rows stay pending (raise it and re-run).
    #[arg(long)]
    pub max_requests: Option<i64>,
    /// Enriched CSV to write (default: `<input stem>.enriched.csv` in the current directory).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// First search radius in metres (1..=2000).
    #[arg(long, default_value_t = limits::DEFAULT_RADIUS_M,
          value_parser = clap::value_parser!(u32).range(1..=limits::MAX_RADIUS_M as i64))]
    pub radius_m: u32,
    /// Second search radius in metres (1..=2000; postcodes.io's largest).
    #[arg(long, default_value_t = limits::DEFAULT_MAX_RADIUS_M,
          value_parser = clap::value_parser!(u32).range(1..=limits::MAX_RADIUS_M as i64))]
    pub max_radius_m: u32,
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
    /// Quoting: `double` (RFC 4180) or `none` (`"` is an ordinary character);
    /// detected when absent (tab and pipe files are read unquoted when their quotes do not pair up).
    #[arg(long, value_parser = ["none", "double"])]
    pub quote: Option<String>,
    /// Put rows that ended `failed` back to pending and try them again.
    #[arg(long)]
    pub retry_failed: bool,
    /// Reuse answers earlier imports on this database got from the same API with
    /// the same radii when at most this many days old; 0 asks everything again.
    #[arg(long, env = "ANSWER_MAX_AGE_DAYS", default_value_t = limits::DEFAULT_ANSWER_MAX_AGE_DAYS)]
    pub answer_max_age_days: u32,
    /// Restarts of a failed Job before the run gives up (Kubernetes `backoffLimit`).
    #[arg(long, default_value_t = limits::DEFAULT_BACKOFF_LIMIT)]
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

/// Runs one Job to completion like a Kubernetes Job with `restartPolicy: Never`:
/// an exit the Job's spec does not fail at once starts a new attempt, up to
/// `backoff_limit` retries. Returns the Job's final state.
async fn run_job(spec: JobSpec, db: String, log_dir: PathBuf) -> anyhow::Result<JobState> {
    let bin = binary(&spec.command)?;
    let log_path = log_dir.join(format!("{}.log", spec.name));
    let mut attempt = 0;
    loop {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let status = Command::new(&bin)
            .args(&spec.args)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .env("DATABASE_URL", &db)
            // The user's own machine: the Jobs may read the user's files and
            // call any API, as the user can (README "Security model").
            .env(pipeline::egress::ENV_POLICY, "off")
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
        let exit = JobExit::from_code(status.code());
        if exit == JobExit::Done {
            return Ok(JobState::Succeeded);
        }
        attempt += 1;
        if spec.fails_at_once(status.code()) || attempt > spec.backoff_limit {
            return Ok(JobState::Failed {
                exit: Some(exit),
                message: last_lines(&log_path, 5),
            });
        }
        tracing::warn!(job = %spec.name, code = ?status.code(), attempt, "Job failed; starting it again (log: {})", log_path.display());
        tokio::time::sleep(Duration::from_millis(500 * (1 << attempt.min(5)))).await;
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

/// The input and output files of a local run.
struct Files {
    input: PathBuf,
    /// The input's file name without `.gz`/`.csv`/`.tsv`/`.txt`.
    stem: String,
    out: PathBuf,
    offline: Option<PathBuf>,
}

/// Why a run cannot start with what it was given (a file that cannot be
/// opened, an option out of range): `local` exits 2 ([`JobExit::Permanent`]),
/// as it does for input the reader cannot read.
#[derive(Debug)]
pub struct CannotStart(pub String);

impl std::fmt::Display for CannotStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CannotStart {}

/// A path `local` must open, or [`CannotStart`] naming it.
fn existing(path: &Path) -> anyhow::Result<PathBuf> {
    std::fs::canonicalize(path)
        .map_err(|e| CannotStart(format!("cannot open {}: {e}", path.display())).into())
}

impl Files {
    fn of(args: &LocalArgs) -> anyhow::Result<Files> {
        let input = existing(&args.file)?;
        let name = input.file_name().and_then(|s| s.to_str()).unwrap_or("import");
        let stem = [".gz", ".csv", ".tsv", ".txt"]
            .iter()
            .fold(name, |s, ext| s.trim_end_matches(ext))
            .to_string();
        let out = args
            .out
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("{stem}.enriched.csv")));
        let offline = match &args.offline_postcodes {
            Some(p) => Some(existing(p)?),
            None => None,
        };
        Ok(Files {
            input,
            stem,
            out,
            offline,
        })
    }
}

/// The `PostcodeImport` spec a local run stands for: the plan is then made
/// exactly as the operator makes it ([`ImportPlan::from_spec`]).
fn spec_of(args: &LocalArgs, shards: u32, offline: Option<&Path>) -> PostcodeImportSpec {
    PostcodeImportSpec {
        source: Default::default(),
        csv: CsvSpec {
            lat_column: args.lat_column.clone(),
            lon_column: args.lon_column.clone(),
            delimiter: args.delimiter.clone(),
            quote: args.quote.clone(),
        },
        shards,
        api: ApiSpec {
            base_url: args.api_url.clone(),
            radius_meters: args.radius_m,
            max_radius_meters: args.max_radius_m,
            widesearch: !args.no_widesearch,
            answer_max_age_days: Some(args.answer_max_age_days),
        },
        offline_postcodes: offline.map(|p| p.to_string_lossy().to_string()),
        quota: QuotaSpec {
            requests_per_second: args.quota_rps,
            max_requests: args.max_requests,
        },
        suspend: false,
        ttl_seconds_after_finished: None,
        retry_failed: 0,
        keep_results: false,
        backoff_limit: args.backoff_limit,
        priority_class_name: None,
        pod_template: None,
        active_deadline_seconds: None,
    }
}

/// The uid of a local import of the file at `path`: `local-` and 16 hex
/// digits of the path's SHA-256. A database written before this id existed
/// holds the import under [`legacy_uid`], which is used when present.
fn uid_of(path: &str) -> String {
    use sha2::{Digest, Sha256};
    format!("local-{}", &hex::encode(Sha256::digest(path.as_bytes()))[..16])
}

/// The uid earlier releases gave a local import: 16 hex digits of FNV-1a 64
/// of the path. Kept only so that their databases still resume.
fn legacy_uid(path: &str) -> String {
    let h = path.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    format!("local-{h:016x}")
}

/// The import of this file in the database (created when new), and the
/// SHA-256 of the file's content.
async fn import_of(store: &Store, files: &Files, args: &LocalArgs) -> anyhow::Result<(ImportRecord, String)> {
    let path = files.input.to_string_lossy().to_string();
    let sha = tokio::task::spawn_blocking({
        let path = files.input.clone();
        move || sha256_file(&path)
    })
    .await??;
    let legacy = legacy_uid(&path);
    let uid = match store.import(&legacy).await? {
        Some(_) => legacy,
        None => uid_of(&path),
    };
    let import = store
        .ensure_import(&uid, &sanitise(&files.stem), &path, args.shards as i32)
        .await?;
    Ok((import, sha))
}

/// Runs an import end to end on this machine; returns the process exit code
/// (README "Running locally": 0 done, 1 a Job failed, 2 unreadable input,
/// 3 request budget spent).
pub async fn run(args: LocalArgs) -> anyhow::Result<i32> {
    let started = Instant::now();
    if !(args.quota_rps > 0.0 && args.quota_rps.is_finite()) {
        return Err(CannotStart("--quota-rps must be a positive number".into()).into());
    }
    let files = Files::of(&args)?;
    let store = Store::connect(&args.db).await?;
    store.migrate().await?;
    let (import, sha) = import_of(&store, &files, &args).await?;
    if files.offline.is_none() {
        // The API's quota on this database: every import using it shares it.
        store
            .set_api_quota(&args.api_url, QuotaWriter::Local, args.quota_rps)
            .await?;
    }
    let resumed =
        import.phase == ImportPhase::Loaded && import.source_sha256.as_deref() == Some(sha.as_str());
    let shards = if resumed {
        import.shards as u32
    } else {
        args.shards
    };
    if resumed {
        if shards != args.shards {
            eprintln!("note: resuming with the {shards} shards this import was loaded with");
        }
        eprintln!(
            "resuming {}: {} rows already loaded",
            files.input.display(),
            import.rows_total
        );
    }
    let source = files.input.to_string_lossy().to_string();
    let spec = spec_of(&args, shards, files.offline.as_deref());
    let plan = ImportPlan::from_spec(import.uid.clone(), import.name.clone(), source, &spec);
    let log_dir = std::env::temp_dir().join(format!("postcode-operator-{}", import.uid));
    std::fs::create_dir_all(&log_dir)?;
    let mut run = LocalRun::new(&store, plan, sha, &args.db, log_dir);
    run.retry_wanted = args.retry_failed;
    // Parse the postcode file once, into the cache every enricher reads, while the reader loads.
    run.warm_index = files.offline.clone().map(|p| {
        tokio::task::spawn_blocking(move || {
            pipeline::offline::OfflineIndex::ensure_cache(&p, &pipeline::offline::default_cache_dir())
        })
    });
    let decision = run.until_done().await?;
    let import = store.import(&import.uid).await?.context("import vanished")?;
    if !matches!(decision.report.as_ref().map(|r| r.phase), Some(Phase::Failed))
        || import.phase == ImportPhase::Loaded
    {
        summarise(&store, &import, &files.out, &decision, run.log_dir(), started).await?;
    }
    store.close().await;
    Ok(decision.exit_code())
}

/// Writes the enriched CSV and prints the run's summary.
async fn summarise(
    store: &Store,
    import: &ImportRecord,
    out: &Path,
    decision: &Decision,
    log_dir: &Path,
    started: Instant,
) -> anyhow::Result<()> {
    let q = store.quota_counters(import.id).await?;
    let file = std::fs::File::create(out).with_context(|| format!("cannot write {}", out.display()))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    // The export visits every row, so its tally is the import's final count.
    let tally = write_csv(store, import, &mut w).await?;
    drop(w);
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
    for warning in import.warnings.iter().flat_map(|w| w.lines()) {
        eprintln!("  warning: {warning}");
    }
    if tally.failed > 0 {
        eprintln!("  {} rows failed (reason in the error column); run the same command with --retry-failed to try them again", tally.failed);
    }
    match decision.exit_code() {
        pipeline::exit::LOCAL_ROWS_FAILED => {
            let cause = store.failure_cause(import.id).await?.unwrap_or_default();
            eprintln!("  exit code 4: {} rows failed ({cause})", tally.failed);
        }
        3 => eprintln!("  the request budget (--max-requests) is spent: {} rows left pending; raise it and run again to resume", tally.pending),
        0 => {}
        _ => eprintln!(
            "  an enricher Job failed (logs in {}); run the same command again to resume",
            log_dir.display()
        ),
    }
    Ok(())
}

/// The local runtime of the lifecycle: observes its child processes and the
/// database, carries out [`decide`]'s decisions, until the import finishes
/// or no Job is left to run.
struct LocalRun<'a> {
    store: &'a Store,
    plan: ImportPlan,
    /// SHA-256 of the input: the import is loaded when the database holds this content.
    content_sha: String,
    db: String,
    log_dir: PathBuf,
    retry_wanted: bool,
    previous: Option<Phase>,
    /// Each Job's state, by name; absent = not started.
    jobs: std::collections::HashMap<String, JobState>,
    running: JoinSet<(String, anyhow::Result<JobState>)>,
    warm_index: Option<tokio::task::JoinHandle<Result<(), pipeline::offline::OfflineError>>>,
    progress: Progress,
    load_started: Option<Instant>,
}

impl<'a> LocalRun<'a> {
    fn new(store: &'a Store, plan: ImportPlan, content_sha: String, db: &str, log_dir: PathBuf) -> Self {
        LocalRun {
            store,
            plan,
            content_sha,
            db: db.to_string(),
            log_dir,
            retry_wanted: false,
            previous: None,
            jobs: Default::default(),
            running: JoinSet::new(),
            warm_index: None,
            progress: Progress::new(),
            load_started: None,
        }
    }

    fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    /// Observes, decides and acts until the import ends or nothing runs; the last decision.
    async fn until_done(&mut self) -> anyhow::Result<Decision> {
        loop {
            let (o, record) = self.observe().await?;
            let d = decide(&o);
            self.act(&d, record.as_ref()).await?;
            let phase = d.report.as_ref().map(|r| r.phase);
            if matches!(phase, Some(Phase::Succeeded | Phase::Failed)) {
                // Jobs still running finish their work (a killed one would
                // lose its batch in flight); they start nothing new.
                while let Some(done) = self.running.join_next().await {
                    let (name, state) = done?;
                    self.jobs.insert(name, state?);
                }
                self.progress.clear();
                return Ok(d);
            }
            if self.running.is_empty() && d.create.is_empty() && d.delete.is_empty() && !d.requeue_failed {
                // Nothing runs and nothing will: e.g. the request budget is spent.
                self.progress.clear();
                return Ok(d);
            }
            self.previous = phase.or(self.previous);
            if !d.create.is_empty() || !d.delete.is_empty() || d.requeue_failed {
                continue;
            }
            self.wait(&o).await?;
        }
    }

    /// Waits for a Job to end or the next progress tick.
    async fn wait(&mut self, o: &Observed) -> anyhow::Result<()> {
        if matches!(o.load, Load::Loaded { .. }) {
            self.progress.show(&o.counts, self.store, &self.plan).await;
        }
        tokio::select! {
            Some(done) = self.running.join_next() => {
                let (name, state) = done?;
                self.jobs.insert(name, state?);
            }
            _ = tokio::time::sleep(self.progress.interval()) => {}
            _ = tokio::signal::ctrl_c() => {
                self.running.abort_all();
                self.progress.clear();
                eprintln!("interrupted: run the same command again to resume");
                std::process::exit(130);
            }
        }
        Ok(())
    }
}

impl LocalRun<'_> {
    fn state_of(&self, spec: &JobSpec) -> Option<JobState> {
        self.jobs.get(&spec.name).cloned()
    }

    /// What [`decide`] looks at: the database and this process's Jobs.
    async fn observe(&mut self) -> anyhow::Result<(Observed, Option<ImportRecord>)> {
        let record = self.store.import(&self.plan.uid).await?;
        let mut o = Observed {
            plan: Ok(self.plan.clone()),
            previous: self.previous,
            suspend: false,
            retry_wanted: self.retry_wanted,
            load: Load::NotLoaded {
                error: record.as_ref().and_then(|r| r.error.clone()),
            },
            reader: self.state_of(&crate::plan::reader_job(&self.plan)),
            enrichers: crate::plan::enricher_jobs(&self.plan)
                .iter()
                .map(|j| self.state_of(j))
                .collect(),
            shard_pending: vec![],
            budget_spent: false,
            counts: Default::default(),
            failure_cause: None,
            ttl_seconds_after_finished: None,
            finished_for: None,
            jobs_not_ready: None,
            jobs_stopping: None,
        };
        let same_content = |r: &&ImportRecord| r.source_sha256.as_deref() == Some(self.content_sha.as_str());
        let Some(r) = record
            .as_ref()
            .filter(|r| r.phase == ImportPhase::Loaded)
            .filter(same_content)
        else {
            return Ok((o, record));
        };
        o.load = Load::Loaded {
            warnings: r.warnings.clone(),
        };
        o.budget_spent = self.store.budget_spent(r.id).await?;
        o.counts = self.store.counts(r).await?;
        if o.counts.rows_failed > 0 {
            o.failure_cause = self.store.failure_cause(r.id).await?;
        }
        o.shard_pending = pending_by_shard(self.plan.shards, &self.store.shard_counts(r.id).await?);
        Ok((o, record))
    }

    /// Carries out a decision: the database first, then the Jobs.
    async fn act(&mut self, d: &Decision, record: Option<&ImportRecord>) -> anyhow::Result<()> {
        if let Some(r) = record {
            if d.set_quota {
                self.finish_loading(r).await?;
                self.store
                    .set_quota(r.id, self.plan.quota_rps, self.plan.max_requests)
                    .await?;
            }
            if d.requeue_failed {
                let n = self.store.requeue_failed(r.id).await?;
                eprintln!("retrying {n} failed coordinates");
                self.retry_wanted = false;
            }
        }
        for name in &d.delete {
            self.jobs.remove(name);
        }
        for (spec, _) in &d.create {
            if spec.role == crate::plan::Role::Reader {
                self.load_started = Some(Instant::now());
            }
            self.jobs.insert(
                spec.name.clone(),
                JobState::Running {
                    suspended: false,
                    suspended_by_us: false,
                },
            );
            let (spec, db, log_dir) = (spec.clone(), self.db.clone(), self.log_dir.clone());
            self.running
                .spawn(async move { (spec.name.clone(), run_job(spec, db, log_dir).await) });
        }
        if let Some(report) = d.report.as_ref().filter(|r| r.phase == Phase::Failed) {
            if self.previous != Some(Phase::Enriching) {
                eprintln!("error: loading {} failed:\n{}", self.plan.source, report.message);
            }
        }
        Ok(())
    }

    /// Once per run, when the import is loaded: report the load and wait for
    /// the offline index the enrichers will map.
    async fn finish_loading(&mut self, r: &ImportRecord) -> anyhow::Result<()> {
        if let Some(t) = self.load_started.take() {
            eprintln!(
                "loaded {} rows ({} invalid) in {:.1}s",
                r.rows_total,
                r.rows_invalid,
                t.elapsed().as_secs_f64()
            );
        }
        if let Some(warm) = self.warm_index.take() {
            let postcodes = match &self.plan.provider {
                crate::plan::ProviderSpec::Offline { postcodes } => postcodes.clone(),
                crate::plan::ProviderSpec::Api { .. } => String::new(),
            };
            warm.await?
                .with_context(|| format!("cannot read the postcode file {postcodes}"))?;
        }
        Ok(())
    }
}

/// The progress display: a bar on a terminal, a line every 10 s otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    last_line: Option<Instant>,
}

impl Progress {
    fn new() -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(1);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} rows {msg}",
                )
                .expect("template")
                .progress_chars("=> "),
            );
            bar
        });
        Progress { bar, last_line: None }
    }

    fn interval(&self) -> Duration {
        Duration::from_millis(if self.bar.is_some() { 500 } else { 10_000 })
    }

    async fn show(&mut self, c: &pipeline::store::Counts, store: &Store, plan: &ImportPlan) {
        // The database may be away for a moment (a restart): the Jobs retry
        // on their own, the progress display just waits.
        let Ok(Some(import)) = store.import(&plan.uid).await else {
            return;
        };
        let Ok(q) = store.quota_counters(import.id).await else {
            return;
        };
        let finished = c.rows_enriched + c.rows_no_match + c.rows_failed;
        let of = c.rows_total - c.rows_invalid;
        // The import's current rate: its quota or its share of the API's.
        let share = q.share_rps.map(|r| format!(" ({r:.1}/s)")).unwrap_or_default();
        match &self.bar {
            Some(bar) => {
                bar.set_length(of.max(1) as u64);
                bar.set_position(finished as u64);
                bar.set_message(format!(
                    "| rows enriched {} no_match {} failed {} | requests {}{share}",
                    c.rows_enriched, c.rows_no_match, c.rows_failed, q.requests
                ));
            }
            None if self
                .last_line
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) =>
            {
                self.last_line = Some(Instant::now());
                eprintln!(
                    "progress: {finished}/{of} rows, enriched {} no_match {} failed {}, requests {}{share}",
                    c.rows_enriched, c.rows_no_match, c.rows_failed, q.requests
                );
            }
            None => {}
        }
    }

    fn clear(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
