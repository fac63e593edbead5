//! A `nodeengined` process with its configuration file, optionally in a
//! node namespace and under a hostname of its own (the cluster gives each
//! hostname its own node id, so workers sharing this machine need their
//! own UTS namespace), and the configuration it reads.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use serde_json::{Value, json};

use crate::netns::{NsPath, unique};
use crate::process::{Proc, print_log_if_panicking};

/// Where nodeengined serves metrics and health ("off": nowhere).
const METRICS_ENV: &str = "NODEENGINE_METRICS_ADDRESS";

/// `NodeEngine config default`: upstream's default configuration document.
pub fn default_conf() -> Value {
    json!({
        "conf_version": "1.0", "cluster_address": "0.0.0.0", "cluster_ssl": false,
        "cluster_port": 10100, "app_logs": "/tmp", "overlay_network": "default", "public_ip": false,
        "overlay_network_port": 0, "mqtt_cert_file": "", "mqtt_key_file": "", "addons": [],
        "virtualizations": [{"virutalizaiton_name": "containerd", "virutalizaiton_runtime": "docker",
                             "virutalizaiton_active": true, "virutalizaiton_config": []}],
        "csi_drivers": []
    })
}

/// `base` pointed at a cluster: registration address and port, the app log
/// directory, the overlay setting (`disabled`, `custom:<socket>`, ...) and
/// whether the first virtualization (containerd) is active.
pub fn conf(
    mut base: Value,
    cluster: &str,
    port: u16,
    app_logs: &Path,
    overlay: &str,
    containerd: bool,
) -> Value {
    base["cluster_address"] = cluster.into();
    base["cluster_port"] = port.into();
    base["app_logs"] = app_logs.display().to_string().into();
    base["overlay_network"] = overlay.into();
    base["virtualizations"][0]["virutalizaiton_active"] = containerd.into();
    base
}

/// How to start a nodeengined.
pub struct NodeEngineBuilder {
    bin: PathBuf,
    conf: PathBuf,
    log: PathBuf,
    netns: Option<NsPath>,
    hostname: Option<String>,
    env: Vec<(String, String)>,
}

impl NodeEngineBuilder {
    pub fn netns(mut self, ns: &NsPath) -> Self {
        self.netns = Some(ns.clone());
        self
    }

    /// Runs it in a UTS namespace of its own with this hostname.
    pub fn hostname(mut self, name: &str) -> Self {
        self.hostname = Some(name.to_string());
        self
    }

    /// The containerd socket and namespace it uses.
    pub fn containerd(self, socket: &Path, namespace: &str) -> Self {
        self.env("CONTAINERD_ADDRESS", &socket.display().to_string())
            .env("CONTAINERD_NAMESPACE", namespace)
    }

    /// Serves metrics and health on `address` (`host:port`).
    pub fn metrics(self, address: &str) -> Self {
        self.env(METRICS_ENV, address)
    }

    /// Where it keeps its state (last report, CSI mounts, unikernels).
    pub fn state_dir(self, dir: &Path) -> Self {
        self.env("OAKESTRA_STATE_DIR", &dir.display().to_string())
    }

    /// Sets (or, given twice, overrides) one environment variable.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        set_var(&mut self.env, key, value);
        self
    }

    pub fn start(self) -> Result<NodeEngine> {
        let mut ne = NodeEngine {
            bin: self.bin,
            conf: self.conf,
            log: self.log,
            netns: self.netns,
            hostname: self.hostname,
            env: self.env,
            proc: None,
        };
        ne.spawn()?;
        Ok(ne)
    }
}

/// A nodeengined process; SIGTERM on drop (its log is printed when the
/// test failed).
pub struct NodeEngine {
    bin: PathBuf,
    conf: PathBuf,
    pub log: PathBuf,
    netns: Option<NsPath>,
    hostname: Option<String>,
    env: Vec<(String, String)>,
    proc: Option<Proc>,
}

impl NodeEngine {
    /// nodeengined `bin` reading `conf`, stdout and stderr appended to `log`.
    /// Unless the builder says otherwise, it is given a containerd socket
    /// where nothing listens (never the machine's own), its state directory
    /// next to the log, and a containerd config that names no runtimes (the
    /// host's `/etc/containerd/config.toml` is not the test's).
    pub fn builder(bin: impl Into<PathBuf>, conf: &Path, log: &Path) -> NodeEngineBuilder {
        let nowhere = log.with_file_name("no-containerd.sock");
        let state = log.with_file_name(unique("nodeengine-state-"));
        let runtimes = log.with_file_name("containerd-runtimes.toml");
        NodeEngineBuilder {
            bin: bin.into(),
            conf: conf.to_path_buf(),
            log: log.to_path_buf(),
            netns: None,
            hostname: None,
            env: vec![("RUST_LOG".into(), "info,nodeengine=debug".into())],
        }
        .containerd(&nowhere, &unique("none"))
        .state_dir(&state)
        .env("CONTAINERD_CONFIG", &runtimes.display().to_string())
        // No metrics listener unless asked for (`metrics`): daemons side by
        // side would race for the default port.
        .env(METRICS_ENV, "off")
    }

    fn spawn(&mut self) -> Result<()> {
        let mut cmd = match &self.netns {
            Some(ns) => ns.command(&self.bin)?,
            None => Command::new(&self.bin),
        };
        if let Some(name) = self.hostname.clone() {
            // SAFETY: unshare(2) and sethostname(2) are async-signal-safe;
            // the name was allocated before fork.
            unsafe {
                cmd.pre_exec(move || {
                    nix::sched::unshare(CloneFlags::CLONE_NEWUTS)?;
                    nix::unistd::sethostname(&name)?;
                    Ok(())
                });
            }
        }
        cmd.env("OAKESTRA_CONF", &self.conf)
            .env_remove("INVOCATION_ID")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        let proc = Proc::spawn_logged("nodeengined", cmd, &self.log)?;
        self.proc = Some(proc.stop_with(Signal::SIGTERM, Duration::from_secs(12)));
        Ok(())
    }

    /// SIGTERM; the exit status when it exited by itself within 12 s.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        self.proc.take()?.stop()
    }

    /// Sets (or overrides) one environment variable for the next start.
    pub fn set_env(&mut self, key: &str, value: &str) {
        set_var(&mut self.env, key, value);
    }

    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn().context("restarting nodeengined")
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(Proc::alive)
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NodeEngine {
    fn drop(&mut self) {
        self.stop();
        print_log_if_panicking("nodeengined", &self.log);
    }
}

/// Sets `key` in `env`, replacing an earlier value.
fn set_var(env: &mut Vec<(String, String)>, key: &str, value: &str) {
    env.retain(|(k, _)| k != key);
    env.push((key.to_string(), value.to_string()));
}
