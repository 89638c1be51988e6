//! The Kubernetes runtime of the Job plan: a [`JobSpec`] becomes a `batch/v1`
//! Job owned by its `PostcodeImport`, with a deterministic name, so a restarted
//! operator finds the Jobs it created instead of creating them again.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        batch::v1::{
            Job, JobSpec as K8sJobSpec, PodFailurePolicy, PodFailurePolicyOnExitCodesRequirement,
            PodFailurePolicyRule,
        },
        core::v1::{
            Capabilities, Container, EnvVar, EnvVarSource, ObjectFieldSelector, PodSecurityContext, PodSpec,
            PodTemplateSpec, SeccompProfile, SecretKeySelector, SecurityContext,
        },
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{api::ListParams, Api, Client, Resource, ResourceExt};
use pipeline::exit::JobExit;
use postcode_resource::PostcodeImport;

use crate::{
    lifecycle::JobState,
    plan::{JobSpec, Role},
};

/// Label on everything the operator creates.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "postcode-operator");
/// Label naming the import a Job belongs to.
pub const IMPORT_LABEL: &str = "postcodes.dev/import";
/// Labels copied from the import to its Jobs, for Kueue and similar admission controllers.
pub const PASS_THROUGH_LABELS: [&str; 1] = ["kueue.x-k8s.io/queue-name"];

/// How the operator's Jobs are run.
#[derive(Debug, Clone)]
pub struct JobSettings {
    pub image: String,
    pub image_pull_policy: String,
    pub service_account: String,
    /// Secret (in the import's namespace) and key holding the database URL.
    pub database_secret: String,
    pub database_secret_key: String,
    pub rust_log: String,
    /// The egress policy of the Jobs, as `EGRESS_*` variables (pipeline::egress).
    pub egress: EgressSettings,
}

/// What the Jobs may reach (chart values `egress.*`, pipeline::egress): set
/// on every Job as the `EGRESS_*` variables the Job binaries enforce.
#[derive(Debug, Clone, Default)]
pub struct EgressSettings {
    /// Comma-separated CIDRs sources may reach although not public.
    pub allow_source_cidrs: String,
    /// Comma-separated CIDRs refused besides the non-public ranges.
    pub deny_cidrs: String,
    /// Comma-separated allowed API base URLs.
    pub allowed_api_urls: String,
    /// Directory, in the Job pods, offline postcode files must be in ("" = none).
    pub offline_postcodes_dir: String,
}

impl EgressSettings {
    /// The policy these settings give, for the upload API's own checks;
    /// errors on a malformed CIDR.
    pub fn policy(&self) -> Result<pipeline::egress::EgressPolicy, pipeline::egress::EgressError> {
        pipeline::egress::EgressPolicy::parse(
            &self.allow_source_cidrs,
            &self.deny_cidrs,
            &self.allowed_api_urls,
            &self.offline_postcodes_dir,
        )
    }

    fn env(&self) -> Vec<EnvVar> {
        use pipeline::egress::*;
        vec![
            env_value(ENV_POLICY, "enforce"),
            env_value(ENV_ALLOW_CIDRS, self.allow_source_cidrs.clone()),
            env_value(ENV_DENY_CIDRS, self.deny_cidrs.clone()),
            env_value(ENV_ALLOWED_API_URLS, self.allowed_api_urls.clone()),
            env_value(ENV_OFFLINE_DIR, self.offline_postcodes_dir.clone()),
        ]
    }
}

/// The per-import copy of the database Secret, in the import's namespace.
pub fn database_secret_name(import: &PostcodeImport) -> String {
    format!("{}-database", import.name_any())
}

/// Labels of a planned Job of `import` and its pods.
fn labels(spec: &JobSpec, import: &PostcodeImport) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([
        (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
        (IMPORT_LABEL.to_string(), import.name_any()),
    ]);
    match spec.role {
        Role::Reader => {
            labels.insert("postcodes.dev/role".into(), "reader".into());
        }
        Role::Enricher { shard } => {
            labels.insert("postcodes.dev/role".into(), "enricher".into());
            labels.insert("postcodes.dev/shard".into(), shard.to_string());
        }
    }
    for key in PASS_THROUGH_LABELS {
        if let Some(v) = import.labels().get(key) {
            labels.insert(key.to_string(), v.clone());
        }
    }
    labels
}

fn env_value(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

fn env_from(name: &str, source: EnvVarSource) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(source),
        ..EnvVar::default()
    }
}

/// The container's environment: the plan's, then what the Kubernetes runtime
/// adds (the database URL from the Secret, the namespace, status reporting).
fn env(spec: &JobSpec, settings: &JobSettings) -> Vec<EnvVar> {
    let mut env: Vec<EnvVar> = spec.env.iter().map(|(k, v)| env_value(k, v)).collect();
    env.push(env_from(
        "DATABASE_URL",
        EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: settings.database_secret.clone(),
                key: settings.database_secret_key.clone(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        },
    ));
    env.push(env_from(
        "IMPORT_NAMESPACE",
        EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: "metadata.namespace".into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        },
    ));
    env.push(env_value("REPORT_STATUS", "true"));
    env.push(env_value("RUST_LOG", settings.rust_log.clone()));
    env.extend(settings.egress.env());
    env
}

fn container(spec: &JobSpec, import: &PostcodeImport, settings: &JobSettings) -> Container {
    let template = import.spec.pod_template.clone().unwrap_or_default();
    Container {
        name: "job".into(),
        image: Some(settings.image.clone()),
        image_pull_policy: Some(settings.image_pull_policy.clone()),
        command: Some(vec![spec.command.clone()]),
        args: Some(spec.args.clone()),
        env: Some(env(spec, settings)),
        volume_mounts: (!template.volume_mounts.is_empty()).then_some(template.volume_mounts),
        resources: template.resources,
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    }
}

/// The Job's `podFailurePolicy`: the exits the plan fails at once fail the
/// Job without a retry (DESIGN.md: bad input or a spent budget is not fixed
/// by a retry).
fn pod_failure_policy(spec: &JobSpec) -> PodFailurePolicy {
    PodFailurePolicy {
        rules: vec![PodFailurePolicyRule {
            action: "FailJob".into(),
            on_exit_codes: Some(PodFailurePolicyOnExitCodesRequirement {
                operator: "In".into(),
                values: spec.fail_at_once.iter().map(|e| e.code()).collect(),
                container_name: None,
            }),
            on_pod_conditions: None,
        }],
    }
}

fn pod_spec(spec: &JobSpec, import: &PostcodeImport, settings: &JobSettings) -> PodSpec {
    PodSpec {
        restart_policy: Some("Never".into()),
        service_account_name: Some(settings.service_account.clone()),
        // The reader talks to the database only; an enricher writes its
        // shard's progress into the import's status (enricher-job status.rs)
        // and so needs the token (README "Security model").
        automount_service_account_token: Some(matches!(spec.role, Role::Enricher { .. })),
        priority_class_name: import.spec.priority_class_name.clone(),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(65532),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..SeccompProfile::default()
            }),
            ..PodSecurityContext::default()
        }),
        containers: vec![container(spec, import, settings)],
        volumes: import
            .spec
            .pod_template
            .as_ref()
            .map(|t| t.volumes.clone())
            .filter(|v| !v.is_empty()),
        ..PodSpec::default()
    }
}

/// Builds the `batch/v1` Job for a planned Job of `import`.
pub fn job(spec: &JobSpec, import: &PostcodeImport, settings: &JobSettings, suspend: bool) -> Job {
    let labels = labels(spec, import);
    Job {
        metadata: ObjectMeta {
            name: Some(spec.name.clone()),
            namespace: import.namespace(),
            labels: Some(labels.clone()),
            owner_references: Some(vec![import.controller_owner_ref(&()).expect("import has a uid")]),
            ..ObjectMeta::default()
        },
        spec: Some(K8sJobSpec {
            backoff_limit: Some(spec.backoff_limit),
            suspend: Some(suspend),
            pod_failure_policy: Some(pod_failure_policy(spec)),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod_spec(spec, import, settings)),
            },
            ..K8sJobSpec::default()
        }),
        status: None,
    }
}

/// Reads a Job's state from its `spec.suspend` and conditions (`Complete`, `Failed`).
pub fn job_state(job: &Job) -> JobState {
    let conds = job.status.as_ref().and_then(|s| s.conditions.as_ref());
    for c in conds.into_iter().flatten() {
        if c.status == "True" && c.type_ == "Complete" {
            return JobState::Succeeded;
        }
        if c.status == "True" && c.type_ == "Failed" {
            let message = c.message.clone().unwrap_or_default();
            return JobState::Failed {
                exit: exit_of_failed(c.reason.as_deref(), &message),
                message: format!("{}: {message}", c.reason.clone().unwrap_or_default()),
            };
        }
    }
    JobState::Running {
        suspended: job.spec.as_ref().and_then(|s| s.suspend).unwrap_or(false),
    }
}

/// The exit that failed a Job at once through its `podFailurePolicy`: the Job
/// controller's `Failed` condition (reason `PodFailurePolicy`) says "Container
/// … failed with exit code N matching FailJob rule at index I"
/// (pkg/controller/job/pod_failure_policy.go). `None` for other failures.
fn exit_of_failed(reason: Option<&str>, message: &str) -> Option<JobExit> {
    if reason != Some("PodFailurePolicy") {
        return None;
    }
    let rest = message.split("exit code ").nth(1)?;
    let code: i32 = rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()?;
    Some(JobExit::from_code(Some(code)))
}

/// The owner of a Job, as the controller's `owns` relation sees it.
pub fn is_owned_by(job: &Job, import: &PostcodeImport) -> bool {
    job.owner_references()
        .iter()
        .any(|o| Some(&o.uid) == import.meta().uid.as_ref())
}

/// Why the last failed pod of a Job ended, as its container status says (e.g.
/// `pod trips-enricher-0-x7k2p: OOMKilled (exit code 137)`): the Job's own
/// condition only says the backoff limit was reached. None when no pod failed
/// or they cannot be read.
pub async fn last_pod_failure(client: &Client, namespace: &str, job: &str) -> Option<String> {
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), namespace);
    let lp = ListParams::default().labels(&format!("batch.kubernetes.io/job-name={job}"));
    let list = pods.list(&lp).await.ok()?;
    list.items
        .iter()
        .filter_map(|p| {
            let status = p.status.as_ref()?;
            let t = status
                .container_statuses
                .iter()
                .flatten()
                .find_map(|c| c.state.as_ref()?.terminated.clone())
                .filter(|t| t.exit_code != 0)?;
            let mut why = format!(
                "pod {}: {} (exit code {})",
                p.name_any(),
                t.reason.clone().unwrap_or_else(|| "Error".into()),
                t.exit_code
            );
            if let Some(m) = t.message.as_deref().map(str::trim).filter(|m| !m.is_empty()) {
                let m: String = m.chars().take(300).collect();
                why.push_str(&format!(": {m}"));
            }
            Some((t.finished_at.clone().map(|f| f.0), why))
        })
        .max_by_key(|(at, _)| *at)
        .map(|(_, why)| why)
}
