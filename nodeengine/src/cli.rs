//! `NodeEngine`: the operator's command line (contract 1.2).
//!
//! It edits the configuration file and controls the service. It never destroys a
//! configuration it cannot parse: it reports the position and stops.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use worker_common::args::empty_is_default;
use worker_common::logging::{self, FollowError};
use worker_common::privileges::require_root;

use crate::config::{
    ADDON_FLOPS, ADDON_IMAGE_BUILDER, CONF_ENV, Config, ConfigError, DEFAULT_CONF_PATH,
    DEFAULT_NETMANAGER_SOCK, NetworkMode,
};
use crate::service::{self, NETMANAGER_UNIT, NODEENGINE_LOG, NODEENGINE_UNIT};

#[derive(Parser, Debug)]
#[command(
    name = "NodeEngine",
    version,
    about = "Oakestra worker node: configure and control the NodeEngine service",
    long_about = "Oakestra worker node: configure and control the NodeEngine service.\n\n\
        `NodeEngine -a ADDR` joins the cluster at ADDR and starts the service \
        (in the foreground when systemd is absent)."
)]
pub struct Cli {
    /// Configuration file
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        env = CONF_ENV,
        default_value = DEFAULT_CONF_PATH,
        value_parser = empty_is_default::<PathBuf>(DEFAULT_CONF_PATH)
    )]
    pub config: PathBuf,

    /// Cluster orchestrator address: set it and start the service
    #[arg(short = 'a', long = "address", value_name = "ADDR")]
    pub address: Option<String>,

    /// Cluster orchestrator port (with -a)
    #[arg(short = 'p', long = "port", value_name = "PORT", requires = "address")]
    pub port: Option<u16>,

    /// Do not follow the log after starting (with -a)
    #[arg(short = 'd', long = "detach", requires = "address")]
    pub detach: bool,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Edit the configuration
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print the version
    Version,
    /// Show the service status (and NetManager's with network auto)
    Status,
    /// Follow the NodeEngine log
    Logs,
    /// Stop NodeEngine and NetManager
    Stop,
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Set the cluster address, port and TLS for the HTTP handshake (does not start)
    Cluster {
        /// Cluster orchestrator address
        url: String,
        /// Cluster orchestrator port
        #[arg(short = 'p', long = "port", default_value_t = 10100)]
        port: u16,
        /// Use HTTPS for the registration handshake
        #[arg(short = 's', long = "ssl")]
        ssl: bool,
    },
    /// Directory for application logs
    Applogs {
        /// Directory
        path: PathBuf,
    },
    /// MQTT over TLS with this client certificate and key
    Auth(AuthArgs),
    /// Turn an addon on or off (advertised to the cluster)
    Addon {
        /// Addon
        #[arg(value_enum)]
        addon: AddonName,
        /// on or off
        #[arg(value_enum)]
        state: OnOff,
    },
    /// Overlay network: auto, manual [SOCK] or off
    #[command(subcommand)]
    Network(NetworkCommand),
    /// Enable or disable a virtualization
    Virtualization {
        /// Virtualization
        #[arg(value_enum)]
        kind: VirtualizationName,
        /// on or off
        #[arg(value_enum)]
        state: OnOff,
    },
    /// CSI drivers: list, add or remove (advertised when they answer a probe)
    Csi {
        #[command(subcommand)]
        action: Option<CsiCommand>,
    },
    /// Reset the configuration to defaults
    Default,
}

#[derive(Subcommand, Debug)]
pub enum CsiCommand {
    /// List the configured CSI drivers (also `config csi` alone)
    List,
    /// Add a CSI driver, or change the endpoint of one with this name
    Add {
        /// Driver name, as jobs' volumes name it (e.g. csi.oakestra.io/hostpath)
        name: String,
        /// The plugin's unix socket: unix:///path or /path
        endpoint: String,
    },
    /// Remove a CSI driver
    Remove {
        /// Driver name
        name: String,
    },
}

#[derive(Args, Debug)]
pub struct AuthArgs {
    /// Client certificate (PEM)
    #[arg(short = 'c', long = "cert", value_name = "CERT")]
    pub cert: PathBuf,
    /// Client key (PEM)
    #[arg(short = 'k', long = "key", value_name = "KEY")]
    pub key: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum NetworkCommand {
    /// NodeEngine starts NetManager and uses /etc/netmanager/netmanager.sock
    Auto,
    /// NetManager is started by the operator; connect to SOCK
    Manual {
        /// NetManager socket
        #[arg(default_value = DEFAULT_NETMANAGER_SOCK)]
        sock: PathBuf,
    },
    /// No overlay network
    Off,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnOff {
    On,
    Off,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddonName {
    #[value(name = "FLOps", alias = "flops")]
    Flops,
    #[value(name = "imageBuilder", alias = "imagebuilder")]
    ImageBuilder,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum VirtualizationName {
    Unikernel,
}

/// Runs the CLI; returns the process exit code.
pub fn main_with(args: impl IntoIterator<Item = std::ffi::OsString>) -> i32 {
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            // Help and version go to stdout with 0, usage errors to stderr with 2.
            let _ = e.print();
            return e.exit_code();
        }
    };
    match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("NodeEngine: {e:#}");
            1
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let path = cli.config;
    if let Some(addr) = &cli.address {
        return start(&path, addr, cli.port, cli.detach);
    }
    match cli.command {
        None => {
            use clap::CommandFactory;
            Cli::command().print_help()?;
            println!();
            Ok(())
        }
        Some(Command::Config(c)) => configure(&path, c),
        Some(Command::Version) => {
            println!("NodeEngine {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Some(Command::Status) => status(&path),
        Some(Command::Logs) => follow(Path::new(NODEENGINE_LOG)),
        Some(Command::Stop) => stop(),
    }
}

/// Load, change, save. A parse error stops before anything is written.
fn edit(path: &Path, change: impl FnOnce(&mut Config)) -> Result<()> {
    let mut cfg = Config::load(path)?;
    change(&mut cfg);
    save(path, &cfg)
}

fn save(path: &Path, cfg: &Config) -> Result<()> {
    cfg.save(path).map_err(|e| match &e {
        ConfigError::Write { source, .. }
            if source.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            anyhow!("{e}\nthis command needs root privileges: run it with sudo")
        }
        _ => anyhow!(e),
    })
}

/// `config cluster` accepts a bare address or an http(s):// URL.
fn split_cluster_url(url: &str) -> (String, Option<bool>) {
    let trimmed = url.trim().trim_end_matches('/');
    if let Some(rest) = trimmed.strip_prefix("https://") {
        (rest.to_string(), Some(true))
    } else if let Some(rest) = trimmed.strip_prefix("http://") {
        (rest.to_string(), Some(false))
    } else {
        (trimmed.to_string(), None)
    }
}

fn configure(path: &Path, c: ConfigCommand) -> Result<()> {
    match c {
        ConfigCommand::Cluster { url, port, ssl } => {
            let (address, scheme_ssl) = split_cluster_url(&url);
            if address.is_empty() {
                bail!("the cluster address is empty");
            }
            edit(path, |cfg| {
                cfg.cluster_address = address;
                cfg.cluster_port = port;
                cfg.cluster_ssl = ssl || scheme_ssl == Some(true);
            })
        }
        ConfigCommand::Applogs { path: dir } => {
            let dir = absolute(&dir)?;
            edit(path, |cfg| cfg.app_logs = dir.display().to_string())
        }
        ConfigCommand::Auth(a) => {
            for f in [&a.cert, &a.key] {
                if !f.is_file() {
                    bail!("{} does not exist or is not a file", f.display());
                }
            }
            let (cert, key) = (absolute(&a.cert)?, absolute(&a.key)?);
            edit(path, |cfg| {
                cfg.mqtt_cert_file = cert.display().to_string();
                cfg.mqtt_key_file = key.display().to_string();
            })
        }
        ConfigCommand::Addon { addon, state } => {
            let name = match addon {
                AddonName::Flops => ADDON_FLOPS,
                AddonName::ImageBuilder => ADDON_IMAGE_BUILDER,
            };
            edit(path, |cfg| cfg.set_addon(name, state == OnOff::On))
        }
        ConfigCommand::Network(n) => {
            let mode = match n {
                NetworkCommand::Auto => NetworkMode::Auto,
                NetworkCommand::Manual { sock } => NetworkMode::Manual(absolute(&sock)?),
                NetworkCommand::Off => NetworkMode::Off,
            };
            edit(path, |cfg| cfg.set_network_mode(&mode))
        }
        ConfigCommand::Virtualization { kind, state } => match kind {
            VirtualizationName::Unikernel => {
                edit(path, |cfg| cfg.set_unikernel(state == OnOff::On))
            }
        },
        ConfigCommand::Csi { action } => configure_csi(path, action.unwrap_or(CsiCommand::List)),
        ConfigCommand::Default => save(path, &Config::default()),
    }
}

fn configure_csi(path: &Path, action: CsiCommand) -> Result<()> {
    match action {
        CsiCommand::List => {
            let cfg = Config::load(path)?;
            if cfg.csi_drivers.is_empty() {
                println!("no CSI drivers configured (NodeEngine config csi add NAME ENDPOINT)");
                return Ok(());
            }
            let width = cfg
                .csi_drivers
                .iter()
                .map(|d| d.csi_driver_name.len())
                .max()
                .unwrap_or(0)
                .max("DRIVER".len());
            println!("{:<width$}  ENDPOINT", "DRIVER");
            for d in &cfg.csi_drivers {
                println!("{:<width$}  {}", d.csi_driver_name, d.csi_driver_endpoint);
            }
            Ok(())
        }
        CsiCommand::Add { name, endpoint } => {
            let name = name.trim().to_string();
            if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
                bail!("CSI driver name {name:?} is empty or contains whitespace");
            }
            crate::csi::plugin::socket_path(&endpoint)?;
            let mut replaced = false;
            edit(path, |cfg| {
                replaced = cfg.set_csi_driver(&name, endpoint.trim())
            })?;
            let verb = if replaced { "updated" } else { "added" };
            println!(
                "CSI driver {name} {verb} ({}); restart NodeEngine to use it",
                endpoint.trim()
            );
            Ok(())
        }
        CsiCommand::Remove { name } => {
            let mut cfg = Config::load(path)?;
            if !cfg.remove_csi_driver(&name) {
                bail!("no CSI driver named {name:?} is configured");
            }
            save(path, &cfg)?;
            println!("CSI driver {name} removed; restart NodeEngine to stop using it");
            Ok(())
        }
    }
}

fn absolute(p: &Path) -> Result<PathBuf> {
    if p.is_absolute() {
        Ok(p.to_path_buf())
    } else {
        Ok(std::env::current_dir()
            .context("current directory")?
            .join(p))
    }
}

// ------------------------------------------------------------------- service

fn daemon_binary() -> Result<PathBuf> {
    let me = std::env::current_exe().context("locating NodeEngine")?;
    if let Some(sib) = me.parent().map(|d| d.join("nodeengined"))
        && sib.is_file()
    {
        return Ok(sib);
    }
    crate::node_report::find_on_path("nodeengined")
        .ok_or_else(|| anyhow!("nodeengined is neither next to NodeEngine nor on PATH"))
}

fn start(path: &Path, address: &str, port: Option<u16>, detach: bool) -> Result<()> {
    require_root(
        "`NodeEngine -a`",
        "it writes the configuration and starts the NodeEngine service",
    )?;
    let (addr, scheme_ssl) = split_cluster_url(address);
    edit(path, |cfg| {
        cfg.cluster_address = addr;
        if let Some(p) = port {
            cfg.cluster_port = p;
        }
        if let Some(ssl) = scheme_ssl {
            cfg.cluster_ssl = ssl;
        }
    })?;
    if service::has_systemd() {
        service::systemctl(&["start", NODEENGINE_UNIT])?;
        println!("NodeEngine service started");
        if detach {
            return Ok(());
        }
        return follow(Path::new(NODEENGINE_LOG));
    }
    let daemon = daemon_binary()?;
    if detach {
        return spawn_detached(&daemon, path);
    }
    println!("systemd is not running here: running nodeengined in the foreground");
    exec_daemon(&daemon, path)
}

fn exec_daemon(daemon: &Path, conf: &Path) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(daemon)
        .env(CONF_ENV, conf)
        .exec();
    Err(anyhow!("cannot run {}: {err}", daemon.display()))
}

/// `-d` without systemd: the daemon runs in the background, its output appended
/// to the log file as the unit would do.
fn spawn_detached(daemon: &Path, conf: &Path) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let log = Path::new(NODEENGINE_LOG);
    if let Some(d) = log.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let err = out.try_clone()?;
    let child = std::process::Command::new(daemon)
        .env(CONF_ENV, conf)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", daemon.display()))?;
    println!(
        "nodeengined started in the background (pid {}); log: {}",
        child.id(),
        log.display()
    );
    Ok(())
}

/// Pids of running processes with this command name.
fn pids_named(name: &str) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| c.trim() == name)
                .unwrap_or(false)
        })
        .collect()
}

fn status(path: &Path) -> Result<()> {
    if service::has_systemd() {
        print!("{}", service::systemctl_status(NODEENGINE_UNIT));
        let auto = Config::load(path)
            .map(|c| c.network_mode() == NetworkMode::Auto)
            .unwrap_or(false);
        if auto {
            print!("{}", service::systemctl_status(NETMANAGER_UNIT));
        }
        return Ok(());
    }
    println!(
        "systemd is not running on this machine, so there is no NodeEngine service; \
         `NodeEngine -a ADDR` runs the daemon in the foreground."
    );
    let pids = pids_named("nodeengined");
    if pids.is_empty() {
        println!("nodeengined: not running");
    } else {
        println!("nodeengined: running (pid {pids:?})");
    }
    let nm = pids_named("NetManager");
    if !nm.is_empty() {
        println!("NetManager: running (pid {nm:?})");
    }
    Ok(())
}

fn stop() -> Result<()> {
    if !service::has_systemd() {
        let pids = pids_named("nodeengined");
        bail!(
            "systemd is not running on this machine, so there is no service to stop; \
             stop the foreground nodeengined with Ctrl-C or `kill <pid>`{}",
            if pids.is_empty() {
                " (none is running)".to_string()
            } else {
                format!(" (running: {pids:?})")
            }
        );
    }
    require_root("`NodeEngine stop`", "it stops the system services")?;
    service::systemctl(&["stop", NODEENGINE_UNIT])?;
    // NetManager may not be installed as a unit (network manual/off): not an error.
    if let Err(e) = service::systemctl(&["stop", NETMANAGER_UNIT]) {
        eprintln!("note: {e:#}");
    }
    println!("NodeEngine and NetManager stopped");
    Ok(())
}

/// `tail -F` of a log file until interrupted.
fn follow(log: &Path) -> Result<()> {
    logging::follow(log).map_err(|e| match e {
        FollowError::Open { .. } if log == Path::new(NODEENGINE_LOG) && !service::has_systemd() => {
            anyhow!("{e} (without systemd the daemon logs to its terminal)")
        }
        e => anyhow!(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn cluster_urls() {
        assert_eq!(
            split_cluster_url("https://a.b/"),
            ("a.b".into(), Some(true))
        );
        assert_eq!(split_cluster_url("10.0.0.1"), ("10.0.0.1".into(), None));
    }
}
