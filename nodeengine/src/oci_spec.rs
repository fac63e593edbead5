//! The OCI runtime spec (config.json) we hand to containerd for one instance.
//!
//! What a job gets is what upstream's containerd defaults give it
//! (docs/nodeengine-parity.md): containerd's default capabilities, masked
//! and read-only paths, its own network namespace (populated by NetManager,
//! or only loopback with the overlay off), `cmd` replacing the image's
//! ENTRYPOINT and CMD, `/dev/fuse` for privileged jobs, NVIDIA GPUs for
//! `vgpus`. Added for confinement (docs/security.md): a default seccomp
//! profile, a pids limit and the image user resolved by name.
//!
//! Written by hand rather than through a spec crate: it is one JSON document,
//! and keeping it here makes every security-relevant default visible in one place.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::image_user::ProcessUser;
use crate::seccomp;

/// Image defaults read from the image config blob.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageDefaults {
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: String,
    pub user: String,
}

/// Everything a job's spec depends on.
#[derive(Debug, Clone)]
pub struct SpecInput<'a> {
    pub namespace: &'a str,
    pub id: &'a str,
    pub instance: u32,
    pub image: &'a ImageDefaults,
    /// Replaces the image's ENTRYPOINT and CMD when not empty (upstream's
    /// `WithProcessArgs`).
    pub cmd: &'a [String],
    pub environment: &'a [String],
    pub vcpus: f64,
    pub memory_mib: u64,
    pub user: &'a ProcessUser,
    /// Bind-mounted at `/etc/resolv.conf` (see `resolv_conf`).
    pub resolv_conf: &'a Path,
    /// Host devices passed through (`/dev/fuse` for privileged jobs).
    pub devices: &'a [HostDevice],
    /// OCI prestart hooks (the NVIDIA GPU hook).
    pub prestart_hooks: &'a [Value],
}

/// A character device of the host, as a container sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostDevice {
    pub path: String,
    pub major: u64,
    pub minor: u64,
    pub file_mode: u32,
}

/// Upstream grants privileged jobs FUSE, nothing else.
pub const PRIVILEGED_DEVICE: &str = "/dev/fuse";

impl HostDevice {
    /// The host's character device at `path` (its numbers and mode).
    pub fn from_host(path: &str) -> Result<HostDevice> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let meta = std::fs::metadata(path)
            .with_context(|| format!("{path} does not exist on this node"))?;
        if !meta.file_type().is_char_device() {
            bail!("{path} is not a character device");
        }
        let rdev = meta.rdev();
        Ok(HostDevice {
            path: path.to_string(),
            major: u64::from(rustix::fs::major(rdev)),
            minor: u64::from(rustix::fs::minor(rdev)),
            file_mode: meta.mode() & 0o7777,
        })
    }
}

const CPU_PERIOD_US: u64 = 100_000;

/// Most tasks a container may run: enough for any service, not for a fork
/// bomb to exhaust the node's pid space.
pub const PIDS_LIMIT: u64 = 4096;

/// containerd's default capability set, which upstream's containers get.
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

/// The process arguments: the job's `cmd` replaces ENTRYPOINT and CMD, as
/// upstream's `WithProcessArgs(cmd...)`; without it, ENTRYPOINT then CMD.
pub fn process_args(image: &ImageDefaults, cmd: &[String]) -> Vec<String> {
    if !cmd.is_empty() {
        return cmd.to_vec();
    }
    let mut args = image.entrypoint.clone();
    args.extend(image.cmd.iter().cloned());
    args
}

/// Image env, then `HOSTNAME`, then the job's environment, merged as
/// containerd merges them: a later `K=V` replaces `K`, and an entry without
/// `=` removes that variable.
pub fn process_env(image: &ImageDefaults, instance: u32, job_env: &[String]) -> Vec<String> {
    let mut env: Vec<String> = Vec::new();
    let key = |kv: &str| kv.split('=').next().unwrap_or_default().to_string();
    let hostname = format!("HOSTNAME=instance-{instance}");
    for e in image
        .env
        .iter()
        .chain(std::iter::once(&hostname))
        .chain(job_env)
    {
        let k = key(e);
        if e.contains('=') {
            match env.iter_mut().find(|x| key(x) == k) {
                Some(slot) => *slot = e.clone(),
                None => env.push(e.clone()),
            }
        } else {
            env.retain(|x| key(x) != k);
        }
    }
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(
            0,
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        );
    }
    env
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

fn resources(vcpus: f64, memory_mib: u64, devices: &[HostDevice]) -> Value {
    let mut allowed = vec![json!({"allow": false, "access": "rwm"})];
    for d in devices {
        allowed.push(json!({"allow": true, "type": "c", "major": d.major, "minor": d.minor, "access": "rwm"}));
    }
    let mut r = json!({"devices": allowed, "pids": {"limit": PIDS_LIMIT}});
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

/// The confinement every container gets: containerd's masked and read-only
/// paths and the default seccomp profile.
fn confine(linux: &mut Value) {
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
        "/sys/devices/virtual/powercap",
        "/proc/scsi"
    ]);
    linux["readonlyPaths"] = json!([
        "/proc/bus",
        "/proc/fs",
        "/proc/irq",
        "/proc/sys",
        "/proc/sysrq-trigger"
    ]);
    linux["seccomp"] = seccomp::default_profile();
}

fn process(args: Vec<String>, env: Vec<String>, cwd: &str, user: &ProcessUser) -> Value {
    let mut u = json!({"uid": user.uid, "gid": user.gid});
    if !user.additional_gids.is_empty() {
        u["additionalGids"] = json!(user.additional_gids);
    }
    json!({
        "terminal": false,
        "user": u,
        "args": args,
        "env": env,
        "cwd": cwd,
        "capabilities": {
            "bounding": DEFAULT_CAPS, "effective": DEFAULT_CAPS, "permitted": DEFAULT_CAPS
        },
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        "noNewPrivileges": false
    })
}

fn working_dir(image: &ImageDefaults) -> &str {
    if image.working_dir.starts_with('/') {
        image.working_dir.as_str()
    } else {
        "/"
    }
}

/// Builds a job's runtime spec.
pub fn build_spec(input: &SpecInput<'_>) -> Value {
    let mut mounts = base_mounts();
    mounts.push(bind("/etc/hosts", "/etc/hosts", true));
    mounts.push(bind(
        "/etc/resolv.conf",
        &input.resolv_conf.display().to_string(),
        true,
    ));
    // Always a network namespace of its own, as upstream: NetManager gives it
    // the overlay address; with the overlay off it has only loopback.
    let namespaces = json!([
        {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}
    ]);
    let devices: Vec<Value> = input
        .devices
        .iter()
        .map(|d| {
            json!({"path": d.path, "type": "c", "major": d.major, "minor": d.minor,
                   "fileMode": d.file_mode, "uid": 0, "gid": 0})
        })
        .collect();
    let mut linux = json!({
        "resources": resources(input.vcpus, input.memory_mib, input.devices),
        "cgroupsPath": format!("/{}/{}", input.namespace, input.id),
        "namespaces": namespaces,
        "devices": devices,
    });
    confine(&mut linux);
    let mut spec = json!({
        "ociVersion": "1.0.2",
        "process": process(
            process_args(input.image, input.cmd),
            process_env(input.image, input.instance, input.environment),
            working_dir(input.image),
            input.user,
        ),
        "root": {"path": "rootfs", "readonly": false},
        "hostname": format!("instance-{}", input.instance),
        "mounts": mounts,
        "linux": linux
    });
    if !input.prestart_hooks.is_empty() {
        spec["hooks"] = json!({"prestart": input.prestart_hooks});
    }
    spec
}

/// A node-level helper container (the FLOps data server): the image's own
/// command, the host's network (upstream publishes its port on the host),
/// one data directory, the same confinement as jobs.
#[derive(Debug, Clone)]
pub struct SidecarSpec<'a> {
    pub namespace: &'a str,
    pub id: &'a str,
    pub image: &'a ImageDefaults,
    /// Host directory and where it appears in the container.
    pub volume: (&'a Path, &'a str),
}

pub fn sidecar_spec(input: &SidecarSpec<'_>) -> Value {
    let mut mounts = base_mounts();
    mounts.push(bind("/etc/hosts", "/etc/hosts", true));
    mounts.push(bind("/etc/resolv.conf", "/etc/resolv.conf", true));
    mounts.push(bind(
        input.volume.1,
        &input.volume.0.display().to_string(),
        false,
    ));
    let mut linux = json!({
        "resources": resources(0.0, 0, &[]),
        "cgroupsPath": format!("/{}/{}", input.namespace, input.id),
        "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "mount"}],
    });
    confine(&mut linux);
    json!({
        "ociVersion": "1.0.2",
        "process": process(
            process_args(input.image, &[]),
            process_env(input.image, 0, &[]),
            working_dir(input.image),
            &ProcessUser::default(),
        ),
        "root": {"path": "rootfs", "readonly": false},
        "mounts": mounts,
        "linux": linux
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    struct Fixture {
        image: ImageDefaults,
        cmd: Vec<String>,
        env: Vec<String>,
        user: ProcessUser,
        resolv: PathBuf,
    }

    impl Fixture {
        fn new() -> Fixture {
            Fixture {
                image: ImageDefaults {
                    env: vec!["PATH=/bin".into(), "A=1".into(), "GONE=x".into()],
                    entrypoint: vec!["/entry".into()],
                    cmd: vec!["sh".into()],
                    ..Default::default()
                },
                cmd: vec!["sleep".into(), "5".into()],
                env: vec!["A=2".into(), "GONE".into(), "B=3".into()],
                user: ProcessUser {
                    uid: 65534,
                    gid: 65534,
                    additional_gids: vec![5],
                },
                resolv: PathBuf::from("/var/lib/oakestra/resolv.conf"),
            }
        }

        fn input<'a>(&'a self, devices: &'a [HostDevice], hooks: &'a [Value]) -> SpecInput<'a> {
            SpecInput {
                namespace: "oakestra",
                id: "a.b.c.d.instance.2",
                instance: 2,
                image: &self.image,
                cmd: &self.cmd,
                environment: &self.env,
                vcpus: 0.5,
                memory_mib: 64,
                user: &self.user,
                resolv_conf: &self.resolv,
                devices,
                prestart_hooks: hooks,
            }
        }
    }

    #[test]
    fn spec_has_limits_hostname_env_user_and_cmd() {
        let f = Fixture::new();
        let s = build_spec(&f.input(&[], &[]));
        assert_eq!(s["hostname"], "instance-2");
        // cmd replaces the ENTRYPOINT too.
        assert_eq!(s["process"]["args"], json!(["sleep", "5"]));
        assert_eq!(
            s["process"]["env"],
            json!(["PATH=/bin", "A=2", "HOSTNAME=instance-2", "B=3"])
        );
        assert_eq!(
            s["process"]["user"],
            json!({"uid": 65534, "gid": 65534, "additionalGids": [5]})
        );
        assert_eq!(s["linux"]["resources"]["memory"]["limit"], 64 << 20);
        assert_eq!(s["linux"]["resources"]["cpu"]["quota"], 50_000);
        assert_eq!(s["linux"]["resources"]["pids"]["limit"], PIDS_LIMIT);
        assert_eq!(s["linux"]["cgroupsPath"], "/oakestra/a.b.c.d.instance.2");
        assert_eq!(s["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ERRNO");
        let mounts = s["mounts"].as_array().expect("mounts");
        let resolv = mounts
            .iter()
            .find(|m| m["destination"] == "/etc/resolv.conf")
            .expect("resolv.conf");
        assert_eq!(resolv["source"], "/var/lib/oakestra/resolv.conf");
        assert!(
            s["linux"]["namespaces"]
                .as_array()
                .is_some_and(|n| n.iter().any(|n| n["type"] == "network"))
        );
        assert!(s.get("hooks").is_none());
    }

    #[test]
    fn without_cmd_entrypoint_then_cmd() {
        let f = Fixture::new();
        assert_eq!(process_args(&f.image, &[]), ["/entry", "sh"]);
    }

    #[test]
    fn privileged_gets_fuse_and_nothing_else() {
        let f = Fixture::new();
        let plain = build_spec(&f.input(&[], &[]));
        let fuse = HostDevice {
            path: PRIVILEGED_DEVICE.into(),
            major: 10,
            minor: 229,
            file_mode: 0o666,
        };
        let privileged = build_spec(&f.input(std::slice::from_ref(&fuse), &[]));
        assert_eq!(
            privileged["process"]["capabilities"],
            plain["process"]["capabilities"]
        );
        assert_eq!(privileged["linux"]["seccomp"], plain["linux"]["seccomp"]);
        assert_eq!(
            privileged["linux"]["maskedPaths"],
            plain["linux"]["maskedPaths"]
        );
        assert_eq!(
            privileged["linux"]["devices"],
            json!([{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229,
                    "fileMode": 0o666, "uid": 0, "gid": 0}])
        );
        assert_eq!(
            privileged["linux"]["resources"]["devices"][1],
            json!({"allow": true, "type": "c", "major": 10, "minor": 229, "access": "rwm"})
        );
    }

    #[test]
    fn hooks_are_prestart_hooks() {
        let f = Fixture::new();
        let hook = json!({"path": "/usr/bin/containerd", "args": ["containerd", "oci-hook"]});
        let s = build_spec(&f.input(&[], std::slice::from_ref(&hook)));
        assert_eq!(s["hooks"]["prestart"], json!([hook]));
    }

    #[test]
    fn sidecar_shares_the_host_network() {
        let img = ImageDefaults {
            cmd: vec!["serve".into()],
            ..Default::default()
        };
        let s = sidecar_spec(&SidecarSpec {
            namespace: "oakestra",
            id: "ml_data_server",
            image: &img,
            volume: (Path::new("/var/lib/x"), "/ml_data_server_volume"),
        });
        assert!(
            s["linux"]["namespaces"]
                .as_array()
                .is_some_and(|n| n.iter().all(|n| n["type"] != "network"))
        );
        assert_eq!(s["process"]["args"], json!(["serve"]));
        assert!(s["mounts"].as_array().is_some_and(|m| {
            m.iter().any(|m| {
                m["destination"] == "/ml_data_server_volume" && m["source"] == "/var/lib/x"
            })
        }));
    }
}
