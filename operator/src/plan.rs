//! The Jobs an import needs: one planning function, two runtimes (DESIGN.md
//! "One plan, two runtimes"). [`ImportPlan::from_spec`] is the only place a
//! plan is made, from a `PostcodeImport` spec (`local` builds one from its
//! flags). The Kubernetes runtime turns a [`JobSpec`] into a `batch/v1` Job;
//! the local runtime runs its command as a child process. When each Job runs
//! is decided in [`crate::lifecycle`].

use pipeline::{exit::JobExit, lookup::SearchPlan};
use postcode_resource::{limits, PostcodeImportSpec};

/// Where enrichers get answers.
#[derive(Debug, Clone, PartialEq)]
pub enum ProviderSpec {
    /// postcodes.io (or a compatible server) at this base URL.
    Api { base_url: String },
    /// An ONS postcode file readable by the enricher.
    Offline { postcodes: String },
}

/// Everything the Jobs of one import are built from.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportPlan {
    pub uid: String,
    pub name: String,
    /// `upload:<id>`, an URL or a path.
    pub source: String,
    /// Parallel enricher Jobs, within [`limits::MIN_SHARDS`]..=[`limits::MAX_SHARDS`].
    pub shards: u32,
    pub provider: ProviderSpec,
    pub search: SearchPlan,
    /// External API requests per second, all shards together.
    pub quota_rps: f64,
    /// Optional request budget for the whole import.
    pub max_requests: Option<i64>,
    /// Days an answer of an earlier import is reused (0: none).
    pub answer_max_age_days: u32,
    pub lat_column: Option<String>,
    pub lon_column: Option<String>,
    pub delimiter: Option<String>,
    /// `none` or `double`; detected when absent.
    pub quote: Option<String>,
    /// Retries of a Job before it counts as failed (Kubernetes `backoffLimit`).
    pub backoff_limit: i32,
}

impl ImportPlan {
    /// The plan of an import named `name` with uid `uid`, reading `source`
    /// (`upload:<id>`, an URL, or for `local` a file path), from its spec.
    /// Shard counts outside the limits are clamped (the CRD schema refuses them).
    pub fn from_spec(uid: String, name: String, source: String, s: &PostcodeImportSpec) -> ImportPlan {
        ImportPlan {
            uid,
            name,
            source,
            shards: s.shards.clamp(limits::MIN_SHARDS, limits::MAX_SHARDS),
            provider: match &s.offline_postcodes {
                Some(p) => ProviderSpec::Offline { postcodes: p.clone() },
                None => ProviderSpec::Api {
                    base_url: s.api.base_url.clone(),
                },
            },
            search: SearchPlan {
                radius_m: s.api.radius_meters.into(),
                max_radius_m: s.api.max_radius_meters.into(),
                widesearch: s.api.widesearch,
            },
            quota_rps: s.quota.requests_per_second,
            max_requests: s.quota.max_requests,
            answer_max_age_days: s
                .api
                .answer_max_age_days
                .unwrap_or(limits::DEFAULT_ANSWER_MAX_AGE_DAYS),
            lat_column: s.csv.lat_column.clone(),
            lon_column: s.csv.lon_column.clone(),
            delimiter: s.csv.delimiter.clone(),
            quote: s.csv.quote.clone(),
            backoff_limit: s.backoff_limit,
        }
    }
}

/// What the reader or an enricher Job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Reader,
    Enricher { shard: u32 },
}

/// A Job to run: its deterministic name, binary, arguments, environment and
/// what its exit codes mean. The database URL is not in here: each runtime
/// passes it as `DATABASE_URL` (a Secret in Kubernetes), so it never lands in
/// a Job spec or a log.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    pub name: String,
    pub role: Role,
    /// Binary name, found beside `postcode-operator` locally and on `PATH` in the image.
    pub command: String,
    pub args: Vec<String>,
    /// Environment both runtimes give the container (each adds `DATABASE_URL`
    /// and its own runtime settings).
    pub env: Vec<(String, String)>,
    pub backoff_limit: i32,
    /// Exits that fail the Job at once, without a retry: the Kubernetes
    /// runtime makes its `podFailurePolicy` from them, `local` stops retrying.
    pub fail_at_once: Vec<JobExit>,
}

impl JobSpec {
    /// Whether a container that exited with `code` (`None`: killed by a
    /// signal) ends this Job without a retry.
    pub fn fails_at_once(&self, code: Option<i32>) -> bool {
        self.fail_at_once.contains(&JobExit::from_code(code))
    }
}

/// The environment of every Job of the plan.
fn job_env(p: &ImportPlan) -> Vec<(String, String)> {
    vec![
        ("IMPORT_UID".into(), p.uid.clone()),
        ("IMPORT_NAME".into(), p.name.clone()),
    ]
}

/// Longest Kubernetes label value and Job name the Job controller can label
/// its pods with (`batch.kubernetes.io/job-name`): 63 characters.
pub const MAX_NAME: usize = 63;

/// A name of at most [`MAX_NAME`] characters for `base`-`suffix` that never
/// collides for two imports: when the whole name does not fit, `base` is cut
/// and the first 8 hex digits of SHA-256 of the import's `uid` are put
/// before the suffix, so imports whose names share their first ~45
/// characters still get distinct names (issue 11).
pub fn fitted_name(base: &str, uid: &str, suffix: &str) -> String {
    let whole = if suffix.is_empty() {
        base.to_string()
    } else {
        format!("{base}-{suffix}")
    };
    if whole.len() <= MAX_NAME {
        return whole;
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(uid.as_bytes());
    let hash: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
    let tail = if suffix.is_empty() {
        hash
    } else {
        format!("{hash}-{suffix}")
    };
    // Names are DNS labels (ASCII), so cutting at a byte count is safe.
    let cut: String = base.chars().take(MAX_NAME - tail.len() - 1).collect();
    format!("{}-{tail}", cut.trim_end_matches(['-', '.']))
}

fn job_name(p: &ImportPlan, suffix: &str) -> String {
    fitted_name(&p.name, &p.uid, suffix)
}

/// The reader Job of an import.
pub fn reader_job(p: &ImportPlan) -> JobSpec {
    let mut args = vec![
        "--source".into(),
        p.source.clone(),
        "--shards".into(),
        p.shards.to_string(),
    ];
    for (flag, v) in [
        ("--lat-column", &p.lat_column),
        ("--lon-column", &p.lon_column),
        ("--delimiter", &p.delimiter),
        ("--quote", &p.quote),
    ] {
        if let Some(v) = v {
            args.extend([flag.to_string(), v.clone()]);
        }
    }
    JobSpec {
        name: job_name(p, "reader"),
        role: Role::Reader,
        command: "reader-job".into(),
        args,
        env: job_env(p),
        backoff_limit: p.backoff_limit,
        fail_at_once: JobExit::FAIL_AT_ONCE.to_vec(),
    }
}

/// The enricher Jobs of an import, one per shard.
pub fn enricher_jobs(p: &ImportPlan) -> Vec<JobSpec> {
    (0..p.shards).map(|shard| enricher_job(p, shard)).collect()
}

/// The enricher Job of one shard.
pub fn enricher_job(p: &ImportPlan, shard: u32) -> JobSpec {
    let mut args = vec![
        "--shard".to_string(),
        shard.to_string(),
        "--radius-m".into(),
        p.search.radius_m.to_string(),
        "--max-radius-m".into(),
        p.search.max_radius_m.to_string(),
        "--widesearch".into(),
        p.search.widesearch.to_string(),
        "--quota-rps".into(),
        p.quota_rps.to_string(),
        "--answer-max-age-days".into(),
        p.answer_max_age_days.to_string(),
    ];
    match &p.provider {
        ProviderSpec::Api { base_url } => args.extend(["--api-url".into(), base_url.clone()]),
        ProviderSpec::Offline { postcodes } => args.extend(["--offline-postcodes".into(), postcodes.clone()]),
    }
    if let Some(m) = p.max_requests {
        args.extend(["--max-requests".into(), m.to_string()]);
    }
    JobSpec {
        name: job_name(p, &format!("enricher-{shard}")),
        role: Role::Enricher { shard },
        command: "enricher-job".into(),
        args,
        env: job_env(p),
        backoff_limit: p.backoff_limit,
        fail_at_once: JobExit::FAIL_AT_ONCE.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> ImportPlan {
        ImportPlan {
            uid: "u-1".into(),
            name: "trips".into(),
            source: "upload:abc".into(),
            shards: 3,
            provider: ProviderSpec::Api {
                base_url: "http://x".into(),
            },
            search: SearchPlan::default(),
            quota_rps: 5.0,
            max_requests: Some(10),
            answer_max_age_days: 30,
            lat_column: Some("Lat".into()),
            lon_column: None,
            delimiter: None,
            quote: None,
            backoff_limit: 3,
        }
    }

    #[test]
    fn one_reader_and_one_enricher_per_shard_with_deterministic_names() {
        let p = plan();
        let r = reader_job(&p);
        assert_eq!(r.name, "trips-reader");
        assert_eq!(
            r.args,
            ["--source", "upload:abc", "--shards", "3", "--lat-column", "Lat"]
        );
        let e = enricher_jobs(&p);
        assert_eq!(
            e.iter().map(|j| j.name.as_str()).collect::<Vec<_>>(),
            ["trips-enricher-0", "trips-enricher-1", "trips-enricher-2"]
        );
        assert!(e[2].args.windows(2).any(|w| w == ["--shard", "2"]));
        assert!(e[0].args.windows(2).any(|w| w == ["--max-requests", "10"]));
        assert_eq!(e, enricher_jobs(&p));
    }

    #[test]
    fn long_names_stay_within_63_characters_and_never_collide() {
        let mut p = plan();
        p.name = "a".repeat(80);
        assert!(enricher_job(&p, 63).name.len() <= 63);
        assert!(reader_job(&p).name.ends_with("-reader"));
        // Two 60-character names differing in their last character.
        let mut q = plan();
        p.name = format!("{}x", "n".repeat(59));
        q.name = format!("{}y", "n".repeat(59));
        q.uid = "u-2".into();
        let mut names = std::collections::HashSet::new();
        for plan in [&p, &q] {
            names.insert(reader_job(plan).name);
            for j in enricher_jobs(&ImportPlan {
                shards: 64,
                ..plan.clone()
            }) {
                assert!(j.name.len() <= MAX_NAME, "{}", j.name);
                names.insert(j.name);
            }
        }
        assert_eq!(names.len(), 2 * 65, "every Job name distinct");
        // Names that fit are kept as they are.
        assert_eq!(fitted_name("trips", "u", "reader"), "trips-reader");
        assert_eq!(fitted_name("trips", "u", ""), "trips");
        assert_eq!(fitted_name(&"b".repeat(70), "u", "").len(), MAX_NAME);
    }
}
