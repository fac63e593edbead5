//! `NodeEngine`: the operator's command line (docs/contract.md §1.2).
//!
//! Verbs and flags are upstream's (`docs/nodeengine-parity.md` lists the few
//! differences): bare `NodeEngine` starts the worker with what the flags and
//! the configuration say, `config ...` edits the configuration. It never
//! destroys a configuration it cannot parse: it reports the position and stops.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use worker_common::args::empty_is_default;
use worker_common::http;
use worker_common::logging::{self, FollowError};
use worker_common::privileges::require_root;
use worker_common::tls::ClientTls;

use crate::addons;
use crate::config::{
    ADDON_FLOPS, ADDON_IMAGE_BUILDER, CONF_ENV, Config, ConfigError, DEFAULT_CONF_PATH,
    DEFAULT_NETMANAGER_SOCK, NetworkMode, RUNTIME_CROSVM, RUNTIME_UNIKERNEL,
};
use crate::service::{self, NETMANAGER_UNIT, NODEENGINE_LOG, NODEENGINE_UNIT};

#[derive(Parser, Debug)]
#[command(
    name = "NodeEngine",
    version = worker_common::version::VERSION,
    about = "Start a new Oakestra worker node, and configure it",
    long_about = "Start a new Oakestra worker node, and configure it.\n\n\
        Without a command, NodeEngine saves the flags given in the configuration, \
        starts the NodeEngine service and follows its log (Ctrl-C stops the service; \
        -d returns at once). Without systemd the daemon runs in the foreground."
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

    #[command(flatten)]
    pub start: StartArgs,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Upstream's root flags: each one given is saved in the configuration
/// before the service starts.
#[derive(Args, Debug, Default, PartialEq)]
pub struct StartArgs {
    /// Address of the cluster orchestrator without port
    #[arg(
        short = 'a',
        long = "clusterAddr",
        visible_alias = "address",
        value_name = "ADDR"
    )]
    pub cluster_addr: Option<String>,

    /// Port of the cluster orchestrator
    #[arg(
        short = 'p',
        long = "clusterPort",
        visible_alias = "port",
        value_name = "PORT"
    )]
    pub cluster_port: Option<u16>,

    /// Register with the cluster orchestrator over HTTPS
    #[arg(short = 's', long = "clusterSSL")]
    pub cluster_ssl: bool,

    /// Run the NodeEngine in the background (do not follow its log)
    #[arg(short = 'd', long = "detatch", visible_alias = "detach")]
    pub detach: bool,

    /// Client certificate for MQTT over TLS
    #[arg(short = 'c', long = "certFile", value_name = "CERT")]
    pub cert_file: Option<PathBuf>,

    /// Key of the client certificate
    #[arg(short = 'k', long = "keyFile", value_name = "KEY")]
    pub key_file: Option<PathBuf>,

    /// Directory for the applications' logs
    #[arg(short = 'l', long = "logs", value_name = "DIR")]
    pub logs: Option<PathBuf>,

    /// Overlay network: default, disabled or custom:<NetManager socket>
    #[arg(short = 'o', long = "overlayNetwork", value_name = "MODE")]
    pub overlay_network: Option<String>,

    /// Turn the imageBuilder addon on (needs qemu-user-static)
    #[arg(long = "image-builder")]
    pub image_builder: bool,

    /// Turn the FLOps-learner addon on (starts its ML data server)
    #[arg(long = "flops-learner")]
    pub flops_learner: bool,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Configure the node engine
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print the version number of NodeEngine
    Version,
    /// Check the status of the node engine (and NetManager's with network
    /// auto); exits non-zero unless the service runs and is ready
    Status(StatusArgs),
    /// Follow the NodeEngine log (the journal under systemd, else the log file)
    Logs,
    /// Stop the NodeEngine (and NetManager)
    Stop,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Where nodeengined answers /readyz (its --metrics-address; "off":
    /// judge by the process alone)
    #[arg(
        long,
        value_name = "ADDRESS",
        env = crate::metrics::ADDRESS_ENV,
        default_value = crate::metrics::DEFAULT_ADDRESS
    )]
    pub metrics_address: String,
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Set the cluster address (and port, and HTTPS) without starting
    Cluster {
        /// Cluster orchestrator address
        url: String,
        /// Cluster orchestrator port
        #[arg(
            short = 'p',
            long = "clusterPort",
            visible_alias = "port",
            default_value_t = 10100
        )]
        port: u16,
        /// Register over HTTPS
        #[arg(short = 's', long = "clusterSSL", visible_alias = "ssl")]
        ssl: bool,
    },
    /// Configure the log directory for the applications
    Applogs {
        /// Directory
        path: PathBuf,
    },
    /// MQTT authentication: client certificate, broker CA, user and password
    Auth(AuthArgs),
    /// Show the addons, or turn one on or off
    Addon {
        /// FLOps or imageBuilder
        #[arg(value_enum, ignore_case = true, requires = "state")]
        addon: Option<AddonName>,
        /// on or off
        #[arg(value_enum, ignore_case = true)]
        state: Option<OnOff>,
    },
    /// Overlay network: auto, manual [SOCK] or off
    #[command(subcommand)]
    Network(NetworkCommand),
    /// Show the virtualization runtimes, or turn one on or off
    Virtualization {
        /// unikernel or crosvm
        #[arg(value_enum, ignore_case = true, requires = "state")]
        kind: Option<VirtualizationName>,
        /// on or off
        #[arg(value_enum, ignore_case = true)]
        state: Option<OnOff>,
    },
    /// Report the public (discovered) or the private IP address as the node's
    #[command(subcommand)]
    Visibility(VisibilityCommand),
    /// Show the node's local policy, or change it (the cluster cannot)
    Policy {
        /// privileged or unknown-runtimes
        #[arg(value_enum, requires = "decision")]
        setting: Option<PolicySetting>,
        /// allow or refuse
        #[arg(value_enum, ignore_case = true)]
        decision: Option<Decision>,
    },
    /// CSI drivers: list, add or remove (advertised when they answer a probe)
    Csi {
        #[command(subcommand)]
        action: Option<CsiCommand>,
    },
    /// Generate the default configuration file
    Default,
    /// Validate the configuration and what the daemon needs of this machine
    /// (containerd, qemu, NetManager); exit code 0 when nothing failed
    Check(crate::config_check::CheckArgs),
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
    #[arg(
        short = 'c',
        long = "certFile",
        visible_alias = "cert",
        value_name = "CERT"
    )]
    pub cert: Option<PathBuf>,
    /// Key of the client certificate (PEM)
    #[arg(
        short = 'k',
        long = "keyFile",
        visible_alias = "key",
        value_name = "KEY"
    )]
    pub key: Option<PathBuf>,
    /// CA the broker's certificate is checked against (besides the system's)
    #[arg(long = "ca", value_name = "CA")]
    pub ca: Option<PathBuf>,
    /// Broker user name ("" removes it)
    #[arg(short = 'u', long = "username", value_name = "USER")]
    pub username: Option<String>,
    /// A root-only file holding the broker password
    #[arg(long = "password-file", value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// MQTT over TLS even without a client certificate
    #[arg(long = "tls", value_enum, ignore_case = true, value_name = "on|off")]
    pub tls: Option<OnOff>,
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

#[derive(Subcommand, Debug)]
pub enum VisibilityCommand {
    /// Report the address a public discovery service sees (public_ip: true)
    Public,
    /// Report the machine's own first IPv4 address (public_ip: false)
    Private,
}

/// Upstream turns anything but on/enable/true into off; we refuse what is
/// neither, so a typo never switches something off.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnOff {
    #[value(aliases = ["enable", "true"])]
    On,
    #[value(aliases = ["disable", "false"])]
    Off,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddonName {
    #[value(name = "FLOps", aliases = ["FLOps-learner"])]
    Flops,
    #[value(name = "imageBuilder", aliases = ["image-builder"])]
    ImageBuilder,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum VirtualizationName {
    Unikernel,
    Crosvm,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicySetting {
    /// Jobs marked `privileged`
    Privileged,
    /// Jobs naming a runtime this node does not offer
    UnknownRuntimes,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Refuse,
}

/// Parses the command line: the start flags belong to `NodeEngine` alone
/// (as upstream's root flags), `--config` goes anywhere.
fn parse(args: impl IntoIterator<Item = std::ffi::OsString>) -> Result<Cli, clap::Error> {
    use clap::CommandFactory;
    let cli = Cli::try_parse_from(args)?;
    if cli.command.is_some() && cli.start != StartArgs::default() {
        return Err(Cli::command().error(
            clap::error::ErrorKind::ArgumentConflict,
            "the start flags (-a, -p, -s, -d, -c, -k, -l, -o, --image-builder, \
             --flops-learner) go with `NodeEngine` alone, not with a command",
        ));
    }
    Ok(cli)
}

/// Runs the CLI; returns the process exit code.
pub fn main_with(args: impl IntoIterator<Item = std::ffi::OsString>) -> i32 {
    let cli = match parse(args) {
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
    match cli.command {
        None => start(&path, &cli.start),
        Some(Command::Config(c)) => configure(&path, c),
        Some(Command::Version) => {
            println!("NodeEngine {}", worker_common::version::VERSION);
            Ok(())
        }
        Some(Command::Status(args)) => status(&path, &args),
        Some(Command::Logs) => follow_service(),
        Some(Command::Stop) => stop(),
    }
}

/// Load, change, save. A parse error stops before anything is written.
fn edit(path: &Path, change: impl FnOnce(&mut Config) -> Result<()>) -> Result<()> {
    let mut cfg = Config::load(path)?;
    change(&mut cfg)?;
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

/// `config cluster` and `-a` accept a bare address or an http(s):// URL.
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

/// An existing file, as an absolute path (the daemon runs elsewhere).
fn existing_file(p: &Path) -> Result<String> {
    if !p.is_file() {
        bail!("{} does not exist or is not a file", p.display());
    }
    Ok(absolute(p)?.display().to_string())
}

fn on_off(state: Option<OnOff>) -> bool {
    state == Some(OnOff::On)
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
                Ok(())
            })
        }
        ConfigCommand::Applogs { path: dir } => {
            let dir = absolute(&dir)?;
            edit(path, |cfg| {
                cfg.app_logs = dir.display().to_string();
                Ok(())
            })
        }
        ConfigCommand::Auth(a) => auth(path, a),
        ConfigCommand::Addon { addon: None, .. } => show_addons(&Config::load(path)?),
        ConfigCommand::Addon {
            addon: Some(addon),
            state,
        } => {
            let on = on_off(state);
            let name = match addon {
                AddonName::Flops => ADDON_FLOPS,
                AddonName::ImageBuilder => {
                    if on && let Some(why) = addons::qemu_user_static_missing() {
                        bail!("cannot turn imageBuilder on: {why}");
                    }
                    ADDON_IMAGE_BUILDER
                }
            };
            edit(path, |cfg| {
                cfg.set_addon(name, on);
                Ok(())
            })
        }
        ConfigCommand::Network(n) => {
            let mode = match n {
                NetworkCommand::Auto => NetworkMode::Auto,
                NetworkCommand::Manual { sock } => NetworkMode::Manual(absolute(&sock)?),
                NetworkCommand::Off => NetworkMode::Off,
            };
            edit(path, |cfg| {
                cfg.set_network_mode(&mode);
                Ok(())
            })
        }
        ConfigCommand::Virtualization { kind: None, .. } => {
            show_virtualizations(&Config::load(path)?)
        }
        ConfigCommand::Virtualization {
            kind: Some(kind),
            state,
        } => {
            let runtime = match kind {
                VirtualizationName::Unikernel => RUNTIME_UNIKERNEL,
                VirtualizationName::Crosvm => RUNTIME_CROSVM,
            };
            edit(path, |cfg| {
                cfg.set_virtualization(runtime, on_off(state));
                Ok(())
            })
        }
        ConfigCommand::Visibility(v) => edit(path, |cfg| {
            cfg.set_public_ip(matches!(v, VisibilityCommand::Public));
            Ok(())
        }),
        ConfigCommand::Policy { setting: None, .. } => show_policy(&Config::load(path)?),
        ConfigCommand::Policy {
            setting: Some(setting),
            decision,
        } => {
            let allow = decision == Some(Decision::Allow);
            edit(path, |cfg| {
                match setting {
                    PolicySetting::Privileged => cfg.local_policy.allow_privileged = allow,
                    PolicySetting::UnknownRuntimes => {
                        cfg.local_policy.allow_unknown_runtimes = allow
                    }
                }
                Ok(())
            })
        }
        ConfigCommand::Csi { action } => configure_csi(path, action.unwrap_or(CsiCommand::List)),
        ConfigCommand::Default => save(path, &Config::default()),
        ConfigCommand::Check(args) => crate::config_check::run(path, &args),
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
                replaced = cfg.set_csi_driver(&name, endpoint.trim());
                Ok(())
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

fn auth(path: &Path, a: AuthArgs) -> Result<()> {
    let nothing = a.cert.is_none()
        && a.key.is_none()
        && a.ca.is_none()
        && a.username.is_none()
        && a.password_file.is_none()
        && a.tls.is_none();
    if nothing {
        return show_auth(&Config::load(path)?);
    }
    // Checked before the file is touched: a typo must not half-configure TLS.
    let cert = a.cert.as_deref().map(existing_file).transpose()?;
    let key = a.key.as_deref().map(existing_file).transpose()?;
    let ca = a.ca.as_deref().map(existing_file).transpose()?;
    let password_file = a.password_file.as_deref().map(existing_file).transpose()?;
    edit(path, |cfg| {
        if let Some(c) = cert {
            cfg.mqtt_cert_file = c;
        }
        if let Some(k) = key {
            cfg.mqtt_key_file = k;
        }
        if let Some(c) = ca {
            cfg.mqtt_ca_file = c;
        }
        if let Some(u) = a.username {
            cfg.mqtt_username = u;
        }
        if let Some(p) = password_file {
            cfg.mqtt_password_file = p;
        }
        if let Some(t) = a.tls {
            cfg.mqtt_tls = t == OnOff::On;
        }
        Ok(())
    })
}

fn active_mark(active: bool) -> &'static str {
    if active {
        "🟢 Active"
    } else {
        "❌ Disabled"
    }
}

/// Upstream's listing of `config addon`.
fn show_addons(cfg: &Config) -> Result<()> {
    println!("Configured Addons:");
    for a in &cfg.addons {
        println!("\t - {}: {}", a.addon_name, active_mark(a.addon_active));
    }
    if cfg.addons.is_empty() {
        println!("No Addons Configured.");
    }
    Ok(())
}

/// Upstream's listing of `config virtualization`.
fn show_virtualizations(cfg: &Config) -> Result<()> {
    println!("Virtualization Runtimes:");
    for v in &cfg.virtualizations {
        println!("\t - {}: {}", v.name, active_mark(v.active));
    }
    if cfg.virtualizations.is_empty() {
        println!("No Virtualization Runtime Configured.");
    }
    Ok(())
}

fn show_policy(cfg: &Config) -> Result<()> {
    let word = |allow: bool| if allow { "allow" } else { "refuse" };
    println!("Local policy (the cluster cannot change it):");
    println!(
        "\t - privileged: {}",
        word(cfg.local_policy.allow_privileged)
    );
    println!(
        "\t - unknown-runtimes: {}",
        word(cfg.local_policy.allow_unknown_runtimes)
    );
    Ok(())
}

fn show_auth(cfg: &Config) -> Result<()> {
    let tls = cfg.mqtt_tls || !cfg.mqtt_cert_file.is_empty();
    let or_none = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            s.to_string()
        }
    };
    println!("MQTT authentication:");
    println!("\t - transport: {}", if tls { "TLS" } else { "plaintext" });
    println!("\t - client certificate: {}", or_none(&cfg.mqtt_cert_file));
    println!("\t - client key: {}", or_none(&cfg.mqtt_key_file));
    println!("\t - broker CA: {}", or_none(&cfg.mqtt_ca_file));
    println!("\t - user: {}", or_none(&cfg.mqtt_username));
    println!("\t - password file: {}", or_none(&cfg.mqtt_password_file));
    Ok(())
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

// --------------------------------------------------------------------- start

/// Saves what the root flags say, as upstream does before starting.
fn apply_start_args(cfg: &mut Config, a: &StartArgs) -> Result<()> {
    if let Some(addr) = &a.cluster_addr {
        let (addr, scheme_ssl) = split_cluster_url(addr);
        if addr.is_empty() {
            bail!("the cluster address is empty");
        }
        cfg.cluster_address = addr;
        if let Some(ssl) = scheme_ssl {
            cfg.cluster_ssl = ssl;
        }
    }
    if let Some(p) = a.cluster_port {
        cfg.cluster_port = p;
    }
    if a.cluster_ssl {
        cfg.cluster_ssl = true;
    }
    if let Some(c) = &a.cert_file {
        cfg.mqtt_cert_file = existing_file(c)?;
    }
    if let Some(k) = &a.key_file {
        cfg.mqtt_key_file = existing_file(k)?;
    }
    if let Some(dir) = &a.logs {
        cfg.app_logs = absolute(dir)?.display().to_string();
    }
    if let Some(o) = &a.overlay_network {
        cfg.overlay_network = o.trim().to_string();
    }
    if a.image_builder {
        if let Some(why) = addons::qemu_user_static_missing() {
            bail!("--image-builder: {why}");
        }
        cfg.set_addon(ADDON_IMAGE_BUILDER, true);
    }
    if a.flops_learner {
        cfg.set_addon(ADDON_FLOPS, true);
    }
    Ok(())
}

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

/// Bare `NodeEngine` (with or without flags): save the flags, start the
/// service, follow its log until Ctrl-C, which stops the service.
fn start(path: &Path, args: &StartArgs) -> Result<()> {
    require_root(
        "`NodeEngine`",
        "it writes the configuration and starts the NodeEngine service",
    )?;
    let mut cfg = Config::load(path)?;
    apply_start_args(&mut cfg, args)?;
    save(path, &cfg)?;
    if cfg.cluster_address.trim().is_empty() || cfg.cluster_address == "0.0.0.0" {
        bail!(
            "no cluster address is configured: start with `NodeEngine -a ADDR` \
             or set it with `NodeEngine config cluster ADDR`"
        );
    }
    if service::has_systemd() {
        // Enabled too: the node rejoins after a reboot.
        service::systemctl(&["enable", "--now", NODEENGINE_UNIT])?;
        println!("NodeEngine started 🟢");
        if args.detach {
            return Ok(());
        }
        return attach();
    }
    let daemon = daemon_binary()?;
    if args.detach {
        return spawn_detached(&daemon, path);
    }
    println!(
        "systemd is not running here: running nodeengined in the foreground (Ctrl-C stops it)"
    );
    exec_daemon(&daemon, path)
}

/// Set by SIGINT/SIGTERM while `attach` follows the log.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Follows the service log (the journal under systemd, else the log file);
/// Ctrl-C (or SIGTERM) stops the services, as upstream's attached
/// `NodeEngine` does.
fn attach() -> Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe; `signal` has no other preconditions.
        unsafe {
            libc::signal(sig, on_interrupt as *const () as libc::sighandler_t);
        }
    }
    let stop = || {
        println!("\nExiting...");
        stop_services()
    };
    if !worker_common::systemd::booted() {
        return follow_then_stop(Path::new(NODEENGINE_LOG), &INTERRUPTED, stop);
    }
    // journalctl as a child, not exec'd: Ctrl-C reaches it too (same
    // process group) and ends it, and this process then stops the services.
    let followed = std::process::Command::new("journalctl")
        .args(["--unit", NODEENGINE_UNIT, "--follow", "--lines", "100"])
        .status();
    if INTERRUPTED.load(Ordering::SeqCst) {
        return stop();
    }
    match followed {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => bail!("journalctl --unit {NODEENGINE_UNIT} ended: {status}"),
        Err(e) => Err(anyhow!("cannot run journalctl: {e}")),
    }
}

/// Follows `log` until `interrupted` is set, then runs `stop`.
fn follow_then_stop(
    log: &Path,
    interrupted: &AtomicBool,
    stop: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let followed = logging::follow_into(log, &mut std::io::stdout(), logging::FOLLOW_POLL, || {
        !interrupted.load(Ordering::SeqCst)
    });
    if interrupted.load(Ordering::SeqCst) {
        return stop();
    }
    followed.map_err(|e| anyhow!(e))
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
    let out = logging::open_append(log)?;
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

/// `NodeEngine status`: prints the state; fails (for scripts and probes)
/// unless the service runs and nodeengined says it is ready.
fn status(path: &Path, args: &StatusArgs) -> Result<()> {
    let mut unhealthy = Vec::new();
    if service::has_systemd() {
        print!("{}", service::systemctl_status(NODEENGINE_UNIT));
        if !service::is_active(NODEENGINE_UNIT) {
            unhealthy.push(format!("{NODEENGINE_UNIT} is not active"));
        }
        let auto = Config::load(path)
            .map(|c| c.network_mode() == NetworkMode::Auto)
            .unwrap_or(false);
        if auto {
            print!("{}", service::systemctl_status(NETMANAGER_UNIT));
            if !service::is_active(NETMANAGER_UNIT) {
                unhealthy.push(format!("{NETMANAGER_UNIT} is not active"));
            }
        }
    } else {
        print_processes();
        if pids_named("nodeengined").is_empty() {
            unhealthy.push("nodeengined is not running".to_string());
        }
    }
    if unhealthy.is_empty() {
        unhealthy.extend(readiness(&args.metrics_address));
    }
    anyhow::ensure!(
        unhealthy.is_empty(),
        "not healthy: {}",
        unhealthy.join("; ")
    );
    Ok(())
}

/// What nodeengined's `/readyz` says is missing (printed as it goes); an
/// unreachable listener is a reason too, since a live daemon serves it.
fn readiness(address: &str) -> Vec<String> {
    if worker_common::metrics::is_off(address) {
        println!("readiness: not asked (metrics address is off)");
        return Vec::new();
    }
    let asked = ClientTls::system_roots()
        .build()
        .map_err(|e| anyhow!("{e}"))
        .and_then(|tls| {
            let client = http::Client::tcp(tls).timeout(std::time::Duration::from_secs(5));
            http::blocking::Client::new(client).map_err(|e| anyhow!("{e}"))
        })
        .and_then(|c| {
            c.get(&format!("http://{address}/readyz"))
                .map_err(|e| anyhow!("{e}"))
        })
        .and_then(|r| {
            r.json::<worker_common::metrics::Readiness>()
                .map_err(|e| anyhow!("{e}"))
        });
    match asked {
        Ok(r) if r.ready => {
            println!("readiness: ready");
            Vec::new()
        }
        Ok(r) => {
            println!("readiness: not ready ({})", r.reasons.join("; "));
            r.reasons
        }
        Err(e) => {
            println!("readiness: no answer from {address} ({e})");
            vec![format!("no readiness answer from {address}")]
        }
    }
}

fn print_processes() {
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
    stop_services()
}

fn stop_services() -> Result<()> {
    service::systemctl(&["stop", NODEENGINE_UNIT])?;
    // NetManager may not be installed as a unit (network manual/off): not an error.
    if let Err(e) = service::systemctl(&["stop", NETMANAGER_UNIT]) {
        eprintln!("note: {e:#}");
    }
    println!("NodeEngine and NetManager stopped");
    Ok(())
}

/// The daemon's log until interrupted: its journal under systemd, else the
/// file `NodeEngine -a -d` appends to.
fn follow_service() -> Result<()> {
    let log = Path::new(NODEENGINE_LOG);
    logging::follow_service(NODEENGINE_UNIT, log, false).map_err(|e| match e {
        FollowError::Open { .. } => {
            anyhow!("{e} (without systemd, `NodeEngine -a` without -d logs to its terminal)")
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

    #[test]
    fn root_flags_are_saved_as_upstream_names_them() {
        let cli = Cli::try_parse_from([
            "NodeEngine",
            "--clusterAddr",
            "10.0.0.7",
            "--clusterPort",
            "10200",
            "--clusterSSL",
            "--detatch",
            "--logs",
            "/var/log/apps",
            "--overlayNetwork",
            "custom:/run/nm.sock",
            "--flops-learner",
        ])
        .expect("upstream's long flags parse");
        assert!(cli.command.is_none() && cli.start.detach);
        let mut cfg = Config::default();
        apply_start_args(&mut cfg, &cli.start).expect("apply");
        assert_eq!(cfg.cluster_address, "10.0.0.7");
        assert_eq!(cfg.cluster_port, 10200);
        assert!(cfg.cluster_ssl);
        assert_eq!(cfg.app_logs, "/var/log/apps");
        assert_eq!(cfg.overlay_network, "custom:/run/nm.sock");
        assert_eq!(cfg.active_addons(), [ADDON_FLOPS]);
        // Our earlier spellings still work.
        let cli = Cli::try_parse_from(["NodeEngine", "--address", "h", "--port", "1", "--detach"])
            .expect("aliases parse");
        assert_eq!(cli.start.cluster_addr.as_deref(), Some("h"));
        // Root flags belong to the root command only; --config goes anywhere.
        assert!(parse(["NodeEngine", "-a", "h", "status"].map(Into::into)).is_err());
        assert!(
            parse(["NodeEngine", "--config", "/c.json", "config", "csi"].map(Into::into)).is_ok()
        );
    }

    #[test]
    fn ctrl_c_while_attached_stops_the_service() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("ne.log");
        std::fs::write(&log, "started\n").expect("write");
        let interrupted = std::sync::Arc::new(AtomicBool::new(false));
        let flag = interrupted.clone();
        let ctrl_c = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            flag.store(true, Ordering::SeqCst);
        });
        let mut stopped = false;
        follow_then_stop(&log, &interrupted, || {
            stopped = true;
            Ok(())
        })
        .expect("follow");
        ctrl_c.join().expect("join");
        assert!(stopped, "the services were not stopped");
    }
}
