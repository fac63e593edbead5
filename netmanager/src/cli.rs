//! Command line: `NetManager` runs the daemon; `help`, `version`, `status`,
//! `logs` are the operator's subcommands (docs/contract.md, NetManager
//! command line). Every setting is a flag with an environment variable, read
//! here and nowhere else, so several daemons can run side by side in separate
//! network namespaces of one machine.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::config::{self, NetConfig, Settings, TunConfig};
use crate::dataplane::AttachMode;
use worker_common::paths::per_netns;

#[derive(Debug, Parser)]
#[command(
    name = "NetManager",
    version,
    about = "Oakestra NetManager with an eBPF overlay dataplane"
)]
pub struct Cli {
    /// Configuration file (docs/contract.md, NetManager configuration).
    #[arg(long, env = "NETMANAGER_CONFIG", default_value = config::DEFAULT_CONFIG_PATH, global = true)]
    pub config: PathBuf,
    /// Upstream's tunnel configuration: service ranges, tunnel port, MTU
    /// (absent: the defaults).
    #[arg(long = "tun-config", env = "NETMANAGER_TUN_CONFIG", default_value = config::DEFAULT_TUN_CONFIG_PATH, global = true)]
    pub tun_config: PathBuf,
    /// API socket [default: /etc/netmanager/netmanager.sock, suffixed with
    /// the network namespace when not the machine's own; NodeEngine
    /// computes the same default].
    #[arg(long, env = "NETMANAGER_SOCKET", global = true)]
    pub socket: Option<PathBuf>,
    /// bpffs directory for pinned maps and links [default: /sys/fs/bpf/oakestra,
    /// suffixed with the network namespace when not the machine's own].
    #[arg(long = "bpf-dir", env = "NETMANAGER_BPF_DIR", global = true)]
    pub bpf_dir: Option<PathBuf>,
    /// State file for restarts without loss [default:
    /// /run/oakestra/netmanager-state.json, suffixed like --bpf-dir].
    #[arg(long, env = "NETMANAGER_STATE", global = true)]
    pub state: Option<PathBuf>,
    /// Log file (also written when run by systemd); `logs` follows it.
    #[arg(long = "log-file", env = "NETMANAGER_LOG_FILE", global = true)]
    pub log_file: Option<PathBuf>,
    /// Uplink interface (default: DefaultInterface, else the default route's).
    #[arg(long, env = "NETMANAGER_UPLINK", global = true)]
    pub uplink: Option<String>,
    /// Run without loading eBPF: plumbing and cluster protocol only.
    #[arg(long = "no-dataplane", env = "NETMANAGER_NO_DATAPLANE", global = true)]
    pub no_dataplane: bool,
    /// Largest inner packet the tunnel carries (upstream's TUN_MTU_SIZE)
    /// [default: tuncfg.json's MTUSize, else 1450].
    #[arg(long = "tunnel-mtu", env = "TUN_MTU_SIZE",
          value_parser = clap::value_parser!(u16).range(576..=9000), global = true)]
    pub tunnel_mtu: Option<u16>,
    /// How the programs attach: TCX links (Linux 6.6), classic tc filters
    /// over netlink, or auto (TCX where the kernel has it).
    #[arg(long = "attach-mode", env = "NETMANAGER_ATTACH_MODE", value_enum,
          default_value_t = AttachMode::Auto, global = true)]
    pub attach_mode: AttachMode,
    /// Where PublicIPNetworking asks for the node's public address (plain
    /// text answer) [default: netcfg.json's PublicIPDiscoveryUrl, else
    /// https://api.ipify.org].
    #[arg(long = "public-ip-url", env = "NETMANAGER_PUBLIC_IP_URL",
          value_parser = parse_url, global = true)]
    pub public_ip_url: Option<String>,
    /// Seconds between re-checks of an inferred node address.
    #[arg(long = "address-check-secs", env = "NETMANAGER_ADDRESS_CHECK_SECS", default_value_t = 120,
          value_parser = clap::value_parser!(u64).range(1..), global = true)]
    pub address_check_secs: u64,
    /// Extra CA certificate (PEM) trusted for the MQTT broker (private cluster CAs).
    #[arg(long = "mqtt-ca", env = "NETMANAGER_MQTT_CA", global = true)]
    pub mqtt_ca: Option<PathBuf>,
    /// Prometheus metrics and /healthz, /readyz over HTTP on this address
    /// ("off" disables it).
    #[arg(
        long = "metrics-address",
        env = "NETMANAGER_METRICS_ADDRESS",
        default_value = "127.0.0.1:9102",
        global = true
    )]
    pub metrics_address: String,
    /// Log filter in RUST_LOG syntax (wins over netcfg.json's Debug).
    #[arg(
        long = "log-filter",
        value_name = "FILTER",
        env = "RUST_LOG",
        global = true
    )]
    pub log_filter: Option<String>,
    /// Set by systemd for its services: the log then also goes to the log file.
    #[arg(long, env = "INVOCATION_ID", hide = true, global = true)]
    pub systemd_invocation: Option<String>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the version.
    Version,
    /// Ask the running daemon for its state and the dataplane's.
    Status,
    /// Follow the log file.
    Logs,
}

impl Cli {
    /// Where the log goes when running as a service.
    pub fn effective_log_file(&self) -> Option<PathBuf> {
        self.log_file.clone().or_else(|| {
            self.systemd_invocation
                .as_ref()
                .map(|_| PathBuf::from(config::DEFAULT_LOG_PATH))
        })
    }

    /// How the daemon logs.
    pub fn log_options(&self, debug: bool) -> worker_common::logging::LogOptions {
        worker_common::logging::LogOptions {
            filter: self.log_filter.clone(),
            debug,
            file: self.effective_log_file(),
            format: worker_common::logging::LogFormat::Plain,
        }
    }

    pub fn socket_path(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| per_netns(config::DEFAULT_SOCKET_PATH))
    }

    pub fn settings(&self) -> Result<Settings> {
        let net = NetConfig::load(&self.config)?;
        let tun = TunConfig::load(&self.tun_config)?;
        Ok(Settings {
            config_path: self.config.clone(),
            socket_path: self.socket_path(),
            bpf_dir: self
                .bpf_dir
                .clone()
                .unwrap_or_else(|| per_netns(config::DEFAULT_BPF_DIR)),
            state_path: self
                .state
                .clone()
                .unwrap_or_else(|| per_netns(config::DEFAULT_STATE_PATH)),
            log_path: self.effective_log_file(),
            uplink: self.uplink.clone().filter(|s| !s.is_empty()),
            tunnel_mtu: self
                .tunnel_mtu
                .or(tun.mtu)
                .unwrap_or(config::DEFAULT_TUNNEL_MTU),
            tunnel_port: tun.tunnel_port.unwrap_or(config::DEFAULT_TUNNEL_PORT),
            service_ranges: tun.service_ranges(),
            attach_mode: self.attach_mode,
            public_ip_url: self
                .public_ip_url
                .clone()
                .or_else(|| net.public_ip_url.clone())
                .unwrap_or_else(|| config::DEFAULT_PUBLIC_IP_URL.to_string()),
            no_dataplane: self.no_dataplane,
            address_check: Duration::from_secs(self.address_check_secs),
            mqtt_ca: self.mqtt_ca.clone(),
            net,
        })
    }
}

fn parse_url(s: &str) -> Result<String, String> {
    let s = s.trim();
    config::check_url(s).map(|()| s.to_string())
}

/// `NetManager status`: prints the state; fails (for scripts and probes)
/// when the daemon is not ready.
pub async fn status(socket: &Path) -> Result<()> {
    let status: crate::status::Status = worker_common::http::Client::unix(socket)
        .get_json(worker_common::netmanager_api::routes::STATUS)
        .await
        .map_err(|e| anyhow::anyhow!("{e} (is NetManager running?)"))?;
    print!("{}", status.render());
    let why = status.not_ready();
    anyhow::ensure!(why.is_empty(), "not ready: {}", why.join("; "));
    Ok(())
}
