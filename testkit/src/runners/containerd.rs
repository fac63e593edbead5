//! A containerd per test (or per sandbox worker): its own root, state,
//! socket and namespace under one directory, optionally inside a node
//! namespace; on drop its containers, shims, cgroups and mounts go too.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::image::{ImageSpec, write_busybox_oci_tar};
use crate::netns::{NsPath, unique};
use crate::process::{Proc, kill_matching, wait_for};

pub struct Containerd {
    /// Everything of this containerd lives here.
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub namespace: String,
    pub log: PathBuf,
    proc: Option<Proc>,
}

impl Containerd {
    /// In `<dir>/containerd`, in this namespace, with a unique containerd
    /// namespace.
    pub fn start(dir: &Path) -> Result<Containerd> {
        Containerd::start_with(dir, &unique("oaktest"), None)
    }

    /// In `<dir>/containerd`, containerd namespace `namespace`, inside
    /// `netns` if given.
    pub fn start_with(dir: &Path, namespace: &str, netns: Option<&NsPath>) -> Result<Containerd> {
        let root = dir.join("containerd");
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        // A crashed earlier run with the same names may have left state.
        remove_runc_state(namespace);
        let config = root.join("config.toml");
        // The CRI plugin is not needed and would try to set up CNI.
        std::fs::write(
            &config,
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  disable = true\n",
        )
        .with_context(|| format!("writing {}", config.display()))?;
        let socket = root.join("containerd.sock");
        let log = root.join("containerd.log");
        let mut cmd = match netns {
            Some(ns) => ns.command("containerd")?,
            None => Command::new("containerd"),
        };
        cmd.arg("--config")
            .arg(&config)
            .arg("--address")
            .arg(&socket)
            .arg("--root")
            .arg(root.join("root"))
            .arg("--state")
            .arg(root.join("state"));
        let c = Containerd {
            proc: Some(Proc::spawn_logged("containerd", cmd, &log)?),
            dir: root,
            socket,
            namespace: namespace.to_string(),
            log,
        };
        wait_for("containerd", Duration::from_secs(20), || {
            c.ctr(&["version"]).is_ok_and(|o| o.status.success())
        })
        .with_context(|| format!("see {}", c.log.display()))?;
        Ok(c)
    }

    /// `ctr` against this containerd and namespace.
    pub fn ctr(&self, args: &[&str]) -> Result<Output> {
        Command::new("ctr")
            .arg("-a")
            .arg(&self.socket)
            .arg("-n")
            .arg(&self.namespace)
            .args(args)
            .output()
            .context("running ctr")
    }

    /// `ctr`, failing with its error output; its stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.ctr(args)?;
        if !out.status.success() {
            bail!("ctr {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Builds the busybox image offline and imports it (unpacked or not).
    pub fn import(&self, spec: &ImageSpec, unpack: bool) -> Result<()> {
        let tarball = self.dir.join(format!("image-{}.tar", unique("")));
        write_busybox_oci_tar(&tarball, spec)?;
        let path = tarball.to_string_lossy().to_string();
        let mut args = vec!["images", "import"];
        if !unpack {
            args.push("--no-unpack");
        }
        args.push(&path);
        let r = self.ctr_ok(&args).map(drop).context("importing the image");
        let _ = std::fs::remove_file(&tarball);
        r
    }

    pub fn container_ids(&self) -> Vec<String> {
        self.ctr_ok(&["containers", "ls", "-q"])
            .map(|out| lines(&out))
            .unwrap_or_default()
    }

    /// Host pid of the task `id` when it is RUNNING.
    pub fn task_pid(&self, id: &str) -> Option<u32> {
        let out = self.ctr_ok(&["tasks", "ls"]).ok()?;
        out.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.first() == Some(&id) && f.get(2) == Some(&"RUNNING"))
            .and_then(|f| f.get(1).and_then(|p| p.parse().ok()))
    }

    /// SIGKILL to every task of the namespace.
    pub fn kill_tasks(&self) {
        let Ok(ids) = self.ctr_ok(&["tasks", "ls", "-q"]) else {
            return;
        };
        for id in lines(&ids) {
            let _ = self.ctr(&["tasks", "kill", "-s", "SIGKILL", &id]);
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }
}

fn lines(out: &str) -> Vec<String> {
    out.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.kill_tasks();
        std::thread::sleep(Duration::from_millis(200));
        for id in self.container_ids() {
            let _ = self.ctr(&["tasks", "rm", "-f", &id]);
            let _ = self.ctr(&["containers", "rm", &id]);
        }
        self.proc = None;
        cleanup_leftovers(&self.dir, &self.namespace);
    }
}

/// What a containerd leaves behind when it stops (or crashed): shims (they
/// outlive it), container processes in its cgroups, overlay mounts under
/// its root, its root and state, and runc's state.
pub fn cleanup_leftovers(dir: &Path, namespace: &str) {
    let dir_s = dir.display().to_string();
    kill_matching(|cmdline| cmdline.contains("containerd-shim") && cmdline.contains(&dir_s));
    kill_cgroup(namespace);
    crate::mounts::unmount_below(dir);
    let _ = std::fs::remove_dir_all(dir.join("root"));
    let _ = std::fs::remove_dir_all(dir.join("state"));
    remove_runc_state(namespace);
}

/// runc keeps container state under /run/containerd/runc/<namespace> no
/// matter which containerd started it; after shims were killed that state
/// outlives them and a later container with the same id fails with
/// "container with given ID already exists". The processes are gone by now,
/// so the state is only stale bookkeeping.
pub fn remove_runc_state(namespace: &str) {
    let _ = std::fs::remove_dir_all(Path::new("/run/containerd/runc").join(namespace));
}

/// Kills what still runs in the cgroups of containerd namespace `ns` and
/// removes them: cgroup v2 (/sys/fs/cgroup/<ns>/<container>) and, on v1
/// hosts, the same path under every controller.
pub fn kill_cgroup(ns: &str) {
    let root = Path::new("/sys/fs/cgroup");
    let mut bases: Vec<PathBuf> = std::fs::read_dir(root)
        .map(|rd| rd.flatten().map(|c| c.path().join(ns)).collect())
        .unwrap_or_default();
    bases.push(root.join(ns));
    bases.retain(|b| b.is_dir());
    if bases.is_empty() {
        return;
    }
    for pass in 0..2 {
        for cg in bases.iter().flat_map(|b| crate::subdirs(b)) {
            let procs = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            if pass == 1 {
                let _ = std::fs::remove_dir(&cg);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    for b in &bases {
        let _ = std::fs::remove_dir(b);
    }
}
