//! Command line: `NetManager` runs the daemon; `help`, `version`, `status`,
//! `logs` are the operator's subcommands (contract 2.7). Every path is a flag
//! with an environment variable, so several daemons can run side by side in
//! separate network namespaces of one machine.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use crate::config::{self, NetConfig, Settings};

#[derive(Debug, Parser)]
#[command(
    name = "NetManager",
    version,
    about = "Oakestra NetManager with an eBPF overlay dataplane"
)]
pub struct Cli {
    /// Configuration file (contract 2.1).
    #[arg(long, env = "NETMANAGER_CONFIG", default_value = config::DEFAULT_CONFIG_PATH, global = true)]
    pub config: PathBuf,
    /// API socket.
    #[arg(long, env = "NETMANAGER_SOCKET", default_value = config::DEFAULT_SOCKET_PATH, global = true)]
    pub socket: PathBuf,
    /// bpffs directory for pinned maps and links.
    #[arg(long = "bpf-dir", env = "NETMANAGER_BPF_DIR", default_value = config::DEFAULT_BPF_DIR, global = true)]
    pub bpf_dir: PathBuf,
    /// State file for restarts without loss.
    #[arg(long, env = "NETMANAGER_STATE", default_value = config::DEFAULT_STATE_PATH, global = true)]
    pub state: PathBuf,
    /// Log file (also written when run by systemd); `logs` follows it.
    #[arg(long = "log-file", env = "NETMANAGER_LOG_FILE", global = true)]
    pub log_file: Option<PathBuf>,
    /// Uplink interface (default: DefaultInterface, else the default route's).
    #[arg(long, env = "NETMANAGER_UPLINK", global = true)]
    pub uplink: Option<String>,
    /// Run without loading eBPF: plumbing and cluster protocol only.
    #[arg(long = "no-dataplane", env = "NETMANAGER_NO_DATAPLANE", global = true)]
    pub no_dataplane: bool,
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
            // systemd sets INVOCATION_ID for its services.
            std::env::var_os("INVOCATION_ID").map(|_| PathBuf::from(config::DEFAULT_LOG_PATH))
        })
    }

    pub fn settings(&self) -> Result<Settings> {
        let net = NetConfig::load(&self.config)?;
        Ok(Settings {
            config_path: self.config.clone(),
            socket_path: self.socket.clone(),
            bpf_dir: self.bpf_dir.clone(),
            state_path: self.state.clone(),
            log_path: self.effective_log_file(),
            uplink: self.uplink.clone().filter(|s| !s.is_empty()),
            tunnel_mtu: config::tunnel_mtu_from_env()?,
            no_dataplane: self.no_dataplane,
            net,
        })
    }
}

/// `NetManager status`.
pub async fn status(socket: &Path) -> Result<()> {
    let (code, v) = crate::api::get(socket, "/status").await?;
    if !code.is_success() {
        bail!("daemon answered {code}: {v}");
    }
    print!("{}", render_status(&v));
    Ok(())
}

fn s(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Human-readable status.
pub fn render_status(v: &serde_json::Value) -> String {
    let mut out = String::new();
    if v["registered"] != serde_json::Value::Bool(true) {
        out.push_str("NetManager is running; node not registered yet\n");
        return out;
    }
    out.push_str(&format!(
        "node {}  cluster {}\nsubnet {} {}  node address {}:{} via {}\n",
        s(&v["node_id"]),
        s(&v["cluster_address"]),
        s(&v["subnet"]),
        s(&v["subnet_v6"]),
        s(&v["node_ip"]),
        s(&v["tunnel_port"]),
        s(&v["uplink"])
    ));
    let deps = v["deployments"].as_array().cloned().unwrap_or_default();
    out.push_str(&format!("\ndeployments ({}):\n", deps.len()));
    for d in &deps {
        out.push_str(&format!(
            "  {}.instance.{}  {}  {} {}  veth {}  ports {}\n",
            s(&d["serviceName"]),
            s(&d["instance"]),
            s(&d["kind"]),
            s(&d["nsAddress"]),
            s(&d["nsAddressv6"]),
            s(&d["veth"]),
            s(&d["portMappings"])
        ));
    }
    let dp = &v["dataplane"];
    if let Some(e) = dp.get("error") {
        out.push_str(&format!("\ndataplane: error {}\n", s(e)));
    } else {
        out.push_str("\nprograms attached (program, interface, hook):\n");
        for a in dp["attachments"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "  {:<24} {:<16} {}\n",
                s(&a[0]),
                s(&a[1]),
                s(&a[2])
            ));
        }
        out.push_str("maps (entries / max):\n");
        for m in dp["maps"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "  {:<24} {:>8} / {}\n",
                s(&m[0]),
                s(&m[1]),
                s(&m[2])
            ));
        }
        out.push_str("counters (packets, bytes):\n");
        for c in dp["counters"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "  {:<32} {:>12} {:>14}\n",
                s(&c[0]),
                s(&c[1]),
                s(&c[2])
            ));
        }
    }
    out.push_str(&format!(
        "\nroutes: {} jobs, {} instance entries, {} service entries; interests: {}\n",
        v["routes"]["jobs"].as_array().map_or(0, Vec::len),
        s(&v["routes"]["instances"]),
        s(&v["routes"]["services"]),
        v["interests"].as_array().map_or(0, Vec::len)
    ));
    out
}

/// `NetManager logs`: print the log and follow it (also across rotation).
pub fn follow_log(path: &Path) -> Result<()> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut pos = 0u64;
    let mut buf = Vec::new();
    let stdout = std::io::stdout();
    loop {
        let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        if len < pos {
            // Truncated or rotated: start over.
            file = std::fs::File::open(path)
                .with_context(|| format!("reopening {}", path.display()))?;
            pos = 0;
        }
        file.seek(SeekFrom::Start(pos))?;
        buf.clear();
        let n = file.read_to_end(&mut buf)?;
        if n > 0 {
            pos += n as u64;
            let mut out = stdout.lock();
            out.write_all(&buf)?;
            out.flush()?;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Set up tracing to stderr and, when given, a log file.
pub fn init_logging(debug: bool, log_file: Option<&Path>) -> Result<()> {
    use tracing_subscriber::prelude::*;
    let default = if debug { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal;
    // Colours only for a terminal; journald and log files get plain text.
    let stderr = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let file = match log_file {
        Some(p) => {
            if let Some(dir) = p.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("opening log file {}", p.display()))?;
            Some(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(Arc::new(f)),
            )
        }
        None => None,
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(stderr)
        .with(file)
        .try_init()
        .ok();
    Ok(())
}
