//! `postcode-operator run`: the controller and the upload API in one process,
//! configured from flags or environment (the chart sets the environment).
//! With leader election on, every replica serves the upload API and only the
//! holder of the `Lease` reconciles.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::Args;
use kube::Client;
use pipeline::store::{QuotaWriter, Store};
use postcode_resource::limits;

use crate::{
    api::{router, ApiConfig, AppState},
    controller::{self, Context},
    jobs::{EgressSettings, JobSettings, PodSettings},
};

/// Options of `postcode-operator run`.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Upload API and probes listen here.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// PostgreSQL URL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// Secret (in POD_NAMESPACE) holding the database URL, copied per import for the Job pods.
    #[arg(
        long,
        env = "DATABASE_SECRET_NAME",
        default_value = "postcode-operator-database"
    )]
    pub database_secret_name: String,
    /// Key of the database URL in that Secret.
    #[arg(long, env = "DATABASE_SECRET_KEY", default_value = "url")]
    pub database_secret_key: String,
    /// Namespace the operator runs in.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub pod_namespace: String,
    /// This replica's name (leader election identity).
    #[arg(long, env = "POD_NAME", default_value = "postcode-operator")]
    pub pod_name: String,
    /// Only watch this namespace (all when empty).
    #[arg(long, env = "WATCH_NAMESPACE", default_value = "")]
    pub watch_namespace: String,
    /// Image of the reader and enricher Jobs.
    #[arg(long, env = "JOB_IMAGE", default_value = "postcode-operator:latest")]
    pub job_image: String,
    #[arg(long, env = "JOB_IMAGE_PULL_POLICY", default_value = "IfNotPresent")]
    pub job_image_pull_policy: String,
    /// ServiceAccount of the Job pods (may patch postcodeimports/status only).
    #[arg(long, env = "JOB_SERVICE_ACCOUNT", default_value = "postcode-operator-job")]
    pub job_service_account: String,
    /// RUST_LOG of the Job pods.
    #[arg(long, env = "JOB_RUST_LOG", default_value = "info,sqlx=error")]
    pub job_rust_log: String,
    /// CIDRs the Jobs' sources may reach although not public (comma-separated;
    /// chart value egress.allowSourceCidrs).
    #[arg(long, env = "JOB_EGRESS_ALLOW_SOURCE_CIDRS", default_value = "")]
    pub job_egress_allow_source_cidrs: String,
    /// CIDRs the Jobs' sources may never reach, e.g. the cluster's Service and
    /// Pod CIDRs when public (comma-separated; chart value egress.denyCidrs).
    #[arg(long, env = "JOB_EGRESS_DENY_CIDRS", default_value = "")]
    pub job_egress_deny_cidrs: String,
    /// API base URLs the enrichers may call (comma-separated; `*` = any;
    /// chart value egress.allowedApiUrls).
    #[arg(long, env = "JOB_EGRESS_ALLOWED_API_URLS", default_value = pipeline::egress::DEFAULT_ALLOWED_API_URLS)]
    pub job_egress_allowed_api_urls: String,
    /// Directory, in the Job pods, that offline postcode files must be in
    /// (none allowed when empty; chart value egress.offlinePostcodesDir).
    #[arg(long, env = "JOB_EGRESS_OFFLINE_POSTCODES_DIR", default_value = "")]
    pub job_egress_offline_postcodes_dir: String,
    /// Container resources of reader pods whose import sets none (JSON
    /// ResourceRequirements; chart value jobPods.reader.resources). Sized
    /// from the reader's measured peak RSS (≤ 54 MiB at 10 M rows,
    /// BENCHMARKS.md); limits too, so that namespaces with a compute
    /// ResourceQuota admit the pods.
    #[arg(long, env = "JOB_READER_RESOURCES", default_value = DEFAULT_READER_RESOURCES)]
    pub job_reader_resources: String,
    /// Container resources of enricher pods whose import sets none (JSON;
    /// chart value jobPods.enricher.resources). Sized from the enricher's
    /// measured peak RSS (≤ 192 MiB with the whole NSPL, BENCHMARKS.md).
    #[arg(long, env = "JOB_ENRICHER_RESOURCES", default_value = DEFAULT_ENRICHER_RESOURCES)]
    pub job_enricher_resources: String,
    /// Volumes an import's podTemplate may add: comma-separated `kind` or
    /// `kind/name` (`*` = any name), kind as the Volume field (chart value
    /// jobPods.allowedVolumes). hostPath is never allowed.
    #[arg(
        long,
        env = "JOB_ALLOWED_VOLUMES",
        default_value = "persistentVolumeClaim/*,configMap/*,emptyDir"
    )]
    pub job_allowed_volumes: String,
    /// Bearer token required by the upload API (none when empty).
    #[arg(long, env = "UPLOAD_TOKEN", default_value = "", hide_env_values = true)]
    pub upload_token: String,
    /// Largest accepted upload, bytes.
    #[arg(long, env = "MAX_UPLOAD_BYTES", default_value_t = 2 << 30)]
    pub max_upload_bytes: u64,
    #[arg(long, env = "DEFAULT_SHARDS", default_value_t = limits::DEFAULT_SHARDS)]
    pub default_shards: u32,
    #[arg(long, env = "DEFAULT_QUOTA_RPS", default_value_t = limits::DEFAULT_QUOTA_RPS)]
    pub default_quota_rps: f64,
    #[arg(long, env = "DEFAULT_API_URL", default_value = limits::DEFAULT_API_URL)]
    pub default_api_url: String,
    /// Seconds an upload may send nothing before it is refused (408).
    #[arg(long, env = "UPLOAD_IDLE_TIMEOUT_S", default_value_t = 60)]
    pub upload_idle_timeout_s: u64,
    /// Quota of an upstream API for every import on this database, as
    /// `BASE_URL=REQUESTS_PER_SECOND`, comma-separated (chart value
    /// `apiQuotas`); a `local --quota-rps` on the same database that is lower stands.
    #[arg(long, env = "API_QUOTAS", default_value = "")]
    pub api_quotas: String,
    /// Reconcile only while holding the `postcode-operator` Lease (for more than one replica).
    #[arg(long, env = "LEADER_ELECTION", default_value_t = false, action = clap::ArgAction::Set)]
    pub leader_election: bool,
}

/// [`RunArgs::job_reader_resources`]' default.
pub const DEFAULT_READER_RESOURCES: &str =
    r#"{"requests":{"cpu":"250m","memory":"64Mi"},"limits":{"cpu":"1","memory":"256Mi"}}"#;
/// [`RunArgs::job_enricher_resources`]' default.
pub const DEFAULT_ENRICHER_RESOURCES: &str =
    r#"{"requests":{"cpu":"250m","memory":"256Mi"},"limits":{"cpu":"1","memory":"768Mi"}}"#;

/// The Job pods' settings from the flags; errors name the flag.
pub fn pod_settings(args: &RunArgs) -> anyhow::Result<PodSettings> {
    let resources = |flag: &str, v: &str| -> anyhow::Result<_> {
        if v.trim().is_empty() {
            return Ok(None);
        }
        serde_json::from_str(v)
            .map(Some)
            .with_context(|| format!("{flag}: not a ResourceRequirements JSON object: {v}"))
    };
    Ok(PodSettings {
        reader_resources: resources("JOB_READER_RESOURCES", &args.job_reader_resources)?,
        enricher_resources: resources("JOB_ENRICHER_RESOURCES", &args.job_enricher_resources)?,
        allowed_volumes: args
            .job_allowed_volumes
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
    })
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let pods = pod_settings(&args)?;
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    let client = Client::try_default().await.context("connecting to Kubernetes")?;
    let store = Store::connect(&args.database_url).await?;
    if !store.is_postgres() {
        tracing::warn!("the operator is using SQLite: fine for a try-out, use PostgreSQL in a cluster");
    }
    store.migrate().await.context("migrating the database")?;
    for (url, rps) in parse_api_quotas(&args.api_quotas)? {
        store.set_api_quota(&url, QuotaWriter::Operator, rps).await?;
        tracing::info!(api = %url, requests_per_second = rps, "API quota written");
    }

    let api_state = AppState {
        client: client.clone(),
        store: store.clone(),
        config: Arc::new(ApiConfig {
            max_upload_bytes: args.max_upload_bytes,
            token: (!args.upload_token.is_empty()).then(|| args.upload_token.clone()),
            default_namespace: args.pod_namespace.clone(),
            default_shards: args.default_shards,
            default_quota_rps: args.default_quota_rps,
            default_api_url: args.default_api_url.clone(),
            idle_timeout: Duration::from_secs(args.upload_idle_timeout_s.max(1)),
            egress: egress_settings(&args)
                .policy()
                .context("the Jobs' egress settings (JOB_EGRESS_*)")?,
        }),
        metrics,
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    tracing::info!("upload API listening on http://{}", listener.local_addr()?);
    let app = router(api_state).layer(tower_http::trace::TraceLayer::new_for_http());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let ctx = context(&client, store, &args, pods);
    let namespace = (!args.watch_namespace.is_empty()).then(|| args.watch_namespace.clone());

    if args.leader_election {
        lead_then_reconcile(&client, &args, ctx, namespace).await?;
    } else {
        controller::run(ctx, namespace).await;
    }
    server.abort();
    let _ = tokio::time::timeout(Duration::from_secs(1), server).await;
    Ok(())
}

/// `--api-quotas`: `(base URL, requests per second)` pairs from
/// `URL=RPS,URL=RPS`; an error names an entry that is not one.
pub fn parse_api_quotas(text: &str) -> anyhow::Result<Vec<(String, f64)>> {
    text.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|e| {
            let (url, rps) = e
                .rsplit_once('=')
                .with_context(|| format!("API_QUOTAS entry {e:?} is not URL=REQUESTS_PER_SECOND"))?;
            let rps: f64 = rps
                .trim()
                .parse()
                .ok()
                .filter(|r: &f64| *r > 0.0 && r.is_finite())
                .with_context(|| format!("API_QUOTAS entry {e:?}: the rate must be a positive number"))?;
            Ok((url.trim().to_string(), rps))
        })
        .collect()
}

/// The Jobs' egress settings from the flags.
pub fn egress_settings(args: &RunArgs) -> EgressSettings {
    EgressSettings {
        allow_source_cidrs: args.job_egress_allow_source_cidrs.clone(),
        deny_cidrs: args.job_egress_deny_cidrs.clone(),
        allowed_api_urls: args.job_egress_allowed_api_urls.clone(),
        offline_postcodes_dir: args.job_egress_offline_postcodes_dir.clone(),
    }
}

/// The controller's context from the flags.
fn context(client: &Client, store: Store, args: &RunArgs, pods: PodSettings) -> Arc<Context> {
    Arc::new(Context {
        client: client.clone(),
        store,
        jobs: JobSettings {
            image: args.job_image.clone(),
            image_pull_policy: args.job_image_pull_policy.clone(),
            service_account: args.job_service_account.clone(),
            database_secret: String::new(),
            database_secret_key: args.database_secret_key.clone(),
            rust_log: args.job_rust_log.clone(),
            egress: egress_settings(args),
            pods,
        },
        database_secret: (args.pod_namespace.clone(), args.database_secret_name.clone()),
        recorder: controller::recorder(client.clone()),
    })
}

/// Waits for the leader Lease, then reconciles until the Lease is lost; a
/// replica that loses it exits at once (another may already be reconciling)
/// and the Deployment restarts it.
async fn lead_then_reconcile(
    client: &Client,
    args: &RunArgs,
    ctx: Arc<Context>,
    namespace: Option<String>,
) -> anyhow::Result<()> {
    let manager = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), "postcode-operator")
        .with_namespace(&args.pod_namespace)
        .with_identity(&args.pod_name)
        .with_duration(15)
        .with_grace(5)
        .build()
        .await
        .context("creating the leader-election Lease manager")?;
    let (mut leader, _task) = manager.watch().await;
    tracing::info!(identity = %args.pod_name, "waiting for the leader Lease");
    while !*leader.borrow_and_update() {
        leader.changed().await.context("leader election stopped")?;
    }
    tracing::info!(identity = %args.pod_name, "leading: starting the controller");
    tokio::select! {
        () = controller::run(ctx, namespace) => Ok(()),
        () = async {
            while leader.changed().await.is_ok() && *leader.borrow() {}
        } => {
            tracing::error!("lost the leader Lease; exiting");
            std::process::exit(1);
        }
    }
}
