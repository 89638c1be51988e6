//! Table-driven tests of [`decide`]: each case is an observed state and the
//! Jobs, phase, conditions and next step it must lead to.

use pipeline::{exit::JobExit, lookup::SearchPlan, store::Counts};
use postcode_resource::Phase;

use super::*;
use crate::plan::ProviderSpec;

fn plan(shards: u32) -> ImportPlan {
    ImportPlan {
        uid: "u-1".into(),
        name: "trips".into(),
        source: "upload:abc".into(),
        shards,
        provider: ProviderSpec::Api {
            base_url: "http://x".into(),
        },
        search: SearchPlan::default(),
        quota_rps: 5.0,
        max_requests: Some(10),
        answer_max_age_days: 30,
        lat_column: None,
        lon_column: None,
        delimiter: None,
        quote: None,
        backoff_limit: 3,
    }
}

/// A new import with a two-shard plan: nothing exists yet.
fn new_import() -> Observed {
    Observed {
        plan: Ok(plan(2)),
        previous: None,
        suspend: false,
        retry_wanted: false,
        load: Load::NotLoaded { error: None },
        reader: None,
        enrichers: vec![],
        shard_pending: vec![],
        budget_spent: false,
        counts: Counts::default(),
        failure_cause: None,
        ttl_seconds_after_finished: None,
        finished_for: None,
        jobs_not_ready: None,
        jobs_stopping: None,
    }
}

/// Loaded, 10 rows of which 4 pending, with these enricher states.
fn loaded(enrichers: Vec<Option<JobState>>) -> Observed {
    Observed {
        previous: Some(Phase::Enriching),
        load: Load::Loaded { warnings: None },
        reader: Some(JobState::Succeeded),
        enrichers,
        shard_pending: vec![2, 2],
        counts: Counts {
            rows_total: 10,
            rows_pending: 4,
            rows_enriched: 6,
            ..Counts::default()
        },
        ..new_import()
    }
}

fn running() -> Option<JobState> {
    Some(JobState::Running {
        suspended: false,
        suspended_by_us: false,
    })
}

fn failed(exit: Option<JobExit>) -> Option<JobState> {
    Some(JobState::Failed {
        exit,
        message: "BackoffLimitExceeded: too many failures".into(),
    })
}

fn names(d: &Decision) -> Vec<String> {
    d.create.iter().map(|(j, _)| j.name.clone()).collect()
}

fn phase(d: &Decision) -> Option<Phase> {
    d.report.as_ref().map(|r| r.phase)
}

fn condition(d: &Decision, type_: &str) -> Option<(bool, String)> {
    let r = d.report.as_ref()?;
    r.conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status, c.reason.clone()))
}

#[test]
fn a_new_import_creates_its_reader_and_nothing_else() {
    let d = decide(&new_import());
    assert_eq!(names(&d), ["trips-reader"]);
    assert_eq!(phase(&d), Some(Phase::Loading));
    assert_eq!(d.next, Next::Poll(PROGRESS_INTERVAL));
    assert_eq!(d.event.as_ref().map(|e| e.reason), Some("Loading"));
    assert!(!d.set_quota && d.delete.is_empty());
}

#[test]
fn a_running_reader_is_left_alone() {
    let o = Observed {
        previous: Some(Phase::Loading),
        reader: running(),
        ..new_import()
    };
    let d = decide(&o);
    assert!(d.create.is_empty());
    assert_eq!(phase(&d), Some(Phase::Loading));
    assert_eq!(d.event, None);
}

#[test]
fn reader_failures_fail_the_import_with_the_readers_own_message() {
    let cases = [
        (
            Some(JobExit::Permanent),
            Some("no latitude column"),
            "InputUnreadable",
            2,
            "no latitude column",
        ),
        (
            Some(JobExit::Retryable),
            None,
            "ReaderFailed",
            1,
            "BackoffLimitExceeded: too many failures",
        ),
        (None, Some("db gone"), "ReaderFailed", 1, "db gone"),
    ];
    for (exit, error, reason, code, message) in cases {
        let o = Observed {
            previous: Some(Phase::Loading),
            load: Load::NotLoaded {
                error: error.map(str::to_string),
            },
            reader: failed(exit),
            ..new_import()
        };
        let d = decide(&o);
        assert_eq!(phase(&d), Some(Phase::Failed), "{exit:?}");
        assert_eq!(condition(&d, "Failed"), Some((true, reason.into())), "{exit:?}");
        assert_eq!(d.report.as_ref().unwrap().message, message);
        assert_eq!(d.exit_code(), code, "{exit:?}");
        assert!(d.report.as_ref().unwrap().completed);
        assert_eq!(d.next, Next::AwaitChange);
    }
}

#[test]
fn once_loaded_every_shard_gets_an_enricher_with_the_quota_set() {
    let d = decide(&loaded(vec![]));
    assert_eq!(names(&d), ["trips-enricher-0", "trips-enricher-1"]);
    assert!(d.set_quota);
    assert_eq!(phase(&d), Some(Phase::Enriching));
    assert_eq!(condition(&d, "Loaded"), Some((true, "Loaded".into())));
    assert!(d.create.iter().all(|(_, suspend)| !suspend));
}

#[test]
fn suspend_creates_suspended_jobs_and_suspends_running_ones() {
    let mut o = loaded(vec![running(), None]);
    o.suspend = true;
    let d = decide(&o);
    assert_eq!(d.create.len(), 1);
    assert!(d.create[0].1, "created suspended");
    assert_eq!(d.set_suspend, [("trips-enricher-0".to_string(), true)]);
    assert_eq!(condition(&d, "Suspended"), Some((true, "Suspended".into())));
    // Resuming un-suspends a suspended Job.
    let mut o = loaded(vec![
        Some(JobState::Running {
            suspended: true,
            suspended_by_us: true,
        }),
        running(),
    ]);
    o.suspend = false;
    let d = decide(&o);
    assert_eq!(d.set_suspend, [("trips-enricher-0".to_string(), false)]);
}

#[test]
fn all_jobs_done_and_nothing_pending_is_succeeded_with_the_counts() {
    let mut o = loaded(vec![Some(JobState::Succeeded), Some(JobState::Succeeded)]);
    o.shard_pending = vec![0, 0];
    o.counts.rows_pending = 0;
    o.counts.rows_enriched = 10;
    o.ttl_seconds_after_finished = Some(60);
    let d = decide(&o);
    assert_eq!(phase(&d), Some(Phase::Succeeded));
    assert_eq!(d.exit_code(), 0);
    assert_eq!(d.next, Next::Poll(Duration::from_secs(60)));
    let r = d.report.unwrap();
    assert!(r.completed);
    assert_eq!(r.counts.unwrap().rows_enriched, 10);
}

#[test]
fn failed_rows_give_a_condition_with_the_count_and_cause_and_exit_4() {
    let mut o = loaded(vec![Some(JobState::Succeeded), Some(JobState::Succeeded)]);
    o.shard_pending = vec![0, 0];
    o.counts.rows_pending = 0;
    o.counts.rows_failed = 4;
    o.failure_cause = Some("connection failed: refused (after 8 requests)".into());
    let d = decide(&o);
    assert_eq!(phase(&d), Some(Phase::Succeeded));
    assert_eq!(condition(&d, ROWS_FAILED), Some((true, "ApiFailed".into())));
    let r = d.report.as_ref().unwrap();
    let c = r.conditions.iter().find(|c| c.type_ == ROWS_FAILED).unwrap();
    assert!(
        c.message.starts_with("4 rows failed: connection failed: refused"),
        "{}",
        c.message
    );
    assert_eq!(d.exit_code(), pipeline::exit::LOCAL_ROWS_FAILED);
    o.counts.rows_failed = 0;
    o.counts.rows_enriched = 10;
    let d = decide(&o);
    assert_eq!(condition(&d, ROWS_FAILED), Some((false, "NoneFailed".into())));
    assert_eq!(d.exit_code(), 0);
}

#[test]
fn a_failed_shard_fails_the_import() {
    let d = decide(&loaded(vec![failed(Some(JobExit::Retryable)), running()]));
    assert_eq!(phase(&d), Some(Phase::Failed));
    assert_eq!(condition(&d, "Failed"), Some((true, "JobFailed".into())));
    assert!(d.report.unwrap().message.contains("trips-enricher-0"));
}

#[test]
fn a_spent_budget_waits_with_quota_exhausted_and_a_raised_one_reruns_the_shard() {
    let mut o = loaded(vec![
        failed(Some(JobExit::QuotaExhausted)),
        Some(JobState::Succeeded),
    ]);
    o.budget_spent = true;
    o.shard_pending = vec![2, 0];
    let d = decide(&o);
    assert_eq!(phase(&d), Some(Phase::Enriching));
    assert_eq!(
        condition(&d, "QuotaExhausted"),
        Some((true, "BudgetSpent".into()))
    );
    assert_eq!(d.next, Next::Poll(QUOTA_WAIT_INTERVAL));
    assert_eq!(d.exit_code(), 3);
    assert!(d.delete.is_empty());
    o.budget_spent = false;
    let d = decide(&o);
    assert_eq!(d.delete, ["trips-enricher-0"]);
    assert_eq!(
        condition(&d, "QuotaExhausted"),
        Some((false, "WithinBudget".into()))
    );
}

#[test]
fn retry_failed_requeues_deletes_failed_jobs_then_reruns_shards_with_work() {
    let mut o = loaded(vec![failed(Some(JobExit::Retryable)), Some(JobState::Succeeded)]);
    o.previous = Some(Phase::Failed);
    o.retry_wanted = true;
    let d = decide(&o);
    assert!(d.requeue_failed && d.set_quota);
    assert_eq!(d.delete, ["trips-enricher-0"]);
    let r = d.report.unwrap();
    assert_eq!(r.phase, Phase::Enriching);
    assert!(r.reopened);
    // Next look: the deleted Job is gone; the succeeded shard has pending rows again.
    let mut o = loaded(vec![None, Some(JobState::Succeeded)]);
    o.shard_pending = vec![1, 3];
    let d = decide(&o);
    assert_eq!(names(&d), ["trips-enricher-0"]);
    assert_eq!(d.delete, ["trips-enricher-1"]);
}

#[test]
fn a_finished_import_waits_for_its_ttl_then_is_deleted() {
    let cases = [
        (None, Some(5), Next::AwaitChange),
        (Some(60), Some(10), Next::Poll(Duration::from_secs(50))),
        (Some(60), Some(60), Next::DeleteImport),
        (Some(0), None, Next::DeleteImport),
    ];
    for previous in [Phase::Succeeded, Phase::Failed] {
        for (ttl, age, next) in cases {
            let o = Observed {
                previous: Some(previous),
                ttl_seconds_after_finished: ttl,
                finished_for: age.map(Duration::from_secs),
                ..new_import()
            };
            let d = decide(&o);
            assert_eq!(d.next, next, "{previous:?} ttl {ttl:?} age {age:?}");
            assert!(d.create.is_empty() && d.report.is_none());
        }
    }
}

#[test]
fn an_unplannable_spec_fails_without_jobs() {
    let o = Observed {
        plan: Err("exactly one of source.uploadId and source.url".into()),
        ..new_import()
    };
    let d = decide(&o);
    assert_eq!(phase(&d), Some(Phase::Failed));
    assert_eq!(condition(&d, "Failed"), Some((true, "InvalidSpec".into())));
    assert!(d.create.is_empty());
    assert_eq!(d.next, Next::AwaitChange);
}

/// Kueue creates the Jobs it manages suspended and releases them when it
/// admits them: a Job suspended by someone else is never un-suspended, one
/// the operator suspended (for `spec.suspend`) is.
#[test]
fn only_jobs_the_operator_suspended_are_resumed_by_it() {
    let held = Some(JobState::Running {
        suspended: true,
        suspended_by_us: false,
    });
    let d = decide(&loaded(vec![held.clone(), running()]));
    assert!(d.set_suspend.is_empty(), "{:?}", d.set_suspend);
    assert_eq!(phase(&d), Some(Phase::Enriching));
    // spec.suspend still suspends it (and marks it ours); a reader held by
    // Kueue is left alone too.
    let mut o = loaded(vec![held.clone(), running()]);
    o.suspend = true;
    let d = decide(&o);
    assert_eq!(d.set_suspend, [("trips-enricher-1".to_string(), true)]);
    let mut o = new_import();
    o.reader = held;
    let d = decide(&o);
    assert!(d.set_suspend.is_empty() && d.create.is_empty());
}

/// A Job of a planned name that the import does not own fails the import
/// with `JobNameConflict` and is neither deleted, changed nor adopted.
#[test]
fn a_foreign_job_with_a_planned_name_fails_the_import_untouched() {
    let foreign = Some(JobState::NotOurs {
        message: "a Job named trips-enricher-1 already exists".into(),
    });
    for o in [
        loaded(vec![running(), foreign.clone()]),
        Observed {
            reader: foreign.clone(),
            ..new_import()
        },
    ] {
        let d = decide(&o);
        assert_eq!(phase(&d), Some(Phase::Failed));
        assert_eq!(condition(&d, "Failed"), Some((true, "JobNameConflict".into())));
        assert!(d.create.is_empty() && d.delete.is_empty() && d.set_suspend.is_empty());
    }
}

/// One shard failing fails the import and suspends the shards still running,
/// so they stop calling the API.
#[test]
fn a_failed_shard_suspends_its_running_siblings() {
    let mut o = loaded(vec![failed(Some(JobExit::Retryable)), running(), running()]);
    o.plan = Ok(plan(3));
    o.shard_pending = vec![2, 2, 0];
    // A runtime that cannot suspend (local) fails at once.
    let d = decide(&o);
    assert_eq!(phase(&d), Some(Phase::Failed));
    // Kubernetes: the siblings are suspended first, and the import fails
    // only once their pods are gone, so its counts are final.
    o.jobs_stopping = Some(false);
    let d = decide(&o);
    assert_eq!(phase(&d), Some(Phase::Enriching));
    assert!(d
        .report
        .as_ref()
        .unwrap()
        .message
        .contains("stopping the other shards"));
    assert_eq!(
        d.set_suspend,
        [
            ("trips-enricher-1".to_string(), true),
            ("trips-enricher-2".to_string(), true)
        ]
    );
    let held = Some(JobState::Running {
        suspended: true,
        suspended_by_us: true,
    });
    o.enrichers = vec![failed(Some(JobExit::Retryable)), held.clone(), held];
    o.jobs_stopping = Some(true);
    let d = decide(&o);
    assert_eq!(phase(&d), Some(Phase::Enriching), "pods still terminating");
    assert!(d.set_suspend.is_empty());
    o.jobs_stopping = Some(false);
    let d = decide(&o);
    assert_eq!(phase(&d), Some(Phase::Failed), "stopped: the final counts");
    assert_eq!(d.report.unwrap().counts.unwrap(), o.counts);
}

/// `activeDeadlineSeconds` ends a Job with reason `DeadlineExceeded`; the
/// import fails with that reason.
#[test]
fn a_job_past_its_deadline_fails_the_import_with_deadline_exceeded() {
    let late = Some(JobState::Failed {
        exit: None,
        message: "DeadlineExceeded: Job was active longer than specified deadline".into(),
    });
    let d = decide(&loaded(vec![late.clone(), running()]));
    assert_eq!(condition(&d, "Failed"), Some((true, "DeadlineExceeded".into())));
    let o = Observed {
        reader: late,
        ..new_import()
    };
    assert_eq!(
        condition(&decide(&o), "Failed"),
        Some((true, "DeadlineExceeded".into()))
    );
}

/// Pods that cannot start show as `JobsReady=False` with the cause, while
/// loading and while enriching.
#[test]
fn pods_that_cannot_start_show_in_the_jobs_ready_condition() {
    let why = Some((
        "FailedCreate".to_string(),
        "Job trips-reader cannot create its pod: serviceaccount \"postcode-operator-job\" not found"
            .to_string(),
    ));
    let o = Observed {
        jobs_not_ready: why.clone(),
        reader: running(),
        ..new_import()
    };
    assert_eq!(
        condition(&decide(&o), "JobsReady"),
        Some((false, "FailedCreate".into()))
    );
    let mut o = loaded(vec![running(), running()]);
    assert_eq!(
        condition(&decide(&o), "JobsReady"),
        Some((true, "PodsStarted".into()))
    );
    o.jobs_not_ready = why;
    assert_eq!(
        condition(&decide(&o), "JobsReady"),
        Some((false, "FailedCreate".into()))
    );
}
