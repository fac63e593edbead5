//! A sandbox worker: a node namespace running its own containerd,
//! NetManager (eBPF dataplane pinned under its own bpffs directory) and
//! NodeEngine (`nodeengined`, network `manual` on its NetManager's socket),
//! each with its own configuration files under the worker's directory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use worker_common::http;
use worker_common::netmanager_api::routes;

use super::broker::MQTT_PORT;
use super::cluster_standin::{ClusterStandin, HTTP_PORT};
use super::image::{ImageSpec, write_busybox_oci_tar};
use super::procs::{Proc, enter_netns, kill_matching, sh, wait_for};
use super::topology::{CLUSTER_IP, netns_path};

/// The daemons a worker runs.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub netmanager: PathBuf,
    pub nodeengined: PathBuf,
}

impl Binaries {
    /// `<target dir>/<profile>/{NetManager,nodeengined}`.
    pub fn in_dir(dir: &Path) -> Binaries {
        Binaries {
            netmanager: dir.join("NetManager"),
            nodeengined: dir.join("nodeengined"),
        }
    }
}

pub struct Worker {
    pub index: u8,
    pub ns: String,
    pub ip: String,
    pub id: String,
    pub dir: PathBuf,
    pub bpf_dir: PathBuf,
    pub socket: PathBuf,
    pub containerd_socket: PathBuf,
    pub containerd_ns: String,
    bins: Binaries,
    /// NetManager's API on `socket`.
    api: http::blocking::Client,
    // Drop order matters: NodeEngine first, NetManager last (see Drop).
    nodeengine: Option<Proc>,
    containerd: Option<Proc>,
    netmanager: Option<Proc>,
}

impl Worker {
    /// Starts containerd, NetManager and NodeEngine in namespace `ns` and
    /// waits until the node registered with `cluster` and has its subnet.
    pub fn start(
        cluster: &ClusterStandin,
        bins: &Binaries,
        (index, ns, ip): (u8, &str, &str),
        dir: &Path,
        bpf_dir: &Path,
    ) -> Result<Worker> {
        std::fs::create_dir_all(dir.join("applogs"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let socket = dir.join("netmanager.sock");
        let api = http::blocking::Client::new(
            http::Client::unix(&socket).timeout(Duration::from_secs(10)),
        )
        .context("a runtime for NetManager's API client")?;
        let mut w = Worker {
            index,
            ns: ns.to_string(),
            ip: ip.to_string(),
            id: String::new(),
            dir: dir.to_path_buf(),
            bpf_dir: bpf_dir.to_path_buf(),
            socket,
            containerd_socket: dir.join("containerd.sock"),
            containerd_ns: format!("oak-{}", ns.replace('-', "")),
            bins: bins.clone(),
            api,
            nodeengine: None,
            containerd: None,
            netmanager: None,
        };
        w.write_configs()?;
        w.start_containerd()?;
        w.import_image()?;
        w.start_netmanager()?;
        w.start_nodeengine()?;
        wait_for(
            &format!("{ns} to register"),
            Duration::from_secs(30),
            || cluster.node_id(ip).is_some(),
        )
        .with_context(|| format!("see {}", w.log("nodeengine").display()))?;
        w.id = cluster.node_id(ip).unwrap_or_default();
        w.wait_netmanager_registered()?;
        Ok(w)
    }

    pub fn log(&self, daemon: &str) -> PathBuf {
        self.dir.join(format!("{daemon}.log"))
    }

    /// Where NodeEngine appends instance `n` of `job`'s output.
    pub fn app_log(&self, job: &str, n: u64) -> PathBuf {
        self.dir.join("applogs").join(format!("{job}.instance.{n}"))
    }

    fn write_configs(&self) -> Result<()> {
        let netcfg = json!({
            "NodePublicAddress": "0.0.0.0", "NodePublicPort": "50103", "ClusterUrl": "0.0.0.0",
            "ClusterMqttPort": MQTT_PORT.to_string(), "DefaultInterface": "eth0", "Debug": false,
            "PublicIPNetworking": false, "MqttCert": "", "MqttKey": ""
        });
        write(&self.dir.join("netcfg.json"), &netcfg.to_string())?;
        let conf = json!({
            "conf_version": "1.0", "cluster_address": CLUSTER_IP, "cluster_ssl": false,
            "cluster_port": HTTP_PORT, "app_logs": self.dir.join("applogs"), "public_ip": false,
            "overlay_network": format!("custom:{}", self.socket.display()),
            "overlay_network_port": 0, "mqtt_cert_file": "", "mqtt_key_file": "", "addons": [],
            "virtualizations": [{"virutalizaiton_name": "containerd", "virutalizaiton_runtime": "docker",
                                 "virutalizaiton_active": true, "virutalizaiton_config": []}],
            "csi_drivers": []
        });
        write(&self.dir.join("conf.json"), &conf.to_string())?;
        // The CRI plugin is not needed and would try to set up CNI.
        write(
            &self.dir.join("containerd.toml"),
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  disable = true\n",
        )
    }

    fn netns_command(&self, program: &Path) -> Result<Command> {
        let mut cmd = Command::new(program);
        enter_netns(&mut cmd, &netns_path(&self.ns))?;
        Ok(cmd)
    }

    fn start_containerd(&mut self) -> Result<()> {
        // A crashed earlier run with the same names may have left runc state.
        remove_runc_state(&self.containerd_ns);
        let mut cmd = self.netns_command(Path::new("containerd"))?;
        cmd.arg("--config")
            .arg(self.dir.join("containerd.toml"))
            .arg("--address")
            .arg(&self.containerd_socket)
            .arg("--root")
            .arg(self.dir.join("root"))
            .arg("--state")
            .arg(self.dir.join("state"));
        self.containerd = Some(Proc::spawn("containerd", cmd, &self.log("containerd"))?);
        wait_for("containerd", Duration::from_secs(20), || {
            self.ctr(&["version"]).is_ok()
        })
        .with_context(|| format!("see {}", self.log("containerd").display()))
    }

    /// `ctr` against this worker's containerd and namespace.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("ctr")
            .arg("-a")
            .arg(&self.containerd_socket)
            .arg("-n")
            .arg(&self.containerd_ns)
            .args(args)
            .output()
            .context("running ctr")?;
        if !out.status.success() {
            bail!("ctr {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn import_image(&self) -> Result<()> {
        let tar = self.dir.join("image.tar");
        write_busybox_oci_tar(&tar, &ImageSpec::default())?;
        self.ctr(&["images", "import", &tar.to_string_lossy()])
            .context("importing the sample image")?;
        Ok(())
    }

    pub fn start_netmanager(&mut self) -> Result<()> {
        self.netmanager = None;
        let _ = std::fs::remove_file(&self.socket);
        let mut cmd = self.netns_command(&self.bins.netmanager)?;
        cmd.env("NETMANAGER_CONFIG", self.dir.join("netcfg.json"))
            .env("NETMANAGER_SOCKET", &self.socket)
            .env("NETMANAGER_BPF_DIR", &self.bpf_dir)
            .env("NETMANAGER_STATE", self.dir.join("netmanager-state.json"))
            // The worker's own (absent unless written): never the machine's.
            .env("NETMANAGER_TUN_CONFIG", self.dir.join("tuncfg.json"))
            // Not under systemd even if our caller is.
            .env_remove("INVOCATION_ID");
        self.netmanager = Some(Proc::spawn("NetManager", cmd, &self.log("netmanager"))?);
        let sock = self.socket.clone();
        wait_for("the NetManager socket", Duration::from_secs(20), || {
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
        })
        .with_context(|| format!("see {}", self.log("netmanager").display()))
    }

    pub fn start_nodeengine(&mut self) -> Result<()> {
        self.nodeengine = None;
        let mut cmd = self.netns_command(&self.bins.nodeengined)?;
        cmd.env("OAKESTRA_CONF", self.dir.join("conf.json"))
            // CSI mounts and unikernel instances under the worker's directory.
            .env("OAKESTRA_STATE_DIR", self.dir.join("state"))
            .env("CONTAINERD_ADDRESS", &self.containerd_socket)
            .env("CONTAINERD_NAMESPACE", &self.containerd_ns)
            .env("RUST_LOG", "info")
            .env_remove("INVOCATION_ID");
        self.nodeengine = Some(Proc::spawn("nodeengined", cmd, &self.log("nodeengine"))?);
        Ok(())
    }

    /// Host pids of the worker's daemons (benchmarks: footprint).
    pub fn daemon_pids(&self) -> Vec<(&'static str, u32)> {
        [
            ("NetManager", &self.netmanager),
            ("nodeengined", &self.nodeengine),
            ("containerd", &self.containerd),
        ]
        .into_iter()
        .filter_map(|(name, p)| p.as_ref().map(|p| (name, p.pid())))
        .collect()
    }

    /// kill -9 of NetManager (restart tests).
    pub fn kill_netmanager(&mut self) {
        if let Some(p) = self.netmanager.as_mut() {
            p.stop_with(libc::SIGKILL, Duration::from_secs(5));
        }
        self.netmanager = None;
    }

    /// SIGTERM of NodeEngine; it leaves its containers running.
    pub fn stop_nodeengine(&mut self) {
        self.nodeengine = None;
    }

    fn wait_netmanager_registered(&self) -> Result<()> {
        wait_for(
            &format!("NetManager of {} to get its subnet", self.ns),
            Duration::from_secs(30),
            || self.status().is_ok_and(|v| v["registered"] == true),
        )
        .with_context(|| format!("see {}", self.log("netmanager").display()))
    }

    /// NetManager's `GET /status`.
    pub fn status(&self) -> Result<Value> {
        Ok(self.api.get_json(routes::STATUS)?)
    }

    /// Host pid of instance `n` of `job`'s task, from containerd.
    pub fn task_pid(&self, job: &str, n: u64) -> Option<u32> {
        let id = format!("{job}.instance.{n}");
        let out = self.ctr(&["tasks", "ls"]).ok()?;
        out.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.first() == Some(&id.as_str()) && f.get(2) == Some(&"RUNNING"))
            .and_then(|f| f.get(1).and_then(|p| p.parse().ok()))
    }

    /// Kills every task of this worker's containerd namespace.
    fn kill_tasks(&self) {
        let Ok(ids) = self.ctr(&["tasks", "ls", "-q"]) else {
            return;
        };
        for id in ids.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let _ = self.ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // NodeEngine first so it does not react to its containers dying.
        self.nodeengine = None;
        self.kill_tasks();
        std::thread::sleep(Duration::from_millis(300));
        self.containerd = None;
        self.netmanager = None;
        cleanup_containerd_leftovers(&self.dir, &self.containerd_ns);
        let _ = std::fs::remove_dir_all(&self.bpf_dir);
    }
}

/// What containerd leaves behind when it stops: shims (they outlive it),
/// container processes in its cgroups, and overlay mounts under its root.
pub fn cleanup_containerd_leftovers(dir: &Path, containerd_ns: &str) {
    let dir_s = dir.display().to_string();
    kill_matching(|cmdline| cmdline.contains("containerd-shim") && cmdline.contains(&dir_s));
    kill_cgroup(containerd_ns);
    let _ = sh(&format!(
        "grep -o ' {dir_s}/[^ ]*' /proc/mounts | sort -r | xargs -r -n1 umount -l"
    ));
    let _ = std::fs::remove_dir_all(dir.join("root"));
    let _ = std::fs::remove_dir_all(dir.join("state"));
    remove_runc_state(containerd_ns);
}

/// runc keeps container state under /run/containerd/runc/<namespace> no
/// matter which containerd started it; after shims were killed that state
/// outlives them and a later container with the same id fails with
/// "container with given ID already exists". The processes are gone by now,
/// so the state is only stale bookkeeping.
pub fn remove_runc_state(containerd_ns: &str) {
    let _ = std::fs::remove_dir_all(Path::new("/run/containerd/runc").join(containerd_ns));
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
        for cg in bases.iter().flat_map(|b| subdirs(b)) {
            let procs = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                // SAFETY: kill(2) on a process inside the caller's own cgroup.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
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

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default()
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
