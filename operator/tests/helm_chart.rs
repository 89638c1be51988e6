//! Tests of the Helm chart `charts/postcode-operator`: `helm lint`, properties
//! of what `helm template` renders (security contexts, RBAC, the operator's env
//! contract, Secrets never in plain env), a server-side dry run of the rendered
//! manifests against the test API server, and the RBAC the chart grants,
//! checked by the API server's own authorizer (SubjectAccessReviews).
//!
//! Needs helm (`HELM`, or `<repo>/.cache/bin/helm` built by
//! `.ci/install-tools.sh`) and, for the API server tests, `KUBECONFIG` pointing
//! at the test control plane (`make test` starts one). Nothing is skipped: a
//! missing tool or control plane fails the test with what to do.
#![allow(clippy::too_many_lines)] // the 80-line limit is for non-test code

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use k8s_openapi::api::core::v1::Secret;
use serde::Deserialize;
use serde_yaml::Value;

// ---------------------------------------------------------------- tools

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn chart_dir() -> PathBuf {
    repo().join("charts/postcode-operator")
}

fn helm() -> PathBuf {
    let p = match std::env::var_os("HELM") {
        Some(h) => PathBuf::from(h),
        None => repo().join(".cache/bin/helm"),
    };
    assert!(
        p.is_file(),
        "helm not found at {} (set HELM, or build it with `.ci/install-tools.sh`, which puts it in <repo>/.cache/bin)",
        p.display()
    );
    p
}

fn kubectl() -> PathBuf {
    PathBuf::from(std::env::var_os("KUBECTL").unwrap_or_else(|| "kubectl".into()))
}

/// The test control plane's kubeconfig; fails (never skips) without one.
fn kubeconfig() -> String {
    match std::env::var("KUBECONFIG") {
        Ok(k) if !k.is_empty() => {
            assert!(Path::new(&k).is_file(), "KUBECONFIG={k} does not exist: is the test control plane running?");
            k
        }
        _ => panic!(
            "KUBECONFIG is not set: this test needs the test Kubernetes API server. Run `make test` \
             (it starts the control plane), or `.ci/controlplane.sh start DIR` and export KUBECONFIG=DIR/kubeconfig"
        ),
    }
}

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn run(cmd: &mut Command, stdin: Option<&str>) -> Run {
    let desc = format!("{cmd:?}");
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run {desc}: {e}"));
    if let Some(input) = stdin {
        let mut w = child.stdin.take().unwrap();
        let input = input.to_owned();
        // Write from a thread so a child that fills its stdout cannot deadlock us.
        std::thread::spawn(move || w.write_all(input.as_bytes()));
    }
    let out = child.wait_with_output().unwrap();
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn helm_cmd() -> Command {
    let mut c = Command::new(helm());
    // Rendering must not depend on (or touch) whatever cluster the caller has.
    c.env_remove("KUBECONFIG");
    c
}

fn set_args(sets: &[&str]) -> Vec<String> {
    sets.iter()
        .flat_map(|s| ["--set".to_string(), s.to_string()])
        .collect()
}

/// `helm lint --strict` with the given `--set`s; asserts success and no
/// warnings or errors.
fn lint(sets: &[&str]) {
    let r = run(
        helm_cmd()
            .arg("lint")
            .arg("--strict")
            .arg(chart_dir())
            .args(set_args(sets)),
        None,
    );
    let all = format!("{}{}", r.stdout, r.stderr);
    assert!(r.ok, "helm lint {sets:?} failed:\n{all}");
    let bad: Vec<&str> = all
        .lines()
        .filter(|l| l.contains("[WARNING]") || l.contains("[ERROR]"))
        .collect();
    assert!(
        bad.is_empty(),
        "helm lint {sets:?} reported problems:\n{}",
        bad.join("\n")
    );
    assert!(
        all.contains("1 chart(s) linted, 0 chart(s) failed"),
        "unexpected helm lint output:\n{all}"
    );
}

/// `helm template` output as a string.
fn template_raw(release: &str, ns: &str, sets: &[&str], extra: &[&str]) -> Result<String, String> {
    let r = run(
        helm_cmd()
            .arg("template")
            .arg(release)
            .arg(chart_dir())
            .args(["--namespace", ns])
            .args(extra)
            .args(set_args(sets)),
        None,
    );
    if r.ok {
        Ok(r.stdout)
    } else {
        Err(r.stderr)
    }
}

fn parse_docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| {
            Value::deserialize(d).unwrap_or_else(|e| panic!("rendered YAML does not parse: {e}\n{yaml}"))
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// Rendered manifests (hooks included, CRDs not) as YAML values.
fn template(release: &str, ns: &str, sets: &[&str]) -> Vec<Value> {
    let yaml = template_raw(release, ns, sets, &[])
        .unwrap_or_else(|e| panic!("helm template {sets:?} failed:\n{e}"));
    parse_docs(&yaml)
}

// ---------------------------------------------------------------- YAML access

static NULL: Value = Value::Null;

fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.')
        .filter(|k| !k.is_empty())
        .fold(v, |v, k| v.get(k).unwrap_or(&NULL))
}

fn s<'a>(v: &'a Value, path: &str) -> &'a str {
    at(v, path).as_str().unwrap_or("")
}

fn seq<'a>(v: &'a Value, path: &str) -> &'a [Value] {
    at(v, path).as_sequence().map(|s| s.as_slice()).unwrap_or(&[])
}

fn kind(v: &Value) -> &str {
    s(v, "kind")
}

fn name(v: &Value) -> &str {
    s(v, "metadata.name")
}

fn namespace(v: &Value) -> &str {
    s(v, "metadata.namespace")
}

fn id(v: &Value) -> String {
    format!("{} {}/{}", kind(v), namespace(v), name(v))
}

fn all<'a>(docs: &'a [Value], k: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| kind(d) == k).collect()
}

fn find<'a>(docs: &'a [Value], k: &str, ns: &str, n: &str) -> Option<&'a Value> {
    docs.iter()
        .find(|d| kind(d) == k && name(d) == n && namespace(d) == ns)
}

fn get<'a>(docs: &'a [Value], k: &str, ns: &str, n: &str) -> &'a Value {
    find(docs, k, ns, n).unwrap_or_else(|| {
        panic!(
            "no {k} {ns}/{n} rendered; have: {:?}",
            docs.iter().map(id).collect::<Vec<_>>()
        )
    })
}

fn is_hook(v: &Value) -> bool {
    !hook(v).is_empty()
}

fn hook(v: &Value) -> &str {
    at(v, "metadata.annotations")
        .get("helm.sh/hook")
        .and_then(|h| h.as_str())
        .unwrap_or("")
}

fn hook_weight(v: &Value) -> i64 {
    at(v, "metadata.annotations")
        .get("helm.sh/hook-weight")
        .and_then(|h| h.as_str())
        .map(|w| w.parse().unwrap())
        .unwrap_or(0)
}

/// Pod specs of the workloads (Deployment, StatefulSet, Job, DaemonSet).
fn pod_specs(docs: &[Value]) -> Vec<(&Value, &Value)> {
    docs.iter()
        .filter(|d| {
            matches!(
                kind(d),
                "Deployment" | "StatefulSet" | "Job" | "DaemonSet" | "ReplicaSet"
            )
        })
        .map(|d| (d, at(d, "spec.template.spec")))
        .collect()
}

fn containers(pod: &Value) -> Vec<&Value> {
    seq(pod, "containers")
        .iter()
        .chain(seq(pod, "initContainers"))
        .collect()
}

fn env_of(c: &Value) -> BTreeMap<String, Value> {
    seq(c, "env")
        .iter()
        .map(|e| (s(e, "name").to_string(), e.clone()))
        .collect()
}

fn env_value<'a>(env: &'a BTreeMap<String, Value>, k: &str) -> &'a str {
    let e = env
        .get(k)
        .unwrap_or_else(|| panic!("env {k} missing; have {:?}", env.keys().collect::<Vec<_>>()));
    e.get("value")
        .and_then(|v| v.as_str())
        .unwrap_or_else(|| panic!("env {k} has no plain value: {e:?}"))
}

/// The operator Deployment and its container.
fn operator<'a>(docs: &'a [Value], ns: &str, full: &str) -> (&'a Value, &'a Value) {
    let d = get(docs, "Deployment", ns, full);
    let c = seq(d, "spec.template.spec.containers")
        .iter()
        .find(|c| s(c, "name") == "operator")
        .expect("the Deployment has a container named operator");
    (d, c)
}

fn secret_data(doc: &Value) -> BTreeMap<String, Vec<u8>> {
    let sec: Secret =
        serde_yaml::from_value(doc.clone()).unwrap_or_else(|e| panic!("{}: not a Secret: {e}", id(doc)));
    let mut out: BTreeMap<String, Vec<u8>> = sec
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect();
    for (k, v) in sec.string_data.unwrap_or_default() {
        out.insert(k, v.into_bytes());
    }
    out
}

// ---------------------------------------------------------------- RBAC model

type Grant = (String, String, String); // (apiGroup, resource, verb)

fn rules_of(role: &Value) -> BTreeSet<Grant> {
    let mut out = BTreeSet::new();
    for r in seq(role, "rules") {
        assert!(
            at(r, "nonResourceURLs").is_null(),
            "{}: unexpected nonResourceURLs",
            id(role)
        );
        assert!(
            at(r, "resourceNames").is_null() || !seq(r, "resourceNames").is_empty(),
            "{}: empty resourceNames",
            id(role)
        );
        for g in seq(r, "apiGroups") {
            for res in seq(r, "resources") {
                for v in seq(r, "verbs") {
                    let t = (
                        g.as_str().unwrap().to_string(),
                        res.as_str().unwrap().to_string(),
                        v.as_str().unwrap().to_string(),
                    );
                    assert!(
                        !t.0.contains('*') && !t.1.contains('*') && !t.2.contains('*'),
                        "{}: wildcard in {t:?}",
                        id(role)
                    );
                    out.insert(t);
                }
            }
        }
    }
    out
}

fn grants(list: &[(&str, &str, &[&str])]) -> BTreeSet<Grant> {
    list.iter()
        .flat_map(|(g, r, vs)| {
            vs.iter()
                .map(move |v| (g.to_string(), r.to_string(), v.to_string()))
        })
        .collect()
}

/// Everything the rendered bindings grant to ServiceAccount `ns/sa`, by the
/// namespace the grant applies in (`*` = cluster-wide).
fn grants_of_sa(docs: &[Value], ns: &str, sa: &str) -> BTreeMap<String, BTreeSet<Grant>> {
    let mut out: BTreeMap<String, BTreeSet<Grant>> = BTreeMap::new();
    for b in docs
        .iter()
        .filter(|d| matches!(kind(d), "RoleBinding" | "ClusterRoleBinding"))
    {
        let bound = seq(b, "subjects").iter().any(|sub| {
            s(sub, "kind") == "ServiceAccount" && s(sub, "name") == sa && s(sub, "namespace") == ns
        });
        if !bound {
            continue;
        }
        let role_kind = s(b, "roleRef.kind");
        let role_ns = if role_kind == "Role" { namespace(b) } else { "" };
        let role = get(docs, role_kind, role_ns, s(b, "roleRef.name"));
        let scope = if kind(b) == "ClusterRoleBinding" {
            "*".to_string()
        } else {
            namespace(b).to_string()
        };
        out.entry(scope).or_default().extend(rules_of(role));
    }
    out
}

// ---------------------------------------------------------------- checks on rendered manifests

const SENSITIVE_ENV: &[&str] = &["DATABASE_URL", "UPLOAD_TOKEN", "POSTGRES_PASSWORD", "PGPASSWORD"];

/// Every container of every workload: non-root, read-only root file system, no
/// privilege escalation, no capabilities, RuntimeDefault seccomp; secrets only
/// through secretKeyRef.
fn check_workloads(docs: &[Value]) {
    let pods = pod_specs(docs);
    assert!(!pods.is_empty(), "no workloads rendered");
    for (w, pod) in pods {
        for c in containers(pod) {
            let what = format!("{} container {}", id(w), s(c, "name"));
            let sc = at(c, "securityContext");
            let psc = at(pod, "securityContext");
            let either = |k: &str| {
                if at(sc, k).is_null() {
                    at(psc, k)
                } else {
                    at(sc, k)
                }
            };
            assert_eq!(
                either("runAsNonRoot").as_bool(),
                Some(true),
                "{what}: runAsNonRoot"
            );
            if let Some(uid) = either("runAsUser").as_i64() {
                assert_ne!(uid, 0, "{what}: runAsUser 0");
            }
            assert_eq!(
                at(sc, "readOnlyRootFilesystem").as_bool(),
                Some(true),
                "{what}: readOnlyRootFilesystem"
            );
            assert_eq!(
                at(sc, "allowPrivilegeEscalation").as_bool(),
                Some(false),
                "{what}: allowPrivilegeEscalation"
            );
            assert_ne!(at(sc, "privileged").as_bool(), Some(true), "{what}: privileged");
            assert!(
                seq(sc, "capabilities.drop")
                    .iter()
                    .any(|v| v.as_str() == Some("ALL")),
                "{what}: capabilities.drop ALL"
            );
            assert!(seq(sc, "capabilities.add").is_empty(), "{what}: capabilities.add");
            assert_eq!(
                s(either("seccompProfile"), "type"),
                "RuntimeDefault",
                "{what}: seccompProfile"
            );
            assert!(
                !at(c, "resources.requests").is_null(),
                "{what}: resources.requests"
            );
            assert!(!s(c, "image").is_empty(), "{what}: image");
            for (k, e) in env_of(c) {
                if SENSITIVE_ENV.contains(&k.as_str()) || k.contains("PASSWORD") || k.contains("TOKEN") {
                    assert!(e.get("value").is_none(), "{what}: {k} has a plain value");
                    assert!(
                        !s(&e, "valueFrom.secretKeyRef.name").is_empty(),
                        "{what}: {k} not from a secretKeyRef: {e:?}"
                    );
                }
            }
        }
        for v in seq(pod, "volumes") {
            assert!(at(v, "hostPath").is_null(), "{}: hostPath volume", id(w));
        }
        assert_ne!(
            at(pod, "hostNetwork").as_bool(),
            Some(true),
            "{}: hostNetwork",
            id(w)
        );
    }
}

/// Namespaced objects carry their namespace explicitly (so the manifests can be
/// applied anywhere), and only into `allowed` namespaces.
fn check_namespaces(docs: &[Value], allowed: &[&str]) {
    const CLUSTER: &[&str] = &[
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "Namespace",
    ];
    for d in docs {
        if CLUSTER.contains(&kind(d)) {
            assert!(
                namespace(d).is_empty(),
                "{}: cluster-scoped with a namespace",
                id(d)
            );
        } else {
            assert!(
                allowed.contains(&namespace(d)),
                "{}: namespace not in {allowed:?}",
                id(d)
            );
        }
    }
}

/// The operator Deployment implements the env contract of the operator binary.
fn check_operator(docs: &[Value], ns: &str, full: &str, replicas: i64) -> BTreeMap<String, Value> {
    let (d, c) = operator(docs, ns, full);
    let pod = at(d, "spec.template.spec");
    assert_eq!(at(d, "spec.replicas").as_i64(), Some(replicas));
    let args: Vec<&str> = seq(c, "args").iter().filter_map(|a| a.as_str()).collect();
    assert_eq!(args, ["run"], "operator args");
    assert!(
        at(c, "command").is_null(),
        "the image's ENTRYPOINT is postcode-operator"
    );
    let port = seq(c, "ports")
        .iter()
        .find(|p| s(p, "name") == "http")
        .expect("port http");
    assert_eq!(at(port, "containerPort").as_i64(), Some(8080));
    let metrics_port = seq(c, "ports")
        .iter()
        .find(|p| s(p, "name") == "metrics")
        .expect("port metrics");
    assert_eq!(at(metrics_port, "containerPort").as_i64(), Some(9090));
    // The probes use the metrics port: the upload port serves only /v1.
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(s(c, &format!("{probe}.httpGet.path")), path, "{probe}");
        let p = at(c, &format!("{probe}.httpGet.port"));
        assert!(
            p.as_str() == Some("metrics") || p.as_i64() == Some(9090),
            "{probe} port {p:?}"
        );
    }
    assert_eq!(s(pod, "securityContext.seccompProfile.type"), "RuntimeDefault");
    // /tmp writable despite the read-only root
    assert!(
        seq(c, "volumeMounts").iter().any(|m| s(m, "mountPath") == "/tmp"),
        "operator /tmp mount"
    );

    let env = env_of(c);
    let db = &env["DATABASE_URL"];
    let db_secret = s(db, "valueFrom.secretKeyRef.name");
    let db_key = s(db, "valueFrom.secretKeyRef.key");
    assert!(
        !db_secret.is_empty() && !db_key.is_empty(),
        "DATABASE_URL from a secretKeyRef: {db:?}"
    );
    assert_eq!(env_value(&env, "DATABASE_SECRET_NAME"), db_secret);
    assert_eq!(env_value(&env, "DATABASE_SECRET_KEY"), db_key);
    assert_eq!(env_value(&env, "LISTEN_ADDR"), "0.0.0.0:8080");
    assert_eq!(env_value(&env, "METRICS_ADDR"), "0.0.0.0:9090");
    assert!(
        ["kubernetes", "token", "none"].contains(&env_value(&env, "UPLOAD_AUTH")),
        "UPLOAD_AUTH"
    );
    assert_eq!(
        env_value(&env, "JOB_IMAGE"),
        s(c, "image"),
        "JOB_IMAGE defaults to the operator's image"
    );
    assert_eq!(env_value(&env, "JOB_IMAGE_PULL_POLICY"), s(c, "imagePullPolicy"));
    assert_eq!(env_value(&env, "MAX_UPLOAD_BYTES"), "2147483648");
    assert_eq!(env_value(&env, "DEFAULT_SHARDS"), "4");
    assert_eq!(env_value(&env, "DEFAULT_QUOTA_RPS"), "5");
    assert_eq!(env_value(&env, "DEFAULT_API_URL"), "https://api.postcodes.io");
    assert!(!env_value(&env, "RUST_LOG").is_empty());
    assert!(!env_value(&env, "JOB_RUST_LOG").is_empty());
    assert!(!env_value(&env, "JOB_SERVICE_ACCOUNT").is_empty());
    for (k, field) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ] {
        assert_eq!(
            s(&env[k], "valueFrom.fieldRef.fieldPath"),
            field,
            "{k} from the downward API"
        );
    }
    let leader = env_value(&env, "LEADER_ELECTION");
    assert_eq!(leader, if replicas > 1 { "true" } else { "false" });
    // Two operators never run at once without leader election.
    if leader == "false" {
        assert_eq!(s(d, "spec.strategy.type"), "Recreate");
    }

    // ServiceAccount and Service wiring.
    let sa = s(pod, "serviceAccountName");
    get(docs, "ServiceAccount", ns, sa);
    let svc = get(docs, "Service", ns, full);
    assert_eq!(s(svc, "spec.type"), "ClusterIP");
    let ports = seq(svc, "spec.ports");
    assert_eq!(ports.len(), 1, "the upload Service exposes the upload port only");
    let sp = &ports[0];
    assert_eq!(
        (s(sp, "name"), at(sp, "port").as_i64(), s(sp, "targetPort")),
        ("http", Some(80), "http")
    );
    let labels = at(d, "spec.template.metadata.labels");
    let sel = at(svc, "spec.selector").as_mapping().expect("service selector");
    assert!(!sel.is_empty());
    for (k, v) in sel {
        assert_eq!(
            labels.get(k),
            Some(v),
            "Service selector {k:?} does not match the pods"
        );
    }
    for (k, v) in at(d, "spec.selector.matchLabels")
        .as_mapping()
        .expect("matchLabels")
    {
        assert_eq!(
            labels.get(k),
            Some(v),
            "Deployment selector {k:?} does not match its pods"
        );
    }
    env
}

/// The operator's RBAC: what the controller, upload API, finalizer, events and
/// leader election need, nothing broader. `watch_scopes` is where the
/// PostcodeImport grants apply (`*` = cluster-wide).
fn check_operator_rbac(docs: &[Value], ns: &str, sa: &str, watch_scopes: &[&str], job_namespaces: &[&str]) {
    let by_scope = grants_of_sa(docs, ns, sa);
    // upload.auth.mode=kubernetes: TokenReviews and SubjectAccessReviews
    // (cluster-scoped), nothing else.
    let (_, c) = operator(docs, ns, sa);
    let kube_auth = env_value(&env_of(c), "UPLOAD_AUTH") == "kubernetes";
    let auth = grants(&[
        ("authentication.k8s.io", "tokenreviews", &["create"]),
        ("authorization.k8s.io", "subjectaccessreviews", &["create"]),
    ]);
    if kube_auth {
        assert!(
            by_scope.get("*").is_some_and(|g| auth.is_subset(g)),
            "kubernetes upload auth needs tokenreviews and subjectaccessreviews: {by_scope:?}"
        );
    }
    // No `update` of imports or their status: the operator only patches them.
    let main = grants(&[
        (
            "postcodes.dev",
            "postcodeimports",
            &["get", "list", "watch", "patch"],
        ),
        ("postcodes.dev", "postcodeimports/status", &["get", "patch"]),
        ("postcodes.dev", "postcodeimports/finalizers", &["update"]),
        (
            "batch",
            "jobs",
            &["get", "list", "watch", "create", "delete", "patch"],
        ),
        ("", "pods", &["list"]),
        // The Job controller's FailedCreate events (JobsReady).
        ("", "events", &["list"]),
        ("events.k8s.io", "events", &["create", "patch"]),
    ]);
    // The upload API creates imports (server-side apply of a new object needs
    // `create`); ttlSecondsAfterFinished deletes them.
    let main_allowed: BTreeSet<Grant> = main
        .union(&grants(&[(
            "postcodes.dev",
            "postcodeimports",
            &["create", "delete"],
        )]))
        .cloned()
        .collect();
    let lease = grants(&[(
        "coordination.k8s.io",
        "leases",
        &["get", "create", "update", "patch"],
    )]);
    // Secret copies are created, never read, patched or deleted, in the Job
    // namespaces; the one Secret read is the database Secret at home, by name
    // (check_named_rbac).
    let secret_create = grants(&[("", "secrets", &["create"])]);
    let secret_get = grants(&[("", "secrets", &["get"])]);
    for scope in watch_scopes {
        let g = by_scope
            .get(*scope)
            .unwrap_or_else(|| panic!("operator has no grants in scope {scope}: {by_scope:?}"));
        let missing: Vec<_> = main.difference(g).collect();
        assert!(missing.is_empty(), "operator lacks {missing:?} in {scope}");
    }
    for jns in job_namespaces {
        assert!(
            secret_create.is_subset(&by_scope[*jns]),
            "operator cannot create Secrets in job namespace {jns}"
        );
    }
    let leases_here = &by_scope[ns];
    assert!(
        lease.is_subset(leases_here),
        "operator lacks lease rights in {ns}"
    );
    assert!(
        secret_get.is_subset(leases_here),
        "operator cannot read its database Secret"
    );
    for (scope, g) in &by_scope {
        // With watchNamespace the imports' grants are bound at home too.
        let mut allowed: BTreeSet<Grant> =
            if scope == "*" || scope == ns || watch_scopes.contains(&scope.as_str()) {
                main_allowed.clone()
            } else {
                BTreeSet::new()
            };
        if job_namespaces.contains(&scope.as_str()) {
            allowed.extend(secret_create.iter().cloned());
        }
        if scope == ns {
            allowed.extend(lease.iter().chain(&secret_get).cloned());
        }
        if scope == "*" && kube_auth {
            allowed.extend(auth.iter().cloned());
        }
        let extra: Vec<_> = g.difference(&allowed).collect();
        assert!(
            extra.is_empty(),
            "operator has more than it needs in {scope}: {extra:?}"
        );
    }
    let scopes: BTreeSet<&str> = by_scope.keys().map(|k| k.as_str()).collect();
    let expected: BTreeSet<&str> = watch_scopes
        .iter()
        .chain(job_namespaces)
        .copied()
        .chain([ns])
        .chain(kube_auth.then_some("*"))
        .collect();
    assert_eq!(scopes, expected, "operator grant scopes");
    check_named_rbac(docs, ns, sa);
}

/// The rules bound to the operator that name their objects: reading Secrets
/// only by the database Secret's name, the Lease only by the release's name
/// (`create` cannot be limited by name).
fn check_named_rbac(docs: &[Value], ns: &str, sa: &str) {
    let full = sa; // the operator's ServiceAccount is named <fullname>
    for b in docs
        .iter()
        .filter(|d| matches!(kind(d), "RoleBinding" | "ClusterRoleBinding"))
    {
        let bound = seq(b, "subjects").iter().any(|sub| {
            s(sub, "kind") == "ServiceAccount" && s(sub, "name") == sa && s(sub, "namespace") == ns
        });
        if !bound {
            continue;
        }
        let role_kind = s(b, "roleRef.kind");
        let role_ns = if role_kind == "Role" { namespace(b) } else { "" };
        let role = get(docs, role_kind, role_ns, s(b, "roleRef.name"));
        for r in seq(role, "rules") {
            let has = |key: &str, v: &str| seq(r, key).iter().any(|x| x.as_str() == Some(v));
            let names: Vec<&str> = if at(r, "resourceNames").is_null() {
                Vec::new()
            } else {
                seq(r, "resourceNames")
                    .iter()
                    .filter_map(|n| n.as_str())
                    .collect()
            };
            if has("resources", "secrets") && !has("verbs", "create") {
                assert_eq!(
                    names,
                    [format!("{full}-database")],
                    "{}: Secrets read by name only",
                    id(role)
                );
            }
            if has("resources", "leases") && !has("verbs", "create") {
                assert_eq!(names, [full], "{}: the Lease named after the release", id(role));
            }
        }
    }
}

/// The Jobs' ServiceAccount exists in each job namespace, bound to a Role that
/// only reads its import and reads/patches its status.
fn check_job_rbac(docs: &[Value], job_sa: &str, job_namespaces: &[&str]) {
    let only = grants(&[
        ("postcodes.dev", "postcodeimports", &["get"]),
        ("postcodes.dev", "postcodeimports/status", &["get", "patch"]),
    ]);
    for ns in job_namespaces {
        get(docs, "ServiceAccount", ns, job_sa);
        let by_scope = grants_of_sa(docs, ns, job_sa);
        let scopes: Vec<&str> = by_scope.keys().map(String::as_str).collect();
        assert_eq!(scopes, [*ns], "job SA in {ns} is bound only in its namespace");
        assert_eq!(by_scope[*ns], only, "job SA grants in {ns}");
    }
    let sa_namespaces: BTreeSet<&str> = all(docs, "ServiceAccount")
        .into_iter()
        .filter(|d| name(d) == job_sa)
        .map(namespace)
        .collect();
    assert_eq!(
        sa_namespaces,
        job_namespaces.iter().copied().collect(),
        "namespaces holding the job ServiceAccount"
    );
}

/// The pre-delete hook deletes every PostcodeImport, with its own SA and RBAC
/// created before it.
fn check_cleanup_hook(docs: &[Value], ns: &str, full: &str) {
    let hook_name = format!("{full}-cleanup");
    let job = get(docs, "Job", ns, &hook_name);
    assert_eq!(hook(job), "pre-delete");
    let pod = at(job, "spec.template.spec");
    let c = &seq(pod, "containers")[0];
    assert!(
        s(c, "image").starts_with("bitnami/kubectl"),
        "cleanup image {}",
        s(c, "image")
    );
    let script = format!("{:?} {:?}", at(c, "command"), at(c, "args"));
    assert!(
        script.contains("kubectl delete postcodeimports --all -A --wait"),
        "cleanup script: {script}"
    );
    let sa = s(pod, "serviceAccountName");
    assert_eq!(sa, hook_name);
    for (k, kns) in [
        ("ServiceAccount", ns),
        ("ClusterRole", ""),
        ("ClusterRoleBinding", ""),
    ] {
        let d = get(docs, k, kns, &hook_name);
        assert_eq!(hook(d), "pre-delete", "{} is a pre-delete hook", id(d));
        assert!(
            hook_weight(d) < hook_weight(job),
            "{} is created before the hook Job",
            id(d)
        );
    }
    let g = grants_of_sa(docs, ns, sa);
    assert_eq!(
        g.get("*"),
        Some(&grants(&[(
            "postcodes.dev",
            "postcodeimports",
            &["get", "list", "watch", "delete"]
        )])),
        "cleanup grants"
    );
    // Hooks only from the cleanup.
    for d in docs.iter().filter(|d| is_hook(d)) {
        assert_eq!(name(d), hook_name, "unexpected hook {}", id(d));
    }
}

// ---------------------------------------------------------------- tests

#[test]
fn chart_crd_is_the_generated_one() {
    let generated = repo().join("crds/postcodeimports.postcodes.dev.yaml");
    let in_chart = chart_dir().join("crds/postcodeimports.postcodes.dev.yaml");
    let a = std::fs::read(&generated).unwrap_or_else(|e| panic!("{}: {e}", generated.display()));
    let b = std::fs::read(&in_chart).unwrap_or_else(|e| panic!("{}: {e}", in_chart.display()));
    assert!(
        a == b,
        "{} differs from {}: copy it (`cp crds/*.yaml charts/postcode-operator/crds/`)",
        in_chart.display(),
        generated.display()
    );
    // --include-crds renders exactly that CRD.
    let docs = parse_docs(&template_raw("t", "default", &[], &["--include-crds"]).unwrap());
    let crd = get(
        &docs,
        "CustomResourceDefinition",
        "",
        "postcodeimports.postcodes.dev",
    );
    assert_eq!(s(crd, "spec.group"), "postcodes.dev");
    assert_eq!(s(crd, "spec.names.kind"), "PostcodeImport");
    assert_eq!(s(crd, "spec.scope"), "Namespaced");
}

#[test]
fn helm_lint_is_clean() {
    lint(&[]);
    lint(&[
        "postgresql.enabled=true",
        "upload.auth.mode=token",
        "upload.auth.token=lint-token",
    ]);
    lint(&[
        "database.existingSecret=db",
        "upload.auth.mode=token",
        "upload.auth.existingSecret=up",
        "replicas=2",
        "jobNamespaces={a,b}",
        "watchNamespace=a",
    ]);
    lint(&[
        "database.url=postgres://u:p@db.example:5432/x",
        "cleanup.enabled=false",
        "defaults.quotaRequestsPerSecond=0.5",
    ]);
}

#[test]
fn helm_rejects_contradictory_or_invalid_values() {
    for (sets, msg) in [
        (
            &["postgresql.enabled=true", "database.url=postgres://x@y/z"][..],
            "leave database.url and database.existingSecret empty",
        ),
        (
            &["database.url=postgres://x@y/z", "database.existingSecret=s"][..],
            "only one of database.url and database.existingSecret",
        ),
        (
            &["upload.auth.token=a", "upload.auth.existingSecret=s"][..],
            "only one of upload.auth.token",
        ),
        (
            &["upload.auth.token=a"][..],
            "only used with upload.auth.mode=token",
        ),
        (&["upload.auth.mode=token"][..], "needs upload.auth.token"),
        (&["upload.auth.mode=off"][..], "/upload/auth/mode"),
        (
            &["upload.auth.mode=none", "service.type=LoadBalancer"][..],
            "needs service.type=ClusterIP",
        ),
        (
            &["upload.auth.mode=none", "service.type=NodePort"][..],
            "needs service.type=ClusterIP",
        ),
        (&["defaults.shards=65"][..], "/defaults/shards"),
        (&["jobNamespaces={Not_A_Namespace}"][..], "/jobNamespaces"),
    ] {
        let err = template_raw("t", "default", sets, &[]).expect_err(&format!("{sets:?} must be rejected"));
        assert!(err.contains(msg), "{sets:?}: expected {msg:?} in:\n{err}");
    }
}

#[test]
fn default_values_render_a_hardened_least_privilege_operator() {
    let (ns, full) = ("pco", "t-postcode-operator");
    let docs = template("t", ns, &[]);
    check_namespaces(&docs, &[ns]);
    check_workloads(&docs);
    let env = check_operator(&docs, ns, full, 1);
    // No database configured: the operator expects <fullname>-database, created by the user.
    assert_eq!(
        env_value(&env, "DATABASE_SECRET_NAME"),
        format!("{full}-database")
    );
    assert_eq!(env_value(&env, "DATABASE_SECRET_KEY"), "url");
    assert!(
        all(&docs, "Secret").is_empty(),
        "no Secret without database.url / postgresql / upload token"
    );
    assert!(!env.contains_key("UPLOAD_TOKEN"), "no upload auth by default");
    assert!(!env.contains_key("WATCH_NAMESPACE"), "all namespaces by default");
    let job_sa = env_value(&env, "JOB_SERVICE_ACCOUNT");
    assert_eq!(job_sa, format!("{full}-job"));
    check_job_rbac(&docs, job_sa, &[ns]);
    check_operator_rbac(&docs, ns, full, &["*"], &[ns]);
    check_cleanup_hook(&docs, ns, full);
    assert!(all(&docs, "StatefulSet").is_empty(), "no PostgreSQL by default");
    assert_eq!(
        all(&docs, "Deployment").len() + all(&docs, "Job").len(),
        2,
        "one operator Deployment and the cleanup hook Job"
    );

    let off = template("t", ns, &["cleanup.enabled=false"]);
    assert!(
        off.iter().all(|d| !is_hook(d)),
        "cleanup.enabled=false renders no hooks"
    );
}

#[test]
fn postgresql_and_upload_auth_variant() {
    let (ns, full) = ("pco", "demo-postcode-operator");
    let token = "upload-token-0b6f1c";
    let docs = template(
        "demo",
        ns,
        &[
            "postgresql.enabled=true",
            "upload.auth.mode=token",
            &format!("upload.auth.token={token}"),
        ],
    );
    check_namespaces(&docs, &[ns]);
    check_workloads(&docs);
    let env = check_operator(&docs, ns, full, 1);

    // DATABASE_URL: from the chart's Secret, which points at the bundled PostgreSQL.
    let db_secret = get(&docs, "Secret", ns, env_value(&env, "DATABASE_SECRET_NAME"));
    let data = secret_data(db_secret);
    let url = String::from_utf8(data["url"].clone()).unwrap();
    let pg = format!("{full}-postgresql");
    let password = String::from_utf8(data["password"].clone()).unwrap();
    assert!(password.len() >= 16, "generated password too short");
    assert_eq!(
        url,
        format!("postgres://postcodes:{password}@{pg}.{ns}.svc.cluster.local:5432/postcodes")
    );

    let sts = get(&docs, "StatefulSet", ns, &pg);
    let c = &seq(sts, "spec.template.spec.containers")[0];
    assert_eq!(s(c, "image"), "postgres:16-alpine");
    let penv = env_of(c);
    assert_eq!(
        s(&penv["POSTGRES_PASSWORD"], "valueFrom.secretKeyRef.name"),
        name(db_secret)
    );
    assert_eq!(
        s(&penv["POSTGRES_PASSWORD"], "valueFrom.secretKeyRef.key"),
        "password"
    );
    assert_eq!(
        seq(sts, "spec.volumeClaimTemplates").len(),
        1,
        "PVC via volumeClaimTemplates"
    );
    let svc = get(&docs, "Service", ns, &pg);
    assert_eq!(at(&seq(svc, "spec.ports")[0], "port").as_i64(), Some(5432));

    // UPLOAD_TOKEN from the chart's upload Secret.
    let up = &env["UPLOAD_TOKEN"];
    let up_secret = get(&docs, "Secret", ns, s(up, "valueFrom.secretKeyRef.name"));
    assert_eq!(
        secret_data(up_secret)[s(up, "valueFrom.secretKeyRef.key")],
        token.as_bytes()
    );

    // Secret values appear only in Secrets (in no env, annotation or arg).
    let needles = [token.to_string(), password.clone()];
    for d in docs.iter().filter(|d| kind(d) != "Secret") {
        let text = serde_yaml::to_string(d).unwrap();
        for n in &needles {
            assert!(!text.contains(n.as_str()), "a secret value appears in {}", id(d));
        }
    }
}

#[test]
fn database_url_and_existing_secrets_stay_in_secrets() {
    let (ns, full) = ("pco", "t-postcode-operator");
    let pw = "db-pass-7f3e9a";
    let url = format!("postgres://app:{pw}@db.example.internal:5432/postcodes");
    let docs = template("t", ns, &[&format!("database.url={url}")]);
    let env = check_operator(&docs, ns, full, 1);
    let sec = get(&docs, "Secret", ns, env_value(&env, "DATABASE_SECRET_NAME"));
    assert_eq!(secret_data(sec)["url"], url.as_bytes());
    for d in docs.iter().filter(|d| kind(d) != "Secret") {
        assert!(
            !serde_yaml::to_string(d).unwrap().contains(pw),
            "database password appears in {}",
            id(d)
        );
    }

    // Existing Secrets: referenced by name and key, nothing created.
    let docs = template(
        "t",
        ns,
        &[
            "database.existingSecret=my-db",
            "database.secretKey=dsn",
            "upload.auth.mode=token",
            "upload.auth.existingSecret=my-up",
            "upload.auth.secretKey=tok",
        ],
    );
    check_workloads(&docs);
    let env = check_operator(&docs, ns, full, 1);
    assert_eq!(env_value(&env, "DATABASE_SECRET_NAME"), "my-db");
    assert_eq!(env_value(&env, "DATABASE_SECRET_KEY"), "dsn");
    assert_eq!(s(&env["UPLOAD_TOKEN"], "valueFrom.secretKeyRef.name"), "my-up");
    assert_eq!(s(&env["UPLOAD_TOKEN"], "valueFrom.secretKeyRef.key"), "tok");
    assert!(
        all(&docs, "Secret").is_empty(),
        "existing Secrets are not created"
    );
}

/// `database.tls.caSecret`: the CA is mounted into the operator, which gets
/// it as `PGSSLROOTCERT` with `PGSSLMODE` (the operator then copies it for the
/// Job pods, at the same path); a mode that would allow plaintext is refused.
#[test]
fn database_tls_ca_reaches_the_operator() {
    let (ns, full) = ("pco", "t-postcode-operator");
    let docs = template(
        "t",
        ns,
        &["database.tls.caSecret=db-ca", "database.tls.caKey=root.pem"],
    );
    check_workloads(&docs);
    let env = check_operator(&docs, ns, full, 1);
    let ca_path = env_value(&env, "PGSSLROOTCERT");
    assert_eq!(env_value(&env, "PGSSLMODE"), "verify-full");
    let (d, c) = operator(&docs, ns, full);
    let (dir, file) = ca_path.rsplit_once('/').unwrap();
    let mount = seq(c, "volumeMounts")
        .iter()
        .find(|m| s(m, "mountPath") == dir)
        .unwrap_or_else(|| panic!("no mount at {dir}"));
    assert_eq!(at(mount, "readOnly").as_bool(), Some(true));
    let vol = seq(at(d, "spec.template.spec"), "volumes")
        .iter()
        .find(|v| s(v, "name") == s(mount, "name"))
        .expect("the CA volume");
    assert_eq!(s(vol, "secret.secretName"), "db-ca");
    let item = &seq(vol, "secret.items")[0];
    assert_eq!((s(item, "key"), s(item, "path")), ("root.pem", file));

    let docs = template(
        "t",
        ns,
        &["database.tls.caSecret=db-ca", "database.tls.sslmode=verify-ca"],
    );
    let (_, c) = operator(&docs, ns, full);
    assert_eq!(env_value(&env_of(c), "PGSSLMODE"), "verify-ca");
    // Without a CA: nothing TLS-specific (the URL's own parameters apply).
    let docs = template("t", ns, &[]);
    let (_, c) = operator(&docs, ns, full);
    let env = env_of(c);
    assert!(!env.contains_key("PGSSLROOTCERT") && !env.contains_key("PGSSLMODE"));
    assert_eq!(
        env_value(&env, "LEADER_ELECTION_LEASE"),
        full,
        "the Lease is named after the release"
    );
    for mode in ["prefer", "disable", "allow"] {
        let err = template_raw(
            "t",
            ns,
            &[
                "database.tls.caSecret=db-ca",
                &format!("database.tls.sslmode={mode}"),
            ],
            &[],
        )
        .expect_err(&format!("sslmode={mode} must be refused"));
        assert!(err.contains("sslmode"), "{err}");
    }
}

#[test]
fn replicas_turn_leader_election_on() {
    let (ns, full) = ("pco", "t-postcode-operator");
    let docs = template("t", ns, &["replicas=2"]);
    check_workloads(&docs);
    let _ = check_operator(&docs, ns, full, 2); // asserts LEADER_ELECTION=true
    let (d, _) = operator(&docs, ns, full);
    assert_ne!(
        s(d, "spec.strategy.type"),
        "Recreate",
        "rolling updates with leader election"
    );

    let docs = template("t", ns, &["leaderElection.enabled=true"]);
    let (_, c) = operator(&docs, ns, full);
    assert_eq!(env_value(&env_of(c), "LEADER_ELECTION"), "true");
}

#[test]
fn job_namespaces_get_the_job_service_account() {
    let (ns, full) = ("pco", "t-postcode-operator");
    let docs = template("t", ns, &["jobNamespaces={a,b,pco}"]);
    check_namespaces(&docs, &[ns, "a", "b"]);
    check_workloads(&docs);
    let env = check_operator(&docs, ns, full, 1);
    check_job_rbac(&docs, env_value(&env, "JOB_SERVICE_ACCOUNT"), &[ns, "a", "b"]);
    check_operator_rbac(&docs, ns, full, &["*"], &[ns, "a", "b"]);

    // watchNamespace: the operator is bound there (and at home) instead of cluster-wide.
    let docs = template("t", ns, &["watchNamespace=w", "jobNamespaces={a}"]);
    let env = check_operator(&docs, ns, full, 1);
    assert_eq!(env_value(&env, "WATCH_NAMESPACE"), "w");
    check_job_rbac(&docs, env_value(&env, "JOB_SERVICE_ACCOUNT"), &[ns, "w", "a"]);
    check_operator_rbac(&docs, ns, full, &["w"], &[ns, "w", "a"]);
    // (but TokenReviews and SubjectAccessReviews, which are cluster-scoped,
    // for upload.auth.mode=kubernetes: check_operator_rbac allows nothing more)
    let delegator = format!("{full}-auth-delegator");
    assert!(
        all(&docs, "ClusterRoleBinding")
            .iter()
            .all(|b| is_hook(b) || name(b) == delegator),
        "no cluster-wide binding for the operator"
    );
    // The uninstall hook deletes only the imports this release watches.
    let hook = get(&docs, "Job", ns, &format!("{full}-cleanup"));
    let c = &seq(at(hook, "spec.template.spec"), "containers")[0];
    let script = format!("{:?}", at(c, "args"));
    assert!(
        script.contains(r#"kubectl delete postcodeimports --all -n \"w\" --wait"#)
            && !script.contains(" -A "),
        "cleanup script: {script}"
    );
}

// ---------------------------------------------------------------- against the test API server

/// Fresh namespaces and a unique release on the test API server, removed on drop.
struct Scratch {
    kubeconfig: String,
    release: String,
    namespaces: Vec<String>,
}

impl Scratch {
    fn new(extra_namespaces: &[&str]) -> Self {
        let kubeconfig = kubeconfig();
        let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
        let base = format!("helm-chart-{tag}");
        let namespaces: Vec<String> = std::iter::once(base.clone())
            .chain(extra_namespaces.iter().map(|x| format!("{base}-{x}")))
            .collect();
        let me = Self {
            kubeconfig,
            release: format!("t{tag}"),
            namespaces,
        };
        for ns in &me.namespaces {
            let r = me.kubectl(&["create", "namespace", ns], None);
            assert!(
                r.ok,
                "cannot create namespace {ns} on the test API server:\n{}",
                r.stderr
            );
        }
        me
    }

    fn ns(&self) -> &str {
        &self.namespaces[0]
    }

    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Run {
        run(
            Command::new(kubectl())
                .arg("--kubeconfig")
                .arg(&self.kubeconfig)
                .arg("--request-timeout=60s")
                .args(args),
            stdin,
        )
    }

    /// `kubectl apply --server-side [--dry-run=server]` of `docs`, one call per
    /// namespace (`-n NS`); asserts every object was accepted.
    fn apply(&self, docs: &[Value], dry_run: bool) {
        let mut groups: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
        for d in docs {
            let ns = if namespace(d).is_empty() {
                self.ns().to_string()
            } else {
                namespace(d).to_string()
            };
            groups.entry(ns).or_default().push(d);
        }
        for (ns, ds) in groups {
            let yaml: String = ds
                .iter()
                .map(|d| format!("---\n{}", serde_yaml::to_string(d).unwrap()))
                .collect();
            let mut args = vec![
                "apply",
                "--server-side",
                "--field-manager=helm-chart-test",
                "-n",
                ns.as_str(),
                "-f",
                "-",
            ];
            if dry_run {
                args.insert(2, "--dry-run=server");
            }
            let r = self.kubectl(&args, Some(&yaml));
            assert!(
                r.ok,
                "kubectl {} rejected the chart in {ns}:\n{}\n{}",
                args.join(" "),
                r.stdout,
                r.stderr
            );
            let applied = r
                .stdout
                .lines()
                .filter(|l| l.contains("serverside-applied"))
                .count();
            assert_eq!(
                applied,
                ds.len(),
                "not every object was applied in {ns}:\n{}\n{}",
                r.stdout,
                r.stderr
            );
            if dry_run {
                assert!(
                    r.stdout
                        .lines()
                        .all(|l| l.trim().is_empty() || l.ends_with("(server dry run)")),
                    "{}",
                    r.stdout
                );
            }
        }
    }

    /// Asks the API server's authorizer (SubjectAccessReviews, all in one
    /// `kubectl create`) whether each ServiceAccount user `who` may `verb` the
    /// `resource` (`plural[.group][/subresource][@name]`) in `ns` (None = all namespaces).
    fn can_all(&self, checks: &[(&str, &str, &str, Option<&str>)]) -> Vec<bool> {
        let reviews: Vec<serde_json::Value> = checks
            .iter()
            .map(|&(who, verb, resource, ns)| {
                let (resource, object) = resource.split_once('@').unwrap_or((resource, ""));
                let (res, sub) = resource.split_once('/').unwrap_or((resource, ""));
                let (plural, group) = res.split_once('.').unwrap_or((res, ""));
                let sa_ns = who
                    .strip_prefix("system:serviceaccount:")
                    .and_then(|r| r.split(':').next())
                    .expect("a ServiceAccount user");
                serde_json::json!({
                    "apiVersion": "authorization.k8s.io/v1",
                    "kind": "SubjectAccessReview",
                    "spec": {
                        "user": who,
                        "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{sa_ns}"), "system:authenticated"],
                        "resourceAttributes": {
                            "namespace": ns.unwrap_or(""), "verb": verb, "group": group, "resource": plural, "subresource": sub,
                            "name": object,
                        },
                    },
                })
            })
            .collect();
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": reviews}).to_string();
        let r = self.kubectl(&["create", "-o", "json", "-f", "-"], Some(&list));
        assert!(r.ok, "SubjectAccessReviews failed:\n{}", r.stderr);
        let answers: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&r.stdout)
            .into_iter::<serde_json::Value>()
            .map(|v| v.expect("SubjectAccessReview JSON"))
            .collect();
        assert_eq!(
            answers.len(),
            checks.len(),
            "one answer per review:\n{}",
            r.stdout
        );
        answers
            .iter()
            .zip(&reviews)
            .map(|(got, asked)| {
                assert_eq!(got["spec"]["user"], asked["spec"]["user"], "answers in order");
                assert_eq!(
                    got["spec"]["resourceAttributes"]["verb"],
                    asked["spec"]["resourceAttributes"]["verb"]
                );
                got["status"]["allowed"].as_bool().unwrap_or(false)
            })
            .collect()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let sel = format!("app.kubernetes.io/instance={}", self.release);
        let _ = self.kubectl(
            &[
                "delete",
                "clusterrole,clusterrolebinding",
                "-l",
                &sel,
                "--wait=false",
            ],
            None,
        );
        for ns in &self.namespaces {
            let _ = self.kubectl(&["delete", "namespace", ns, "--wait=false"], None);
        }
    }
}

/// The Jobs' NetworkPolicy in `ns` as rendered: its egress rules, checked to
/// be only DNS, the database on its port, public addresses (the non-public
/// ranges excepted) and the listed extra CIDRs; no ingress.
fn check_job_network_policy(docs: &[Value], ns: &str, full: &str, extra_cidrs: &[&str], bundled_pg: bool) {
    let np = get(docs, "NetworkPolicy", ns, &format!("{full}-jobs"));
    assert_eq!(
        at(np, "spec.podSelector.matchLabels")["app.kubernetes.io/managed-by"],
        "postcode-operator",
        "{np:?}"
    );
    let types: Vec<&str> = seq(np, "spec.policyTypes")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(types, ["Ingress", "Egress"]);
    assert!(seq(np, "spec.ingress").is_empty(), "no ingress: {np:?}");
    let rules = seq(np, "spec.egress");
    assert_eq!(rules.len(), 3, "{np:?}");
    // DNS only: ports 53 and no other.
    let dns: Vec<i64> = seq(&rules[0], "ports")
        .iter()
        .filter_map(|p| at(p, "port").as_i64())
        .collect();
    assert_eq!(dns, [53, 53], "{:?}", rules[0]);
    // The database: its port only.
    let db: Vec<i64> = seq(&rules[1], "ports")
        .iter()
        .filter_map(|p| at(p, "port").as_i64())
        .collect();
    assert_eq!(db, [5432]);
    let to = seq(&rules[1], "to");
    if bundled_pg {
        assert!(!at(&to[0], "podSelector").is_null() && to.len() == 1, "{to:?}");
    } else {
        assert!(to.iter().all(|t| !s(t, "ipBlock.cidr").is_empty()), "{to:?}");
    }
    // Public addresses (any port) minus every non-public range, plus the extra CIDRs.
    let blocks = seq(&rules[2], "to");
    assert!(seq(&rules[2], "ports").is_empty());
    let v4 = blocks
        .iter()
        .find(|b| s(b, "ipBlock.cidr") == "0.0.0.0/0")
        .expect("the public IPv4 block");
    let except: Vec<&str> = seq(v4, "ipBlock.except")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for private in [
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "100.64.0.0/10",
    ] {
        assert!(except.contains(&private), "{private} not excepted: {except:?}");
    }
    let v6 = blocks
        .iter()
        .find(|b| s(b, "ipBlock.cidr") == "::/0")
        .expect("the public IPv6 block");
    let except6: Vec<&str> = seq(v6, "ipBlock.except")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        except6.contains(&"fc00::/7") && except6.contains(&"fe80::/10"),
        "{except6:?}"
    );
    let extra: Vec<&str> = blocks[2..].iter().map(|b| s(b, "ipBlock.cidr")).collect();
    assert_eq!(extra, extra_cidrs);
    // The API server: enrichers only (they write their shard's status).
    let api = get(docs, "NetworkPolicy", ns, &format!("{full}-enrichers-api"));
    assert_eq!(
        at(api, "spec.podSelector.matchLabels")["postcodes.dev/role"],
        "enricher"
    );
    let types: Vec<&str> = seq(api, "spec.policyTypes")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(types, ["Egress"]);
}

#[test]
fn job_egress_settings_and_network_policy_render_as_configured() {
    let (ns, full) = ("pco", "t-postcode-operator");
    let docs = template("t", ns, &["jobNamespaces={a}"]);
    let env = check_operator(&docs, ns, full, 1);
    assert_eq!(
        env_value(&env, "JOB_EGRESS_ALLOWED_API_URLS"),
        "https://api.postcodes.io"
    );
    assert_eq!(env_value(&env, "JOB_EGRESS_ALLOW_SOURCE_CIDRS"), "");
    assert_eq!(env_value(&env, "JOB_EGRESS_DENY_CIDRS"), "");
    assert_eq!(
        env_value(&env, "JOB_EGRESS_OFFLINE_POSTCODES_DIR"),
        "",
        "no offline file by default"
    );
    for n in [ns, "a"] {
        check_job_network_policy(&docs, n, full, &[], false);
    }

    let docs = template(
        "t",
        ns,
        &[
            "egress.allowSourceCidrs={10.96.12.0/24,192.168.7.7}",
            "egress.denyCidrs={34.118.224.0/20}",
            "egress.allowedApiUrls={https://api.postcodes.io,http://postcodes.mirror.svc:8000}",
            "egress.offlinePostcodesDir=/data/postcodes",
            "postgresql.enabled=true",
        ],
    );
    let env = check_operator(&docs, ns, full, 1);
    assert_eq!(
        env_value(&env, "JOB_EGRESS_ALLOW_SOURCE_CIDRS"),
        "10.96.12.0/24,192.168.7.7"
    );
    assert_eq!(env_value(&env, "JOB_EGRESS_DENY_CIDRS"), "34.118.224.0/20");
    assert_eq!(
        env_value(&env, "JOB_EGRESS_ALLOWED_API_URLS"),
        "https://api.postcodes.io,http://postcodes.mirror.svc:8000"
    );
    assert_eq!(
        env_value(&env, "JOB_EGRESS_OFFLINE_POSTCODES_DIR"),
        "/data/postcodes"
    );
    check_job_network_policy(&docs, ns, full, &["10.96.12.0/24", "192.168.7.7"], true);

    let off = template("t", ns, &["networkPolicy.enabled=false"]);
    let left: Vec<&str> = all(&off, "NetworkPolicy").into_iter().map(name).collect();
    assert_eq!(
        left,
        [full],
        "only the operator pod's own policy (operatorNetworkPolicy) is left"
    );
    let off = template(
        "t",
        ns,
        &[
            "networkPolicy.enabled=false",
            "operatorNetworkPolicy.enabled=false",
        ],
    );
    assert!(all(&off, "NetworkPolicy").is_empty());
    assert!(template_raw("t", ns, &["egress.allowSourceCidrs={not-a-cidr}"], &[]).is_err());
}

#[test]
fn server_side_dry_run_accepts_every_variant() {
    let k = Scratch::new(&["a", "b"]);
    let (ns, a, b) = (
        k.ns().to_string(),
        k.namespaces[1].clone(),
        k.namespaces[2].clone(),
    );
    let jobs = format!("jobNamespaces={{{a},{b}}}");
    let variants: Vec<Vec<String>> = vec![
        vec![],
        vec![
            "postgresql.enabled=true".into(),
            "upload.auth.mode=token".into(),
            "upload.auth.token=dry-run-token".into(),
            "replicas=2".into(),
            jobs.clone(),
        ],
        vec![
            "database.url=postgres://u:p@db.example:5432/x".into(),
            format!("watchNamespace={a}"),
            "egress.allowSourceCidrs={10.96.12.0/24}".into(),
            "cleanup.enabled=false".into(),
        ],
        vec![
            "database.existingSecret=db".into(),
            "upload.auth.mode=token".into(),
            "upload.auth.existingSecret=up".into(),
            "leaderElection.enabled=true".into(),
        ],
    ];
    for (i, sets) in variants.iter().enumerate() {
        let sets: Vec<&str> = sets.iter().map(|x| x.as_str()).collect();
        // The first variant includes the CRD (identical to the one installed, or created by the dry run).
        let extra: &[&str] = if i == 0 { &["--include-crds"] } else { &[] };
        let yaml = template_raw(&k.release, &ns, &sets, extra)
            .unwrap_or_else(|e| panic!("helm template {sets:?}:\n{e}"));
        let docs = parse_docs(&yaml);
        if i == 0 {
            assert!(find(
                &docs,
                "CustomResourceDefinition",
                "",
                "postcodeimports.postcodes.dev"
            )
            .is_some());
        }
        k.apply(&docs, true);
    }
}

#[test]
fn rbac_is_enforced_as_intended_by_the_api_server() {
    let k = Scratch::new(&["a", "other"]);
    let (ns, a, other) = (
        k.ns().to_string(),
        k.namespaces[1].clone(),
        k.namespaces[2].clone(),
    );
    let full = format!("{}-postcode-operator", k.release);
    let docs = template(&k.release, &ns, &[&format!("jobNamespaces={{{a}}}")]);
    // Only the identities and their permissions are created for real; the
    // cluster-scoped ones are labelled with the release and removed on drop.
    let rbac: Vec<Value> = docs
        .into_iter()
        .filter(|d| {
            matches!(
                kind(d),
                "ServiceAccount" | "Role" | "RoleBinding" | "ClusterRole" | "ClusterRoleBinding"
            )
        })
        .collect();
    k.apply(&rbac, false);

    let op = &*format!("system:serviceaccount:{ns}:{full}");
    let job_a = &*format!("system:serviceaccount:{a}:{full}-job");
    let job_home = &*format!("system:serviceaccount:{ns}:{full}-job");
    let cleanup = &*format!("system:serviceaccount:{ns}:{full}-cleanup");
    let pi = "postcodeimports.postcodes.dev";
    let pis = "postcodeimports.postcodes.dev/status";
    let pif = "postcodeimports.postcodes.dev/finalizers";
    let (o, an, hm) = (Some(other.as_str()), Some(a.as_str()), Some(ns.as_str()));
    let db_secret = format!("secrets@{full}-database");
    let other_db_secret = format!("secrets@{full}-database-not");
    let lease = format!("leases.coordination.k8s.io@{full}");
    #[rustfmt::skip]
    let checks: Vec<(&str, &str, &str, Option<&str>, bool)> = vec![
        // operator: imports anywhere, its Jobs, Secret copies, events, leases at home
        (op, "watch", pi, None, true), (op, "list", pi, None, true), (op, "get", pi, o, true),
        (op, "create", pi, o, true), (op, "patch", pi, o, true), (op, "delete", pi, o, true),
        (op, "patch", pis, o, true), (op, "update", pif, o, true),
        (op, "create", "jobs.batch", o, true), (op, "delete", "jobs.batch", o, true), (op, "watch", "jobs.batch", None, true),
        (op, "patch", "jobs.batch", o, true),
        (op, "create", "events.events.k8s.io", o, true), (op, "patch", "events.events.k8s.io", o, true),
        (op, "list", "pods", o, true),
        // upload.auth.mode=kubernetes: ask who a token is and what its holder may do
        (op, "create", "tokenreviews.authentication.k8s.io", None, true),
        (op, "create", "subjectaccessreviews.authorization.k8s.io", None, true),
        (op, "create", "localsubjectaccessreviews.authorization.k8s.io", o, false),
        (op, "create", "serviceaccounts/token", o, false),
        // Secrets: create the copies in the Job namespaces, read only the database Secret, by name
        (op, "create", "secrets", an, true), (op, "create", "secrets", hm, true),
        (op, "get", &db_secret, hm, true),
        // the Lease named after the release, at home
        (op, "get", &lease, hm, true), (op, "update", &lease, hm, true), (op, "patch", &lease, hm, true),
        (op, "create", "leases.coordination.k8s.io", hm, true),
        // ... and nothing more: refused
        (op, "update", pi, o, false), (op, "update", pis, o, false),
        (op, "get", "secrets", o, false), (op, "get", "secrets", an, false), (op, "get", "secrets", hm, false),
        (op, "get", "secrets@other-secret", hm, false), (op, "get", &other_db_secret, hm, false),
        (op, "get", &db_secret, an, false), (op, "create", "secrets", o, false),
        (op, "patch", "secrets", an, false), (op, "delete", "secrets", an, false), (op, "delete", "secrets", hm, false),
        (op, "patch", &db_secret, hm, false), (op, "delete", &db_secret, hm, false), (op, "update", "secrets", an, false),
        (op, "list", "secrets", o, false), (op, "list", "secrets", hm, false), (op, "watch", "secrets", None, false),
        (op, "update", "leases.coordination.k8s.io@postcode-operator", hm, false),
        (op, "get", "leases.coordination.k8s.io@another-release-postcode-operator", hm, false),
        (op, "create", "leases.coordination.k8s.io", o, false), (op, "delete", &lease, hm, false),
        (op, "deletecollection", pi, o, false), (op, "create", "pods", o, false), (op, "delete", "pods", o, false), (op, "create", "deployments.apps", o, false),
        (op, "create", "rolebindings.rbac.authorization.k8s.io", o, false), (op, "update", "jobs.batch/status", o, false),
        // Job pods: read their import, read/patch its status, in their namespaces only
        (job_a, "get", pi, an, true), (job_a, "get", pis, an, true), (job_a, "patch", pis, an, true),
        (job_home, "get", pi, hm, true), (job_home, "patch", pis, hm, true),
        (job_a, "list", pi, an, false), (job_a, "watch", pi, an, false), (job_a, "patch", pi, an, false),
        (job_a, "update", pi, an, false), (job_a, "delete", pi, an, false), (job_a, "create", pi, an, false),
        (job_a, "update", pis, an, false), (job_a, "update", pif, an, false),
        (job_a, "get", pi, o, false), (job_a, "get", "secrets", an, false), (job_a, "create", "jobs.batch", an, false),
        // pre-delete hook: delete imports everywhere, nothing else
        (cleanup, "list", pi, None, true), (cleanup, "delete", pi, o, true), (cleanup, "watch", pi, None, true),
        (cleanup, "patch", pi, o, false), (cleanup, "delete", "secrets", o, false),
    ];
    let asked: Vec<_> = checks
        .iter()
        .map(|&(who, verb, res, ns, _)| (who, verb, res, ns))
        .collect();
    let failures: Vec<String> = checks
        .iter()
        .zip(k.can_all(&asked))
        .filter(|((.., want), got)| got != want)
        .map(|((who, verb, res, ns, want), got)| {
            format!(
                "{who} {verb} {res} in {}: expected {want}, got {got}",
                ns.unwrap_or("all namespaces")
            )
        })
        .collect();
    assert!(
        failures.is_empty(),
        "RBAC differs from the intent:\n{}",
        failures.join("\n")
    );

    // watchNamespace: bound in that namespace and at home, not cluster-wide.
    let docs = template(
        &k.release,
        &ns,
        &[&format!("watchNamespace={a}"), "cleanup.enabled=false"],
    );
    let rbac: Vec<Value> = docs
        .into_iter()
        .filter(|d| matches!(kind(d), "RoleBinding" | "ClusterRoleBinding"))
        .collect();
    let r = k.kubectl(&["delete", "clusterrolebinding", &full], None);
    assert!(r.ok, "{}", r.stderr);
    k.apply(&rbac, false);
    let got = k.can_all(&[
        (op, "watch", pi, an),
        (op, "create", "secrets", an),
        (op, "get", &db_secret, hm),
        (op, "create", "leases.coordination.k8s.io", hm),
        (op, "watch", pi, o),
        (op, "watch", pi, None),
        (op, "create", "secrets", o),
        (op, "get", "secrets", an),
    ]);
    assert_eq!(
        got,
        [true, true, true, true, false, false, false, false],
        "operator grants with watchNamespace={a}"
    );
}

#[test]
fn metrics_port_network_policy_pdb_and_service_monitor_render_as_configured() {
    let (ns, full) = ("pco", "t-postcode-operator");
    let docs = template("t", ns, &[]);
    let (d, _) = operator(&docs, ns, full);
    let pod_labels = at(d, "spec.template.metadata.labels");
    let selects_pods = |sel: &Value| {
        let m = sel.as_mapping().expect("a selector");
        !m.is_empty() && m.iter().all(|(k, v)| pod_labels.get(k) == Some(v))
    };
    // metrics: a Service of its own, on the metrics port only
    let msvc = get(&docs, "Service", ns, &format!("{full}-metrics"));
    assert_eq!(s(msvc, "spec.type"), "ClusterIP");
    let ports = seq(msvc, "spec.ports");
    assert_eq!(ports.len(), 1);
    assert_eq!(
        (s(&ports[0], "targetPort"), at(&ports[0], "port").as_i64()),
        ("metrics", Some(9090))
    );
    assert!(selects_pods(at(msvc, "spec.selector")));
    assert!(
        all(&docs, "ServiceMonitor").is_empty(),
        "no ServiceMonitor by default"
    );
    assert!(
        all(&docs, "PodDisruptionBudget").is_empty(),
        "no PDB for one replica"
    );

    // NetworkPolicy: the upload port from anyone, the metrics port from the monitoring namespace
    let np = get(&docs, "NetworkPolicy", ns, full);
    assert!(selects_pods(at(np, "spec.podSelector.matchLabels")));
    let types: Vec<&str> = seq(np, "spec.policyTypes")
        .iter()
        .filter_map(|t| t.as_str())
        .collect();
    assert_eq!(types, ["Ingress"]);
    let rules = seq(np, "spec.ingress");
    let rule_for = |port: &str| {
        rules
            .iter()
            .find(|r| seq(r, "ports").iter().any(|p| s(p, "port") == port))
            .unwrap_or_else(|| panic!("no ingress rule for port {port}"))
    };
    assert!(
        at(rule_for("http"), "from").is_null(),
        "upload port: from anywhere"
    );
    let from = seq(rule_for("metrics"), "from");
    assert_eq!(from.len(), 1);
    assert_eq!(
        at(&from[0], "namespaceSelector.matchLabels")
            .get("kubernetes.io/metadata.name")
            .and_then(Value::as_str),
        Some("monitoring")
    );
    assert!(
        rules.iter().all(|r| seq(r, "ports").len() == 1),
        "each rule opens one port"
    );

    // configured: upload from one namespace, scrapers elsewhere, a ServiceMonitor, two replicas
    let docs = template(
        "t",
        ns,
        &[
            "operatorNetworkPolicy.uploadFrom[0].namespaceSelector.matchLabels.team=analysts",
            "operatorNetworkPolicy.monitoringNamespaceSelector.matchLabels.name=prom",
            "metrics.serviceMonitor.enabled=true",
            "metrics.serviceMonitor.labels.release=kube-prometheus",
            "replicas=2",
        ],
    );
    let np = get(&docs, "NetworkPolicy", ns, full);
    let rules = seq(np, "spec.ingress");
    let upload = rules
        .iter()
        .find(|r| seq(r, "ports").iter().any(|p| s(p, "port") == "http"))
        .unwrap();
    assert_eq!(
        s(&seq(upload, "from")[0], "namespaceSelector.matchLabels.team"),
        "analysts"
    );
    let metrics = rules
        .iter()
        .find(|r| seq(r, "ports").iter().any(|p| s(p, "port") == "metrics"))
        .unwrap();
    assert_eq!(
        s(&seq(metrics, "from")[0], "namespaceSelector.matchLabels.name"),
        "prom"
    );
    let sm = get(&docs, "ServiceMonitor", ns, full);
    assert_eq!(s(sm, "metadata.labels.release"), "kube-prometheus");
    let ep = &seq(sm, "spec.endpoints")[0];
    assert_eq!((s(ep, "port"), s(ep, "path")), ("metrics", "/metrics"));
    let msvc = get(&docs, "Service", ns, &format!("{full}-metrics"));
    for (k, v) in at(sm, "spec.selector.matchLabels").as_mapping().unwrap() {
        assert_eq!(
            at(msvc, "metadata.labels").get(k),
            Some(v),
            "ServiceMonitor selects the metrics Service"
        );
    }
    assert!(
        at(get(&docs, "Service", ns, full), "metadata.labels")
            .get("app.kubernetes.io/component")
            .and_then(Value::as_str)
            != Some("metrics"),
        "the ServiceMonitor does not select the upload Service"
    );
    let pdb = get(&docs, "PodDisruptionBudget", ns, full);
    assert_eq!(at(pdb, "spec.minAvailable").as_i64(), Some(1));
    let (d, _) = operator(&docs, ns, full);
    let pod_labels = at(d, "spec.template.metadata.labels");
    for (k, v) in at(pdb, "spec.selector.matchLabels").as_mapping().unwrap() {
        assert_eq!(pod_labels.get(k), Some(v), "the PDB selects the operator pods");
    }

    // upload.auth.mode=none: only behind a ClusterIP Service, and no review rights
    let docs = template("t", ns, &["upload.auth.mode=none"]);
    let (_, c) = operator(&docs, ns, full);
    assert_eq!(env_value(&env_of(c), "UPLOAD_AUTH"), "none");
    assert!(
        find(&docs, "ClusterRole", "", &format!("{full}-auth-delegator")).is_none(),
        "no TokenReview/SubjectAccessReview rights without kubernetes auth"
    );
    for t in ["LoadBalancer", "NodePort"] {
        let err = template_raw(
            "t",
            ns,
            &["upload.auth.mode=none", &format!("service.type={t}")],
            &[],
        )
        .expect_err("mode none with a non-ClusterIP Service");
        assert!(err.contains("needs service.type=ClusterIP"), "{err}");
    }
    // the default is kubernetes, with exactly the review rights
    let docs = template("t", ns, &[]);
    let (_, c) = operator(&docs, ns, full);
    assert_eq!(env_value(&env_of(c), "UPLOAD_AUTH"), "kubernetes");
    assert_eq!(env_value(&env_of(c), "UPLOAD_AUTH_CACHE_S"), "10");
    let delegator = get(&docs, "ClusterRole", "", &format!("{full}-auth-delegator"));
    assert_eq!(
        rules_of(delegator),
        grants(&[
            ("authentication.k8s.io", "tokenreviews", &["create"]),
            ("authorization.k8s.io", "subjectaccessreviews", &["create"]),
        ])
    );
}
