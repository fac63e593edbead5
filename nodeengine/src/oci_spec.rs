//! The OCI runtime spec (config.json) we hand to containerd for one instance.
//!
//! Written by hand rather than through a spec crate: it is one JSON document, and
//! keeping it here makes every security-relevant default visible in one place.

use serde_json::{Value, json};

/// Image defaults read from the image config blob.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageDefaults {
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: String,
    pub user: String,
}

/// Everything the spec depends on.
#[derive(Debug, Clone)]
pub struct SpecInput<'a> {
    pub namespace: &'a str,
    pub id: &'a str,
    pub instance: u32,
    pub image: &'a ImageDefaults,
    /// Replaces the image's Cmd when not empty (Entrypoint is kept, as docker does).
    pub cmd: &'a [String],
    pub environment: &'a [String],
    pub vcpus: f64,
    pub memory_mib: u64,
    pub privileged: bool,
    /// Share the host network namespace (overlay off) instead of a private one that
    /// NetManager populates.
    pub host_network: bool,
}

const CPU_PERIOD_US: u64 = 100_000;

/// Docker's default capability set: what an unprivileged service gets.
const DEFAULT_CAPS: &[&str] = &[
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

const PRIVILEGED_EXTRA_CAPS: &[&str] = &[
    "CAP_SYS_ADMIN",
    "CAP_NET_ADMIN",
    "CAP_SYS_PTRACE",
    "CAP_SYS_MODULE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_NICE",
    "CAP_SYS_RAWIO",
    "CAP_LINUX_IMMUTABLE",
    "CAP_SYS_BOOT",
    "CAP_LEASE",
    "CAP_SYS_PACCT",
    "CAP_SYS_TTY_CONFIG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_CONTROL",
    "CAP_MAC_ADMIN",
    "CAP_MAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_NET_BROADCAST",
    "CAP_SYSLOG",
];

/// The process arguments: image Entrypoint, then the job's cmd or the image's Cmd.
pub fn process_args(image: &ImageDefaults, cmd: &[String]) -> Vec<String> {
    let mut args = image.entrypoint.clone();
    if cmd.is_empty() {
        args.extend(image.cmd.iter().cloned());
    } else {
        args.extend(cmd.iter().cloned());
    }
    args
}

/// Image env, then `HOSTNAME`, then the job's environment; later entries win.
pub fn process_env(image: &ImageDefaults, instance: u32, job_env: &[String]) -> Vec<String> {
    let mut env: Vec<String> = Vec::new();
    let mut set = |kv: String| {
        let key = kv.split('=').next().unwrap_or_default().to_string();
        env.retain(|e| e.split('=').next() != Some(key.as_str()));
        env.push(kv);
    };
    for e in &image.env {
        set(e.clone());
    }
    set(format!("HOSTNAME=instance-{instance}"));
    for e in job_env {
        set(e.clone());
    }
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(
            0,
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        );
    }
    env
}

/// `uid[:gid]` when numeric; a user name would need the image's /etc/passwd, which we
/// do not read, so it runs as root (logged by the caller).
pub fn parse_user(user: &str) -> Option<(u32, u32)> {
    if user.is_empty() {
        return Some((0, 0));
    }
    let (u, g) = user.split_once(':').unwrap_or((user, ""));
    let uid: u32 = u.parse().ok()?;
    let gid: u32 = if g.is_empty() { uid } else { g.parse().ok()? };
    Some((uid, gid))
}

/// The host's resolv.conf; with systemd-resolved the stub file points at 127.0.0.53,
/// which is unreachable from another network namespace, so prefer the real one.
pub fn host_resolv_conf() -> &'static str {
    const RESOLVED: &str = "/run/systemd/resolve/resolv.conf";
    if std::path::Path::new(RESOLVED).exists() {
        RESOLVED
    } else {
        "/etc/resolv.conf"
    }
}

fn bind(dest: &str, source: &str, ro: bool) -> Value {
    let mut options = vec!["rbind", "rprivate"];
    if ro {
        options.push("ro");
    }
    json!({"destination": dest, "type": "bind", "source": source, "options": options})
}

fn base_mounts() -> Vec<Value> {
    vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
        json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}),
    ]
}

fn resources(vcpus: f64, memory_mib: u64) -> Value {
    let mut r = json!({"devices": [{"allow": false, "access": "rwm"}]});
    if memory_mib > 0 {
        r["memory"] = json!({"limit": memory_mib.saturating_mul(1 << 20)});
    }
    if vcpus > 0.0 {
        // At least 1 ms per period: the kernel refuses smaller quotas.
        let quota = ((vcpus * CPU_PERIOD_US as f64) as i64).max(1000);
        r["cpu"] = json!({"quota": quota, "period": CPU_PERIOD_US});
    }
    r
}

/// Builds the runtime spec.
pub fn build_spec(input: &SpecInput<'_>) -> Value {
    let (uid, gid) = parse_user(&input.image.user).unwrap_or((0, 0));
    let mut caps: Vec<&str> = DEFAULT_CAPS.to_vec();
    if input.privileged {
        caps.extend_from_slice(PRIVILEGED_EXTRA_CAPS);
    }
    let cwd = if input.image.working_dir.starts_with('/') {
        input.image.working_dir.as_str()
    } else {
        "/"
    };
    let mut mounts = base_mounts();
    mounts.push(bind("/etc/hosts", "/etc/hosts", true));
    mounts.push(bind("/etc/resolv.conf", host_resolv_conf(), true));

    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
    ];
    if !input.host_network {
        namespaces.push(json!({"type": "network"}));
    }
    let mut linux = json!({
        "resources": resources(input.vcpus, input.memory_mib),
        "cgroupsPath": format!("/{}/{}", input.namespace, input.id),
        "namespaces": namespaces,
    });
    if !input.privileged {
        linux["maskedPaths"] = json!([
            "/proc/acpi",
            "/proc/asound",
            "/proc/kcore",
            "/proc/keys",
            "/proc/latency_stats",
            "/proc/timer_list",
            "/proc/timer_stats",
            "/proc/sched_debug",
            "/sys/firmware",
            "/proc/scsi"
        ]);
        linux["readonlyPaths"] = json!([
            "/proc/bus",
            "/proc/fs",
            "/proc/irq",
            "/proc/sys",
            "/proc/sysrq-trigger"
        ]);
    }
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": uid, "gid": gid},
            "args": process_args(input.image, input.cmd),
            "env": process_env(input.image, input.instance, input.environment),
            "cwd": cwd,
            "capabilities": {
                "bounding": caps, "effective": caps, "permitted": caps
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": !input.privileged
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": format!("instance-{}", input.instance),
        "mounts": mounts,
        "linux": linux
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input<'a>(img: &'a ImageDefaults, cmd: &'a [String], env: &'a [String]) -> SpecInput<'a> {
        SpecInput {
            namespace: "oakestra",
            id: "a.b.c.d.instance.2",
            instance: 2,
            image: img,
            cmd,
            environment: env,
            vcpus: 0.5,
            memory_mib: 64,
            privileged: false,
            host_network: false,
        }
    }

    #[test]
    fn spec_has_limits_hostname_env_and_cmd() {
        let img = ImageDefaults {
            env: vec!["PATH=/bin".into(), "A=1".into()],
            entrypoint: vec![],
            cmd: vec!["sh".into()],
            ..Default::default()
        };
        let cmd = vec!["sleep".to_string(), "5".to_string()];
        let env = vec!["A=2".to_string()];
        let s = build_spec(&input(&img, &cmd, &env));
        assert_eq!(s["hostname"], "instance-2");
        assert_eq!(s["process"]["args"], json!(["sleep", "5"]));
        assert_eq!(
            s["process"]["env"],
            json!(["PATH=/bin", "HOSTNAME=instance-2", "A=2"])
        );
        assert_eq!(s["linux"]["resources"]["memory"]["limit"], 64 << 20);
        assert_eq!(s["linux"]["resources"]["cpu"]["quota"], 50_000);
        assert_eq!(s["linux"]["cgroupsPath"], "/oakestra/a.b.c.d.instance.2");
        assert!(
            s["mounts"]
                .as_array()
                .is_some_and(|m| m.iter().any(|m| m["destination"] == "/etc/hosts"))
        );
    }

    #[test]
    fn users() {
        assert_eq!(parse_user(""), Some((0, 0)));
        assert_eq!(parse_user("1000"), Some((1000, 1000)));
        assert_eq!(parse_user("1000:5"), Some((1000, 5)));
        assert_eq!(parse_user("nobody"), None);
    }
}
