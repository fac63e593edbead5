//! A whole Oakestra cluster on one machine: the test kit's cluster double
//! (a demo/test fixture standing in for upstream's cluster) behind an MQTT
//! broker, and N real workers in network namespaces on one underlay.
//! `cargo xtask sandbox` runs it interactively; the end-to-end tests
//! (`tests/tests/e2e_*.rs`) and the benchmark drive the same code.

pub mod broker;
pub mod cli;
pub mod control;
pub mod placement;
pub mod sample_services;
pub mod sla;
pub mod workbench;
pub mod workers;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use testkit::cluster::REGISTRATION_PORT;
use testkit::topology::UNDERLAY_GATEWAY;
use testkit::{ClusterDouble, NsPath, Underlay};

use broker::{Broker, MQTT_PORT};
use workers::{Binaries, Worker};

/// Everything that differs between two sandboxes running side by side.
#[derive(Clone, Debug)]
pub struct Options {
    /// Namespace prefix (`<prefix>-under`, `<prefix>-w1`, ...), also the
    /// workers' hostnames.
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

/// Field order is drop order: workers before the cluster, the underlay last.
pub struct Sandbox {
    pub workers: Vec<Worker>,
    pub cluster: ClusterDouble,
    pub broker: Broker,
    pub underlay: Underlay,
    pub options: Options,
}

impl Sandbox {
    /// Brings the cluster double and the workers up; `progress` hears
    /// about each step.
    pub fn start(options: &Options, progress: &mut dyn FnMut(&str)) -> Result<Sandbox> {
        std::fs::create_dir_all(&options.run_dir)
            .with_context(|| format!("creating {}", options.run_dir.display()))?;
        progress("creating the underlay namespace (198.51.100.0/24)");
        let underlay = Underlay::named(&format!("{}-under", options.prefix))
            .context("creating the underlay")?;
        let under = NsPath::clone(&underlay.ns);
        progress(&if options.external_mosquitto {
            format!("starting mosquitto on {UNDERLAY_GATEWAY}:{MQTT_PORT}")
        } else {
            format!("starting the embedded MQTT broker (rumqttd) on {UNDERLAY_GATEWAY}:{MQTT_PORT}")
        });
        let broker = if options.external_mosquitto {
            Broker::mosquitto(&under, &options.run_dir)?
        } else {
            Broker::embedded(&under)?
        };
        let endpoint = Broker::endpoint(&under);
        endpoint.wait_accepting()?;
        progress(&format!(
            "starting the cluster double (HTTP {UNDERLAY_GATEWAY}:{REGISTRATION_PORT})"
        ));
        let cluster = ClusterDouble::options(endpoint)
            .http(SocketAddr::from(([0, 0, 0, 0], REGISTRATION_PORT)))
            .start()?;
        let mut sb = Sandbox {
            workers: Vec::new(),
            cluster,
            broker,
            underlay,
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
        let name = format!("{}-w{n}", self.options.prefix);
        let node = self
            .underlay
            .node_named(&name, n)
            .with_context(|| format!("creating worker namespace {name}"))?;
        let dir = self.options.run_dir.join(n.to_string());
        let bpf = PathBuf::from(format!("{}{n}", self.options.bpf_prefix));
        let w = Worker::start(
            &self.cluster,
            &self.options.bins,
            (n, &name, node),
            &dir,
            &bpf,
        )
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
