//! Why a Job's pods do not start (issue 11: an import must not sit in
//! `Loading`/`Enriching` forever while its pods cannot be created or run).
//! Read from what the cluster says, as `kubectl describe` shows it:
//!
//! - the Job controller's `FailedCreate` events on the Job (a missing
//!   ServiceAccount, a ResourceQuota or LimitRange refusing the pod, a
//!   PodSecurity violation): pods are not even created;
//! - the pods' `PodScheduled=False` condition (`Unschedulable`: no node fits
//!   the requests, selectors or taints);
//! - the containers' waiting reasons other than the normal start ones
//!   (`ErrImagePull`, `ImagePullBackOff`, `CreateContainerConfigError`, …).
//!
//! Only Jobs with no ready pod, not suspended and not finished are looked at,
//! so a running import costs nothing here.

use k8s_openapi::api::{
    batch::v1::Job,
    core::v1::{Event, Pod},
};
use kube::{api::ListParams, Api, Client, ResourceExt};

/// Waiting reasons of a container that is on its way (not a problem).
const STARTING: [&str; 2] = ["ContainerCreating", "PodInitializing"];

/// Whether `job` is suspended but still has pods running or terminating
/// (the Job controller deletes them on suspension; they may still write).
pub fn suspended_with_pods(job: &Job) -> bool {
    let suspended = job.spec.as_ref().and_then(|s| s.suspend).unwrap_or(false);
    let status = job.status.clone().unwrap_or_default();
    suspended && (status.active.unwrap_or(0) > 0 || status.terminating.unwrap_or(0) > 0)
}

/// Whether `job` should have a running pod and has none ready.
fn should_be_running(job: &Job) -> bool {
    let spec_suspended = job.spec.as_ref().and_then(|s| s.suspend).unwrap_or(false);
    let status = job.status.clone().unwrap_or_default();
    let finished = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.status == "True" && matches!(c.type_.as_str(), "Complete" | "Failed" | "Suspended"));
    !spec_suspended && !finished && status.ready.unwrap_or(0) == 0
}

/// The first reason (condition reason, message) why some of `jobs` has no
/// running pod; `None` when each starts or runs. API errors count as "no
/// reason known" (this only feeds a condition).
pub async fn not_ready<'a>(client: &Client, jobs: impl Iterator<Item = &'a Job>) -> Option<(String, String)> {
    for job in jobs.filter(|j| should_be_running(j)) {
        let ns = job.namespace().unwrap_or_default();
        let name = job.name_any();
        if let Some(why) = pod_problem(client, &ns, &name).await {
            return Some(why);
        }
        if let Some(why) = failed_create(client, &ns, &name).await {
            return Some(why);
        }
    }
    None
}

/// The latest `FailedCreate` event of the Job `name`.
async fn failed_create(client: &Client, ns: &str, name: &str) -> Option<(String, String)> {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default().fields(&format!(
        "involvedObject.kind=Job,involvedObject.name={name},reason=FailedCreate"
    ));
    let latest = events
        .list(&lp)
        .await
        .ok()?
        .items
        .into_iter()
        .max_by_key(|e| e.last_timestamp.as_ref().map(|t| t.0))?;
    let msg = latest.message.unwrap_or_default();
    Some((
        "FailedCreate".into(),
        format!("Job {name} cannot create its pod: {msg}"),
    ))
}

/// Why a pod of the Job `name` cannot be scheduled or its container started.
async fn pod_problem(client: &Client, ns: &str, name: &str) -> Option<(String, String)> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default().labels(&format!("batch.kubernetes.io/job-name={name}"));
    let list = pods.list(&lp).await.ok()?;
    list.items.iter().find_map(|p| {
        let status = p.status.as_ref()?;
        let unschedulable = status.conditions.iter().flatten().find(|c| {
            c.type_ == "PodScheduled" && c.status == "False" && c.reason.as_deref() == Some("Unschedulable")
        });
        if let Some(c) = unschedulable {
            let msg = c.message.clone().unwrap_or_default();
            return Some((
                "Unschedulable".into(),
                format!("pod {} of Job {name} cannot be scheduled: {msg}", p.name_any()),
            ));
        }
        status.container_statuses.iter().flatten().find_map(|c| {
            let w = c.state.as_ref()?.waiting.as_ref()?;
            let reason = w.reason.clone().filter(|r| !STARTING.contains(&r.as_str()))?;
            let msg = w.message.clone().unwrap_or_default();
            Some((
                reason.clone(),
                format!("pod {} of Job {name}: {reason}: {msg}", p.name_any()),
            ))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_jobs_without_a_ready_pod_that_should_run_are_looked_at() {
        let job = |spec: serde_json::Value, status: serde_json::Value| -> Job {
            serde_json::from_value(json!({"metadata": {"name": "j"}, "spec": spec, "status": status}))
                .unwrap()
        };
        let t = json!({"template": {}});
        assert!(should_be_running(&job(t.clone(), json!({}))));
        assert!(should_be_running(&job(
            t.clone(),
            json!({"active": 1, "ready": 0})
        )));
        assert!(!should_be_running(&job(
            t.clone(),
            json!({"active": 1, "ready": 1})
        )));
        assert!(!should_be_running(&job(
            json!({"template": {}, "suspend": true}),
            json!({})
        )));
        assert!(!should_be_running(&job(
            t,
            json!({"conditions": [{"type": "Complete", "status": "True"}]})
        )));
    }
}
