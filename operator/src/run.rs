//! `postcode-operator run`: the controller and the upload API in one process,
//! configured from flags or environment (the chart sets the environment).
//! With leader election on, every replica serves the upload API and only the
//! holder of the `Lease` reconciles.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::Args;
use k8s_openapi::api::batch::v1::Job;
use kube::{runtime::reflector, Client};
use pipeline::store::{QuotaWriter, Store};
use postcode_resource::limits;

use crate::{
    api::{metrics_router, router, ApiConfig, AppState},
    auth::{AuthMode, Authorizer},
    controller::{self, Context},
    jobs::{DatabaseCa, EgressSettings, JobSettings, PodSettings},
};

/// Options of `postcode-operator run`.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// The upload API listens here (nothing else is served on it).
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// `/metrics`, `/healthz` and `/readyz` listen here.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,
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
    /// PEM file of the CA that signed the database server's certificate
    /// (chart value database.tls.caSecret). sqlx reads it as the default
    /// `sslrootcert`; the Job pods get a copy at the same path.
    #[arg(long, env = "PGSSLROOTCERT")]
    pub database_ca_file: Option<String>,
    /// Default `sslmode` of the database URL (verify-full when a CA is given
    /// and no mode); passed to the Job pods too.
    #[arg(long, env = "PGSSLMODE")]
    pub database_sslmode: Option<String>,
    /// How the upload API authenticates callers: `kubernetes` (a TokenReview
    /// of the caller's bearer token, a SubjectAccessReview per action),
    /// `token` (the shared UPLOAD_TOKEN) or `none` (anyone who reaches it).
    #[arg(long, env = "UPLOAD_AUTH", default_value = "kubernetes")]
    pub upload_auth: String,
    /// The shared bearer token of `UPLOAD_AUTH=token`.
    #[arg(long, env = "UPLOAD_TOKEN", default_value = "", hide_env_values = true)]
    pub upload_token: String,
    /// Seconds a TokenReview or SubjectAccessReview answer is reused (0: never).
    #[arg(long, env = "UPLOAD_AUTH_CACHE_S", default_value_t = 10.0)]
    pub upload_auth_cache_s: f64,
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
    /// Uploads streamed into the database at once; more wait their turn
    /// (unread, so their senders are held back by TCP). Each holds a 1 MiB
    /// buffer: the upload path's memory is bounded by this, whatever the
    /// number of uploads.
    #[arg(long, env = "UPLOAD_CONCURRENCY", default_value_t = 4)]
    pub upload_concurrency: usize,
    /// Quota of an upstream API for every import on this database, as
    /// `BASE_URL=REQUESTS_PER_SECOND`, comma-separated (chart value
    /// `apiQuotas`); a `local --quota-rps` on the same database that is lower stands.
    #[arg(long, env = "API_QUOTAS", default_value = "")]
    pub api_quotas: String,
    /// Reconcile only while holding the Lease LEADER_ELECTION_LEASE (for more than one replica).
    #[arg(long, env = "LEADER_ELECTION", default_value_t = false, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// Name of the leader-election Lease in POD_NAMESPACE (the chart sets the
    /// release's full name, so two releases in one namespace never share a leader).
    #[arg(long, env = "LEADER_ELECTION_LEASE", default_value = "postcode-operator")]
    pub leader_election_lease: String,
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

/// The Kubernetes client of [`Client::try_default`], counting every request
/// it sends in `postcode_operator_kube_requests_total{verb}` (`get`, `list`,
/// `watch`, `create`, `patch`, `delete`, `deletecollection`, …), the operator's cost to the API
/// server (BENCHMARKS.md, operator cost).
async fn counted_client() -> anyhow::Result<Client> {
    let config = kube::Config::infer().await?;
    let count = tower::util::MapRequestLayer::new(|req: http::Request<kube::client::Body>| {
        metrics::counter!("postcode_operator_kube_requests_total", "verb" => kube_verb(&req)).increment(1);
        req
    });
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&count)
        .build())
}

/// The Kubernetes verb of a request: its HTTP method, with `GET` split into
/// `get`, `list` (a collection) and `watch` (`?watch=true`).
fn kube_verb<B>(req: &http::Request<B>) -> &'static str {
    let watch = req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
    match *req.method() {
        http::Method::GET if watch => "watch",
        http::Method::GET if is_collection(req.uri().path()) => "list",
        http::Method::GET => "get",
        http::Method::POST => "create",
        http::Method::PATCH => "patch",
        http::Method::PUT => "update",
        http::Method::DELETE if is_collection(req.uri().path()) => "deletecollection",
        http::Method::DELETE => "delete",
        _ => "other",
    }
}

/// Whether an API path names a collection: /api/v1/[namespaces/NS/]KIND and
/// the same under /apis/GROUP/VERSION, where a name after the kind (and any
/// subresource after it) names one object.
fn is_collection(path: &str) -> bool {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let prefix = if segments.first() == Some(&"api") { 2 } else { 3 };
    let mut rest = segments.get(prefix..).unwrap_or_default();
    if rest.len() >= 3 && rest[0] == "namespaces" {
        rest = &rest[2..];
    }
    rest.len() < 2
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let pods = pod_settings(&args)?;
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    let client = counted_client().await.context("connecting to Kubernetes")?;
    // Lazy: the probes and the API answer while the database is still down.
    let store = Store::connect_lazy(&args.database_url).await?;
    if !store.is_postgres() {
        tracing::warn!("the operator is using SQLite: fine for a try-out, use PostgreSQL in a cluster");
    }
    let (database_ready, ready_rx) = tokio::sync::watch::channel(false);

    let auth_mode = AuthMode::from_settings(&args.upload_auth, &args.upload_token)?;
    let cache = Duration::try_from_secs_f64(args.upload_auth_cache_s)
        .context("UPLOAD_AUTH_CACHE_S must be a number of seconds, 0 or more")?;
    // The one namespace watched, `None`: all.
    let namespace = (!args.watch_namespace.is_empty()).then(|| args.watch_namespace.clone());
    let api_state = AppState {
        client: client.clone(),
        store: store.clone(),
        auth: Arc::new(Authorizer::new(auth_mode, client.clone(), cache)),
        config: Arc::new(ApiConfig {
            max_upload_bytes: args.max_upload_bytes,
            default_namespace: args.pod_namespace.clone(),
            default_shards: args.default_shards,
            default_quota_rps: args.default_quota_rps,
            default_api_url: args.default_api_url.clone(),
            idle_timeout: Duration::from_secs(args.upload_idle_timeout_s.max(1)),
            egress: egress_settings(&args)
                .policy()
                .context("the Jobs' egress settings (JOB_EGRESS_*)")?,
            watch_namespace: namespace.clone(),
        }),
        metrics,
        database_ready: ready_rx,
        upload_slots: Arc::new(tokio::sync::Semaphore::new(args.upload_concurrency.max(1))),
    };
    let server = serve(args.listen, "upload API", router(api_state.clone())).await?;
    let metrics_server = serve(args.metrics_addr, "metrics and probes", metrics_router(api_state)).await?;

    wait_for_database(&store).await;
    database_ready.send_replace(true);
    for (url, rps) in parse_api_quotas(&args.api_quotas)? {
        store.set_api_quota(&url, QuotaWriter::Operator, rps).await?;
        tracing::info!(api = %url, requests_per_second = rps, "API quota written");
    }

    let (ctx, job_cache) = context(&client, store, &args, pods)?;

    if args.leader_election {
        lead_then_reconcile(&client, &args, ctx, namespace, job_cache).await?;
    } else {
        controller::run(ctx, namespace, job_cache).await;
    }
    for s in [server, metrics_server] {
        s.abort();
        let _ = tokio::time::timeout(Duration::from_secs(1), s).await;
    }
    Ok(())
}

/// Serves `app` on `addr` in a task; logs `<what> listening on http://ADDR`.
async fn serve(
    addr: SocketAddr,
    what: &str,
    app: axum::Router,
) -> anyhow::Result<tokio::task::JoinHandle<std::io::Result<()>>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("{what}: listening on {addr}"))?;
    tracing::info!("{what} listening on http://{}", listener.local_addr()?);
    let app = app.layer(tower_http::trace::TraceLayer::new_for_http());
    Ok(tokio::spawn(async move { axum::serve(listener, app).await }))
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

/// Connects and migrates, retrying with backoff (1 s doubling to 30 s) for
/// as long as it takes: an operator started before its database (or during an
/// outage) waits with `/readyz` 503 instead of exiting into CrashLoopBackOff.
/// Every failed attempt is logged with its cause (refused, TLS, wrong CA).
async fn wait_for_database(store: &Store) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let attempt = async {
            store.check_connection().await?;
            store.migrate().await.context("migrating the database")
        };
        match attempt.await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(retry_in_s = backoff.as_secs(), "database not ready: {e:#}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
    match store.uses_tls().await {
        Ok(true) => tracing::info!("database connected and migrated"),
        Ok(false) => tracing::warn!(
            "database connected WITHOUT TLS: add sslmode=verify-full and sslrootcert to the URL \
             (chart value database.tls) unless the network path is trusted"
        ),
        Err(e) => tracing::warn!("database connected; its TLS state is unknown: {e:#}"),
    }
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

/// The database CA for the Job pods, read from the operator's own copy.
fn database_ca(args: &RunArgs) -> anyhow::Result<Option<DatabaseCa>> {
    let Some(path) = args.database_ca_file.as_deref().filter(|p| !p.is_empty()) else {
        return Ok(None);
    };
    let pem =
        std::fs::read(path).with_context(|| format!("reading the database CA {path} (PGSSLROOTCERT)"))?;
    Ok(Some(DatabaseCa {
        pem,
        path: path.to_string(),
        sslmode: args.database_sslmode.clone().filter(|m| !m.is_empty()),
    }))
}

/// The reconcilers' context from the flags, and the writer of its Job cache for [`controller::run`].
fn context(
    client: &Client,
    store: Store,
    args: &RunArgs,
    pods: PodSettings,
) -> anyhow::Result<(Arc<Context>, reflector::store::Writer<Job>)> {
    let (job_cache, job_writer) = reflector::store();
    let ctx = Arc::new(Context {
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
            database_ca: database_ca(args)?,
        },
        database_secret: (args.pod_namespace.clone(), args.database_secret_name.clone()),
        recorder: controller::recorder(client.clone()),
        job_cache,
        deleted_jobs: Default::default(),
        failure_causes: Default::default(),
    });
    Ok((ctx, job_writer))
}

/// Waits for the leader Lease, then reconciles until the Lease is lost; a
/// replica that loses it exits at once (another may already be reconciling)
/// and the Deployment restarts it.
async fn lead_then_reconcile(
    client: &Client,
    args: &RunArgs,
    ctx: Arc<Context>,
    namespace: Option<String>,
    job_cache: reflector::store::Writer<Job>,
) -> anyhow::Result<()> {
    let manager = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), &args.leader_election_lease)
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
        () = controller::run(ctx, namespace, job_cache) => Ok(()),
        () = async {
            while leader.changed().await.is_ok() && *leader.borrow() {}
        } => {
            tracing::error!("lost the leader Lease; exiting");
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::kube_verb;

    fn verb(method: &str, uri: &str) -> &'static str {
        let req = http::Request::builder().method(method).uri(uri).body(()).unwrap();
        kube_verb(&req)
    }

    #[test]
    fn requests_are_counted_by_their_kubernetes_verb() {
        assert_eq!(verb("GET", "/apis/batch/v1/namespaces/ns/jobs/imp-reader"), "get");
        assert_eq!(
            verb("GET", "/apis/batch/v1/namespaces/ns/jobs?labelSelector=a"),
            "list"
        );
        assert_eq!(
            verb("GET", "/apis/batch/v1/jobs?watch=true&resourceVersion=1"),
            "watch"
        );
        assert_eq!(
            verb("GET", "/apis/postcodes.dev/v1alpha1/postcodeimports"),
            "list"
        );
        assert_eq!(verb("GET", "/api/v1/namespaces/ns/pods/p/log"), "get");
        assert_eq!(verb("GET", "/api/v1/namespaces/ns"), "get");
        assert_eq!(
            verb(
                "PATCH",
                "/apis/postcodes.dev/v1alpha1/namespaces/ns/postcodeimports/x/status"
            ),
            "patch"
        );
        assert_eq!(verb("POST", "/apis/batch/v1/namespaces/ns/jobs"), "create");
        assert_eq!(verb("DELETE", "/apis/batch/v1/namespaces/ns/jobs/j"), "delete");
        assert_eq!(
            verb("DELETE", "/apis/batch/v1/namespaces/ns/jobs"),
            "deletecollection"
        );
    }
}
