//! What a container needs from the API server before it can start: its
//! environment (Secrets, ConfigMaps, the downward API) and its Pod's volumes
//! (emptyDir, secret, configMap, hostPath, persistentVolumeClaim, projected
//! incl. the ServiceAccount token from the TokenRequest API, downwardAPI).

use std::{
    collections::{BTreeMap, HashMap},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use k8s_openapi::api::core::v1::{
    ConfigMap, Container, DownwardAPIVolumeFile, EnvVarSource, KeyToPath, ObjectFieldSelector,
    PersistentVolume, PersistentVolumeClaim, Pod, ProjectedVolumeSource, ResourceFieldSelector, Secret,
    ServiceAccount, Volume,
};
use kube::{api::PostParams, Api, ResourceExt};
use serde_json::json;

use crate::{quantity, Shared};

/// Why a container cannot start yet: the waiting reason and message a kubelet
/// reports (`CreateContainerConfigError`, `ContainerCreating`, `ErrImagePull`…).
#[derive(Debug, Clone, PartialEq)]
pub struct Waiting {
    pub reason: String,
    pub message: String,
}

pub fn waiting(reason: &str, message: impl Into<String>) -> Waiting {
    Waiting {
        reason: reason.into(),
        message: message.into(),
    }
}

/// Secrets and ConfigMaps read for one Pod start, each once.
#[derive(Default)]
pub struct Lookups {
    secrets: HashMap<String, Option<BTreeMap<String, Vec<u8>>>>,
    config_maps: HashMap<String, Option<BTreeMap<String, Vec<u8>>>>,
}

impl Lookups {
    pub async fn secret(
        &mut self,
        shared: &Shared,
        ns: &str,
        name: &str,
    ) -> Result<Option<&BTreeMap<String, Vec<u8>>>, Waiting> {
        if !self.secrets.contains_key(name) {
            let api: Api<Secret> = Api::namespaced(shared.client.clone(), ns);
            let data = api
                .get_opt(name)
                .await
                .map_err(|e| waiting("CreateContainerConfigError", format!("read secret {name:?}: {e}")))?
                .map(|s| {
                    let mut d: BTreeMap<String, Vec<u8>> = s
                        .data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.0))
                        .collect();
                    for (k, v) in s.string_data.unwrap_or_default() {
                        d.insert(k, v.into_bytes());
                    }
                    d
                });
            self.secrets.insert(name.to_string(), data);
        }
        Ok(self.secrets[name].as_ref())
    }

    pub async fn config_map(
        &mut self,
        shared: &Shared,
        ns: &str,
        name: &str,
    ) -> Result<Option<&BTreeMap<String, Vec<u8>>>, Waiting> {
        if !self.config_maps.contains_key(name) {
            let api: Api<ConfigMap> = Api::namespaced(shared.client.clone(), ns);
            let data = api
                .get_opt(name)
                .await
                .map_err(|e| {
                    waiting(
                        "CreateContainerConfigError",
                        format!("read configmap {name:?}: {e}"),
                    )
                })?
                .map(|m| {
                    let mut d: BTreeMap<String, Vec<u8>> = m
                        .data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.into_bytes()))
                        .collect();
                    for (k, v) in m.binary_data.unwrap_or_default() {
                        d.insert(k, v.0);
                    }
                    d
                });
            self.config_maps.insert(name.to_string(), data);
        }
        Ok(self.config_maps[name].as_ref())
    }
}

/// A `fieldRef` of the downward API.
pub fn field_value(pod: &Pod, node: &str, f: &ObjectFieldSelector) -> Result<String, Waiting> {
    let path = f.field_path.as_str();
    let spec = pod.spec.clone().unwrap_or_default();
    let v = match path {
        "metadata.name" => pod.name_any(),
        "metadata.namespace" => pod.namespace().unwrap_or_default(),
        "metadata.uid" => pod.uid().unwrap_or_default(),
        "spec.nodeName" => spec.node_name.unwrap_or_else(|| node.to_string()),
        "spec.serviceAccountName" => spec.service_account_name.unwrap_or_else(|| "default".into()),
        "status.hostIP" | "status.podIP" | "status.hostIPs" | "status.podIPs" => "127.0.0.1".into(),
        "metadata.labels" | "metadata.annotations" => {
            let m = if path == "metadata.labels" {
                pod.labels()
            } else {
                pod.annotations()
            };
            m.iter().map(|(k, v)| format!("{k}={v:?}\n")).collect()
        }
        p => {
            let key = |prefix: &str| {
                p.strip_prefix(prefix)
                    .and_then(|r| r.strip_suffix("']"))
                    .map(str::to_string)
            };
            if let Some(k) = key("metadata.labels['") {
                pod.labels().get(&k).cloned().unwrap_or_default()
            } else if let Some(k) = key("metadata.annotations['") {
                pod.annotations().get(&k).cloned().unwrap_or_default()
            } else {
                return Err(waiting(
                    "CreateContainerConfigError",
                    format!("unsupported fieldRef fieldPath {p:?}"),
                ));
            }
        }
    };
    Ok(v)
}

/// A `resourceFieldRef`, in units of its divisor (rounded up, as the kubelet does).
pub fn resource_value(
    pod: &Pod,
    container: Option<&Container>,
    r: &ResourceFieldSelector,
) -> Result<String, Waiting> {
    let c = match r.container_name.as_deref().filter(|n| !n.is_empty()) {
        Some(n) => pod
            .spec
            .as_ref()
            .and_then(|s| s.containers.iter().find(|c| c.name == n)),
        None => container,
    }
    .ok_or_else(|| {
        waiting(
            "CreateContainerConfigError",
            "resourceFieldRef: no such container",
        )
    })?;
    let (kind, name) = r.resource.split_once('.').ok_or_else(|| {
        waiting(
            "CreateContainerConfigError",
            format!("bad resource {:?}", r.resource),
        )
    })?;
    let value = quantity::resource(c, kind, name).unwrap_or(match name {
        "memory" => 8.0 * 1024.0 * 1024.0 * 1024.0,
        "cpu" if kind == "limits" => 2.0,
        _ => 0.0,
    });
    let divisor = r
        .divisor
        .as_ref()
        .and_then(|d| quantity::parse(&d.0))
        .filter(|d| *d > 0.0)
        .unwrap_or(1.0);
    Ok(format!("{}", (value / divisor).ceil() as i64))
}

/// Expands `$(VAR)` references from `env` (`$$` escapes), as the kubelet does.
pub fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(body) = after.strip_prefix('(') {
            match body.find(')') {
                Some(j) => {
                    let name = &body[..j];
                    match env.iter().rev().find(|(k, _)| k == name) {
                        Some((_, v)) => out.push_str(v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &body[j + 1..];
                }
                None => {
                    out.push('$');
                    rest = after;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The container's environment from `envFrom` and `env`, appended to `base`.
pub async fn container_env(
    shared: &Shared,
    pod: &Pod,
    c: &Container,
    lookups: &mut Lookups,
    base: Vec<(String, String)>,
) -> Result<Vec<(String, String)>, Waiting> {
    let ns = pod.namespace().unwrap_or_default();
    let mut env = base;
    let set = |env: &mut Vec<(String, String)>, k: String, v: String| {
        env.retain(|(k2, _)| *k2 != k);
        env.push((k, v));
    };
    for from in c.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let (kind, name, optional, data) = if let Some(s) = &from.secret_ref {
            (
                "secret",
                &s.name,
                s.optional,
                lookups.secret(shared, &ns, &s.name).await?,
            )
        } else if let Some(m) = &from.config_map_ref {
            (
                "configmap",
                &m.name,
                m.optional,
                lookups.config_map(shared, &ns, &m.name).await?,
            )
        } else {
            continue;
        };
        let data = match data {
            Some(d) => d.clone(),
            None if optional == Some(true) => continue,
            None => {
                return Err(waiting(
                    "CreateContainerConfigError",
                    format!("{kind} {name:?} not found"),
                ))
            }
        };
        for (k, v) in data {
            set(
                &mut env,
                format!("{prefix}{k}"),
                String::from_utf8_lossy(&v).into_owned(),
            );
        }
    }
    for var in c.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(v), _) => Some(expand(v, &env)),
            (None, None) => Some(String::new()),
            (None, Some(from)) => value_from(shared, pod, c, &ns, &var.name, from, lookups).await?,
        };
        if let Some(v) = value {
            set(&mut env, var.name.clone(), v);
        }
    }
    Ok(env)
}

/// An env var's `valueFrom`: a Secret or ConfigMap key (`None` when optional
/// and missing), a downward API field or a resource field.
async fn value_from(
    shared: &Shared,
    pod: &Pod,
    c: &Container,
    ns: &str,
    var: &str,
    from: &EnvVarSource,
    lookups: &mut Lookups,
) -> Result<Option<String>, Waiting> {
    let (kind, what, r_name, r_key, optional, d) = if let Some(r) = &from.secret_key_ref {
        let d = lookups.secret(shared, ns, &r.name).await?;
        ("secret", "Secret", &r.name, &r.key, r.optional, d)
    } else if let Some(r) = &from.config_map_key_ref {
        let d = lookups.config_map(shared, ns, &r.name).await?;
        ("configmap", "ConfigMap", &r.name, &r.key, r.optional, d)
    } else if let Some(f) = &from.field_ref {
        return field_value(pod, shared.node(), f).map(Some);
    } else if let Some(r) = &from.resource_field_ref {
        return resource_value(pod, Some(c), r).map(Some);
    } else {
        return Err(waiting(
            "CreateContainerConfigError",
            format!("unsupported valueFrom for ${var}"),
        ));
    };
    match d.and_then(|d| d.get(r_key)) {
        Some(v) => Ok(Some(String::from_utf8_lossy(v).into_owned())),
        None if optional == Some(true) => Ok(None),
        None if d.is_none() => Err(waiting(
            "CreateContainerConfigError",
            format!("{kind} {r_name:?} not found"),
        )),
        None => Err(waiting(
            "CreateContainerConfigError",
            format!("couldn't find key {r_key} in {what} {ns}/{r_name}"),
        )),
    }
}

/// A prepared volume: a host directory (or file) and whether it must be read-only.
#[derive(Debug, Clone)]
pub struct HostVolume {
    pub path: PathBuf,
    pub read_only: bool,
    /// A tmpfs of this size (emptyDir medium Memory) instead of a bind mount.
    pub tmpfs: Option<Option<u64>>,
}

fn write_file(dir: &Path, rel: &str, data: &[u8], mode: u32) -> Result<(), Waiting> {
    let rel = rel.trim_start_matches('/');
    if rel.split('/').any(|p| p == "..") {
        return Err(waiting(
            "ContainerCreating",
            format!("refusing path {rel:?} with '..'"),
        ));
    }
    let p = dir.join(rel);
    let io = |e: std::io::Error| waiting("ContainerCreating", format!("write {}: {e}", p.display()));
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    std::fs::write(&p, data).map_err(io)?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    Ok(())
}

fn project_keys(
    dir: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<KeyToPath>>,
    default_mode: u32,
    what: &str,
) -> Result<(), Waiting> {
    match items {
        Some(items) if !items.is_empty() => {
            for it in items {
                let Some(v) = data.get(&it.key) else {
                    return Err(waiting(
                        "ContainerCreating",
                        format!(
                            "MountVolume.SetUp failed: {what}: configuration has no key {:?}",
                            it.key
                        ),
                    ));
                };
                write_file(dir, &it.path, v, it.mode.map_or(default_mode, |m| m as u32))?;
            }
        }
        _ => {
            for (k, v) in data {
                write_file(dir, k, v, default_mode)?;
            }
        }
    }
    Ok(())
}

fn downward_files(
    pod: &Pod,
    node: &str,
    dir: &Path,
    items: &[DownwardAPIVolumeFile],
    default_mode: u32,
) -> Result<(), Waiting> {
    for it in items {
        let v = if let Some(f) = &it.field_ref {
            field_value(pod, node, f)?
        } else if let Some(r) = &it.resource_field_ref {
            resource_value(pod, None, r)?
        } else {
            continue;
        };
        write_file(
            dir,
            &it.path,
            v.as_bytes(),
            it.mode.map_or(default_mode, |m| m as u32),
        )?;
    }
    Ok(())
}

/// Requests a token for the Pod's ServiceAccount, bound to the Pod.
async fn service_account_token(
    shared: &Shared,
    pod: &Pod,
    audience: Option<&str>,
    expiration: Option<i64>,
) -> Result<String, Waiting> {
    let ns = pod.namespace().unwrap_or_default();
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let api: Api<ServiceAccount> = Api::namespaced(shared.client.clone(), &ns);
    let mut spec = json!({
        "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod.name_any(), "uid": pod.uid()},
        "expirationSeconds": expiration.unwrap_or(3607),
    });
    if let Some(a) = audience.filter(|a| !a.is_empty()) {
        spec["audiences"] = json!([a]);
    }
    let req = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec});
    let resp: serde_json::Value = api
        .create_subresource("token", &sa, &PostParams::default(), &req)
        .await
        .map_err(|e| {
            waiting(
                "ContainerCreating",
                format!("MountVolume.SetUp failed: failed to fetch token for serviceaccount {ns}/{sa}: {e}"),
            )
        })?;
    resp.pointer("/status/token")
        .and_then(|t| t.as_str())
        .map(str::to_string)
        .ok_or_else(|| waiting("ContainerCreating", "TokenRequest answered without a token"))
}

/// Makes every volume of the Pod under `dir`; the ones a container mounts are
/// returned by name.
pub async fn prepare_volumes(
    shared: &Shared,
    pod: &Pod,
    dir: &Path,
    lookups: &mut Lookups,
) -> Result<HashMap<String, HostVolume>, Waiting> {
    let mut out = HashMap::new();
    let volumes: Vec<Volume> = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default();
    for v in volumes {
        let hv = prepare_volume(shared, pod, &dir.join(&v.name), &v, lookups).await?;
        out.insert(v.name.clone(), hv);
    }
    Ok(out)
}

fn io_waiting(p: &Path, e: std::io::Error) -> Waiting {
    waiting("ContainerCreating", format!("{}: {e}", p.display()))
}

/// An empty directory for a volume's files (mode 0755), replacing any left over.
fn fresh_dir(vdir: &Path) -> Result<(), Waiting> {
    if vdir.exists() {
        std::fs::remove_dir_all(vdir).map_err(|e| io_waiting(vdir, e))?;
    }
    std::fs::create_dir_all(vdir).map_err(|e| io_waiting(vdir, e))?;
    std::fs::set_permissions(vdir, std::fs::Permissions::from_mode(0o755)).map_err(|e| io_waiting(vdir, e))
}

fn read_only(path: PathBuf) -> HostVolume {
    HostVolume {
        path,
        read_only: true,
        tmpfs: None,
    }
}

/// One volume of the Pod made ready on the host under `vdir`.
async fn prepare_volume(
    shared: &Shared,
    pod: &Pod,
    vdir: &Path,
    v: &Volume,
    lookups: &mut Lookups,
) -> Result<HostVolume, Waiting> {
    let ns = pod.namespace().unwrap_or_default();
    let vdir = vdir.to_path_buf();
    if let Some(e) = &v.empty_dir {
        if e.medium.as_deref() == Some("Memory") {
            let size = e
                .size_limit
                .as_ref()
                .and_then(|q| quantity::bytes(&q.0))
                .map(|b| b as u64);
            return Ok(HostVolume {
                path: vdir,
                read_only: false,
                tmpfs: Some(size),
            });
        }
        std::fs::create_dir_all(&vdir).map_err(|e| io_waiting(&vdir, e))?;
        std::fs::set_permissions(&vdir, std::fs::Permissions::from_mode(0o777))
            .map_err(|e| io_waiting(&vdir, e))?;
        return Ok(HostVolume {
            path: vdir,
            read_only: false,
            tmpfs: None,
        });
    }
    if let Some(s) = &v.secret {
        let name = s.secret_name.clone().unwrap_or_default();
        fresh_dir(&vdir)?;
        let data = lookups.secret(shared, &ns, &name).await?.cloned();
        let src = Keyed::new("secret", &name, s.items.as_ref(), s.optional);
        src.project(&vdir, data, s.default_mode.unwrap_or(0o644) as u32, &v.name)?;
        return Ok(read_only(vdir));
    }
    if let Some(m) = &v.config_map {
        fresh_dir(&vdir)?;
        let data = lookups.config_map(shared, &ns, &m.name).await?.cloned();
        let src = Keyed::new("configmap", &m.name, m.items.as_ref(), m.optional);
        src.project(&vdir, data, m.default_mode.unwrap_or(0o644) as u32, &v.name)?;
        return Ok(read_only(vdir));
    }
    if let Some(d) = &v.downward_api {
        fresh_dir(&vdir)?;
        downward_files(
            pod,
            shared.node(),
            &vdir,
            d.items.as_deref().unwrap_or_default(),
            d.default_mode.unwrap_or(0o644) as u32,
        )?;
        return Ok(read_only(vdir));
    }
    if let Some(p) = &v.projected {
        fresh_dir(&vdir)?;
        projected(shared, pod, &vdir, v, p, lookups).await?;
        return Ok(read_only(vdir));
    }
    if let Some(h) = &v.host_path {
        return host_path(&h.path, h.type_.as_deref().unwrap_or(""));
    }
    if let Some(c) = &v.persistent_volume_claim {
        return Ok(HostVolume {
            path: claim_dir(shared, &ns, &c.claim_name).await?,
            read_only: c.read_only == Some(true),
            tmpfs: None,
        });
    }
    Err(waiting(
        "CreateContainerConfigError",
        format!(
            "volume {:?}: this volume type is not supported by the pod agent",
            v.name
        ),
    ))
}

/// A Secret or ConfigMap source of a volume: its keys projected as files.
struct Keyed<'a> {
    kind: &'static str,
    name: &'a str,
    items: Option<&'a Vec<KeyToPath>>,
    optional: Option<bool>,
}

impl<'a> Keyed<'a> {
    fn new(
        kind: &'static str,
        name: &'a str,
        items: Option<&'a Vec<KeyToPath>>,
        optional: Option<bool>,
    ) -> Self {
        Keyed {
            kind,
            name,
            items,
            optional,
        }
    }

    /// Writes the keys under `vdir`; a missing source is an error unless optional.
    fn project(
        &self,
        vdir: &Path,
        data: Option<BTreeMap<String, Vec<u8>>>,
        mode: u32,
        volume: &str,
    ) -> Result<(), Waiting> {
        match data {
            Some(d) => project_keys(vdir, &d, self.items, mode, self.name),
            None if self.optional == Some(true) => Ok(()),
            None => Err(waiting(
                "ContainerCreating",
                format!(
                    "MountVolume.SetUp failed for volume {volume:?} : {} {:?} not found",
                    self.kind, self.name
                ),
            )),
        }
    }
}

/// A projected volume's sources written under `vdir` (ServiceAccount token,
/// ConfigMaps, Secrets, downward API).
async fn projected(
    shared: &Shared,
    pod: &Pod,
    vdir: &Path,
    v: &Volume,
    p: &ProjectedVolumeSource,
    lookups: &mut Lookups,
) -> Result<(), Waiting> {
    let ns = pod.namespace().unwrap_or_default();
    let mode = p.default_mode.unwrap_or(0o644) as u32;
    for src in p.sources.iter().flatten() {
        if let Some(t) = &src.service_account_token {
            let token =
                service_account_token(shared, pod, t.audience.as_deref(), t.expiration_seconds).await?;
            write_file(vdir, &t.path, token.as_bytes(), mode)?;
        }
        if let Some(c) = &src.config_map {
            let data = lookups.config_map(shared, &ns, &c.name).await?.cloned();
            Keyed::new("configmap", &c.name, c.items.as_ref(), c.optional)
                .project(vdir, data, mode, &v.name)?;
        }
        if let Some(s) = &src.secret {
            let data = lookups.secret(shared, &ns, &s.name).await?.cloned();
            Keyed::new("secret", &s.name, s.items.as_ref(), s.optional).project(vdir, data, mode, &v.name)?;
        }
        if let Some(d) = &src.downward_api {
            downward_files(
                pod,
                shared.node(),
                vdir,
                d.items.as_deref().unwrap_or_default(),
                mode,
            )?;
        }
        if src.cluster_trust_bundle.is_some() || src.pod_certificate.is_some() {
            return Err(waiting(
                "CreateContainerConfigError",
                format!(
                    "volume {:?}: projected source not supported by the pod agent",
                    v.name
                ),
            ));
        }
    }
    Ok(())
}

/// A hostPath volume, its `type` checked as the kubelet does.
fn host_path(path: &str, type_: &str) -> Result<HostVolume, Waiting> {
    let p = PathBuf::from(path);
    match type_ {
        "DirectoryOrCreate" => std::fs::create_dir_all(&p).map_err(|e| io_waiting(&p, e))?,
        "Directory" if !p.is_dir() => {
            return Err(waiting(
                "ContainerCreating",
                format!("hostPath type check failed: {path} is not a directory"),
            ))
        }
        "File" if !p.is_file() => {
            return Err(waiting(
                "ContainerCreating",
                format!("hostPath type check failed: {path} is not a file"),
            ))
        }
        _ => {}
    }
    Ok(HostVolume {
        path: p,
        read_only: false,
        tmpfs: None,
    })
}

/// The directory standing in for a PersistentVolumeClaim: the `hostPath` (or
/// `local`) path of the PersistentVolume it names in `spec.volumeName`, else a
/// directory of the agent's own, `<state>/volumes/<ns>/<claim>`, kept across Pods.
async fn claim_dir(shared: &Shared, ns: &str, claim: &str) -> Result<PathBuf, Waiting> {
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(shared.client.clone(), ns);
    let pvc = pvcs
        .get_opt(claim)
        .await
        .map_err(|e| {
            waiting(
                "ContainerCreating",
                format!("read persistentvolumeclaim {claim:?}: {e}"),
            )
        })?
        .ok_or_else(|| {
            waiting(
                "ContainerCreating",
                format!("persistentvolumeclaim {claim:?} not found"),
            )
        })?;
    if let Some(pv_name) = pvc
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.clone())
        .filter(|n| !n.is_empty())
    {
        let pvs: Api<PersistentVolume> = Api::all(shared.client.clone());
        let pv = pvs
            .get_opt(&pv_name)
            .await
            .map_err(|e| {
                waiting(
                    "ContainerCreating",
                    format!("read persistentvolume {pv_name:?}: {e}"),
                )
            })?
            .ok_or_else(|| {
                waiting(
                    "ContainerCreating",
                    format!("persistentvolume {pv_name:?} not found"),
                )
            })?;
        let spec = pv.spec.unwrap_or_default();
        if let Some(h) = spec.host_path {
            return Ok(PathBuf::from(h.path));
        }
        if let Some(l) = spec.local {
            return Ok(PathBuf::from(l.path));
        }
        return Err(waiting(
            "ContainerCreating",
            format!("persistentvolume {pv_name:?}: only hostPath and local volumes are supported by the pod agent"),
        ));
    }
    let dir = shared.args.state_dir.join("volumes").join(ns).join(claim);
    std::fs::create_dir_all(&dir)
        .map_err(|e| waiting("ContainerCreating", format!("{}: {e}", dir.display())))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))
        .map_err(|e| waiting("ContainerCreating", format!("{}: {e}", dir.display())))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion() {
        let env = vec![
            ("A".to_string(), "1".to_string()),
            ("B".to_string(), "x".to_string()),
        ];
        assert_eq!(expand("$(A)-$(B)", &env), "1-x");
        assert_eq!(expand("$$(A)", &env), "$(A)");
        assert_eq!(expand("$(C)", &env), "$(C)");
        assert_eq!(expand("a$b", &env), "a$b");
    }
}
