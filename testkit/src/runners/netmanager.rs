//! A NetManager process in a node namespace, with its own configuration,
//! socket, state file, log and (optionally) bpffs pins, and its local API
//! through the shared HTTP client.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use worker_common::http::{self, Method};
use worker_common::netmanager_api::routes;

use crate::bpffs::PinDir;
use crate::netns::NsPath;
use crate::process::{Proc, print_log_if_panicking, wait_for};

/// Upstream's default netcfg.json with the cluster's MQTT port.
pub fn upstream_netcfg(mqtt_port: u16) -> Value {
    json!({
        "NodePublicAddress": "0.0.0.0", "NodePublicPort": "50103", "ClusterUrl": "0.0.0.0",
        "ClusterMqttPort": mqtt_port.to_string(), "DefaultInterface": "", "Debug": true,
        "PublicIPNetworking": false, "MqttCert": "", "MqttKey": ""
    })
}

enum Pins {
    /// `--no-dataplane` (and a bpffs directory that does not exist).
    Off,
    Dir(PinDir),
}

/// How to start a NetManager.
pub struct NetManagerBuilder {
    bin: PathBuf,
    netns: NsPath,
    dir: PathBuf,
    tag: Option<String>,
    netcfg: Value,
    pins: Pins,
    env: Vec<(String, String)>,
    graceful: bool,
    tun_config: Option<Value>,
}

impl NetManagerBuilder {
    /// Names its files `netmanager-<tag>.*` (several daemons in one directory).
    pub fn tag(mut self, tag: &str) -> Self {
        self.tag = Some(tag.to_string());
        self
    }

    /// The whole netcfg.json.
    pub fn netcfg(mut self, netcfg: Value) -> Self {
        self.netcfg = netcfg;
        self
    }

    /// `extra`'s fields on top of the netcfg.json so far.
    pub fn netcfg_with(mut self, extra: Value) -> Self {
        if let (Some(cfg), Some(extra)) = (self.netcfg.as_object_mut(), extra.as_object()) {
            cfg.extend(extra.clone());
        }
        self
    }

    /// Runs the eBPF dataplane pinned in `pins` (removed with the runner).
    pub fn dataplane(mut self, pins: PinDir) -> Self {
        self.pins = Pins::Dir(pins);
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Upstream's tuncfg.json for it to read (without one it reads a file
    /// that does not exist -- never the machine's /etc/netmanager/).
    pub fn tun_config(mut self, tuncfg: Value) -> Self {
        self.tun_config = Some(tuncfg);
        self
    }

    /// Stops with SIGTERM (its clean shutdown) instead of SIGKILL.
    pub fn graceful_stop(mut self) -> Self {
        self.graceful = true;
        self
    }

    pub fn start(self) -> Result<NetManager> {
        let name = |base: &str, ext: &str| match &self.tag {
            Some(t) => self.dir.join(format!("{base}-{t}.{ext}")),
            None => self.dir.join(format!("{base}.{ext}")),
        };
        let config = name("netcfg", "json");
        std::fs::write(&config, self.netcfg.to_string())
            .with_context(|| format!("writing {}", config.display()))?;
        let tun_config = name("tuncfg", "json");
        if let Some(t) = &self.tun_config {
            std::fs::write(&tun_config, t.to_string())
                .with_context(|| format!("writing {}", tun_config.display()))?;
        }
        let mut env = vec![(
            "NETMANAGER_TUN_CONFIG".to_string(),
            tun_config.display().to_string(),
        )];
        env.extend(self.env);
        let socket = name("netmanager", "sock");
        let api = http::blocking::Client::new(
            http::Client::unix(&socket).timeout(Duration::from_secs(30)),
        )
        .context("a runtime for NetManager's API client")?;
        let mut nm = NetManager {
            bin: self.bin,
            netns: self.netns,
            config,
            socket,
            state: name("netmanager-state", "json"),
            log: name("netmanager", "log"),
            pins: self.pins,
            env,
            graceful: self.graceful,
            api,
            proc: None,
        };
        nm.restart()?;
        Ok(nm)
    }
}

/// A NetManager process; killed on drop (its log is printed when the test
/// failed), its pins removed.
pub struct NetManager {
    bin: PathBuf,
    netns: NsPath,
    config: PathBuf,
    pub socket: PathBuf,
    pub state: PathBuf,
    pub log: PathBuf,
    pins: Pins,
    env: Vec<(String, String)>,
    graceful: bool,
    api: http::blocking::Client,
    proc: Option<Proc>,
}

impl NetManager {
    /// NetManager `bin` in `netns`, files in `dir`; by default upstream's
    /// netcfg.json for a broker on port 1883 and no dataplane.
    pub fn builder(bin: impl Into<PathBuf>, netns: &NsPath, dir: &Path) -> NetManagerBuilder {
        NetManagerBuilder {
            bin: bin.into(),
            netns: netns.clone(),
            dir: dir.to_path_buf(),
            tag: None,
            netcfg: upstream_netcfg(1883),
            pins: Pins::Off,
            env: Vec::new(),
            graceful: false,
            tun_config: None,
        }
    }

    /// Where the dataplane pins (None without one).
    pub fn pin_dir(&self) -> Option<&Path> {
        match &self.pins {
            Pins::Off => None,
            Pins::Dir(d) => Some(d.path()),
        }
    }

    /// (Re)starts the process and waits for its socket.
    pub fn restart(&mut self) -> Result<()> {
        self.kill9();
        let _ = std::fs::remove_file(&self.socket);
        let mut cmd = self.netns.command(&self.bin)?;
        match &self.pins {
            Pins::Off => cmd
                .arg("--no-dataplane")
                .env("NETMANAGER_BPF_DIR", "/nonexistent"),
            Pins::Dir(d) => cmd.env("NETMANAGER_BPF_DIR", d.path()),
        };
        cmd.env("NETMANAGER_CONFIG", &self.config)
            .env("NETMANAGER_SOCKET", &self.socket)
            .env("NETMANAGER_STATE", &self.state)
            // Not under systemd even if the caller is.
            .env_remove("INVOCATION_ID")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        let proc = Proc::spawn_logged("NetManager", cmd, &self.log)?;
        self.proc = Some(if self.graceful {
            proc
        } else {
            proc.stop_with(Signal::SIGKILL, Duration::from_secs(5))
        });
        let sock = self.socket.clone();
        wait_for("the NetManager socket", Duration::from_secs(20), || {
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
        })
        .with_context(|| format!("see {}", self.log.display()))
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    /// Stops it as its guard would (SIGKILL, or SIGTERM when graceful).
    pub fn stop(&mut self) {
        self.proc = None;
    }

    pub fn alive(&mut self) -> bool {
        self.proc.as_mut().is_some_and(Proc::alive)
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// Resident memory of the running process, in bytes.
    pub fn rss_bytes(&self) -> Result<u64> {
        let pid = self.pid().context("NetManager is not running")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading /proc/{pid}/status"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|kb| kb.trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .with_context(|| format!("no VmRSS in /proc/{pid}/status"))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One request to the API: status and JSON body (panics when there is
    /// no answer or it is not JSON).
    pub fn request(&self, method: Method, path: &str, body: Option<&str>) -> (u16, Value) {
        let body = body.map(|b| ("application/json", b.to_string().into()));
        let resp = self
            .api
            .send(method.clone(), path, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let value = serde_json::from_slice(&resp.body)
            .unwrap_or_else(|e| panic!("non-JSON answer {:?}: {e}", resp.text()));
        (resp.status.as_u16(), value)
    }

    pub fn post(&self, path: &str, body: &str) -> (u16, Value) {
        self.request(Method::POST, path, Some(body))
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        self.request(Method::GET, path, None)
    }

    /// `GET /status`.
    pub fn status(&self) -> Result<Value> {
        Ok(self.api.get_json(routes::STATUS)?)
    }
}

impl Drop for NetManager {
    fn drop(&mut self) {
        self.proc = None;
        print_log_if_panicking("NetManager", &self.log);
    }
}
