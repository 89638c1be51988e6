//! The Kubernetes runtime of the Job plan: a [`JobSpec`] becomes a `batch/v1`
//! Job owned by its `PostcodeImport`, with a deterministic name, so a restarted
//! operator finds the Jobs it created instead of creating them again.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        batch::v1::{
            Job, JobSpec as K8sJobSpec, PodFailurePolicy, PodFailurePolicyOnExitCodesRequirement,
            PodFailurePolicyOnPodConditionsPattern, PodFailurePolicyRule,
        },
        core::v1::{
            Capabilities, Container, EnvVar, EnvVarSource, KeyToPath, ObjectFieldSelector,
            PodSecurityContext, PodSpec, PodTemplateSpec, ResourceRequirements, SeccompProfile,
            SecretKeySelector, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
        },
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{api::ListParams, Api, Client, Resource, ResourceExt};
use pipeline::exit::JobExit;
use postcode_resource::{PodTemplate, PostcodeImport};

use crate::{
    lifecycle::JobState,
    plan::{JobSpec, Role},
};

/// Label on everything the operator creates.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "postcode-operator");
/// Label naming the import a Job belongs to (its name, cut to 63 characters
/// with a hash of its uid when longer: [`crate::plan::fitted_name`]). For
/// people and `kubectl`; the operator finds its Jobs by name and owner.
pub const IMPORT_LABEL: &str = "postcodes.dev/import";
/// Label holding the import's uid on its Jobs and their pods: how the
/// operator finds them when the import is deleted (a uid always fits a label
/// value; a name may not).
pub const IMPORT_UID_LABEL: &str = "postcodes.dev/import-uid";
/// Annotation the operator puts on a Job it suspended (for `spec.suspend`):
/// it un-suspends only such Jobs, so a Job suspended by an admission
/// controller (Kueue creates its Jobs suspended and releases them when
/// admitted) is left to it.
pub const SUSPENDED_BY_OPERATOR: &str = "postcodes.dev/suspended-by-operator";
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
    /// Chart defaults and bounds of the Job pods.
    pub pods: PodSettings,
    /// The database server's CA, when the operator has one (chart value `database.tls`).
    pub database_ca: Option<DatabaseCa>,
}

/// What the cluster admin sets for every Job pod (chart values `jobPods.*`).
#[derive(Debug, Clone, Default)]
pub struct PodSettings {
    /// Container resources of reader pods when the import's template sets none.
    pub reader_resources: Option<ResourceRequirements>,
    /// Container resources of enricher pods when the import's template sets none.
    pub enricher_resources: Option<ResourceRequirements>,
    /// Volumes an import's template may add: `kind` or `kind/name` entries,
    /// `*` for any name (e.g. `persistentVolumeClaim/nspl`, `configMap/*`,
    /// `emptyDir`); `kind` is the Volume field name. `hostPath` never.
    pub allowed_volumes: Vec<String>,
}

impl PodSettings {
    /// Checks an import's pod template against the allowlist; the error says
    /// which volume and what is allowed.
    pub fn check(&self, template: &PodTemplate) -> Result<(), String> {
        for (i, v) in template.volumes.iter().enumerate() {
            let (kind, name) = volume_kind_and_name(v);
            let allowed = kind != "hostPath"
                && self.allowed_volumes.iter().any(|a| {
                    let (k, n) = a.split_once('/').unwrap_or((a.as_str(), "*"));
                    k == kind && (n == "*" || Some(n) == name.as_deref())
                });
            if !allowed {
                let what = match &name {
                    Some(n) => format!("{kind}/{n}"),
                    None => kind,
                };
                return Err(format!(
                    "podTemplate.volumes[{i}] ({what}) is not allowed in this cluster; allowed: {} \
                     (chart value jobPods.allowedVolumes)",
                    if self.allowed_volumes.is_empty() {
                        "none".to_string()
                    } else {
                        self.allowed_volumes.join(", ")
                    }
                ));
            }
        }
        Ok(())
    }
}

/// A Volume's source kind (its field name, e.g. `persistentVolumeClaim`) and
/// the name of what it mounts when it names one (claim, ConfigMap, Secret).
fn volume_kind_and_name(v: &Volume) -> (String, Option<String>) {
    let json = serde_json::to_value(v).unwrap_or_default();
    let kind = json
        .as_object()
        .and_then(|o| o.keys().find(|k| *k != "name").cloned())
        .unwrap_or_else(|| "emptyDir".into());
    let name = match kind.as_str() {
        "persistentVolumeClaim" => json.pointer("/persistentVolumeClaim/claimName"),
        "configMap" => json.pointer("/configMap/name"),
        "secret" => json.pointer("/secret/secretName"),
        _ => None,
    };
    (kind, name.and_then(|n| n.as_str()).map(str::to_string))
}

/// The CA that signed the database server's certificate (chart value
/// `database.tls.caSecret`, mounted in the operator at `path`, which is its
/// `PGSSLROOTCERT`). The operator copies it into each import's database
/// Secret (key [`DATABASE_CA_KEY`]); the Job pods mount it at the same path
/// and get the same `PGSSLROOTCERT` and `PGSSLMODE`, so a URL that names
/// `sslrootcert` works in both.
#[derive(Debug, Clone)]
pub struct DatabaseCa {
    pub pem: Vec<u8>,
    pub path: String,
    pub sslmode: Option<String>,
}

/// Key of the CA in the per-import database Secret.
pub const DATABASE_CA_KEY: &str = "ca.crt";
const DATABASE_CA_VOLUME: &str = "database-ca";

impl DatabaseCa {
    /// The directory mounted and the file name in it.
    fn dir_and_file(&self) -> (String, String) {
        let p = std::path::Path::new(&self.path);
        let dir = p
            .parent()
            .map(|d| d.display().to_string())
            .filter(|d| !d.is_empty());
        let file = p.file_name().map(|f| f.to_string_lossy().into_owned());
        (
            dir.unwrap_or_else(|| "/etc/postcode-operator/database-ca".into()),
            file.unwrap_or_else(|| DATABASE_CA_KEY.into()),
        )
    }
}

/// The Job pod's volume holding the database CA (from the per-import Secret).
fn database_ca_volume(settings: &JobSettings) -> Option<Volume> {
    let ca = settings.database_ca.as_ref()?;
    Some(Volume {
        name: DATABASE_CA_VOLUME.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(settings.database_secret.clone()),
            items: Some(vec![KeyToPath {
                key: DATABASE_CA_KEY.into(),
                path: ca.dir_and_file().1,
                mode: None,
            }]),
            default_mode: Some(0o444),
            optional: Some(false),
        }),
        ..Volume::default()
    })
}

/// Its mount, at the directory of the operator's `PGSSLROOTCERT`.
fn database_ca_mount(settings: &JobSettings) -> Option<VolumeMount> {
    let ca = settings.database_ca.as_ref()?;
    Some(VolumeMount {
        name: DATABASE_CA_VOLUME.into(),
        mount_path: ca.dir_and_file().0,
        read_only: Some(true),
        ..VolumeMount::default()
    })
}

/// `PGSSLROOTCERT` and `PGSSLMODE` of the Job pods (the URL's own parameters win).
fn database_ca_env(settings: &JobSettings) -> Vec<EnvVar> {
    let Some(ca) = &settings.database_ca else {
        return Vec::new();
    };
    let mut env = vec![env_value("PGSSLROOTCERT", ca.path.clone())];
    env.extend(ca.sslmode.iter().map(|m| env_value("PGSSLMODE", m.clone())));
    env
}

/// `base` (the import's own) plus the database CA's, `None` when empty.
fn with_database_ca<T>(mut base: Vec<T>, extra: Option<T>) -> Option<Vec<T>> {
    base.extend(extra);
    (!base.is_empty()).then_some(base)
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

/// The [`IMPORT_LABEL`] value of `import`: its name when it fits a label value.
pub fn import_label_value(import: &PostcodeImport) -> String {
    crate::plan::fitted_name(&import.name_any(), &import.uid().unwrap_or_default(), "")
}

/// Labels of a planned Job of `import` and its pods.
fn labels(spec: &JobSpec, import: &PostcodeImport) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([
        (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
        (IMPORT_LABEL.to_string(), import_label_value(import)),
        (IMPORT_UID_LABEL.to_string(), import.uid().unwrap_or_default()),
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
    env.extend(database_ca_env(settings));
    env
}

fn container(spec: &JobSpec, import: &PostcodeImport, settings: &JobSettings) -> Container {
    let template = import.spec.pod_template.clone().unwrap_or_default();
    let default_resources = match spec.role {
        Role::Reader => &settings.pods.reader_resources,
        Role::Enricher { .. } => &settings.pods.enricher_resources,
    };
    Container {
        name: "job".into(),
        image: Some(settings.image.clone()),
        image_pull_policy: Some(settings.image_pull_policy.clone()),
        command: Some(vec![spec.command.clone()]),
        args: Some(spec.args.clone()),
        env: Some(env(spec, settings)),
        volume_mounts: with_database_ca(template.volume_mounts, database_ca_mount(settings)),
        resources: template.resources.or_else(|| default_resources.clone()),
        // The pod's failure says why (the Job binaries write their last
        // error there; the logs' tail when they could not).
        termination_message_policy: Some("FallbackToLogsOnError".into()),
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
/// by a retry); a pod ended by a disruption (eviction, preemption, node
/// drain: the `DisruptionTarget` condition) is retried without counting
/// against `backoffLimit` (Kubernetes "Handling retriable and non-retriable
/// pod failures with Pod failure policy").
fn pod_failure_policy(spec: &JobSpec) -> PodFailurePolicy {
    PodFailurePolicy {
        rules: vec![
            PodFailurePolicyRule {
                action: "Ignore".into(),
                on_exit_codes: None,
                on_pod_conditions: Some(vec![PodFailurePolicyOnPodConditionsPattern {
                    type_: "DisruptionTarget".into(),
                    status: "True".into(),
                }]),
            },
            PodFailurePolicyRule {
                action: "FailJob".into(),
                on_exit_codes: Some(PodFailurePolicyOnExitCodesRequirement {
                    operator: "In".into(),
                    values: spec.fail_at_once.iter().map(|e| e.code()).collect(),
                    container_name: None,
                }),
                on_pod_conditions: None,
            },
        ],
    }
}

fn pod_spec(spec: &JobSpec, import: &PostcodeImport, settings: &JobSettings) -> PodSpec {
    let t = import.spec.pod_template.clone().unwrap_or_default();
    PodSpec {
        restart_policy: Some("Never".into()),
        service_account_name: Some(settings.service_account.clone()),
        // The reader talks to the database only; an enricher writes its
        // shard's progress into the import's status (enricher-job status.rs)
        // and so needs the token (README "Security model").
        automount_service_account_token: Some(matches!(spec.role, Role::Enricher { .. })),
        priority_class_name: t
            .priority_class_name
            .or_else(|| import.spec.priority_class_name.clone()),
        node_selector: (!t.node_selector.is_empty()).then_some(t.node_selector),
        tolerations: some_vec(t.tolerations),
        affinity: t.affinity,
        image_pull_secrets: some_vec(t.image_pull_secrets),
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
        volumes: with_database_ca(t.volumes, database_ca_volume(settings)),
        ..PodSpec::default()
    }
}

/// `Some(v)` unless `v` is empty (absent rather than `[]` in the pod spec).
fn some_vec<T>(v: Vec<T>) -> Option<Vec<T>> {
    (!v.is_empty()).then_some(v)
}

/// Pod labels and annotations: the template's, then ours (ours win).
fn pod_metadata(import: &PostcodeImport, labels: &BTreeMap<String, String>) -> ObjectMeta {
    let t = import.spec.pod_template.clone().unwrap_or_default();
    let mut all = t.labels;
    all.extend(labels.clone());
    ObjectMeta {
        labels: Some(all),
        annotations: (!t.annotations.is_empty()).then_some(t.annotations),
        ..ObjectMeta::default()
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
            annotations: suspend
                .then(|| BTreeMap::from([(SUSPENDED_BY_OPERATOR.to_string(), "true".to_string())])),
            owner_references: Some(vec![import.controller_owner_ref(&()).expect("import has a uid")]),
            ..ObjectMeta::default()
        },
        spec: Some(K8sJobSpec {
            backoff_limit: Some(spec.backoff_limit),
            suspend: Some(suspend),
            pod_failure_policy: Some(pod_failure_policy(spec)),
            active_deadline_seconds: import.spec.active_deadline_seconds,
            template: PodTemplateSpec {
                metadata: Some(pod_metadata(import, &labels)),
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
    let suspended = job.spec.as_ref().and_then(|s| s.suspend).unwrap_or(false);
    JobState::Running {
        suspended,
        suspended_by_us: suspended && job.annotations().contains_key(SUSPENDED_BY_OPERATOR),
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

/// Whether `import` is the Job's controller owner: only such Jobs are
/// adopted, changed or deleted (a Job of the same name made by someone else
/// is left alone and fails the import with `JobNameConflict`).
pub fn is_owned_by(job: &Job, import: &PostcodeImport) -> bool {
    job.owner_references()
        .iter()
        .any(|o| o.controller == Some(true) && Some(&o.uid) == import.meta().uid.as_ref())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{enricher_job, reader_job};
    use serde_json::json;

    fn import(spec: serde_json::Value) -> PostcodeImport {
        serde_json::from_value(json!({
            "apiVersion": "postcodes.dev/v1alpha1", "kind": "PostcodeImport",
            "metadata": {"name": "trips", "namespace": "a", "uid": "u-1"},
            "spec": spec,
        }))
        .unwrap()
    }

    fn settings() -> JobSettings {
        JobSettings {
            image: "img".into(),
            image_pull_policy: "IfNotPresent".into(),
            service_account: "postcode-operator-job".into(),
            database_secret: "trips-database".into(),
            database_secret_key: "url".into(),
            rust_log: "info".into(),
            egress: EgressSettings::default(),
            pods: PodSettings {
                reader_resources: serde_json::from_value(json!({"requests": {"memory": "64Mi"}})).ok(),
                enricher_resources: serde_json::from_value(json!({"requests": {"memory": "256Mi"}})).ok(),
                allowed_volumes: vec![
                    "persistentVolumeClaim/nspl".into(),
                    "configMap/*".into(),
                    "emptyDir".into(),
                ],
            },
            database_ca: None,
        }
    }

    fn jobs_of(imp: &PostcodeImport) -> Vec<Job> {
        let plan = crate::controller::plan_for(imp).unwrap();
        let s = settings();
        vec![
            job(&reader_job(&plan), imp, &s, false),
            job(&enricher_job(&plan, 0), imp, &s, false),
        ]
    }

    /// Every field of `spec.podTemplate` reaches the reader's and the
    /// enricher's pod template verbatim; the ServiceAccount stays the chart's.
    #[test]
    fn every_pod_template_field_reaches_every_job_pod() {
        let template = json!({
            "labels": {"team": "geo", "postcodes.dev/role": "mine"},
            "annotations": {"cost-centre": "42"},
            "volumes": [{"name": "nspl", "persistentVolumeClaim": {"claimName": "nspl"}}],
            "volumeMounts": [{"name": "nspl", "mountPath": "/data"}],
            "resources": {"requests": {"cpu": "2", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
            "nodeSelector": {"disk": "ssd"},
            "tolerations": [{"key": "batch", "operator": "Exists", "effect": "NoSchedule"}],
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}},
            "imagePullSecrets": [{"name": "registry"}],
            "priorityClassName": "batch-low",
        });
        let imp = import(
            json!({"source": {"uploadId": "x"}, "podTemplate": template, "activeDeadlineSeconds": 600}),
        );
        for j in jobs_of(&imp) {
            let spec = j.spec.unwrap();
            assert_eq!(spec.active_deadline_seconds, Some(600));
            let pod = serde_json::to_value(&spec.template).unwrap();
            for key in [
                "volumes",
                "nodeSelector",
                "tolerations",
                "affinity",
                "imagePullSecrets",
                "priorityClassName",
            ] {
                assert_eq!(pod["spec"][key], template[key], "{key}");
            }
            assert_eq!(pod["spec"]["serviceAccountName"], "postcode-operator-job");
            assert_eq!(pod["spec"]["containers"][0]["resources"], template["resources"]);
            assert_eq!(
                pod["spec"]["containers"][0]["volumeMounts"],
                template["volumeMounts"]
            );
            assert_eq!(pod["metadata"]["annotations"], template["annotations"]);
            assert_eq!(pod["metadata"]["labels"]["team"], "geo");
            assert_ne!(
                pod["metadata"]["labels"]["postcodes.dev/role"], "mine",
                "ours win"
            );
        }
    }

    /// Without resources in the template, the chart's defaults per role.
    #[test]
    fn pods_get_the_chart_resources_when_the_import_sets_none() {
        let imp = import(json!({"source": {"uploadId": "x"}}));
        let mem: Vec<_> = jobs_of(&imp)
            .into_iter()
            .map(|j| {
                let pod = serde_json::to_value(j.spec.unwrap().template).unwrap();
                pod["spec"]["containers"][0]["resources"]["requests"]["memory"].clone()
            })
            .collect();
        assert_eq!(mem, [json!("64Mi"), json!("256Mi")]);
    }

    #[test]
    fn volumes_outside_the_allowlist_are_refused_with_what_is_allowed() {
        let check = |v: serde_json::Value| {
            let t: PodTemplate = serde_json::from_value(json!({"volumes": [v]})).unwrap();
            settings().pods.check(&t)
        };
        assert!(check(json!({"name": "a", "persistentVolumeClaim": {"claimName": "nspl"}})).is_ok());
        assert!(check(json!({"name": "a", "configMap": {"name": "anything"}})).is_ok());
        assert!(check(json!({"name": "a", "emptyDir": {}})).is_ok());
        for (v, what) in [
            (
                json!({"name": "a", "persistentVolumeClaim": {"claimName": "other"}}),
                "persistentVolumeClaim/other",
            ),
            (json!({"name": "a", "secret": {"secretName": "db"}}), "secret/db"),
            (json!({"name": "a", "hostPath": {"path": "/"}}), "hostPath"),
        ] {
            let err = check(v).unwrap_err();
            assert!(
                err.contains(&format!("podTemplate.volumes[0] ({what}) is not allowed"))
                    && err.contains("jobPods.allowedVolumes"),
                "{err}"
            );
        }
        let mut anything = settings().pods;
        anything.allowed_volumes = vec!["hostPath".into()];
        let t: PodTemplate =
            serde_json::from_value(json!({"volumes": [{"name": "a", "hostPath": {"path": "/"}}]})).unwrap();
        assert!(anything.check(&t).is_err(), "hostPath never, even when listed");
    }

    /// Evictions and preemption (`DisruptionTarget`) do not use up retries.
    #[test]
    fn disruptions_are_ignored_by_the_pod_failure_policy() {
        let imp = import(json!({"source": {"uploadId": "x"}}));
        for j in jobs_of(&imp) {
            let p = serde_json::to_value(j.spec.unwrap().pod_failure_policy).unwrap();
            assert_eq!(p["rules"][0]["action"], "Ignore");
            assert_eq!(p["rules"][0]["onPodConditions"][0]["type"], "DisruptionTarget");
            assert_eq!(p["rules"][1]["action"], "FailJob");
        }
    }

    #[test]
    fn a_long_import_name_gives_valid_labels() {
        let mut imp = import(json!({"source": {"uploadId": "x"}}));
        imp.metadata.name = Some("n".repeat(120));
        for j in jobs_of(&imp) {
            assert!(j.metadata.name.as_ref().unwrap().len() <= 63);
            for v in j.metadata.labels.unwrap().values() {
                assert!(v.len() <= 63, "{v}");
            }
        }
    }

    fn settings_with_ca(database_ca: Option<DatabaseCa>) -> JobSettings {
        JobSettings {
            image: "img".into(),
            image_pull_policy: "IfNotPresent".into(),
            service_account: "sa".into(),
            database_secret: "t-database".into(),
            database_secret_key: "url".into(),
            rust_log: "info".into(),
            egress: EgressSettings::default(),
            pods: PodSettings::default(),
            database_ca,
        }
    }

    fn pod(settings: &JobSettings) -> PodSpec {
        let imp: PostcodeImport = serde_json::from_value(serde_json::json!({
            "apiVersion": "postcodes.dev/v1alpha1", "kind": "PostcodeImport",
            "metadata": {"name": "t", "namespace": "n", "uid": "u1"},
            "spec": {"source": {"url": "https://example.com/x.csv"}},
        }))
        .unwrap();
        let plan = crate::controller::plan_for(&imp).unwrap();
        let j = job(&crate::plan::reader_job(&plan), &imp, settings, false);
        j.spec.unwrap().template.spec.unwrap()
    }

    #[test]
    fn the_database_ca_is_mounted_at_the_operators_path_from_the_import_secret() {
        let ca = DatabaseCa {
            pem: b"pem".to_vec(),
            path: "/etc/postcode-operator/database-ca/ca.crt".into(),
            sslmode: Some("verify-full".into()),
        };
        let p = pod(&settings_with_ca(Some(ca)));
        let vol = p
            .volumes
            .unwrap()
            .into_iter()
            .find(|v| v.name == DATABASE_CA_VOLUME)
            .unwrap();
        let secret = vol.secret.unwrap();
        assert_eq!(secret.secret_name.as_deref(), Some("t-database"));
        let item = &secret.items.unwrap()[0];
        assert_eq!(
            (item.key.as_str(), item.path.as_str()),
            (DATABASE_CA_KEY, "ca.crt")
        );
        let c = &p.containers[0];
        let mount = c
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.name == DATABASE_CA_VOLUME)
            .unwrap();
        assert_eq!(mount.mount_path, "/etc/postcode-operator/database-ca");
        let env: BTreeMap<_, _> = c
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.as_str(), e.value.clone()))
            .collect();
        assert_eq!(
            env["PGSSLROOTCERT"].as_deref(),
            Some("/etc/postcode-operator/database-ca/ca.crt")
        );
        assert_eq!(env["PGSSLMODE"].as_deref(), Some("verify-full"));

        let p = pod(&settings_with_ca(None));
        assert!(p.volumes.is_none() && p.containers[0].volume_mounts.is_none());
        assert!(p.containers[0]
            .env
            .iter()
            .flatten()
            .all(|e| !e.name.starts_with("PGSSL")));
    }
}
