//! Answers reused across imports (issue 13): a finished lookup — its provider,
//! the API base URL, the search parameters and the exact coordinate — is kept
//! in the `answers` table, and a later import asking the same provider the same
//! question takes it from there while it is younger than the maximum age,
//! instead of sending a request. postcodes.io's data changes quarterly (each
//! ONS NSPL release), hence the default of 30 days
//! (`postcode_resource::limits::DEFAULT_ANSWER_MAX_AGE_DAYS`; 0 disables).
//!
//! Only answers of a provider asked by request are kept (the offline index
//! answers faster than the cache could be read). The statements are in
//! `store/answers.rs`; the enricher reuses answers when it has planned its
//! shard and keeps its own when the shard is finished ([`crate::enrich`]).

use std::time::Duration;

use crate::lookup::SearchPlan;

/// Which answers an enricher may reuse and under which key it keeps its own.
#[derive(Debug, Clone, PartialEq)]
pub struct AnswerCache {
    /// Who answers: `postcodes.io <base URL>` (trailing `/` removed).
    pub provider: String,
    /// The search parameters: `radius=100 max_radius=2000 widesearch=true` (metres).
    pub search: String,
    /// Answers older than this are asked again (and replaced).
    pub max_age: Duration,
}

impl AnswerCache {
    /// The cache of postcodes.io at `base_url` searched with `plan`, reusing
    /// answers up to `max_age_days` days old; `None` when `max_age_days` is 0
    /// (nothing reused, nothing kept).
    pub fn for_api(base_url: &str, plan: &SearchPlan, max_age_days: u32) -> Option<AnswerCache> {
        (max_age_days > 0).then(|| AnswerCache {
            provider: format!("postcodes.io {}", base_url.trim_end_matches('/')),
            search: format!(
                "radius={} max_radius={} widesearch={}",
                plan.radius_m, plan.max_radius_m, plan.widesearch
            ),
            max_age: Duration::from_secs(u64::from(max_age_days) * 86_400),
        })
    }

    /// The oldest `answered_at` (seconds since the Unix epoch) still reused at `now`.
    pub fn oldest_reused(&self, now: f64) -> f64 {
        now - self.max_age.as_secs_f64()
    }
}

/// Seconds since the Unix epoch on this machine's clock (a day of skew
/// between machines does not matter against a maximum age in days).
pub fn now_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_names_the_api_and_the_search_and_zero_disables() {
        let c = AnswerCache::for_api("http://x:1/", &SearchPlan::default(), 30).unwrap();
        assert_eq!(c.provider, "postcodes.io http://x:1");
        assert_eq!(c.search, "radius=100 max_radius=2000 widesearch=true");
        assert_eq!(c.oldest_reused(30.0 * 86_400.0 + 5.0), 5.0);
        assert!(AnswerCache::for_api("http://x", &SearchPlan::default(), 0).is_none());
    }
}
