//! The upload API (axum): `POST /v1/imports` stores a CSV in the database and
//! creates its `PostcodeImport`; `GET /v1/imports/{ns}/{name}` and
//! `…/results.csv` read it back; `DELETE /v1/imports/{ns}/{name}` deletes it;
//! `GET /v1/imports` lists what the caller may see and `…/points` samples an
//! import's points for a picture. `/` serves the web page ([`crate::web`]).
//! `/metrics`, `/healthz` and `/readyz` are served on their own port
//! ([`metrics_router`]), never on the upload port.
//!
//! Every `/v1` request is authenticated and each action authorized
//! ([`crate::auth`]: by default a TokenReview and a SubjectAccessReview on the
//! caller's behalf). Uploads stream into the database in 1 MiB chunks (never
//! whole in memory), with a size limit (413 past it) and a SHA-256. Names and
//! namespaces are checked against Kubernetes naming rules before they reach
//! the API server, and every SQL query binds its values. Errors:
//! [`crate::error`].

use std::{sync::Arc, time::Duration};

use axum::{
    body::Body,
    extract::{FromRequest, Multipart, Path, Query, Request, State},
    http::{header, HeaderMap, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
    Extension, Json, Router,
};
use futures::StreamExt;
use kube::{
    api::{DeleteParams, PostParams},
    Api, Client, ResourceExt,
};
use metrics_exporter_prometheus::PrometheusHandle;
use pipeline::{export::LineEncoder, model::ImportPhase, store::Store};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::{
    auth::{Authorizer, Caller, Verb},
    error::{self, ApiError},
};
use postcode_resource::{limits, CsvSpec, ImportSource, PostcodeImport, PostcodeImportSpec, QuotaSpec};

/// Upload API settings.
#[derive(Clone)]
pub struct ApiConfig {
    /// Largest accepted CSV, bytes.
    pub max_upload_bytes: u64,
    /// Namespace of imports created without one.
    pub default_namespace: String,
    pub default_shards: u32,
    pub default_quota_rps: f64,
    pub default_api_url: String,
    /// An upload that sends nothing for this long is refused with 408.
    pub idle_timeout: std::time::Duration,
    /// What the Jobs may reach: `apiUrl` and `offlinePostcodes` it refuses are refused with 400.
    pub egress: pipeline::egress::EgressPolicy,
    /// The one namespace the operator watches (`WATCH_NAMESPACE`); `None`:
    /// all. `GET /v1/imports` lists imports from these namespaces only.
    pub watch_namespace: Option<String>,
}

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    pub client: Client,
    pub store: Store,
    pub config: Arc<ApiConfig>,
    /// Who may do what on `/v1`.
    pub auth: Arc<Authorizer>,
    pub metrics: PrometheusHandle,
    /// True once the database has answered and is migrated: until then
    /// `/readyz` is 503 and `/v1/*` waits up to 10 s, then answers 503.
    pub database_ready: tokio::sync::watch::Receiver<bool>,
    /// One permit per upload being streamed at once (`UPLOAD_CONCURRENCY`); the rest wait.
    pub upload_slots: Arc<tokio::sync::Semaphore>,
}

impl AppState {
    fn database_ready(&self) -> bool {
        *self.database_ready.borrow()
    }
}

/// A DNS-1123 label (Kubernetes namespace, and our import names, which end up in
/// Job names): 1..=63 lower-case alphanumerics or `-`, alphanumeric at both ends.
/// Import names are limited to 40 so `-enricher-63` still fits a Job name.
pub fn valid_label(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// The routes of the upload API (its port serves nothing else).
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/imports", post(create_import).get(list_imports))
        .route("/v1/imports/{ns}/{name}", get(get_import).delete(delete_import))
        .route("/v1/imports/{ns}/{name}/results.csv", get(results_csv))
        .route("/v1/imports/{ns}/{name}/points", get(points))
        // (route_layer: an unknown path is a plain 404, whoever asks)
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .route_layer(middleware::from_fn_with_state(state.clone(), database_ready))
        // The web page: static files, no secret in them; what it shows
        // comes from `/v1`, with the token its user types in.
        .merge(crate::web::router())
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(middleware::from_fn(error::request_id))
        .with_state(state)
}

/// The metrics and probe routes, for their own port (`METRICS_ADDR`).
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route(
            "/metrics",
            get(|State(s): State<AppState>| async move { s.metrics.render() }),
        )
        .with_state(state)
}

/// Authenticates the caller of `/v1/*` (401/403 otherwise) and hands it to
/// the handlers, which authorize their action.
async fn authenticate(
    State(s): State<AppState>,
    headers: HeaderMap,
    mut req: Request,
    next: Next,
) -> Response {
    match s.auth.authenticate(&headers).await {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

/// `/v1/*` while the operator still waits for the database: a request
/// waits up to 10 s for it (a client that starts with the operator), then gets
/// 503, instead of hanging on the pool and failing later.
async fn database_ready(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let mut ready = s.database_ready.clone();
    // (the borrow `wait_for` returns is not Send: dropped before the next await)
    let is_ready = matches!(
        tokio::time::timeout(Duration::from_secs(10), ready.wait_for(|r| *r)).await,
        Ok(Ok(_))
    );
    if !is_ready {
        return ApiError::Client(
            StatusCode::SERVICE_UNAVAILABLE,
            "the database is not reachable yet; retry later".into(),
        )
        .into_response();
    }
    next.run(req).await
}

async fn readyz(State(s): State<AppState>) -> Response {
    let db = s.database_ready() && s.store.import("readyz-probe").await.is_ok();
    let kube = s.client.apiserver_version().await.is_ok();
    let code = if db && kube {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(json!({"database": db, "kubernetes": kube}))).into_response()
}

/// Options of `POST /v1/imports` (query string).
#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct CreateOptions {
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub shards: Option<u32>,
    pub quota_rps: Option<f64>,
    pub max_requests: Option<i64>,
    pub lat_column: Option<String>,
    pub lon_column: Option<String>,
    pub delimiter: Option<String>,
    /// `none` or `double` (detected when absent).
    pub quote: Option<String>,
    pub offline_postcodes: Option<String>,
    pub api_url: Option<String>,
}

const CHUNK: usize = 1 << 20;

/// Longest wait for an upload slot before 503 (a slot may be held by a slow
/// sender for as long as it keeps sending within the idle timeout).
const SLOT_WAIT: Duration = Duration::from_secs(300);

/// Streams bytes into an upload; 413 past the limit (the partial upload is deleted).
struct UploadWriter<'a> {
    store: &'a Store,
    id: String,
    buf: Vec<u8>,
    seq: i32,
    size: u64,
    max: u64,
    sha: Sha256,
}

impl<'a> UploadWriter<'a> {
    /// Adds `data`, storing each full chunk as it fills: the buffer is
    /// allocated once at [`CHUNK`] bytes and never grows.
    async fn push(&mut self, mut data: &[u8]) -> Result<(), ApiError> {
        self.size += data.len() as u64;
        if self.size > self.max {
            let _ = self.store.delete_upload(&self.id).await;
            return Err(ApiError::Client(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("upload larger than the limit of {} bytes", self.max),
            ));
        }
        self.sha.update(data);
        while !data.is_empty() {
            let take = (CHUNK - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == CHUNK {
                self.store
                    .append_upload_chunk(&self.id, self.seq, &self.buf)
                    .await
                    .map_err(ApiError::internal)?;
                self.buf.clear();
                self.seq += 1;
            }
        }
        Ok(())
    }

    async fn finish(mut self) -> Result<(u64, String), ApiError> {
        if !self.buf.is_empty() {
            let chunk = std::mem::take(&mut self.buf);
            self.store
                .append_upload_chunk(&self.id, self.seq, &chunk)
                .await
                .map_err(ApiError::internal)?;
        }
        let sha = hex::encode(self.sha.finalize());
        self.store
            .finish_upload(&self.id, self.size as i64, &sha)
            .await
            .map_err(ApiError::internal)?;
        Ok((self.size, sha))
    }
}

/// Checks the upload's options; the namespace and name of the import to create.
fn validate(opts: &CreateOptions, config: &ApiConfig) -> Result<(String, String), ApiError> {
    let ns = opts
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    if !valid_label(&ns, 63) {
        return Err(ApiError::Client(
            StatusCode::BAD_REQUEST,
            format!("invalid namespace {ns:?}: 1 to 63 lower-case letters, digits or '-'"),
        ));
    }
    let name = match &opts.name {
        Some(n) if valid_label(n, 40) => n.clone(),
        Some(n) => {
            return Err(ApiError::Client(
                StatusCode::BAD_REQUEST,
                format!("invalid name {n:?}: 1 to 40 lower-case letters, digits or '-'"),
            ))
        }
        None => format!("import-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
    };
    if opts.shards.is_some_and(|sh| !limits::shards_allowed(sh)) {
        return Err(ApiError::Client(
            StatusCode::BAD_REQUEST,
            format!("shards must be {}..={}", limits::MIN_SHARDS, limits::MAX_SHARDS),
        ));
    }
    if opts.quota_rps.is_some_and(|q| !(q > 0.0 && q.is_finite())) {
        return Err(ApiError::Client(
            StatusCode::BAD_REQUEST,
            "quotaRps must be a positive number of requests per second".into(),
        ));
    }
    check_egress(opts, config)?;
    Ok((ns, name))
}

/// `apiUrl` and `offlinePostcodes` against the Jobs' egress policy (400 when refused).
fn check_egress(opts: &CreateOptions, config: &ApiConfig) -> Result<(), ApiError> {
    let refused = |e: pipeline::egress::EgressError| ApiError::Client(StatusCode::BAD_REQUEST, e.to_string());
    if let Some(url) = &opts.api_url {
        config.egress.check_api_url(url).map_err(refused)?;
    }
    if let Some(path) = &opts.offline_postcodes {
        config
            .egress
            .check_offline_path_lexically(std::path::Path::new(path))
            .map_err(refused)?;
    }
    Ok(())
}

fn stalled(idle: Duration) -> ApiError {
    ApiError::Client(
        StatusCode::REQUEST_TIMEOUT,
        format!("the upload stalled: nothing received for {}s", idle.as_secs()),
    )
}

/// Streams the `file` field of a multipart upload into `w`.
async fn stream_multipart(req: Request, w: &mut UploadWriter<'_>, idle: Duration) -> Result<(), ApiError> {
    let bad = |e: axum::extract::multipart::MultipartError| {
        ApiError::Client(StatusCode::BAD_REQUEST, e.body_text())
    };
    let mut mp = Multipart::from_request(req, &())
        .await
        .map_err(|e| ApiError::Client(StatusCode::BAD_REQUEST, e.body_text()))?;
    let mut got = false;
    while let Some(mut field) = mp.next_field().await.map_err(bad)? {
        if field.name() != Some("file") {
            continue;
        }
        got = true;
        while let Some(chunk) = tokio::time::timeout(idle, field.chunk())
            .await
            .map_err(|_| stalled(idle))?
            .map_err(bad)?
        {
            w.push(&chunk).await?;
        }
    }
    if !got {
        return Err(ApiError::Client(
            StatusCode::BAD_REQUEST,
            "multipart upload without a `file` field".into(),
        ));
    }
    Ok(())
}

/// Streams a plain request body into `w`.
async fn stream_body(req: Request, w: &mut UploadWriter<'_>, idle: Duration) -> Result<(), ApiError> {
    let mut body = req.into_body().into_data_stream();
    while let Some(chunk) = tokio::time::timeout(idle, body.next())
        .await
        .map_err(|_| stalled(idle))?
    {
        let chunk = chunk.map_err(|e| {
            ApiError::Client(StatusCode::BAD_REQUEST, format!("reading the upload failed: {e}"))
        })?;
        w.push(&chunk).await?;
    }
    Ok(())
}

/// Stores the request's CSV as upload `upload_id`; its size in bytes and SHA-256.
/// A failed or empty upload is deleted.
///
/// Waits for one of the [`AppState::upload_slots`] first (503 after
/// [`SLOT_WAIT`]), so memory stays bounded however many uploads arrive at
/// once; the body is not read meanwhile. Each wait is counted in
/// `postcode_operator_upload_slot_waits_total`.
async fn store_upload(s: &AppState, upload_id: &str, req: Request) -> Result<(u64, String), ApiError> {
    let _slot = match s.upload_slots.try_acquire() {
        Ok(slot) => slot,
        Err(_) => {
            metrics::counter!("postcode_operator_upload_slot_waits_total").increment(1);
            tokio::time::timeout(SLOT_WAIT, s.upload_slots.acquire())
                .await
                .map_err(|_| {
                    ApiError::Client(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!(
                            "the upload API is storing as many uploads as it may at once \
                             (UPLOAD_CONCURRENCY) and none ended within {}s: retry later",
                            SLOT_WAIT.as_secs()
                        ),
                    )
                })?
                .map_err(ApiError::internal)?
        }
    };
    s.store
        .create_upload(upload_id)
        .await
        .map_err(ApiError::internal)?;
    let mut w = UploadWriter {
        store: &s.store,
        id: upload_id.to_string(),
        buf: Vec::with_capacity(CHUNK),
        seq: 0,
        size: 0,
        max: s.config.max_upload_bytes,
        sha: Sha256::new(),
    };
    let multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("multipart/form-data"));
    let streamed = if multipart {
        stream_multipart(req, &mut w, s.config.idle_timeout).await
    } else {
        stream_body(req, &mut w, s.config.idle_timeout).await
    };
    let streamed = streamed.and_then(|()| match w.size {
        0 => Err(ApiError::Client(
            StatusCode::BAD_REQUEST,
            "the upload is empty: send the CSV as the request body or a multipart `file` field".into(),
        )),
        _ => Ok(()),
    });
    if let Err(e) = streamed {
        let _ = s.store.delete_upload(upload_id).await;
        return Err(e);
    }
    w.finish().await
}

/// The spec of an import of upload `upload_id` with the upload's options.
fn spec_for(opts: &CreateOptions, config: &ApiConfig, upload_id: &str) -> PostcodeImportSpec {
    let mut spec: PostcodeImportSpec =
        serde_json::from_value(json!({"source": {"uploadId": upload_id}})).expect("minimal spec");
    spec.source = ImportSource {
        upload_id: Some(upload_id.to_string()),
        url: None,
    };
    spec.shards = opts.shards.unwrap_or(config.default_shards);
    spec.quota = QuotaSpec {
        requests_per_second: opts.quota_rps.unwrap_or(config.default_quota_rps),
        max_requests: opts.max_requests,
    };
    spec.csv = CsvSpec {
        lat_column: opts.lat_column.clone(),
        lon_column: opts.lon_column.clone(),
        delimiter: opts.delimiter.clone(),
        quote: opts.quote.clone(),
    };
    spec.offline_postcodes = opts.offline_postcodes.clone();
    spec.api.base_url = opts
        .api_url
        .clone()
        .unwrap_or_else(|| config.default_api_url.clone());
    spec
}

async fn create_import(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(opts): Query<CreateOptions>,
    req: Request,
) -> Result<Response, ApiError> {
    let (ns, name) = validate(&opts, &s.config)?;
    // Before a byte is stored: may the caller create imports there?
    s.auth.authorize(&caller, Verb::Create, &ns, None).await?;
    let api: Api<PostcodeImport> = Api::namespaced(s.client.clone(), &ns);
    // A taken name is refused before a byte is stored (the create below
    // still refuses a name taken meanwhile).
    if opts.name.is_some() && api.get_opt(&name).await?.is_some() {
        return Err(ApiError::Client(
            StatusCode::CONFLICT,
            format!(
                "an import named {name} already exists in namespace {ns}: choose another name, \
                 or delete the existing import first"
            ),
        ));
    }
    let upload_id = uuid::Uuid::new_v4().to_string();
    let (bytes, sha256) = store_upload(&s, &upload_id, req).await?;
    let imp = PostcodeImport::new(&name, spec_for(&opts, &s.config, &upload_id));
    let created = match api.create(&PostParams::default(), &imp).await {
        Ok(c) => c,
        Err(e) => {
            let _ = s.store.delete_upload(&upload_id).await;
            return Err(e.into());
        }
    };
    tracing::info!(namespace = %ns, name = %name, caller = %caller.name(), bytes, "upload API: import created");
    let body = json!({"namespace": ns, "name": created.name_any(), "uid": created.uid(), "uploadId": upload_id, "bytes": bytes, "sha256": sha256});
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// Checks `ns`/`name` of a path (400 saying what a valid one is) and that
/// the caller may `verb` the import.
async fn check_path(s: &AppState, caller: &Caller, verb: Verb, ns: &str, name: &str) -> Result<(), ApiError> {
    if !valid_label(ns, 63) {
        return Err(ApiError::bad_request(format!(
            "invalid namespace {ns:?}: 1 to 63 lower-case letters, digits or '-'"
        )));
    }
    if !valid_label(name, 63) {
        return Err(ApiError::bad_request(format!(
            "invalid import name {name:?}: 1 to 63 lower-case letters, digits or '-'"
        )));
    }
    s.auth.authorize(caller, verb, ns, Some(name)).await
}

async fn get_import(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    check_path(&s, &caller, Verb::Get, &ns, &name).await?;
    let api: Api<PostcodeImport> = Api::namespaced(s.client.clone(), &ns);
    let imp = api.get(&name).await?;
    Ok(
        Json(
            json!({"namespace": ns, "name": name, "uid": imp.uid(), "spec": imp.spec, "status": imp.status}),
        )
        .into_response(),
    )
}

/// `DELETE /v1/imports/{ns}/{name}`: 202 while its finalizer deletes its
/// rows, 200 once gone.
async fn delete_import(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    check_path(&s, &caller, Verb::Delete, &ns, &name).await?;
    let api: Api<PostcodeImport> = Api::namespaced(s.client.clone(), &ns);
    let deleting = api.delete(&name, &DeleteParams::default()).await?.is_left();
    tracing::info!(namespace = %ns, name = %name, caller = %caller.name(), "upload API: import deleted");
    let code = if deleting {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((
        code,
        Json(json!({"namespace": ns, "name": name, "deleted": true})),
    )
        .into_response())
}

/// `GET /v1/imports`: the imports the caller may see — those of each
/// namespace the operator watches where a SubjectAccessReview allows the
/// caller to `list postcodeimports` — newest first, with their progress.
/// `{"imports": [{namespace, name, phase, rowsTotal, rowsEnriched, …}],
/// "namespaces": [the namespaces listed]}`.
async fn list_imports(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    let all = match &s.config.watch_namespace {
        Some(ns) => Api::<PostcodeImport>::namespaced(s.client.clone(), ns),
        None => Api::<PostcodeImport>::all(s.client.clone()),
    }
    .list(&Default::default())
    .await?;
    let mut namespaces: Vec<String> = all.items.iter().filter_map(|i| i.namespace()).collect();
    namespaces.sort();
    namespaces.dedup();
    let mut listed = vec![];
    for ns in namespaces {
        if s.auth.allowed(&caller, Verb::List, &ns, None).await?.0 {
            listed.push(ns);
        }
    }
    let mut items: Vec<&PostcodeImport> = all
        .items
        .iter()
        .filter(|i| i.namespace().is_some_and(|ns| listed.contains(&ns)))
        .collect();
    items.sort_by_key(|i| std::cmp::Reverse(i.creation_timestamp()));
    let imports: Vec<_> = items
        .iter()
        .map(|i| {
            let st = i.status.clone().unwrap_or_default();
            json!({
                "namespace": i.namespace(), "name": i.name_any(),
                "created": i.creation_timestamp().map(|t| t.0.to_string()),
                "phase": st.phase, "rowsTotal": st.rows_total, "rowsEnriched": st.rows_enriched,
                "rowsFailed": st.rows_failed, "rowsPending": st.rows_pending,
            })
        })
        .collect();
    Ok(Json(json!({"imports": imports, "namespaces": listed})).into_response())
}

/// Options of `GET /v1/imports/{ns}/{name}/points`.
#[derive(Debug, Deserialize)]
struct PointsOptions {
    /// Most points answered (default 5,000, at most 50,000).
    max: Option<i64>,
}

/// `GET /v1/imports/{ns}/{name}/points?max=N`: up to N of the import's points
/// spread over its rows, for a picture: `{"rowsTotal": n, "points":
/// [[latitude, longitude, status], …]}` (WGS84 degrees;
/// [`Store::point_sample`]). 409 until the rows are loaded.
async fn points(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((ns, name)): Path<(String, String)>,
    Query(opts): Query<PointsOptions>,
) -> Result<Response, ApiError> {
    check_path(&s, &caller, Verb::Get, &ns, &name).await?;
    let max = opts.max.unwrap_or(5_000).clamp(1, 50_000);
    let record = loaded_record(&s, &ns, &name).await?;
    let points = s
        .store
        .point_sample(record.id, record.rows_total, max)
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(json!({"rowsTotal": record.rows_total, "points": points})).into_response())
}

/// The database record of import `ns`/`name` once its rows are loaded (409 before).
async fn loaded_record(
    s: &AppState,
    ns: &str,
    name: &str,
) -> Result<pipeline::store::ImportRecord, ApiError> {
    let api: Api<PostcodeImport> = Api::namespaced(s.client.clone(), ns);
    let imp = api.get(name).await?;
    let uid = imp.uid().unwrap_or_default();
    let record = s.store.import(&uid).await.map_err(ApiError::internal)?;
    record.filter(|r| r.phase == ImportPhase::Loaded).ok_or_else(|| {
        ApiError::Client(
            StatusCode::CONFLICT,
            format!("import {ns}/{name} has not loaded yet: ask again once its phase is Enriching or later"),
        )
    })
}

async fn results_csv(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    check_path(&s, &caller, Verb::Get, &ns, &name).await?;
    let record = loaded_record(&s, &ns, &name).await?;
    let store = s.store.clone();
    let header = LineEncoder::default().header(&record);
    // Pages of rows by primary key: memory stays flat whatever the import size.
    let pages = futures::stream::try_unfold((Some(0i64), LineEncoder::default()), move |(after, mut enc)| {
        let store = store.clone();
        async move {
            let Some(after) = after else { return Ok(None) };
            let rows = store
                .results_page(record.id, after, 10_000)
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            let next = if rows.len() < 10_000 {
                None
            } else {
                rows.last().map(|r| r.row_number)
            };
            let mut buf = Vec::with_capacity(rows.len() * 96);
            for r in &rows {
                buf.extend_from_slice(enc.row(r));
            }
            Ok::<_, std::io::Error>(Some((buf, (next, enc))))
        }
    });
    let stream = futures::stream::once(async move { Ok::<_, std::io::Error>(header) }).chain(pages);
    Response::builder()
        .header(header::CONTENT_TYPE, "text/csv; charset=utf-8")
        .header(
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{name}.enriched.csv\""),
        )
        .body(Body::from_stream(stream))
        .map_err(ApiError::internal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_kubernetes_rules() {
        assert!(valid_label("trips-2024", 40));
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a_b",
            "a.b",
            "a b",
            "x'; DROP TABLE points; --",
            &"a".repeat(41),
        ] {
            assert!(!valid_label(bad, 40), "{bad}");
        }
    }
}
