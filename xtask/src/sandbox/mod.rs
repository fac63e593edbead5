//! A whole Oakestra cluster on one machine: a cluster stand-in (demo/test
//! fixture, see `cluster_standin`) and N real workers in network
//! namespaces. `cargo xtask sandbox` runs it interactively; the end-to-end
//! tests (`tests/tests/e2e_*.rs`) drive the same code.

pub mod broker;
pub mod cli;
pub mod cluster_standin;
pub mod image;
pub mod procs;
pub mod sample_services;
pub mod service_manager;
pub mod topology;
pub mod workers;

use std::path::PathBuf;

use anyhow::{Context, Result};

use broker::{Broker, MQTT_PORT, wait_listening};
use cluster_standin::ClusterStandin;
use topology::{Topology, netns_path};
use workers::{Binaries, Worker};

/// Everything that differs between two sandboxes running side by side.
#[derive(Clone, Debug)]
pub struct Options {
    /// Namespace prefix (`<prefix>-under`, `<prefix>-w1`, ...).
    pub prefix: String,
    pub workers: u8,
    /// mosquitto child instead of the embedded rumqttd (stoppable).
    pub external_mosquitto: bool,
    /// Per-worker directories `<run_dir>/<n>`, broker files, state.
    pub run_dir: PathBuf,
    /// Worker n pins its dataplane under `<bpf_prefix><n>`.
    pub bpf_prefix: String,
    pub bins: Binaries,
}

/// Field order is drop order: workers before the cluster, the namespaces last.
pub struct Sandbox {
    pub workers: Vec<Worker>,
    pub cluster: ClusterStandin,
    pub broker: Broker,
    pub topology: Topology,
    pub options: Options,
}

impl Sandbox {
    /// Brings the cluster stand-in and the workers up; `progress` hears
    /// about each step.
    pub fn start(options: &Options, progress: &mut dyn FnMut(&str)) -> Result<Sandbox> {
        std::fs::create_dir_all(&options.run_dir)
            .with_context(|| format!("creating {}", options.run_dir.display()))?;
        progress("creating the underlay namespace (198.51.100.0/24)");
        let topology = Topology::new(&options.prefix)?;
        let under = netns_path(&topology.underlay);
        progress(if options.external_mosquitto {
            "starting mosquitto on 198.51.100.254:10003"
        } else {
            "starting the embedded MQTT broker (rumqttd) on 198.51.100.254:10003"
        });
        let broker = if options.external_mosquitto {
            Broker::mosquitto(&under, &options.run_dir)?
        } else {
            Broker::embedded(&under)?
        };
        wait_listening(&under, MQTT_PORT)?;
        progress("starting the cluster stand-in (HTTP 198.51.100.254:10100)");
        let cluster = ClusterStandin::start(&under)?;
        let mut sb = Sandbox {
            workers: Vec::new(),
            cluster,
            broker,
            topology,
            options: options.clone(),
        };
        for n in 1..=options.workers {
            progress(&format!(
                "starting worker {n}: containerd, NetManager, NodeEngine"
            ));
            sb.add_worker(n)?;
        }
        Ok(sb)
    }

    /// Starts worker `n` (namespace, daemons, registration).
    pub fn add_worker(&mut self, n: u8) -> Result<&Worker> {
        let (ns, ip) = self.topology.worker(n)?;
        let dir = self.options.run_dir.join(n.to_string());
        let bpf = PathBuf::from(format!("{}{n}", self.options.bpf_prefix));
        let w = Worker::start(&self.cluster, &self.options.bins, (n, &ns, &ip), &dir, &bpf)
            .with_context(|| format!("starting worker {n}"))?;
        self.workers.push(w);
        self.workers.last().context("just added")
    }

    pub fn worker(&self, n: u8) -> Result<&Worker> {
        self.workers
            .iter()
            .find(|w| w.index == n)
            .with_context(|| format!("no worker {n}"))
    }

    pub fn worker_mut(&mut self, n: u8) -> Result<&mut Worker> {
        self.workers
            .iter_mut()
            .find(|w| w.index == n)
            .with_context(|| format!("no worker {n}"))
    }
}
