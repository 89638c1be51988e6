//! One home for the limits and defaults of an import: the CRD schema, the
//! `local` and Job command lines, the upload API and the chart's defaults all
//! read them from here.

/// Fewest enricher Jobs (shards) an import can have.
pub const MIN_SHARDS: u32 = 1;
/// Most enricher Jobs (shards) an import can have: each is a Job with its own
/// pod and database connections.
pub const MAX_SHARDS: u32 = 64;
/// Enricher Jobs when the import does not say.
pub const DEFAULT_SHARDS: u32 = 4;

/// Longest `source.url` and `api.baseUrl`, characters (bounds the CEL rules' cost).
pub const MAX_URL_LEN: u32 = 2048;

/// The public postcodes.io, the default upstream API.
pub const DEFAULT_API_URL: &str = "https://api.postcodes.io";
/// First search radius, metres (postcodes.io's own default).
pub const DEFAULT_RADIUS_M: u32 = 100;
/// Second search radius, metres.
pub const DEFAULT_MAX_RADIUS_M: u32 = 2000;
/// Largest radius postcodes.io accepts, metres: it clamps larger ones to this.
pub const MAX_RADIUS_M: u32 = 2000;

/// External API requests per second when the import does not say.
pub const DEFAULT_QUOTA_RPS: f64 = 5.0;

/// Days a finished answer is reused by later imports asking the same API the
/// same question (postcodes.io's data changes quarterly); 0 disables the
/// answer cache (`pipeline::answer_cache`).
pub const DEFAULT_ANSWER_MAX_AGE_DAYS: u32 = 30;

/// Retries of a Job before it counts as failed (Kubernetes `backoffLimit`).
pub const DEFAULT_BACKOFF_LIMIT: i32 = 3;
/// Most retries of a Job an import may ask for.
pub const MAX_BACKOFF_LIMIT: i32 = 20;

/// Most volumes an import's `podTemplate` may add (bounds the CEL rule's cost).
pub const MAX_POD_VOLUMES: usize = 32;

/// Whether `shards` is an allowed shard count.
pub fn shards_allowed(shards: u32) -> bool {
    (MIN_SHARDS..=MAX_SHARDS).contains(&shards)
}
