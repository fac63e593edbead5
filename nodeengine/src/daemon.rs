//! `nodeengined`: reads the configuration, joins the cluster and serves it until
//! SIGTERM/SIGINT.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::watch;

use crate::cluster_link;
use crate::cluster_mqtt::{self, MqttSettings};
use crate::config::{self, Config, NetworkMode, RUNTIME_CONTAINER, RUNTIME_UNIKERNEL};
use crate::containerd_runtime::{ContainerdRuntime, ContainerdSettings};
use crate::deploy::{Engine, EngineSettings};
use crate::netmanager_client::NetManagerClient;
use crate::netmanager_supervisor;
use crate::node_report::{self, NodeSampler, StaticFacts};
use crate::unikernel::UnikernelRuntime;

/// Where unikernel kernels are unpacked.
const UNIKERNEL_STATE: &str = "/var/lib/oakestra/unikernel";

pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // The systemd unit appends stderr to a log file: no colour codes there.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Resolves on SIGTERM or SIGINT.
async fn termination() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => tracing::info!("SIGTERM received, stopping"),
                _ = i.recv() => tracing::info!("SIGINT received, stopping"),
            }
        }
        _ => {
            // Without signal handlers the only clean stop is ctrl-c.
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Entry point of the daemon binary.
pub async fn run(conf_path: PathBuf) -> Result<()> {
    let cfg = Config::load(&conf_path)?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let serve = serve(cfg, shutdown_rx);
    tokio::pin!(serve);
    tokio::select! {
        r = &mut serve => return r,
        _ = termination() => {}
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
    net: Option<NetManagerClient>,
) -> Result<(
    Arc<Engine>,
    tokio::sync::mpsc::UnboundedReceiver<crate::job::StatusReport>,
)> {
    let containerd = if cfg.runtime_active(RUNTIME_CONTAINER) {
        Some(ContainerdRuntime::new(ContainerdSettings::from_env())?)
    } else {
        None
    };
    let unikernel = if cfg.runtime_active(RUNTIME_UNIKERNEL) {
        if let Some(reason) = UnikernelRuntime::unavailable_reason() {
            tracing::warn!("unikernel runtime enabled but {reason}; unikernel jobs will fail");
        }
        Some(UnikernelRuntime::new(UNIKERNEL_STATE))
    } else {
        None
    };
    Ok(Engine::new(EngineSettings {
        containerd,
        unikernel,
        netmanager: net,
        app_logs: PathBuf::from(&cfg.app_logs),
        node_ip: node_report::primary_ipv4(),
    }))
}

async fn serve(cfg: Config, shutdown: watch::Receiver<bool>) -> Result<()> {
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
    let (engine, status_rx) = build_engine(&cfg, net.clone())?;
    if cfg.runtime_active(RUNTIME_CONTAINER)
        && let Err(e) = engine.reconcile().await
    {
        tracing::warn!("reconciling with containerd: {e:#}");
    }

    let mut sampler = NodeSampler::new(StaticFacts::from_config(&cfg));
    let url = cluster_link::register_url(&cfg.cluster_address, cfg.cluster_port, cfg.cluster_ssl)?;
    let reg = cluster_link::register_with_retry(&url, || sampler.sample("")).await;
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
    let mut backoff = cluster_link::Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
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

/// The configuration path for the daemon (env override, else default).
pub fn default_conf_path() -> PathBuf {
    config::conf_path(None::<&Path>)
}
