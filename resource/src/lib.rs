//! The `PostcodeImport` custom resource (`postcodes.dev/v1alpha1`): what a user
//! asks for (spec) and what the operator and the enricher Jobs report (status),
//! shared by the operator and the Jobs (which write their shard's progress).
//! The CRD YAML in `crds/` and the chart is generated from these types
//! (`postcode-operator crd`); a test fails when it is stale.
//!
//! [`limits`] holds every limit and default of an import.

pub mod limits;

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// apiVersion of the product's resources.
pub const API_VERSION: &str = "postcodes.dev/v1alpha1";
/// Finalizer that deletes an import's rows before the resource goes.
pub const FINALIZER: &str = "postcodes.dev/cleanup";

/// A CSV of coordinates to enrich with the nearest UK postcode.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "postcodes.dev",
    version = "v1alpha1",
    kind = "PostcodeImport",
    plural = "postcodeimports",
    shortname = "pcimport",
    namespaced,
    status = "PostcodeImportStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Rows","type":"integer","jsonPath":".status.rowsTotal"}"#,
    printcolumn = r#"{"name":"Enriched","type":"integer","jsonPath":".status.rowsEnriched"}"#,
    printcolumn = r#"{"name":"Share","type":"number","jsonPath":".status.apiShareRps","description":"API requests/second this import may use now: its quota, or its equal share of the API's quota"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("has(self.source.uploadId) != has(self.source.url)").message("exactly one of source.uploadId and source.url must be set"))]
#[serde(rename_all = "camelCase")]
pub struct PostcodeImportSpec {
    /// Where the CSV comes from. Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("source is immutable"))]
    pub source: ImportSource,
    /// How to read the CSV; everything is detected when absent. Immutable.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("csv is immutable"))]
    pub csv: CsvSpec,
    /// Parallel enricher Jobs, [`limits::MIN_SHARDS`]..=[`limits::MAX_SHARDS`]. Immutable.
    #[serde(default = "default_shards")]
    #[schemars(range(min = limits::MIN_SHARDS, max = limits::MAX_SHARDS))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("shards is immutable"))]
    pub shards: u32,
    /// postcodes.io endpoint and search radii. Immutable.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("api is immutable"))]
    pub api: ApiSpec,
    /// Path, inside the Job pods, of an ONS postcode file (NSPL/ONSPD CSV, plain or
    /// gzip); when set the enrichers answer offline instead of calling the API.
    /// Its area columns are filled from the file's area codes, named from the
    /// ONS `Documents/` folder beside the file or beside its folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline_postcodes: Option<String>,
    /// External API quota for the whole import; may change mid-run.
    #[serde(default)]
    pub quota: QuotaSpec,
    /// Stops the enricher Jobs (Job `.spec.suspend`); `false` resumes where the shards stopped.
    #[serde(default)]
    pub suspend: bool,
    /// Deletes the import (and its Jobs) this many seconds after it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i64>,
    /// Bump to requeue the import's `failed` rows and re-run only the shards that have some.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub retry_failed: i32,
    /// Keep the rows in the database after the resource is deleted.
    #[serde(default)]
    pub keep_results: bool,
    /// Retries of each Job before it counts as failed.
    #[serde(default = "default_backoff_limit")]
    #[schemars(range(min = 0, max = limits::MAX_BACKOFF_LIMIT))]
    pub backoff_limit: i32,
    /// `priorityClassName` of the Job pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Settings of the Job pods (the reader's and every enricher's), e.g. a
    /// volume holding the `offlinePostcodes` file. Read when a Job is created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_template: Option<PodTemplate>,
    /// `activeDeadlineSeconds` of each Job: a Job running longer is stopped
    /// and the import fails with reason `DeadlineExceeded`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub active_deadline_seconds: Option<i64>,
}

/// What an import sets in its Job pods (the reader's and every enricher's),
/// copied verbatim into each Job's pod template. What it may not do: choose
/// the ServiceAccount (the chart's Job ServiceAccount is always used), mount
/// a `hostPath` (refused here by CEL), or mount volumes outside the chart's
/// allowlist (`jobPods.allowedVolumes`, checked by the operator: the import
/// fails with `PodTemplateRefused`). Labels the operator sets on its Jobs win
/// over the template's.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.volumes) || self.volumes.all(v, !has(v.hostPath))").message("podTemplate.volumes: hostPath volumes are never allowed"))]
pub struct PodTemplate {
    /// Labels added to the pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations added to the pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Volumes added to the pods, at most [`limits::MAX_POD_VOLUMES`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = limits::MAX_POD_VOLUMES))]
    pub volumes: Vec<k8s_openapi::api::core::v1::Volume>,
    /// Mounts added to the Job container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_mounts: Vec<k8s_openapi::api::core::v1::VolumeMount>,
    /// Requests and limits of the Job container; the chart's defaults
    /// (`jobPods.reader.resources`, `jobPods.enricher.resources`) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,
    /// `nodeSelector` of the pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// `tolerations` of the pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<k8s_openapi::api::core::v1::Toleration>,
    /// `affinity` of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<k8s_openapi::api::core::v1::Affinity>,
    /// `imagePullSecrets` of the pods (Secrets in the import's namespace).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<k8s_openapi::api::core::v1::LocalObjectReference>,
    /// `priorityClassName` of the pods (wins over `spec.priorityClassName`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
}

fn default_shards() -> u32 {
    limits::DEFAULT_SHARDS
}

fn default_backoff_limit() -> i32 {
    limits::DEFAULT_BACKOFF_LIMIT
}

/// Exactly one of `uploadId` and `url`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct ImportSource {
    /// An upload stored by the upload API (`POST /v1/imports`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_id: Option<String>,
    /// An `http://` or `https://` URL the reader Job fetches, at most
    /// [`limits::MAX_URL_LEN`] characters ([`URL_RULE`]; a path is never a
    /// source in a cluster). Which addresses it may reach is the cluster's
    /// egress policy (chart values `egress.*`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = limits::MAX_URL_LEN))]
    #[x_kube(validation = Rule::new(URL_RULE).message("source.url must be an http:// or https:// URL with a host (a path is never a source in a cluster)"))]
    pub url: Option<String>,
}

impl ImportSource {
    /// The source as `reader-job --source` takes it.
    pub fn as_arg(&self) -> Option<String> {
        match (&self.upload_id, &self.url) {
            (Some(id), None) => Some(format!("upload:{id}")),
            (None, Some(url)) => Some(url.clone()),
            _ => None,
        }
    }
}

/// CSV reading options; `None` means detect.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct CsvSpec {
    /// Latitude column: header name or 1-based number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lat_column: Option<String>,
    /// Longitude column: header name or 1-based number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lon_column: Option<String>,
    /// One of `,` `;` `tab` `|`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delimiter: Option<String>,
    /// `double` (RFC 4180 quoting) or `none` (`"` is an ordinary character);
    /// detected when absent: comma and semicolon files are quoted, tab and
    /// pipe files only when their quotes pair up at field boundaries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^(none|double)$"))]
    pub quote: Option<String>,
}

/// CEL: the string is an absolute `http(s)` URL with a host (Kubernetes CEL
/// URL library, `isURL` also accepts bare paths, whose scheme is empty).
pub const URL_RULE: &str =
    "isURL(self) && url(self).getScheme() in ['http', 'https'] && url(self).getHostname() != ''";

/// CEL: an `http(s)` URL whose host is not a loopback, link-local,
/// unspecified or private (RFC 1918, 100.64/10) IPv4 literal, nor an IPv6
/// literal. A first line only: names and other spellings of addresses are
/// checked by the allowlist the enrichers enforce (chart value
/// `egress.allowedApiUrls`). A regex on the string keeps the rule's estimated
/// cost within the API server's budget (the CEL `ip()`/`cidr()` functions on
/// `url().getHostname()` exceed it).
pub const API_URL_HOST_RULE: &str = r"!self.matches('^[a-zA-Z]+://([^/@]*@)?(\\[|(127|10|0)\\.|169\\.254\\.|192\\.168\\.|172\\.(1[6-9]|2[0-9]|3[01])\\.|100\\.(6[4-9]|[7-9][0-9]|1[01][0-9]|12[0-7])\\.)')";

/// postcodes.io endpoint and search radii.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.maxRadiusMeters >= self.radiusMeters").message("api.maxRadiusMeters must be at least api.radiusMeters"))]
pub struct ApiSpec {
    /// postcodes.io base URL, at most [`limits::MAX_URL_LEN`] characters
    /// ([`URL_RULE`], [`API_URL_HOST_RULE`]); the enrichers call it only when it is on the
    /// cluster's allowlist (chart value `egress.allowedApiUrls`).
    #[serde(default = "default_base_url")]
    #[schemars(length(max = limits::MAX_URL_LEN))]
    #[x_kube(validation = Rule::new(URL_RULE).message("api.baseUrl must be an http:// or https:// URL with a host"))]
    #[x_kube(validation = Rule::new(API_URL_HOST_RULE).message("api.baseUrl must not name a loopback, link-local or private address"))]
    pub base_url: String,
    /// First search radius in metres.
    #[serde(default = "default_radius")]
    #[schemars(range(min = 1, max = limits::MAX_RADIUS_M))]
    pub radius_meters: u32,
    /// Second search radius in metres (postcodes.io clamps to 2000).
    #[serde(default = "default_max_radius")]
    #[schemars(range(min = 1, max = limits::MAX_RADIUS_M))]
    pub max_radius_meters: u32,
    /// Finally search up to 20 km (postcodes.io widesearch).
    #[serde(default = "default_true")]
    pub widesearch: bool,
    /// Reuse answers earlier imports got from this API with the same radii
    /// when they are at most this many days old (default 30; 0 asks
    /// everything again and keeps nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 3650))]
    pub answer_max_age_days: Option<u32>,
}

impl Default for ApiSpec {
    fn default() -> Self {
        Self {
            base_url: default_base_url(),
            radius_meters: default_radius(),
            max_radius_meters: default_max_radius(),
            widesearch: true,
            answer_max_age_days: None,
        }
    }
}

fn default_base_url() -> String {
    limits::DEFAULT_API_URL.into()
}
fn default_radius() -> u32 {
    limits::DEFAULT_RADIUS_M
}
fn default_max_radius() -> u32 {
    limits::DEFAULT_MAX_RADIUS_M
}
fn default_true() -> bool {
    true
}

/// The external API quota of the import, all shards together.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct QuotaSpec {
    /// Requests per second to the external API.
    #[serde(default = "default_rps")]
    #[x_kube(validation = Rule::new("self > 0.0").message("requestsPerSecond must be positive"))]
    pub requests_per_second: f64,
    /// Request budget for the whole import; when spent the import stops with the
    /// `QuotaExhausted` condition and unfinished rows stay pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_requests: Option<i64>,
}

impl Default for QuotaSpec {
    fn default() -> Self {
        Self {
            requests_per_second: default_rps(),
            max_requests: None,
        }
    }
}

fn default_rps() -> f64 {
    limits::DEFAULT_QUOTA_RPS
}

/// Phase of an import: a summary of its conditions.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    Pending,
    Loading,
    Enriching,
    Succeeded,
    Failed,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

/// Progress of one shard, written by its enricher Job (server-side apply, field
/// manager `enricher-<index>`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardStatus {
    pub index: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Rows of the shard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<i64>,
    /// Rows of the shard with a final status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done: Option<i64>,
    /// Requests retried by this run of the shard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<i64>,
}

/// What the operator observed; counts only, never per row.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PostcodeImportStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows_total: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows_invalid: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows_enriched: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows_no_match: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows_failed: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows_pending: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_requests: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_retries: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttled: Option<i64>,
    /// While enriching with an API: the rate of API requests this import may
    /// use now (requests/second), its `spec.quota.requestsPerSecond` or less,
    /// an equal share of the API's quota among the imports using it at the
    /// time. Absent once enriching ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_share_rps: Option<f64>,
    /// Per-shard progress, keyed by `index`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["index"]))]
    pub shards: Vec<ShardStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The `retryFailed` value last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_failed_observed: Option<i32>,
    /// Kubernetes API conventions; keyed by `type`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// The CRD as YAML, as `postcode-operator crd` prints it.
pub fn crd_yaml() -> String {
    let crd = PostcodeImport::crd();
    format!(
        "# Generated by `postcode-operator crd`; do not edit.\n{}",
        serde_yaml::to_string(&crd).expect("CRD serialises")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crds_in_the_repo_are_current() {
        let want = crd_yaml();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        for path in [
            "crds/postcodeimports.postcodes.dev.yaml",
            "charts/postcode-operator/crds/postcodeimports.postcodes.dev.yaml",
        ] {
            let have = std::fs::read_to_string(root.join(path)).unwrap_or_default();
            assert!(
                have == want,
                "{path} is stale: run `cargo run -p postcode-operator -- crd > {path}`"
            );
        }
    }

    #[test]
    fn crd_has_cel_rules_list_maps_and_printer_columns() {
        let y = crd_yaml();
        for want in [
            "has(self.source.uploadId) != has(self.source.url)",
            "x-kubernetes-list-map-keys",
            "jsonPath: .status.rowsEnriched",
            "source is immutable",
            "maximum: 64",
            "source.url must be an http:// or https:// URL",
            "api.baseUrl must be an http:// or https:// URL",
            "api.baseUrl must not name a loopback, link-local or private address",
        ] {
            assert!(y.contains(want), "missing {want:?} in\n{y}");
        }
    }

    #[test]
    fn spec_defaults() {
        let spec: PostcodeImportSpec =
            serde_json::from_value(serde_json::json!({"source": {"uploadId": "a"}})).unwrap();
        assert_eq!(spec.shards, 4);
        assert_eq!(spec.api.radius_meters, 100);
        assert_eq!(spec.quota.requests_per_second, 5.0);
        assert_eq!(spec.source.as_arg().as_deref(), Some("upload:a"));
    }
}
