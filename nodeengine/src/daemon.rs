//! `nodeengined`: reads its command line and the configuration, joins the
//! cluster and serves it until SIGTERM/SIGINT.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use clap::Parser;
use tokio::sync::watch;
use worker_common::args::empty_is_default;
use worker_common::backoff::Backoff;
use worker_common::shutdown::stop_signal;

use crate::addons;
use crate::app_logs::{self, AppLogs};
use crate::cluster_link;
use crate::cluster_mqtt::{self, MqttSecurity, MqttSettings, Session};
use crate::config::{
    ADDON_FLOPS, CONF_ENV, Config, DEFAULT_CONF_PATH, NetworkMode, RUNTIME_CONTAINER,
    RUNTIME_UNIKERNEL,
};
use crate::containerd_runtime::{self, ContainerdRuntime, ContainerdSettings};
use crate::csi::{Registry as CsiRegistry, VolumeManager};
use crate::deploy::{Engine, EngineSettings};
use crate::last_report::{self, LastReport};
use crate::metrics::{self, Metrics};
use crate::netmanager_client::NetManagerClient;
use crate::netmanager_supervisor;
use crate::node_report::{NodeIp, NodeSampler, StaticFacts};
use crate::public_ip::{self, PublicIpSource};
use crate::runtimes::{self, Runtimes};
use crate::unikernel::UnikernelRuntime;

/// What upstream reports as the node's port without `MY_PORT`.
const DEFAULT_NODE_PORT: &str = "3000";

/// Where the daemon keeps what must outlive it: CSI mount records, staging and
/// target paths (`csi/`, upstream's location), unikernel instances
/// (`unikernel/`), the time of the last report (`last-report`), the fallback
/// resolv.conf and the FLOps data server's volume (`flops/`).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/oakestra";

/// `nodeengined`'s command line. Everything the daemon takes from its
/// environment is declared here; the rest is in the configuration file.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "nodeengined",
    version = worker_common::version::VERSION,
    about = "Oakestra NodeEngine daemon"
)]
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

    /// containerd's configuration, where its runtimes (runsc, kata, ...) are found
    #[arg(
        long,
        value_name = "PATH",
        env = "CONTAINERD_CONFIG",
        default_value = runtimes::DEFAULT_CONTAINERD_CONFIG,
        value_parser = empty_is_default::<PathBuf>(runtimes::DEFAULT_CONTAINERD_CONFIG)
    )]
    pub containerd_config: PathBuf,

    /// The port this node reports to the cluster (upstream's `MY_PORT`)
    #[arg(
        long,
        value_name = "PORT",
        env = "MY_PORT",
        default_value = DEFAULT_NODE_PORT,
        value_parser = empty_is_default::<String>(DEFAULT_NODE_PORT)
    )]
    pub node_port: String,

    /// State directory (CSI volumes under csi/, unikernels under unikernel/,
    /// the last report time, the fallback resolv.conf, addon data)
    #[arg(
        long,
        value_name = "DIR",
        env = "OAKESTRA_STATE_DIR",
        default_value = DEFAULT_STATE_DIR,
        value_parser = empty_is_default::<PathBuf>(DEFAULT_STATE_DIR)
    )]
    pub state_dir: PathBuf,

    /// How qemu runs unikernels: auto (KVM when a probe says it works, else
    /// TCG), kvm, or tcg (hosts whose KVM cannot boot the guests' kernels)
    #[arg(
        long,
        value_name = "ACCEL",
        value_enum,
        env = crate::unikernel::accel::ACCEL_ENV,
        default_value_t = crate::unikernel::accel::AccelChoice::Auto
    )]
    pub unikernel_accel: crate::unikernel::accel::AccelChoice,

    /// Seconds without reports after which the cluster has replaced this
    /// node's instances: containers found at start are adopted only within it
    #[arg(
        long,
        value_name = "SECONDS",
        env = "NODEENGINE_ADOPT_WINDOW",
        default_value_t = last_report::DEFAULT_WINDOW.as_secs()
    )]
    pub adopt_window: u64,

    /// Where the public address is discovered (`config visibility public`)
    #[arg(
        long,
        value_name = "URL",
        env = "NODEENGINE_PUBLIC_IP_URL",
        default_value = public_ip::DEFAULT_URL,
        value_parser = empty_is_default::<String>(public_ip::DEFAULT_URL)
    )]
    pub public_ip_url: String,

    /// Seconds between public address discoveries
    #[arg(
        long,
        value_name = "SECONDS",
        env = "NODEENGINE_PUBLIC_IP_REFRESH",
        default_value_t = public_ip::DEFAULT_REFRESH.as_secs()
    )]
    pub public_ip_refresh: u64,

    /// Largest size of one application's log before it is cut to its newest half
    #[arg(
        long,
        value_name = "BYTES",
        env = "NODEENGINE_APP_LOG_MAX_BYTES",
        default_value_t = app_logs::DEFAULT_MAX_BYTES
    )]
    pub app_log_max_bytes: u64,

    /// Prometheus metrics and /healthz, /readyz over HTTP on this address
    /// ("off" disables it)
    #[arg(
        long,
        value_name = "ADDRESS",
        env = metrics::ADDRESS_ENV,
        default_value = metrics::DEFAULT_ADDRESS,
        value_parser = empty_is_default::<String>(metrics::DEFAULT_ADDRESS)
    )]
    pub metrics_address: String,

    /// Log filter, e.g. `info,nodeengine=debug`
    #[arg(long, value_name = "FILTER", env = "RUST_LOG")]
    pub log_filter: Option<String>,

    #[command(flatten)]
    pub log: worker_common::logging::LogArgs,
}

impl DaemonArgs {
    pub fn containerd(&self) -> ContainerdSettings {
        ContainerdSettings {
            socket: self.containerd_address.clone(),
            namespace: self.containerd_namespace.clone(),
        }
    }
}

/// Entry point of the daemon binary: serves until SIGTERM/SIGINT.
pub async fn run(args: DaemonArgs) -> Result<()> {
    let cfg = Config::load(&args.config)?;
    // Keep-alives while the runtime schedules work (a wedged runtime gets
    // the daemon restarted after WatchdogSec=).
    let _watchdog = worker_common::systemd::spawn_watchdog(|| async { Ok(()) });
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let serve = serve(cfg, args, shutdown_rx);
    tokio::pin!(serve);
    tokio::select! {
        r = &mut serve => return r,
        _ = stop_signal() => {}
    }
    worker_common::systemd::stopping();
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
    args: &DaemonArgs,
    runtimes: Runtimes,
    net: Option<NetManagerClient>,
    volumes: VolumeManager,
    node_ip: NodeIp,
    metrics: Metrics,
) -> Result<(
    Arc<Engine>,
    tokio::sync::mpsc::Receiver<crate::job::StatusReport>,
)> {
    let containerd = if cfg.runtime_active(RUNTIME_CONTAINER) {
        Some(ContainerdRuntime::new(args.containerd())?)
    } else {
        None
    };
    let unikernel = if cfg.runtime_active(RUNTIME_UNIKERNEL) {
        if let Some(reason) = UnikernelRuntime::unavailable_reason() {
            tracing::warn!("unikernel runtime enabled but {reason}; unikernel jobs will fail");
        }
        Some(UnikernelRuntime::new(
            args.state_dir.join("unikernel"),
            args.unikernel_accel,
        ))
    } else {
        None
    };
    let app_logs = AppLogs::open(Path::new(&cfg.app_logs), args.app_log_max_bytes)?;
    tracing::info!(dir = %app_logs.dir().display(), "application logs");
    Ok(Engine::new(EngineSettings {
        containerd,
        unikernel,
        netmanager: net,
        volumes,
        app_logs,
        runtimes,
        policy: cfg.local_policy.clone(),
        state_dir: args.state_dir.clone(),
        node_ip,
        metrics,
    }))
}

/// Adopts running containers when the cluster still counts them, removes
/// them otherwise (see `last_report`).
async fn reconcile(engine: &Arc<Engine>, last: &LastReport, window: Duration) {
    let adopt = last.within(window, SystemTime::now());
    match last.stored() {
        Some(at) => tracing::info!(
            "last report went out {:?} ago (window {window:?}): {}",
            SystemTime::now().duration_since(at).unwrap_or_default(),
            if adopt {
                "adopting running instances"
            } else {
                "removing instances the cluster has replaced"
            }
        ),
        None => tracing::info!("no earlier report known: removing leftover instances"),
    }
    if let Err(e) = engine.reconcile(adopt).await {
        tracing::warn!("reconciling with containerd: {e:#}");
    }
}

/// Addons that need work at start; returns whether the FLOps data server runs.
async fn start_addons(cfg: &Config, args: &DaemonArgs) -> bool {
    if !cfg.active_addons().iter().any(|a| a == ADDON_FLOPS) {
        return false;
    }
    let started = match ContainerdRuntime::new(args.containerd()) {
        Ok(rt) => addons::start_flops_data_server(&rt, &args.state_dir).await,
        Err(e) => Err(e),
    };
    match started {
        Ok(()) => true,
        Err(e) => {
            // Upstream exits here; the node keeps serving its other jobs and
            // does not advertise FLOps-learner.
            tracing::error!(
                "FLOps ML data server not started, FLOps-learner not advertised: {e:#}"
            );
            false
        }
    }
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
    let metrics = Metrics::new(net.is_some());
    let node_ip = NodeIp::default();
    let runtimes = Runtimes::new(&cfg, &args.containerd_config);
    // Probed before the registration, so its node document lists only the
    // CSI drivers that answer; then again every 30 s.
    let csi = CsiRegistry::new(&cfg.csi_drivers);
    csi.probe_all().await;
    tokio::spawn(csi.clone().reprobe_until(shutdown.clone()));
    let volumes = VolumeManager::new(csi.clone(), args.state_dir.join("csi"));
    let (engine, status_rx) = build_engine(
        &cfg,
        &args,
        runtimes.clone(),
        net.clone(),
        volumes,
        node_ip.clone(),
        metrics.clone(),
    )?;
    // From here on probes get answers (not ready until registered).
    let listener = worker_common::metrics::serve(
        &args.metrics_address,
        metrics::router(metrics.clone(), {
            let engine = engine.clone();
            Arc::new(move || engine.running_by_virtualization())
        }),
    )
    .await;
    let last_report = LastReport::new(&args.state_dir);
    if cfg.runtime_active(RUNTIME_CONTAINER) {
        reconcile(
            &engine,
            &last_report,
            Duration::from_secs(args.adopt_window),
        )
        .await;
    }
    engine.release_orphaned_volumes().await;
    let flops = start_addons(&cfg, &args).await;

    let mut facts = StaticFacts::from_config(&cfg, &args.node_port);
    facts.virtualization = runtimes.advertised(&cfg);
    // The imageBuilder check runs dpkg: on the blocking pool.
    let addon_cfg = cfg.clone();
    facts.supported_addons =
        tokio::task::spawn_blocking(move || addons::advertised(&addon_cfg, flops))
            .await
            .unwrap_or_default();
    let mut sampler = NodeSampler::new(facts).with_csi(csi);
    let mut public_ip = PublicIpSource::new(
        cfg.public_ip(),
        &args.public_ip_url,
        Duration::from_secs(args.public_ip_refresh.max(1)),
    )?;
    sampler.set_public_ip(public_ip.current().await);
    let cluster =
        cluster_link::ClusterLink::new(&cfg.cluster_address, cfg.cluster_port, cfg.cluster_ssl)?;
    // The work loop starts here; the cluster may be away for long, so
    // readiness does not wait for it (nor for NetManager).
    worker_common::systemd::ready(&format!(
        "registering with the cluster at {}",
        cfg.cluster_address
    ));
    let reg = cluster
        .register_with_retry(|| {
            let doc = sampler.sample("");
            node_ip.set(&doc.ip);
            doc
        })
        .await;
    worker_common::systemd::status(&format!("registered as node {}", reg.node_id));
    metrics.set_registered();
    tracing::info!(node_id = %reg.node_id, mqtt_port = reg.mqtt_port, "registered with the cluster");

    if let Some(net) = net.clone() {
        let (id, cluster) = (reg.node_id.clone(), cfg.cluster_address.clone());
        // In the background: MQTT reports must not wait for NetManager to come up.
        let m = metrics.clone();
        tokio::spawn(async move {
            register_with_netmanager(&net, &id, &cluster).await;
            m.set_netmanager_registered();
        });
    }

    let session = Session {
        settings: MqttSettings {
            node_id: reg.node_id.clone(),
            host: cfg.cluster_address.clone(),
            port: reg.mqtt_port,
            security: MqttSecurity::from_config(&cfg),
        },
        sampler,
        public_ip,
        node_ip,
        last_report,
        metrics,
    };
    let result = cluster_mqtt::run(session, engine, status_rx, shutdown).await;
    if let Some(l) = listener {
        l.abort();
    }
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
        assert_eq!(a.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
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
                "CONTAINERD_CONFIG",
                "CONTAINERD_NAMESPACE",
                "JOURNAL_STREAM",
                "MY_PORT",
                "NODEENGINE_ADOPT_WINDOW",
                "NODEENGINE_APP_LOG_MAX_BYTES",
                "NODEENGINE_METRICS_ADDRESS",
                "NODEENGINE_PUBLIC_IP_REFRESH",
                "NODEENGINE_PUBLIC_IP_URL",
                "NODEENGINE_UNIKERNEL_ACCEL",
                "OAKESTRA_CONF",
                "OAKESTRA_LOG_FORMAT",
                "OAKESTRA_STATE_DIR",
                "RUST_LOG"
            ]
        );
    }
}
