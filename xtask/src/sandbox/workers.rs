//! A sandbox worker: a node namespace running its own containerd,
//! NetManager (eBPF dataplane pinned under its own bpffs directory) and
//! NodeEngine (`nodeengined`, network `manual` on its NetManager's socket,
//! under the hostname of its namespace so the cluster gives it its own
//! node id), each with its own configuration files under the worker's
//! directory -- all run by the test kit's runners.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{Value, json};
use testkit::cluster::REGISTRATION_PORT;
use testkit::image::ImageSpec;
use testkit::runners::nodeengine::{conf, default_conf};
use testkit::topology::{UNDERLAY_GATEWAY, UPLINK};
use testkit::{ClusterDouble, Containerd, NetManager, Node, NodeEngine, PinDir, wait_for};

use super::broker::MQTT_PORT;

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

/// Field order is drop order: NodeEngine first (so it does not react to
/// its containers dying), then containerd with the containers, NetManager,
/// and the namespace last.
pub struct Worker {
    pub index: u8,
    /// The node namespace's name, also the worker's hostname.
    pub ns: String,
    pub ip: String,
    pub id: String,
    pub dir: PathBuf,
    pub bpf_dir: PathBuf,
    pub socket: PathBuf,
    pub containerd_ns: String,
    nodeengine: NodeEngine,
    containerd: Containerd,
    netmanager: NetManager,
    pub node: Node,
}

/// NetManager's configuration in the sandbox: upstream's, with the
/// cluster's broker port and the uplink named.
fn netcfg() -> Value {
    json!({
        "NodePublicAddress": "0.0.0.0", "NodePublicPort": "50103", "ClusterUrl": "0.0.0.0",
        "ClusterMqttPort": MQTT_PORT.to_string(), "DefaultInterface": UPLINK, "Debug": false,
        "PublicIPNetworking": false, "MqttCert": "", "MqttKey": ""
    })
}

impl Worker {
    /// Starts containerd, NetManager and NodeEngine in `node` (namespace
    /// `name`) and waits until the node registered with `cluster` and its
    /// NetManager has a subnet.
    pub fn start(
        cluster: &ClusterDouble,
        bins: &Binaries,
        (index, name, node): (u8, &str, Node),
        dir: &Path,
        bpf_dir: &Path,
    ) -> Result<Worker> {
        let app_logs = dir.join("applogs");
        std::fs::create_dir_all(&app_logs)
            .with_context(|| format!("creating {}", app_logs.display()))?;
        let containerd_ns = format!("oak-{}", name.replace('-', ""));
        let containerd = Containerd::start_with(dir, &containerd_ns, Some(&node.ns))?;
        containerd
            .import(&ImageSpec::default(), true)
            .context("importing the sample image")?;
        let netmanager = NetManager::builder(&bins.netmanager, &node.ns, dir)
            .netcfg(netcfg())
            .dataplane(PinDir::at(bpf_dir))
            .graceful_stop()
            .start()?;
        let socket = netmanager.socket.clone();
        let conf_path = dir.join("conf.json");
        let doc = conf(
            default_conf(),
            &UNDERLAY_GATEWAY.to_string(),
            REGISTRATION_PORT,
            &app_logs,
            &format!("custom:{}", socket.display()),
            true,
        );
        std::fs::write(&conf_path, doc.to_string())
            .with_context(|| format!("writing {}", conf_path.display()))?;
        let nodeengine =
            NodeEngine::builder(&bins.nodeengined, &conf_path, &dir.join("nodeengine.log"))
                .netns(&node.ns)
                .hostname(name)
                .containerd(&containerd.socket, &containerd.namespace)
                // CSI mounts and unikernel instances under the worker's directory.
                .state_dir(&dir.join("state"))
                // Each worker in a namespace of its own: the default port.
                .metrics("127.0.0.1:9103")
                .env("RUST_LOG", "info")
                .start()?;
        let mut w = Worker {
            index,
            ns: name.to_string(),
            ip: node.ip.to_string(),
            id: String::new(),
            dir: dir.to_path_buf(),
            bpf_dir: bpf_dir.to_path_buf(),
            socket,
            containerd_ns,
            nodeengine,
            containerd,
            netmanager,
            node,
        };
        wait_for(
            &format!("{name} to register"),
            Duration::from_secs(30),
            || cluster.node(name).is_some(),
        )
        .with_context(|| format!("see {}", w.log("nodeengine").display()))?;
        w.id = cluster.node(name).map(|n| n.id).unwrap_or_default();
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

    /// `ctr` against this worker's containerd and namespace.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        self.containerd.ctr_ok(args)
    }

    pub fn start_netmanager(&mut self) -> Result<()> {
        self.netmanager.restart()
    }

    /// One environment variable for NodeEngine's next start.
    pub fn set_nodeengine_env(&mut self, key: &str, value: &str) {
        self.nodeengine.set_env(key, value);
    }

    pub fn start_nodeengine(&mut self) -> Result<()> {
        self.nodeengine.restart()
    }

    /// Host pids of the worker's daemons (benchmarks: footprint).
    pub fn daemon_pids(&self) -> Vec<(&'static str, u32)> {
        [
            ("NetManager", self.netmanager.pid()),
            ("nodeengined", self.nodeengine.pid()),
            ("containerd", self.containerd.pid()),
        ]
        .into_iter()
        .filter_map(|(name, p)| p.map(|p| (name, p)))
        .collect()
    }

    /// kill -9 of NetManager (restart tests).
    pub fn kill_netmanager(&mut self) {
        self.netmanager.kill9();
    }

    /// SIGTERM of NodeEngine; it leaves its containers running.
    pub fn stop_nodeengine(&mut self) {
        self.nodeengine.stop();
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
        self.netmanager.status()
    }

    /// Host pid of instance `n` of `job`'s task, from containerd.
    pub fn task_pid(&self, job: &str, n: u64) -> Option<u32> {
        self.containerd.task_pid(&format!("{job}.instance.{n}"))
    }
}
