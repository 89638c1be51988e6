//! What a Job's exit code means: the contract between the Job binaries
//! (`reader-job`, `enricher-job`) and both runtimes (the Kubernetes Job's
//! `podFailurePolicy`, the `local` runner). DESIGN.md "Enrichment rules": a
//! shard that fails for a reason a retry will not fix fails without burning
//! retries.

/// How a Job's container ended, by its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobExit {
    /// Exit 0: the Job's work is done.
    Done,
    /// Exit 2: bad input or configuration (an unreadable CSV, a bad flag); a
    /// retry will not fix it, so the Job fails at once.
    Permanent,
    /// Exit 3: the import's request budget is spent; unfinished rows stay
    /// pending until the budget is raised. The Job fails at once.
    QuotaExhausted,
    /// Any other exit, or death by a signal: a transient fault, retried up to
    /// the Job's `backoffLimit`.
    Retryable,
}

impl JobExit {
    /// The exits that fail a Job at once instead of being retried.
    pub const FAIL_AT_ONCE: [JobExit; 2] = [JobExit::Permanent, JobExit::QuotaExhausted];

    /// The exit code a Job binary ends with (1 for [`JobExit::Retryable`]).
    pub const fn code(self) -> i32 {
        match self {
            JobExit::Done => 0,
            JobExit::Permanent => 2,
            JobExit::QuotaExhausted => 3,
            JobExit::Retryable => 1,
        }
    }

    /// The meaning of an exit code; `None` (killed by a signal) is retryable.
    pub fn from_code(code: Option<i32>) -> JobExit {
        match code {
            Some(0) => JobExit::Done,
            Some(2) => JobExit::Permanent,
            Some(3) => JobExit::QuotaExhausted,
            _ => JobExit::Retryable,
        }
    }

    /// Whether this exit fails the Job without a retry.
    pub fn fails_at_once(self) -> bool {
        Self::FAIL_AT_ONCE.contains(&self)
    }
}

/// Exit code of `postcode-operator local` (not of a Job) when the import
/// finished but some rows ended `failed`: the API kept failing for their
/// coordinates after the retries (README "Running locally", exit codes).
/// `--retry-failed` asks them again. Distinct from every [`JobExit`] code.
pub const LOCAL_ROWS_FAILED: i32 = 4;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_only_permanent_and_quota_fail_at_once() {
        for e in [
            JobExit::Done,
            JobExit::Permanent,
            JobExit::QuotaExhausted,
            JobExit::Retryable,
        ] {
            assert_eq!(JobExit::from_code(Some(e.code())), e);
        }
        assert_eq!(JobExit::from_code(None), JobExit::Retryable);
        assert_eq!(JobExit::from_code(Some(137)), JobExit::Retryable);
        assert!(JobExit::Permanent.fails_at_once() && JobExit::QuotaExhausted.fails_at_once());
        assert!(!JobExit::Retryable.fails_at_once() && !JobExit::Done.fails_at_once());
    }
}
