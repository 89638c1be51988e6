//! The import lifecycle: which Jobs an import has and when, what their ends
//! mean, and which phase, conditions and events follow. One pure function,
//! [`decide`], used by both runtimes (DESIGN.md "One plan, two runtimes"):
//! the controller observes Kubernetes Jobs and the database, `local` observes
//! its child processes and the database; each then carries out the
//! [`Decision`].
//!
//! Pending → Loading (the reader Job) → Enriching (one enricher Job per shard)
//! → Succeeded | Failed:
//! - until the database says the import is loaded, the reader Job exists; if
//!   it fails, the import fails (with the reader's own message when it wrote
//!   one);
//! - once loaded, every shard has an enricher Job (suspended with
//!   `spec.suspend`); a shard Job that ended but whose shard has pending rows
//!   again (after `retryFailed`, or a raised request budget) is deleted so it
//!   runs again;
//! - an enricher that stopped on a spent request budget leaves the import
//!   Enriching with `QuotaExhausted=True` until the budget is raised;
//! - any other enricher failure fails the import; all Jobs done and no row
//!   pending is Succeeded;
//! - a finished import is deleted `ttlSecondsAfterFinished` after it ended.

use std::time::Duration;

use pipeline::{
    exit::{JobExit, LOCAL_ROWS_FAILED},
    store::Counts,
};
use postcode_resource::Phase;

use crate::plan::{enricher_jobs, reader_job, ImportPlan, JobSpec};

/// The condition saying how many rows ended `failed` and why (`True` when
/// some did); `local` then exits [`LOCAL_ROWS_FAILED`].
pub const ROWS_FAILED: &str = "RowsFailed";

/// How often a running import is looked at again (counts, Jobs).
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(3);
/// How often an import waiting for a raised request budget is looked at.
pub const QUOTA_WAIT_INTERVAL: Duration = Duration::from_secs(30);

/// A Job as either runtime sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    /// Created and not finished; `suspended` is its `spec.suspend`,
    /// `suspended_by_us` whether the operator suspended it (for
    /// `spec.suspend`) rather than an admission controller such as Kueue.
    Running {
        suspended: bool,
        suspended_by_us: bool,
    },
    /// A Job of the planned name exists but the import is not its controller
    /// owner: it is left untouched and the import fails (`JobNameConflict`).
    NotOurs {
        message: String,
    },
    Succeeded,
    /// Failed for good (after its retries, or at once for a final exit).
    Failed {
        /// The exit that ended it, when the runtime knows it.
        exit: Option<JobExit>,
        /// Why, as the runtime says it (e.g. the Job's `Failed` condition).
        message: String,
    },
}

/// Whether the database holds the import's rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Load {
    /// Not loaded (yet); with the reader's error message when it wrote one.
    NotLoaded { error: Option<String> },
    /// Loaded; with what the reader had to repair, one warning a line.
    Loaded { warnings: Option<String> },
}

/// Everything [`decide`] looks at.
#[derive(Debug, Clone)]
pub struct Observed {
    /// The Job plan, or why the spec cannot be planned.
    pub plan: Result<ImportPlan, String>,
    /// The phase reported last (`status.phase`); `None` for a new import.
    pub previous: Option<Phase>,
    /// `spec.suspend`.
    pub suspend: bool,
    /// `spec.retryFailed` is ahead of the value last acted on.
    pub retry_wanted: bool,
    pub load: Load,
    /// The reader Job; `None` when it does not exist.
    pub reader: Option<JobState>,
    /// The enricher Job of each shard (index = shard); `None` when it does not
    /// exist. Shorter than the plan's shard count means the rest do not exist.
    pub enrichers: Vec<Option<JobState>>,
    /// Rows still pending per shard (index = shard), once loaded.
    pub shard_pending: Vec<i64>,
    /// The import's request budget is spent.
    pub budget_spent: bool,
    /// Row counts, once loaded.
    pub counts: Counts,
    /// Why rows ended `failed` (the most frequent error of the import's
    /// failed coordinates), when some did.
    pub failure_cause: Option<String>,
    /// `spec.ttlSecondsAfterFinished`.
    pub ttl_seconds_after_finished: Option<i64>,
    /// Time since the import finished, for a finished import.
    pub finished_for: Option<Duration>,
    /// Why some Job has no running pod although it should (reason, message),
    /// from its `FailedCreate` events and its pods' waiting reasons: the
    /// `JobsReady` condition. `None` when every Job's pods start.
    pub jobs_not_ready: Option<(String, String)>,
    /// Whether a suspended enricher Job still has pods running or
    /// terminating; `None` for a runtime that cannot suspend Jobs (`local`
    /// stops its children itself when the import fails).
    pub jobs_stopping: Option<bool>,
}

/// [`Observed::shard_pending`] from the store's per-shard counts: rows not
/// yet finished per shard, 0 for a shard with no planned lookups.
pub fn pending_by_shard(shards: u32, counts: &[pipeline::store::ShardCounts]) -> Vec<i64> {
    let mut pending = vec![0; shards as usize];
    for s in counts {
        if let Some(p) = pending.get_mut(s.shard as usize) {
            *p = s.rows - s.done;
        }
    }
    pending
}

/// A condition as the import's status should hold it (Kubernetes API
/// conventions: `type`, `status`, `reason`, `message`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    pub type_: &'static str,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

/// A [`Want`] of condition `type_`.
pub fn want(type_: &'static str, status: bool, reason: &str, message: impl Into<String>) -> Want {
    Want {
        type_,
        status,
        reason: reason.into(),
        message: message.into(),
    }
}

/// An event to publish about the import.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
}

/// What to do after acting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Look again after this long.
    Poll(Duration),
    /// Nothing changes until the resource does.
    AwaitChange,
    /// Delete the import: its `ttlSecondsAfterFinished` has passed.
    DeleteImport,
}

/// The status to report; `None` fields keep what the status holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub phase: Phase,
    pub message: String,
    pub conditions: Vec<Want>,
    /// The import has just finished: record when.
    pub completed: bool,
    /// The import runs again (a retry): clear its completion time.
    pub reopened: bool,
    /// Row counts to report.
    pub counts: Option<Counts>,
}

/// What a runtime should do now.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Jobs to create (only ones that do not exist), with `spec.suspend`.
    pub create: Vec<(JobSpec, bool)>,
    /// Jobs to delete so that they run again.
    pub delete: Vec<String>,
    /// Existing Jobs whose `spec.suspend` must change.
    pub set_suspend: Vec<(String, bool)>,
    /// Write the plan's quota to the database first.
    pub set_quota: bool,
    /// Put the import's `failed` rows back to pending, and record that
    /// `retryFailed` was acted on.
    pub requeue_failed: bool,
    /// The status to report; `None` leaves the status as it is.
    pub report: Option<Report>,
    pub event: Option<Note>,
    pub next: Next,
}

impl Decision {
    fn new(next: Next) -> Decision {
        Decision {
            create: vec![],
            delete: vec![],
            set_suspend: vec![],
            set_quota: false,
            requeue_failed: false,
            report: None,
            event: None,
            next,
        }
    }

    /// The exit code of `postcode-operator local` for an import that ended or
    /// stopped with this decision: 0 succeeded, 4 succeeded but some rows
    /// ended `failed` (condition `RowsFailed`), 3 request budget spent, 2 the
    /// input cannot be read, 1 a Job failed after its retries, or the import
    /// stopped unfinished (README "Running locally").
    pub fn exit_code(&self) -> i32 {
        let Some(r) = &self.report else {
            return JobExit::Retryable.code();
        };
        let quota = r
            .conditions
            .iter()
            .any(|c| c.type_ == "QuotaExhausted" && c.status);
        let input = r.conditions.iter().any(|c| c.reason == "InputUnreadable");
        let rows_failed = r.conditions.iter().any(|c| c.type_ == ROWS_FAILED && c.status);
        match r.phase {
            Phase::Succeeded if rows_failed => LOCAL_ROWS_FAILED,
            Phase::Succeeded => 0,
            _ if quota => JobExit::QuotaExhausted.code(),
            Phase::Failed if input => JobExit::Permanent.code(),
            _ => JobExit::Retryable.code(),
        }
    }
}

/// The decision for an import in the state `o`.
pub fn decide(o: &Observed) -> Decision {
    let plan = match &o.plan {
        Ok(plan) => plan,
        Err(why) => return invalid_spec(why),
    };
    if matches!(o.previous, Some(Phase::Succeeded | Phase::Failed)) && !o.retry_wanted {
        return finished(o);
    }
    if let Some(why) = name_conflict(o) {
        return conflict(o, why);
    }
    match &o.load {
        Load::NotLoaded { error } => loading(o, plan, error.as_deref()),
        Load::Loaded { .. } if o.retry_wanted => retry(o, plan),
        Load::Loaded { .. } => enriching(o, plan),
    }
}

/// The first planned Job name held by a Job the import does not own.
fn name_conflict(o: &Observed) -> Option<String> {
    std::iter::once(&o.reader)
        .chain(&o.enrichers)
        .find_map(|j| match j {
            Some(JobState::NotOurs { message }) => Some(message.clone()),
            _ => None,
        })
}

/// A Job of a planned name belongs to someone else: fail without touching it.
fn conflict(o: &Observed, why: String) -> Decision {
    let mut d = Decision::new(after_finishing(o));
    d.event = Some(Note {
        warning: true,
        reason: "JobNameConflict",
        note: why.clone(),
    });
    d.report = Some(Report {
        phase: Phase::Failed,
        message: why.clone(),
        conditions: vec![want("Failed", true, "JobNameConflict", why)],
        completed: true,
        reopened: false,
        counts: None,
    });
    d
}

/// The condition reason for a failed Job: `DeadlineExceeded` when its
/// `activeDeadlineSeconds` ran out (the Job controller's `Failed` reason),
/// else `other`.
fn failure_reason<'a>(message: &str, other: &'a str) -> &'a str {
    if message.starts_with("DeadlineExceeded") {
        "DeadlineExceeded"
    } else {
        other
    }
}

/// The `JobsReady` condition: False with the cause while some Job's pods
/// cannot start (missing ServiceAccount, quota, image pull, unschedulable).
fn jobs_ready(o: &Observed) -> Want {
    match &o.jobs_not_ready {
        Some((reason, message)) => want("JobsReady", false, reason, message.clone()),
        None => want("JobsReady", true, "PodsStarted", ""),
    }
}

fn invalid_spec(why: &str) -> Decision {
    let reason = if why.starts_with("podTemplate") {
        "PodTemplateRefused"
    } else {
        "InvalidSpec"
    };
    let mut d = Decision::new(Next::AwaitChange);
    d.report = Some(Report {
        phase: Phase::Failed,
        message: why.into(),
        conditions: vec![want("Failed", true, reason, why)],
        completed: false,
        reopened: false,
        counts: None,
    });
    d
}

fn finished(o: &Observed) -> Decision {
    let Some(ttl) = o.ttl_seconds_after_finished else {
        return Decision::new(Next::AwaitChange);
    };
    let ttl = Duration::from_secs(ttl.max(0) as u64);
    let age = o.finished_for.unwrap_or_default();
    if age >= ttl {
        return Decision::new(Next::DeleteImport);
    }
    Decision::new(Next::Poll((ttl - age).max(Duration::from_secs(1))))
}

/// When to look again at an import that has just finished: when its
/// `ttlSecondsAfterFinished` runs out (Succeeded and Failed alike).
fn after_finishing(o: &Observed) -> Next {
    match o.ttl_seconds_after_finished {
        Some(ttl) => Next::Poll(Duration::from_secs(ttl.max(0) as u64)),
        None => Next::AwaitChange,
    }
}

fn loading(o: &Observed, plan: &ImportPlan, error: Option<&str>) -> Decision {
    let spec = reader_job(plan);
    match &o.reader {
        Some(JobState::Failed { exit, message }) => {
            let why = error.map_or_else(|| message.clone(), str::to_string);
            let reason = if *exit == Some(JobExit::Permanent) {
                "InputUnreadable"
            } else {
                failure_reason(message, "ReaderFailed")
            };
            let mut d = Decision::new(after_finishing(o));
            d.event = Some(Note {
                warning: true,
                reason: "LoadFailed",
                note: why.clone(),
            });
            d.report = Some(Report {
                phase: Phase::Failed,
                message: why.clone(),
                conditions: vec![
                    want("Loaded", false, reason, why.clone()),
                    want("Failed", true, reason, why),
                ],
                completed: true,
                reopened: false,
                counts: None,
            });
            d
        }
        reader => {
            let mut d = Decision::new(Next::Poll(PROGRESS_INTERVAL));
            if reader.is_none() {
                if matches!(o.previous, None | Some(Phase::Pending)) {
                    d.event = Some(Note {
                        warning: false,
                        reason: "Loading",
                        note: format!("reader Job {} started", spec.name),
                    });
                }
                d.create.push((spec.clone(), false));
            }
            d.report = Some(Report {
                phase: Phase::Loading,
                message: format!("reader Job {} is loading the CSV", spec.name),
                conditions: vec![
                    want("Loaded", false, "Loading", "the reader Job is loading the CSV"),
                    jobs_ready(o),
                ],
                completed: false,
                reopened: false,
                counts: None,
            });
            d
        }
    }
}

/// `retryFailed` was bumped: requeue the failed rows and delete the failed
/// enricher Jobs; on the next look ([`enriching`]) those shards get new Jobs,
/// and so does every finished shard that has pending rows again.
fn retry(o: &Observed, plan: &ImportPlan) -> Decision {
    let mut d = Decision::new(Next::Poll(Duration::from_secs(1)));
    for (spec, state) in enricher_jobs(plan).into_iter().zip(&o.enrichers) {
        if matches!(state, Some(JobState::Failed { .. })) {
            d.delete.push(spec.name);
        }
    }
    d.set_quota = true;
    d.requeue_failed = true;
    d.event = Some(Note {
        warning: false,
        reason: "RetryFailed",
        note: "failed coordinates requeued".into(),
    });
    d.report = Some(Report {
        phase: Phase::Enriching,
        message: "failed coordinates requeued".into(),
        conditions: vec![],
        completed: false,
        reopened: true,
        counts: None,
    });
    d
}

/// How the enricher Jobs stand.
#[derive(Default)]
struct Shards {
    /// (what failed, the Job's own message).
    failed: Vec<(String, String)>,
    quota_stopped: usize,
    all_done: bool,
}

fn enriching(o: &Observed, plan: &ImportPlan) -> Decision {
    let mut d = Decision::new(Next::Poll(PROGRESS_INTERVAL));
    d.set_quota = true;
    let shards = act_on_enrichers(o, plan, &mut d);
    let c = &o.counts;
    let loaded = want(
        "Loaded",
        true,
        "Loaded",
        match &o.load {
            Load::Loaded { warnings: Some(w) } => format!(
                "{} rows loaded, {} invalid; {}",
                c.rows_total,
                c.rows_invalid,
                w.replace('\n', "; ")
            ),
            _ => format!("{} rows loaded, {} invalid", c.rows_total, c.rows_invalid),
        },
    );
    let quota = quota_condition(plan, shards.quota_stopped, c.rows_pending);
    if !shards.failed.is_empty() {
        let msg = shards
            .failed
            .iter()
            .map(|(what, _)| what.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        let reason = failure_reason(&shards.failed[0].1, "JobFailed");
        suspend_siblings(o, plan, &mut d);
        if o.jobs_stopping.is_some() && (!d.set_suspend.is_empty() || o.jobs_stopping == Some(true)) {
            // Fail only once the other shards have stopped, so that the
            // final counts are the database's.
            d.next = Next::Poll(Duration::from_secs(1));
            let stopping = format!("{msg}; stopping the other shards before the final counts");
            d.report = Some(report(
                Phase::Enriching,
                stopping.clone(),
                vec![loaded, want("Enriched", false, reason, stopping), quota],
                c,
            ));
            return d;
        }
        d.next = after_finishing(o);
        d.event = Some(Note {
            warning: true,
            reason: "Failed",
            note: msg.clone(),
        });
        d.report = Some(report(
            Phase::Failed,
            msg.clone(),
            vec![
                loaded,
                want("Enriched", false, reason, msg.clone()),
                quota,
                want("Failed", true, reason, msg),
            ],
            c,
        ));
    } else if shards.all_done && c.rows_pending == 0 {
        let msg = format!(
            "{} rows: {} enriched, {} no_match, {} invalid, {} failed",
            c.rows_total, c.rows_enriched, c.rows_no_match, c.rows_invalid, c.rows_failed
        );
        d.next = after_finishing(o);
        d.event = Some(Note {
            warning: false,
            reason: "Succeeded",
            note: msg.clone(),
        });
        let conditions = vec![
            loaded,
            want("Enriched", true, "Enriched", msg.clone()),
            quota,
            rows_failed_condition(c.rows_failed, o.failure_cause.as_deref()),
            want("Failed", false, "Succeeded", ""),
        ];
        d.report = Some(report(Phase::Succeeded, msg, conditions, c));
    } else {
        still_enriching(o, plan, &mut d, loaded, quota, shards.quota_stopped > 0);
    }
    d
}

fn still_enriching(
    o: &Observed,
    plan: &ImportPlan,
    d: &mut Decision,
    loaded: Want,
    quota: Want,
    waiting: bool,
) {
    let c = &o.counts;
    if o.previous != Some(Phase::Enriching) {
        d.event = Some(Note {
            warning: false,
            reason: "Enriching",
            note: format!("{} enricher Jobs started", plan.shards),
        });
    }
    if waiting {
        d.next = Next::Poll(QUOTA_WAIT_INTERVAL);
    }
    let suspended = if o.suspend {
        want(
            "Suspended",
            true,
            "Suspended",
            "enricher Jobs suspended by spec.suspend",
        )
    } else {
        want("Suspended", false, "Running", "")
    };
    let message = format!(
        "{} of {} rows finished",
        c.rows_total - c.rows_pending - c.rows_invalid,
        c.rows_total - c.rows_invalid
    );
    let conditions = vec![
        loaded,
        want("Enriched", false, "Enriching", "enricher Jobs running"),
        suspended,
        quota,
        jobs_ready(o),
    ];
    d.report = Some(report(Phase::Enriching, message, conditions, c));
}

fn report(phase: Phase, message: String, conditions: Vec<Want>, c: &Counts) -> Report {
    let finished = matches!(phase, Phase::Succeeded | Phase::Failed);
    Report {
        phase,
        message,
        conditions,
        completed: finished,
        reopened: false,
        counts: Some(c.clone()),
    }
}

/// Creates, deletes and (un)suspends enricher Jobs into `d`; says how they stand.
fn act_on_enrichers(o: &Observed, plan: &ImportPlan, d: &mut Decision) -> Shards {
    let mut s = Shards {
        all_done: true,
        ..Shards::default()
    };
    for spec in enricher_jobs(plan) {
        let shard = match spec.role {
            crate::plan::Role::Enricher { shard } => shard as usize,
            crate::plan::Role::Reader => continue,
        };
        let pending = o.shard_pending.get(shard).copied().unwrap_or(0);
        match o.enrichers.get(shard).cloned().flatten() {
            None => {
                s.all_done = false;
                d.create.push((spec, o.suspend));
            }
            Some(JobState::Running {
                suspended,
                suspended_by_us,
            }) => {
                s.all_done = false;
                // Suspend for spec.suspend; un-suspend only what we
                // suspended (Kueue owns the suspension of Jobs it holds).
                if (o.suspend && !suspended) || (!o.suspend && suspended_by_us) {
                    d.set_suspend.push((spec.name.clone(), o.suspend));
                }
            }
            Some(JobState::NotOurs { .. }) => s.all_done = false,
            Some(JobState::Succeeded) if pending > 0 => {
                // Its shard has work again (retryFailed): run it again.
                s.all_done = false;
                d.delete.push(spec.name.clone());
            }
            Some(JobState::Succeeded) => {}
            Some(JobState::Failed { exit, message }) => {
                s.all_done = false;
                if o.budget_spent {
                    s.quota_stopped += 1;
                } else if exit == Some(JobExit::QuotaExhausted) {
                    // The budget was raised since this Job stopped: run the shard again.
                    d.delete.push(spec.name.clone());
                } else {
                    s.failed
                        .push((format!("Job {} failed: {message}", spec.name), message));
                }
            }
        }
    }
    s
}

/// One shard failed and fails the import: its running siblings are
/// suspended so they stop calling the API (they can be resumed by
/// `retryFailed`, which re-runs the shards with failed or pending rows).
fn suspend_siblings(o: &Observed, plan: &ImportPlan, d: &mut Decision) {
    d.set_suspend.clear();
    for (spec, state) in enricher_jobs(plan).into_iter().zip(&o.enrichers) {
        if matches!(state, Some(JobState::Running { suspended: false, .. })) {
            d.set_suspend.push((spec.name, true));
        }
    }
}

/// [`ROWS_FAILED`]: how many rows ended `failed` and the most frequent cause.
fn rows_failed_condition(rows_failed: i64, cause: Option<&str>) -> Want {
    if rows_failed == 0 {
        return want(ROWS_FAILED, false, "NoneFailed", "");
    }
    want(
        ROWS_FAILED,
        true,
        "ApiFailed",
        format!(
            "{rows_failed} rows failed: {}; bump spec.retryFailed (local: --retry-failed) to ask them again",
            cause.unwrap_or("unknown cause")
        ),
    )
}

fn quota_condition(plan: &ImportPlan, quota_stopped: usize, rows_pending: i64) -> Want {
    if quota_stopped == 0 {
        return want("QuotaExhausted", false, "WithinBudget", "");
    }
    want(
        "QuotaExhausted",
        true,
        "BudgetSpent",
        format!(
            "request budget of {} spent; {rows_pending} rows pending; raise spec.quota.maxRequests to resume",
            plan.max_requests.unwrap_or(0)
        ),
    )
}

#[cfg(test)]
mod tests;
