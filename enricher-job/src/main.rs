//! `enricher-job`: enriches one shard of an import (DESIGN.md "Shape", step 2).
//!
//! Exit codes: 0 shard finished; 3 the import's request budget is spent
//! (unfinished rows stay pending); 2 bad configuration, or an API URL or
//! offline file the egress policy refuses; 1 anything else (retry). The
//! error of a failed run is also the pod's termination message.

use std::{path::PathBuf, sync::Arc, time::Duration};

use clap::Parser;

mod status;
use pipeline::{
    answer_cache::AnswerCache,
    concurrency::ConcurrencyConfig,
    egress::{EgressError, EgressPolicy},
    enrich::{run_shard, Finish, ShardConfig},
    lookup::SearchPlan,
    model::ImportPhase,
    offline::OfflineIndex,
    postcodes_io::PostcodesIo,
    provider::Provider,
    retry::RetryPolicy,
    store::{ImportRecord, Store},
    EXIT_PERMANENT, EXIT_QUOTA_EXHAUSTED,
};
use status::StatusReporter;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Enrich one shard of an import with the nearest UK postcodes"
)]
struct Args {
    /// The import's uid.
    #[arg(long, env = "IMPORT_UID")]
    import_uid: String,
    /// This Job's shard, 0-based.
    #[arg(long, env = "SHARD_INDEX")]
    shard: i32,
    /// `postgres://…` or a SQLite file path / `sqlite://…` URL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// postcodes.io base URL.
    #[arg(
        long,
        env = "POSTCODES_API_URL",
        default_value = "https://api.postcodes.io",
        conflicts_with = "offline_postcodes"
    )]
    api_url: String,
    /// Answer from an ONS postcode file instead of the API (no requests, no quota).
    #[arg(long, env = "OFFLINE_POSTCODES")]
    offline_postcodes: Option<PathBuf>,
    /// Where the built postcode index is cached and mapped by every enricher
    /// process (default: `postcode-operator-index` in the temporary directory).
    #[arg(long, env = "OFFLINE_INDEX_CACHE_DIR")]
    index_cache_dir: Option<PathBuf>,
    /// First search radius, metres.
    #[arg(long, default_value_t = 100.0)]
    radius_m: f64,
    /// Second search radius, metres (postcodes.io clamps to 2000).
    #[arg(long, default_value_t = 2000.0)]
    max_radius_m: f64,
    /// Finally search up to 20 km (postcodes.io widesearch).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    widesearch: bool,
    /// External API requests per second, all shards together (used when the import has no quota yet).
    #[arg(long, default_value_t = 5.0)]
    quota_rps: f64,
    /// Total request budget of the import (used when the import has no quota yet).
    #[arg(long)]
    max_requests: Option<i64>,
    /// The longest timeout of one API request, seconds. Timeouts adapt to the
    /// server's latency below it (3 × the recent 90th percentile, at least
    /// 10 s; pipeline::concurrency).
    #[arg(long, default_value_t = 120.0)]
    timeout_s: f64,
    /// Attempts per request before its rows are marked failed.
    #[arg(long, default_value_t = 8)]
    max_attempts: u32,
    /// Reuse answers other imports got from the same API with the same search
    /// parameters when they are at most this many days old; 0 reuses and keeps nothing.
    #[arg(long, env = "ANSWER_MAX_AGE_DAYS", default_value_t = postcode_resource::limits::DEFAULT_ANSWER_MAX_AGE_DAYS)]
    answer_max_age_days: u32,
}

#[tokio::main]
async fn main() {
    pipeline::init_process();
    pipeline::exit_on_sigterm();
    let args = Args::parse();
    match run(&args).await {
        Ok(Finish::Done) => {}
        Ok(Finish::QuotaExhausted) => {
            eprintln!(
                "enricher-job: shard {}: the import's request budget is spent; unfinished rows stay pending",
                args.shard
            );
            std::process::exit(EXIT_QUOTA_EXHAUSTED);
        }
        Err((code, e)) => {
            let msg = format!("enricher-job: shard {}: {e:#}", args.shard);
            eprintln!("{msg}");
            pipeline::write_termination_message(&msg);
            std::process::exit(code);
        }
    }
}

/// Exit code and error of a failed run: [`EXIT_PERMANENT`] for what a retry
/// will not fix, 1 for the rest.
type Failure = (i32, anyhow::Error);

fn permanent(e: anyhow::Error) -> Failure {
    (EXIT_PERMANENT, e)
}

fn retryable(e: anyhow::Error) -> Failure {
    (1, e)
}

async fn run(args: &Args) -> Result<Finish, Failure> {
    if !(args.quota_rps > 0.0 && args.quota_rps.is_finite()) {
        return Err(permanent(anyhow::anyhow!(
            "--quota-rps must be a positive number"
        )));
    }
    let store = Store::connect(&args.database_url).await.map_err(retryable)?;
    let import = loaded_import(args, &store).await?;
    // Refused: the Job fails at once (exit 2) and the reason reaches the
    // import's status through the pod's termination message.
    check_egress(args).map_err(|e| permanent(e.into()))?;
    let provider = provider(args, &store, import.id).await?;
    let started = std::time::Instant::now();
    let finish = enrich(args, &store, import.id, provider).await?;
    tracing::info!(
        shard = args.shard,
        seconds = started.elapsed().as_secs_f64(),
        ?finish,
        "shard run ended"
    );
    store.close().await;
    Ok(finish)
}

/// The import, when it is loaded and has the shard asked for; a permanent
/// failure otherwise (the reader has not run, or the arguments are wrong).
async fn loaded_import(args: &Args, store: &Store) -> Result<ImportRecord, Failure> {
    let import = store
        .import(&args.import_uid)
        .await
        .map_err(retryable)?
        .ok_or_else(|| {
            permanent(anyhow::anyhow!(
                "import {} does not exist; run the reader first",
                args.import_uid
            ))
        })?;
    if import.phase != ImportPhase::Loaded {
        return Err(permanent(anyhow::anyhow!(
            "import {} is {}, not Loaded",
            import.name,
            import.phase
        )));
    }
    if args.shard < 0 || args.shard >= import.shards {
        return Err(permanent(anyhow::anyhow!(
            "shard {} is outside 0..{}",
            args.shard,
            import.shards
        )));
    }
    Ok(import)
}

/// Runs the shard to its end, reporting progress to the import's status when
/// running in a cluster ([`StatusReporter`]).
async fn enrich(
    args: &Args,
    store: &Store,
    import_id: i64,
    provider: Arc<dyn Provider>,
) -> Result<Finish, Failure> {
    let cfg = shard_config(args, import_id);
    let reporter = StatusReporter::from_env(args.shard).await;
    let progress = reporter
        .as_ref()
        .map(|r| r.spawn_periodic(store.clone(), import_id));
    let mut last = RunStatsLog::default();
    let retries = reporter.as_ref().map(|r| r.retries.clone()).unwrap_or_default();
    let result = run_shard(store, provider, &cfg, |s| {
        retries.store(s.retries as i64, std::sync::atomic::Ordering::Relaxed);
        last.maybe_log(args.shard, s)
    })
    .await;
    if let Some(p) = progress {
        p.abort();
    }
    let finish = result.map_err(retryable)?;
    if let Some(r) = &reporter {
        let phase = match finish {
            Finish::Done => "Succeeded",
            Finish::QuotaExhausted => "QuotaExhausted",
        };
        r.report(store, import_id, phase).await;
    }
    Ok(finish)
}

/// Whether the egress policy (`EGRESS_*`, pipeline::egress) allows the API
/// URL or the offline postcode file this shard would use.
fn check_egress(args: &Args) -> Result<(), EgressError> {
    let policy = EgressPolicy::from_env()?;
    match &args.offline_postcodes {
        Some(path) => policy.check_offline_path(path).map(drop),
        None => policy.check_api_url(&args.api_url),
    }
}

/// The offline index when `--offline-postcodes` names a postcode file (built
/// or mapped from its cache), postcodes.io otherwise (the import's quota row
/// created if it has none).
async fn provider(args: &Args, store: &Store, import_id: i64) -> Result<Arc<dyn Provider>, Failure> {
    let provider: Arc<dyn Provider> = match &args.offline_postcodes {
        Some(path) => {
            let started = std::time::Instant::now();
            let index = tokio::task::spawn_blocking({
                let path = path.clone();
                let cache = args
                    .index_cache_dir
                    .clone()
                    .unwrap_or_else(pipeline::offline::default_cache_dir);
                move || OfflineIndex::load_cached(&path, &cache)
            })
            .await
            .map_err(|e| retryable(e.into()))?
            .map_err(|e| permanent(e.into()))?;
            tracing::info!(
                postcodes = index.postcodes(),
                seconds = started.elapsed().as_secs_f64(),
                "offline index loaded"
            );
            Arc::new(index)
        }
        None => {
            store
                .ensure_quota(import_id, args.quota_rps, args.max_requests)
                .await
                .map_err(retryable)?;
            // Every request also takes a slot of the API's quota, shared by
            // every import on this database (when the API has one).
            store
                .use_api_quota(import_id, &args.api_url)
                .await
                .map_err(retryable)?;
            Arc::new(PostcodesIo::new(
                &args.api_url,
                Duration::from_secs_f64(args.timeout_s),
            ))
        }
    };
    Ok(provider)
}

fn shard_config(args: &Args, import_id: i64) -> ShardConfig {
    let plan = SearchPlan {
        radius_m: args.radius_m,
        max_radius_m: args.max_radius_m,
        widesearch: args.widesearch,
    };
    ShardConfig {
        import_id,
        shard: args.shard,
        plan,
        cache: AnswerCache::for_api(&args.api_url, &plan, args.answer_max_age_days)
            .filter(|_| args.offline_postcodes.is_none()),
        concurrency: args.offline_postcodes.is_none().then(|| ConcurrencyConfig {
            api_url: args.api_url.clone(),
            max_timeout: Duration::from_secs_f64(args.timeout_s),
        }),
        retry: RetryPolicy {
            max_attempts: args.max_attempts,
            ..RetryPolicy::default()
        },
    }
}

/// Logs progress at most every 10 seconds.
#[derive(Default)]
struct RunStatsLog {
    at: Option<std::time::Instant>,
}

impl RunStatsLog {
    fn maybe_log(&mut self, shard: i32, s: &pipeline::enrich::RunStats) {
        if self.at.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            self.at = Some(std::time::Instant::now());
            tracing::info!(
                shard,
                coordinates = s.coordinates,
                requests = s.requests,
                retries = s.retries,
                "progress"
            );
        }
    }
}
