//! `nodeengined`: reads its command line and the configuration, joins the
//! cluster and serves it until SIGTERM/SIGINT.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use tokio::sync::watch;
use worker_common::args::empty_is_default;
use worker_common::backoff::Backoff;
use worker_common::shutdown::stop_signal;

use crate::cluster_link;
use crate::cluster_mqtt::{self, MqttSettings};
use crate::config::{
    CONF_ENV, Config, DEFAULT_CONF_PATH, NetworkMode, RUNTIME_CONTAINER, RUNTIME_UNIKERNEL,
};
use crate::containerd_runtime::{self, ContainerdRuntime, ContainerdSettings};
use crate::csi::{Registry as CsiRegistry, VolumeManager};
use crate::deploy::{Engine, EngineSettings};
use crate::netmanager_client::NetManagerClient;
use crate::netmanager_supervisor;
use crate::node_report::{self, NodeSampler, StaticFacts};
use crate::unikernel::UnikernelRuntime;

/// What upstream reports as the node's port without `MY_PORT`.
const DEFAULT_NODE_PORT: &str = "3000";

/// Where the daemon keeps what must outlive it: CSI mount records, staging and
/// target paths (`csi/`, upstream's location) and unikernel instances
/// (`unikernel/`).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/oakestra";

/// `nodeengined`'s command line. Everything the daemon takes from its
/// environment is declared here; the rest is in the configuration file.
#[derive(Parser, Debug, Clone)]
#[command(name = "nodeengined", version, about = "Oakestra NodeEngine daemon")]
pub struct DaemonArgs {
    /// Configuration file
    #[arg(
        long,
        value_name = "PATH",
        env = CONF_ENV,
        default_value = DEFAULT_CONF_PATH,
        value_parser = empty_is_default::<PathBuf>(DEFAULT_CONF_PATH)
    )]
    pub config: PathBuf,

    /// containerd's socket (the variable `ctr` reads too)
    #[arg(
        long,
        value_name = "SOCKET",
        env = containerd_runtime::SOCKET_ENV,
        default_value = containerd_runtime::DEFAULT_SOCKET,
        value_parser = empty_is_default::<PathBuf>(containerd_runtime::DEFAULT_SOCKET)
    )]
    pub containerd_address: PathBuf,

    /// containerd namespace of the workloads (the variable `ctr` reads too)
    #[arg(
        long,
        value_name = "NAMESPACE",
        env = containerd_runtime::NAMESPACE_ENV,
        default_value = containerd_runtime::DEFAULT_NAMESPACE,
        value_parser = empty_is_default::<String>(containerd_runtime::DEFAULT_NAMESPACE)
    )]
    pub containerd_namespace: String,

    /// The port this node reports to the cluster (upstream's `MY_PORT`)
    #[arg(
        long,
        value_name = "PORT",
        env = "MY_PORT",
        default_value = DEFAULT_NODE_PORT,
        value_parser = empty_is_default::<String>(DEFAULT_NODE_PORT)
    )]
    pub node_port: String,

    /// State directory (CSI volumes under csi/, unikernels under unikernel/)
    #[arg(
        long,
        value_name = "DIR",
        env = "OAKESTRA_STATE_DIR",
        default_value = DEFAULT_STATE_DIR,
        value_parser = empty_is_default::<PathBuf>(DEFAULT_STATE_DIR)
    )]
    pub state_dir: PathBuf,

    /// Log filter, e.g. `info,nodeengine=debug`
    #[arg(long, value_name = "FILTER", env = "RUST_LOG")]
    pub log_filter: Option<String>,
}

impl DaemonArgs {
    fn containerd(&self) -> ContainerdSettings {
        ContainerdSettings {
            socket: self.containerd_address.clone(),
            namespace: self.containerd_namespace.clone(),
        }
    }
}

/// Entry point of the daemon binary: serves until SIGTERM/SIGINT.
pub async fn run(args: DaemonArgs) -> Result<()> {
    let cfg = Config::load(&args.config)?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let serve = serve(cfg, args, shutdown_rx);
    tokio::pin!(serve);
    tokio::select! {
        r = &mut serve => return r,
        _ = stop_signal() => {}
    }
    let _ = shutdown_tx.send(true);
    // Let the MQTT session say goodbye and the NetManager child stop.
    match tokio::time::timeout(Duration::from_secs(8), serve).await {
        Ok(r) => r,
        Err(_) => {
            tracing::warn!("shutdown took too long; exiting");
            Ok(())
        }
    }
}

fn build_engine(
    cfg: &Config,
    containerd: ContainerdSettings,
    net: Option<NetManagerClient>,
    volumes: VolumeManager,
    state_dir: &std::path::Path,
) -> Result<(
    Arc<Engine>,
    tokio::sync::mpsc::UnboundedReceiver<crate::job::StatusReport>,
)> {
    let containerd = if cfg.runtime_active(RUNTIME_CONTAINER) {
        Some(ContainerdRuntime::new(containerd)?)
    } else {
        None
    };
    let unikernel = if cfg.runtime_active(RUNTIME_UNIKERNEL) {
        if let Some(reason) = UnikernelRuntime::unavailable_reason() {
            tracing::warn!("unikernel runtime enabled but {reason}; unikernel jobs will fail");
        }
        Some(UnikernelRuntime::new(state_dir.join("unikernel")))
    } else {
        None
    };
    Ok(Engine::new(EngineSettings {
        containerd,
        unikernel,
        netmanager: net,
        volumes,
        app_logs: PathBuf::from(&cfg.app_logs),
        node_ip: node_report::primary_ipv4(),
    }))
}

async fn serve(cfg: Config, args: DaemonArgs, shutdown: watch::Receiver<bool>) -> Result<()> {
    tracing::info!(
        cluster = %cfg.cluster_address, port = cfg.cluster_port,
        network = ?cfg.network_mode(), "starting NodeEngine"
    );
    let mode = cfg.network_mode();
    let mut supervisor = None;
    if mode == NetworkMode::Auto {
        supervisor = netmanager_supervisor::start(shutdown.clone())
            .context("starting NetManager (network mode auto)")?;
    }
    let net = mode.socket().map(NetManagerClient::new);
    // Probed before the registration, so its node document lists only the
    // CSI drivers that answer; then again every 30 s.
    let csi = CsiRegistry::new(&cfg.csi_drivers);
    csi.probe_all().await;
    tokio::spawn(csi.clone().reprobe_until(shutdown.clone()));
    let volumes = VolumeManager::new(csi.clone(), args.state_dir.join("csi"));
    let (engine, status_rx) = build_engine(
        &cfg,
        args.containerd(),
        net.clone(),
        volumes,
        &args.state_dir,
    )?;
    if cfg.runtime_active(RUNTIME_CONTAINER)
        && let Err(e) = engine.reconcile().await
    {
        tracing::warn!("reconciling with containerd: {e:#}");
    }
    engine.release_orphaned_volumes().await;

    let mut sampler =
        NodeSampler::new(StaticFacts::from_config(&cfg, &args.node_port)).with_csi(csi);
    let cluster =
        cluster_link::ClusterLink::new(&cfg.cluster_address, cfg.cluster_port, cfg.cluster_ssl)?;
    let reg = cluster.register_with_retry(|| sampler.sample("")).await;
    tracing::info!(node_id = %reg.node_id, mqtt_port = reg.mqtt_port, "registered with the cluster");

    if let Some(net) = net.clone() {
        let (id, cluster) = (reg.node_id.clone(), cfg.cluster_address.clone());
        // In the background: MQTT reports must not wait for NetManager to come up.
        tokio::spawn(async move { register_with_netmanager(&net, &id, &cluster).await });
    }

    let mqtt = MqttSettings {
        node_id: reg.node_id.clone(),
        host: cfg.cluster_address.clone(),
        port: reg.mqtt_port,
        cert_file: cfg.mqtt_cert_file.clone(),
        key_file: cfg.mqtt_key_file.clone(),
    };
    let result = cluster_mqtt::run(mqtt, engine, status_rx, sampler, shutdown).await;
    if let Some(sup) = supervisor {
        let _ = tokio::time::timeout(Duration::from_secs(6), sup).await;
    }
    result
}

/// Registers the node with NetManager, retrying until it answers. Until then
/// deployments fail with NetManager's error as the reason; the daemon keeps serving.
async fn register_with_netmanager(net: &NetManagerClient, node_id: &str, cluster: &str) {
    netmanager_supervisor::wait_for_socket(net.socket(), Duration::from_secs(30)).await;
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    for attempt in 1.. {
        match net.register(node_id, cluster).await {
            Ok(()) => {
                tracing::info!(socket = %net.socket().display(), "registered with NetManager");
                return;
            }
            Err(e) => {
                let d = backoff.next_delay();
                tracing::warn!(
                    "NetManager registration attempt {attempt}: {e:#}; retrying in {d:?}"
                );
                tokio::time::sleep(d).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line() {
        use clap::CommandFactory;
        DaemonArgs::command().debug_assert();
        let a = DaemonArgs::try_parse_from([
            "nodeengined",
            "--config",
            "/tmp/c.json",
            "--containerd-namespace",
            "",
            "--node-port",
            "4000",
        ])
        .expect("parses");
        assert_eq!(a.config, PathBuf::from("/tmp/c.json"));
        // Empty is the default, as for an empty environment variable.
        assert_eq!(
            a.containerd_namespace,
            containerd_runtime::DEFAULT_NAMESPACE
        );
        assert_eq!(a.node_port, "4000");
    }

    /// Everything the daemon takes from its environment is an argument.
    #[test]
    fn environment_is_declared() {
        use clap::CommandFactory;
        let command = DaemonArgs::command();
        let mut vars: Vec<String> = command
            .get_arguments()
            .filter_map(|a| a.get_env())
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        vars.sort();
        assert_eq!(
            vars,
            [
                "CONTAINERD_ADDRESS",
                "CONTAINERD_NAMESPACE",
                "MY_PORT",
                "OAKESTRA_CONF",
                "OAKESTRA_STATE_DIR",
                "RUST_LOG"
            ]
        );
    }
}
