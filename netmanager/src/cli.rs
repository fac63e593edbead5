//! Command line: `NetManager` runs the daemon; `help`, `version`, `status`,
//! `logs` are the operator's subcommands (docs/contract.md, NetManager
//! command line), `config check` and `teardown` ours (docs/operations.md). Every setting is a flag with an environment variable, read
//! here and nowhere else, so several daemons can run side by side in separate
//! network namespaces of one machine.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::config::{self, NetConfig, Settings, TunConfig};
use crate::dataplane::{AttachMode, UplinkHook, XdpMode};
use worker_common::paths::per_netns;

#[derive(Debug, Parser)]
#[command(
    name = "NetManager",
    version = worker_common::version::VERSION,
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
    /// Log to this file instead of stderr (or the journal); `logs` follows it.
    #[arg(long = "log-file", env = "NETMANAGER_LOG_FILE", global = true)]
    pub log_file: Option<PathBuf>,
    #[command(flatten)]
    pub log: worker_common::logging::LogArgs,
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
    /// What screens tunnel datagrams on the uplink: the TC program alone,
    /// an XDP program in front of it that drops malformed and rejected
    /// ones before the stack, or that XDP program also delivering into
    /// containers' veths what it can (docs/dataplane.md, "The uplink hook").
    #[arg(long = "uplink-hook", env = "NETMANAGER_UPLINK_HOOK", value_enum,
          default_value_t = UplinkHook::default(), global = true)]
    pub uplink_hook: UplinkHook,
    /// With --uplink-hook xdp or xdp-redirect: native XDP (in the driver), generic, or
    /// auto (native where the driver has it).
    #[arg(long = "xdp-mode", env = "NETMANAGER_XDP_MODE", value_enum,
          default_value_t = XdpMode::default(), global = true)]
    pub xdp_mode: XdpMode,
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
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the version.
    Version,
    /// Ask the running daemon for its state and the dataplane's.
    Status,
    /// Follow the log: the journal under systemd, else the log file.
    Logs,
    /// Check the configuration and what the daemon needs of this machine.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Remove the dataplane for good: pinned links and maps (which
    /// detaches the programs), the nft table, the bridge and the state file.
    /// NetManager must be stopped; a restart never needs this.
    Teardown {
        /// Only say what would be removed.
        #[arg(long = "dry-run")]
        dry_run: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate netcfg.json and the environment (kernel features, bpffs,
    /// nft, uplink); exit code 0 when nothing failed.
    Check {
        /// Also check that the cluster's MQTT broker accepts TCP
        /// connections: at HOST[:PORT], or ClusterUrl:ClusterMqttPort.
        #[arg(long, value_name = "HOST[:PORT]", num_args = 0..=1, default_missing_value = "")]
        broker: Option<String>,
    },
}

impl Cli {
    /// How the daemon logs.
    pub fn log_options(&self, debug: bool) -> worker_common::logging::LogOptions {
        worker_common::logging::LogOptions {
            filter: self.log_filter.clone(),
            debug,
            file: self.log_file.clone(),
            args: self.log.clone(),
        }
    }

    pub fn socket_path(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| per_netns(config::DEFAULT_SOCKET_PATH))
    }

    /// `logs`: the journal under systemd, else the log file (`--log-file`,
    /// or where nodeengined puts its NetManager child's output).
    pub fn follow_logs(&self) -> Result<()> {
        let file = self
            .log_file
            .clone()
            .unwrap_or_else(|| PathBuf::from(config::DEFAULT_LOG_PATH));
        worker_common::logging::follow_service(
            worker_common::systemd::NETMANAGER_UNIT,
            &file,
            self.log_file.is_some(),
        )?;
        Ok(())
    }

    pub fn bpf_dir(&self) -> PathBuf {
        self.bpf_dir
            .clone()
            .unwrap_or_else(|| per_netns(config::DEFAULT_BPF_DIR))
    }

    pub fn state_path(&self) -> PathBuf {
        self.state
            .clone()
            .unwrap_or_else(|| per_netns(config::DEFAULT_STATE_PATH))
    }

    pub fn settings(&self) -> Result<Settings> {
        let net = NetConfig::load(&self.config)?;
        let tun = TunConfig::load(&self.tun_config)?;
        Ok(Settings {
            config_path: self.config.clone(),
            socket_path: self.socket_path(),
            bpf_dir: self.bpf_dir(),
            state_path: self.state_path(),
            log_path: self.log_file.clone(),
            uplink: self.uplink.clone().filter(|s| !s.is_empty()),
            tunnel_mtu: self
                .tunnel_mtu
                .or(tun.mtu)
                .unwrap_or(config::DEFAULT_TUNNEL_MTU),
            tunnel_port: tun.tunnel_port.unwrap_or(config::DEFAULT_TUNNEL_PORT),
            service_ranges: tun.service_ranges(),
            attach_mode: self.attach_mode,
            uplink_hook: self.uplink_hook,
            xdp_mode: self.xdp_mode,
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
