//! Where answers come from: the [`Provider`] interface the enricher drives, and
//! what a provider answers for one batch.
//!
//! Two providers implement it: postcodes.io ([`crate::postcodes_io`]: 100
//! coordinates a request, within the import's quota, with retries) and the
//! offline ONS index ([`crate::offline`]: answers in memory, no quota). The
//! enricher ([`crate::enrich`]) asks a provider one search stage at a time; the
//! stages and what a provider's answer means for a coordinate are the search
//! ladder ([`crate::ladder`]).

use std::time::Duration;

use futures::future::BoxFuture;

use crate::{
    geo::LatLon,
    lookup::{Match, Radius},
};

/// A source of nearest-postcode answers.
pub trait Provider: Send + Sync {
    /// Who answers, for logs (e.g. `postcodes.io at https://api.postcodes.io`).
    fn name(&self) -> String;

    /// Coordinates the enricher claims and asks at once (postcodes.io: 100, its
    /// bulk limit).
    fn batch_size(&self) -> usize;

    /// Whether this provider answers in memory, with no request to pace, count
    /// or retry (the offline index). The enricher then climbs the whole search
    /// ladder of a batch at once ([`crate::ladder::climb`]) and answers a shard's
    /// coordinates while it plans them; otherwise it asks one stage a request,
    /// within the quota, and saves coordinates for the next stage as pending.
    fn answers_locally(&self) -> bool;

    /// The answers for `at` (at most [`Provider::batch_size`] coordinates) at one
    /// search radius, in the order asked.
    fn answer<'a>(
        &'a self,
        at: &'a [LatLon],
        radius: Radius,
    ) -> BoxFuture<'a, Result<Vec<Answer>, CallError>>;
}

/// The answer for one coordinate of a batch.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // mostly `Found`: boxing would only add an allocation
pub enum Answer {
    Found(Match),
    /// No postcode within the radius (postcodes.io `result: null`).
    NoPostcode,
    /// The response did not contain this coordinate (fewer results than queries).
    Missing,
}

/// Why a batch got no answers.
#[derive(Debug, Clone, PartialEq)]
pub enum CallError {
    /// HTTP 429; `retry_after` from the `Retry-After` header when present.
    Throttled { retry_after: Option<Duration> },
    /// Worth retrying: 5xx, timeout, connection error, malformed body.
    Transient(String),
    /// Not worth retrying (4xx other than 429): the request itself is wrong.
    Permanent(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Throttled { retry_after: Some(d) } => {
                write!(f, "HTTP 429 (Retry-After {}s)", d.as_secs_f64())
            }
            CallError::Throttled { retry_after: None } => write!(f, "HTTP 429"),
            CallError::Transient(m) | CallError::Permanent(m) => f.write_str(m),
        }
    }
}
