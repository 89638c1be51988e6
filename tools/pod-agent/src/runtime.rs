//! Containers as runc runs them: an OCI bundle per container (an overlay of the
//! image's root filesystem, config.json), `runc run` in the foreground (its exit
//! status is the container's), the memory limit in a cgroup v1 parent the agent
//! owns (so an OOM kill can be told from a plain SIGKILL afterwards).

use std::{
    ffi::CString,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::process::{Child, Command};
use tracing::{info, warn};

use crate::{volumes::Waiting, Args};

/// The image config the agent honours (written by tools/image-rootfs.sh).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ImageConfig {
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub working_dir: String,
}

#[derive(Debug, Clone)]
pub struct Image {
    pub rootfs: PathBuf,
    pub config: ImageConfig,
}

impl Image {
    /// (uid, gid) of a name or number in the image's /etc/passwd (gid 0 when unknown).
    pub fn lookup_user(&self, user: &str) -> Option<(i64, Option<i64>)> {
        let passwd = std::fs::read_to_string(self.rootfs.join("etc/passwd")).unwrap_or_default();
        let by_passwd = passwd.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 3 && (f[0] == user || f[2] == user))
                .then(|| Some((f[2].parse().ok()?, f[3].parse().ok())))
                .flatten()
        });
        by_passwd.or_else(|| user.parse().ok().map(|u| (u, None)))
    }

    pub fn home_of(&self, uid: i64) -> Option<String> {
        let passwd = std::fs::read_to_string(self.rootfs.join("etc/passwd")).ok()?;
        passwd.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 5 && f[2] == uid.to_string()).then(|| f[5].to_string())
        })
    }
}

/// Everything one container start needs, decided by the Pod's spec.
#[derive(Debug, Clone)]
pub struct Plan {
    pub pod_uid: String,
    pub pod_dir: PathBuf,
    pub name: String,
    pub hostname: String,
    pub image: Image,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: String,
    pub uid: i64,
    pub gid: i64,
    pub additional_gids: Vec<i64>,
    pub capabilities: Vec<String>,
    pub no_new_privileges: bool,
    pub read_only_root: bool,
    pub seccomp: bool,
    pub mounts: Vec<Value>,
    pub memory_limit: Option<u64>,
    pub cpu_limit_millis: Option<u64>,
    pub cpu_request_millis: Option<u64>,
    pub termination_log: PathBuf,
    pub termination_path: String,
}

impl Plan {
    pub fn id(&self) -> String {
        container_id(&self.pod_uid, &self.name)
    }

    pub fn dir(&self) -> PathBuf {
        self.pod_dir.join("containers").join(&self.name)
    }
}

/// The runc id of a Pod's container.
pub fn container_id(pod_uid: &str, container: &str) -> String {
    format!("{pod_uid}_{container}")
}

pub struct Runtime {
    runc: PathBuf,
    pub root: PathBuf,
    pub version: String,
    images: Vec<(String, PathBuf)>,
    state_dir: PathBuf,
    /// Our own memory cgroup (cgroup v1), under which every container's lives.
    cgroup_prefix: String,
}

/// A running `runc run`.
pub struct Running {
    pub child: Child,
    pub id: String,
    pub log: PathBuf,
    pub log_offset: u64,
}

/// How a container ended.
#[derive(Debug, Clone)]
pub struct Exit {
    pub code: i32,
    pub signal: Option<i32>,
    pub reason: String,
}

pub fn kernel_version() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string()
}

const MEMORY_ROOT: &str = "/sys/fs/cgroup/memory";

impl Runtime {
    pub fn new(args: &Args) -> Result<Runtime> {
        let out = std::process::Command::new(&args.runc)
            .arg("--version")
            .output()
            .with_context(|| {
                format!(
                    "run {} --version (install runc: apt-get install runc)",
                    args.runc.display()
                )
            })?;
        let version = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim_start_matches("runc version ")
            .to_string();
        let cgroup_prefix = std::fs::read_to_string("/proc/self/cgroup")?
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.splitn(3, ':').collect();
                (f.len() == 3 && f[1].split(',').any(|c| c == "memory"))
                    .then(|| f[2].trim_end_matches('/').to_string())
            })
            .unwrap_or_default();
        if !Path::new(MEMORY_ROOT).join("memory.limit_in_bytes").exists()
            && !Path::new(MEMORY_ROOT)
                .join(cgroup_prefix.trim_start_matches('/'))
                .join("memory.limit_in_bytes")
                .exists()
        {
            anyhow::bail!("the pod agent needs the cgroup v1 memory controller at {MEMORY_ROOT}");
        }
        let root = args.state_dir.join("runc");
        std::fs::create_dir_all(&root)?;
        for (name, dir) in &args.images {
            if !dir.join("rootfs").is_dir() || !dir.join("image.json").is_file() {
                anyhow::bail!(
                    "image {name}: {} has no rootfs/ and image.json (tools/image-rootfs.sh makes them)",
                    dir.display()
                );
            }
        }
        Ok(Runtime {
            runc: args.runc.clone(),
            root,
            version,
            images: args.images.clone(),
            state_dir: args.state_dir.clone(),
            cgroup_prefix,
        })
    }

    fn runc(&self) -> Command {
        let mut c = Command::new(&self.runc);
        c.arg("--root").arg(&self.root);
        c
    }

    /// The image a reference names (any tag or digest of a configured name).
    pub fn image(&self, reference: &str) -> Result<Image, Waiting> {
        let repo = reference.split('@').next().unwrap_or(reference);
        let repo = match repo.rsplit_once(':') {
            Some((r, tag)) if !tag.contains('/') => r,
            _ => repo,
        };
        let found = self
            .images
            .iter()
            .find(|(n, _)| n == reference || n == repo || repo.ends_with(&format!("/{n}")));
        let Some((_, dir)) = found else {
            return Err(crate::volumes::waiting(
                "ErrImagePull",
                format!(
                    "failed to pull image {reference:?}: the pod agent has only {:?}",
                    self.images.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>()
                ),
            ));
        };
        let config: ImageConfig = std::fs::read(dir.join("image.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Ok(Image {
            rootfs: dir.join("rootfs"),
            config,
        })
    }

    /// Stops whatever an earlier agent left in its runc root and state dir.
    pub async fn clean_leftovers(&self) {
        if let Ok(out) = self.runc().args(["list", "-q"]).output().await {
            for id in String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| !l.is_empty())
            {
                info!("stopping leftover container {id}");
                let _ = self.runc().args(["kill", id, "KILL"]).output().await;
                let _ = self.runc().args(["delete", "--force", id]).output().await;
            }
        }
        let prefix = self.state_dir.join("pods");
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|p| Path::new(p).starts_with(&prefix))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            umount(Path::new(p));
        }
    }

    fn memory_dir(&self, pod_uid: &str, container: &str) -> PathBuf {
        Path::new(MEMORY_ROOT)
            .join(self.cgroup_prefix.trim_start_matches('/'))
            .join("pod-agent")
            .join(pod_uid)
            .join(container)
    }

    fn cgroups_path(&self, pod_uid: &str, container: &str) -> String {
        format!("{}/pod-agent/{pod_uid}/{container}/ctr", self.cgroup_prefix)
    }

    /// Makes the bundle and starts `runc run` (returns once runc is started).
    pub async fn start(&self, plan: &Plan) -> Result<Running> {
        let dir = plan.dir();
        let bundle = dir.join("bundle");
        let rootfs = bundle.join("rootfs");
        let (upper, work) = (dir.join("upper"), dir.join("work"));
        umount(&rootfs);
        for d in [&upper, &work] {
            let _ = std::fs::remove_dir_all(d);
        }
        for d in [&upper, &work, &rootfs] {
            std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
        }
        mount_overlay(&plan.image.rootfs, &upper, &work, &rootfs)?;
        let _ = self.runc().args(["delete", "--force", &plan.id()]).output().await;

        let mem = self.memory_dir(&plan.pod_uid, &plan.name);
        let _ = std::fs::remove_dir(mem.join("ctr"));
        let _ = std::fs::remove_dir(&mem);
        std::fs::create_dir_all(&mem).with_context(|| format!("create {}", mem.display()))?;
        if let Some(limit) = plan.memory_limit {
            std::fs::write(mem.join("memory.limit_in_bytes"), limit.to_string())
                .with_context(|| format!("set the memory limit in {}", mem.display()))?;
            // No swap: the limit is the limit (where swap accounting exists).
            let _ = std::fs::write(mem.join("memory.memsw.limit_in_bytes"), limit.to_string());
        }
        let config = self.oci_config(plan);
        std::fs::write(bundle.join("config.json"), serde_json::to_vec_pretty(&config)?)?;
        let log = dir.join("log");
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
        let log_offset = log_file.metadata()?.len();
        let err = log_file.try_clone()?;
        let child = self
            .runc()
            .arg("run")
            .arg("--bundle")
            .arg(&bundle)
            .arg(plan.id())
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .context("spawn runc run")?;
        Ok(Running {
            child,
            id: plan.id(),
            log,
            log_offset,
        })
    }

    /// The OCI runtime config of a container.
    fn oci_config(&self, p: &Plan) -> Value {
        let mut mounts = vec![
            json!({"destination": "/proc", "type": "proc", "source": "proc"}),
            json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
            json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
            json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
            json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
            json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
        ];
        for f in ["/etc/hosts", "/etc/resolv.conf"] {
            if Path::new(f).is_file() {
                mounts.push(json!({"destination": f, "type": "bind", "source": f, "options": ["rbind", "ro", "rprivate"]}));
            }
        }
        mounts.push(json!({"destination": p.termination_path, "type": "bind",
            "source": p.termination_log, "options": ["rbind", "rw", "rprivate"]}));
        mounts.extend(p.mounts.iter().cloned());
        let caps: Vec<String> = p.capabilities.clone();
        let mut resources = json!({
            "devices": [{"allow": false, "access": "rwm"}],
            "pids": {"limit": 4096},
        });
        if let Some(limit) = p.cpu_limit_millis {
            resources["cpu"] = json!({"quota": limit * 100, "period": 100_000});
        }
        if let Some(req) = p.cpu_request_millis {
            let shares = (req * 1024 / 1000).max(2);
            resources["cpu"]["shares"] = json!(shares);
        }
        let mut linux = json!({
            "cgroupsPath": self.cgroups_path(&p.pod_uid, &p.name),
            "resources": resources,
            // The network namespace is the host's: the API server, PostgreSQL and
            // the test servers listen on loopback (see README.md).
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        });
        if p.seccomp {
            linux["seccomp"] = runtime_default_seccomp();
        }
        json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": false,
                "user": {"uid": p.uid, "gid": p.gid, "additionalGids": p.additional_gids},
                "args": p.argv,
                "env": p.env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
                "cwd": p.cwd,
                "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
                "noNewPrivileges": p.no_new_privileges,
            },
            "root": {"path": "rootfs", "readonly": p.read_only_root},
            "hostname": p.hostname,
            "mounts": mounts,
            "linux": linux,
        })
    }

    /// Waits until the container's own process runs (not `runc init`), then
    /// writes what the kernel says about it to `runtime.json`; None when it
    /// ended first.
    pub async fn inspect(&self, plan: &Plan, image_name: &str) -> Option<Value> {
        let id = plan.id();
        for _ in 0..800 {
            let out = self.runc().args(["state", &id]).output().await.ok()?;
            let state: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            let pid = state["pid"].as_i64().unwrap_or(0);
            let status = state["status"].as_str().unwrap_or("");
            if status == "stopped" {
                return None;
            }
            if pid > 0 && status == "running" {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if !cmdline.is_empty() && !cmdline.starts_with(b"runc\0init") && !cmdline.ends_with(b"init\0")
                {
                    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                    let field = |k: &str| {
                        st.lines()
                            .find_map(|l| l.strip_prefix(&format!("{k}:")))
                            .map(|v| v.split_whitespace().map(str::to_string).collect::<Vec<_>>())
                            .unwrap_or_default()
                    };
                    let mountinfo =
                        std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
                    // The last mount on "/" is the one the process sees.
                    let root_opts = mountinfo
                        .lines()
                        .rfind(|l| l.split(' ').nth(4) == Some("/"))
                        .and_then(|l| l.split(' ').nth(5))
                        .unwrap_or("")
                        .to_string();
                    let record = json!({
                        "runtime": "runc",
                        "runtimeVersion": self.version,
                        "id": id,
                        "pid": pid,
                        "image": image_name,
                        "imageRootfs": plan.image.rootfs,
                        "argv": plan.argv,
                        "uid": field("Uid"),
                        "gid": field("Gid"),
                        "groups": field("Groups"),
                        "seccomp": field("Seccomp").first().cloned().unwrap_or_default(),
                        "noNewPrivs": field("NoNewPrivs").first().cloned().unwrap_or_default(),
                        "capEff": field("CapEff").first().cloned().unwrap_or_default(),
                        "capBnd": field("CapBnd").first().cloned().unwrap_or_default(),
                        "rootMountOptions": root_opts,
                        "rootReadOnly": root_opts.split(',').any(|o| o == "ro"),
                        "memoryLimitBytes": plan.memory_limit,
                        "cgroup": std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default()
                            .lines().find(|l| l.contains(":memory:")).unwrap_or("").to_string(),
                    });
                    let _ = std::fs::write(
                        plan.dir().join("runtime.json"),
                        serde_json::to_vec_pretty(&record).ok()?,
                    );
                    return Some(record);
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        None
    }

    pub async fn kill(&self, id: &str, signal: &str) {
        match self.runc().args(["kill", id, signal]).output().await {
            Ok(o) if !o.status.success() => {
                let e = String::from_utf8_lossy(&o.stderr);
                if !e.contains("not running") && !e.contains("does not exist") {
                    warn!("runc kill {id} {signal}: {}", e.trim());
                }
            }
            Err(e) => warn!("runc kill {id} {signal}: {e}"),
            _ => {}
        }
    }

    /// After `runc run` returned: how the container ended, and its bundle,
    /// overlay and cgroups removed (the log and runtime.json stay).
    pub async fn finish(
        &self,
        plan: &Plan,
        status: std::process::ExitStatus,
        log: &Path,
        log_offset: u64,
    ) -> Exit {
        use std::os::unix::process::ExitStatusExt;
        let code = status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(9));
        let mem = self.memory_dir(&plan.pod_uid, &plan.name);
        // The cgroup reached its limit: it hit it (failcnt, memory or memory+swap)
        // or its peak usage is the limit (the kernel does not always count the
        // hit that ends in an OOM kill). A plain SIGKILL leaves both below it.
        let read = |f: &str| -> u64 {
            std::fs::read_to_string(mem.join(f))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0)
        };
        let peak = read("memory.max_usage_in_bytes").max(read("memory.memsw.max_usage_in_bytes"));
        let failcnt = read("memory.failcnt")
            + read("memory.memsw.failcnt")
            + plan.memory_limit.map_or(0, |l| u64::from(peak + 65536 >= l));
        let _ = self.runc().args(["delete", "--force", &plan.id()]).output().await;
        let tail = read_from(log, log_offset);
        let start_error = code != 0
            && tail
                .lines()
                .any(|l| l.contains("runc run failed") || l.starts_with("runc run:"));
        let exit = if start_error {
            Exit {
                code: 128,
                signal: None,
                reason: "StartError".into(),
            }
        } else if code == 137 && failcnt > 0 && plan.memory_limit.is_some() {
            Exit {
                code,
                signal: Some(9),
                reason: "OOMKilled".into(),
            }
        } else if code == 0 {
            Exit {
                code,
                signal: None,
                reason: "Completed".into(),
            }
        } else {
            Exit {
                code,
                signal: (code > 128).then_some(code - 128),
                reason: "Error".into(),
            }
        };
        self.cleanup(plan);
        exit
    }

    fn cleanup(&self, plan: &Plan) {
        let dir = plan.dir();
        umount(&dir.join("bundle/rootfs"));
        for d in ["upper", "work"] {
            let _ = std::fs::remove_dir_all(dir.join(d));
        }
        // runc removed the leaf; our parents remain in every hierarchy.
        if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
            for e in entries.flatten() {
                let base = e
                    .path()
                    .join(self.cgroup_prefix.trim_start_matches('/'))
                    .join("pod-agent")
                    .join(&plan.pod_uid);
                let _ = std::fs::remove_dir(base.join(&plan.name).join("ctr"));
                let _ = std::fs::remove_dir(base.join(&plan.name));
                let _ = std::fs::remove_dir(&base);
            }
        }
    }
}

/// The text a log file got since `offset`, at most its last 64 KiB.
pub fn read_from(log: &Path, offset: u64) -> String {
    let data = std::fs::read(log).unwrap_or_default();
    let start = (offset as usize)
        .min(data.len())
        .max(data.len().saturating_sub(65536));
    String::from_utf8_lossy(&data[start..]).into_owned()
}

fn mount_overlay(lower: &Path, upper: &Path, work: &Path, target: &Path) -> Result<()> {
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    let c = |s: &str| CString::new(s).unwrap();
    let (src, tgt, fstype, data) = (c("overlay"), c(&target.to_string_lossy()), c("overlay"), c(&opts));
    // SAFETY: plain mount(2) with NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            fstype.as_ptr(),
            0,
            data.as_ptr() as *const _,
        )
    };
    if r != 0 {
        anyhow::bail!(
            "mount overlay on {}: {}",
            target.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

fn umount(target: &Path) {
    let Ok(t) = CString::new(target.to_string_lossy().as_bytes()) else {
        return;
    };
    // SAFETY: umount2(2) with a NUL-terminated path.
    unsafe {
        libc::umount2(t.as_ptr(), libc::MNT_DETACH);
    }
}

/// Makes a file the container may write its termination message to.
pub fn termination_log(dir: &Path) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let p = dir.join("termination-log");
    std::fs::write(&p, b"")?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666))?;
    Ok(p)
}

/// The container runtime's default capabilities (containerd's list).
pub const DEFAULT_CAPABILITIES: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// `seccompProfile: RuntimeDefault`: every syscall allowed but the ones the
/// Docker/containerd default profile keeps from containers (kernel modules,
/// mounts and namespaces, keyrings, tracing, clocks, BPF, reboot…), which fail
/// with EPERM. A deny list rather than containerd's allow list: shorter to
/// read, and the same for the programs run here.
pub fn runtime_default_seccomp() -> Value {
    let denied = [
        "acct",
        "add_key",
        "bpf",
        "clock_adjtime",
        "clock_settime",
        "create_module",
        "delete_module",
        "fanotify_init",
        "finit_module",
        "fsconfig",
        "fsmount",
        "fsopen",
        "fspick",
        "get_kernel_syms",
        "init_module",
        "ioperm",
        "iopl",
        "kcmp",
        "kexec_file_load",
        "kexec_load",
        "keyctl",
        "lookup_dcookie",
        "mount",
        "mount_setattr",
        "move_mount",
        "name_to_handle_at",
        "nfsservctl",
        "open_by_handle_at",
        "open_tree",
        "perf_event_open",
        "pivot_root",
        "process_vm_readv",
        "process_vm_writev",
        "ptrace",
        "query_module",
        "quotactl",
        "quotactl_fd",
        "reboot",
        "request_key",
        "setns",
        "settimeofday",
        "swapoff",
        "swapon",
        "sysfs",
        "_sysctl",
        "umount2",
        "unshare",
        "uselib",
        "userfaultfd",
        "ustat",
        "vm86",
        "vm86old",
    ];
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [{"names": denied.to_vec(), "action": "SCMP_ACT_ERRNO", "errnoRet": 1}],
    })
}
