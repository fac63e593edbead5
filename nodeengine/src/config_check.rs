//! `NodeEngine config check`: conf.json and what nodeengined needs of this
//! machine (containerd, qemu for unikernels, NetManager for the overlay,
//! optionally the cluster), each finding with its fix (docs/operations.md).
//! Changes nothing.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser};
use worker_common::check::{Report, readable_file, tcp_reachable};

use crate::config::{Config, NetworkMode, RUNTIME_CONTAINER, RUNTIME_UNIKERNEL};
use crate::containerd_runtime::{ContainerdRuntime, ContainerdSettings};
use crate::daemon::DaemonArgs;
use crate::netmanager_supervisor::find_netmanager;
use crate::unikernel::UnikernelRuntime;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The containerd socket is nodeengined's (its `CONTAINERD_ADDRESS`, or the
/// default), so the check sees what the daemon will.
#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Also check that the cluster's registration endpoint and its MQTT
    /// broker accept TCP connections
    #[arg(long)]
    pub broker: bool,
    /// The broker's port for --broker (the cluster names it in its
    /// registration answer; upstream clusters use 10003)
    #[arg(
        long,
        value_name = "PORT",
        default_value_t = 10003,
        requires = "broker"
    )]
    pub mqtt_port: u16,
}

/// Runs every check, prints the report; an error when anything failed.
pub fn run(path: &Path, args: &CheckArgs) -> Result<()> {
    let mut report = Report::default();
    let cfg = configuration(&mut report, path);
    if cfg.runtime_active(RUNTIME_CONTAINER) {
        // The daemon's own command line, from the environment only.
        let daemon = DaemonArgs::try_parse_from(["nodeengined"])
            .context("reading nodeengined's settings from the environment")?;
        containerd(&mut report, &daemon.containerd())?;
    }
    if cfg.runtime_active(RUNTIME_UNIKERNEL) {
        match UnikernelRuntime::unavailable_reason() {
            None => report.ok("unikernel runtime", "qemu found"),
            Some(why) => report.fail(
                "unikernel runtime",
                why,
                "install qemu (apt install qemu-system), or turn unikernels off: \
                 NodeEngine config virtualization unikernel off",
            ),
        }
    }
    network(&mut report, &cfg.network_mode());
    if args.broker {
        cluster(&mut report, &cfg, args.mqtt_port);
    }
    report.finish()?;
    Ok(())
}

fn configuration(report: &mut Report, path: &Path) -> Config {
    let subject = format!("configuration {}", path.display());
    if !path.exists() {
        report.warn(
            subject,
            "absent: the daemon runs with the defaults",
            "NodeEngine config default (or NodeEngine -a ADDR) writes one",
        );
        return Config::default();
    }
    let cfg = match Config::load(path) {
        Ok(cfg) => cfg,
        Err(e) => {
            report.fail(
                subject,
                e.to_string(),
                "correct the file at the position named above, or start again with \
                 `NodeEngine config default`",
            );
            return Config::default();
        }
    };
    report.ok(subject, "valid");
    let address = cfg.cluster_address.trim();
    if address.is_empty() || address == "0.0.0.0" {
        report.fail(
            "cluster address",
            format!("{address:?} is no cluster"),
            "NodeEngine config cluster ADDR (or join with NodeEngine -a ADDR)",
        );
    } else {
        report.ok(
            "cluster address",
            format!(
                "{}://{address}:{}",
                if cfg.cluster_ssl { "https" } else { "http" },
                cfg.cluster_port
            ),
        );
    }
    match (cfg.mqtt_cert_file.trim(), cfg.mqtt_key_file.trim()) {
        ("", "") => {}
        (cert, key) => {
            let fix = "NodeEngine config auth -c CERT -k KEY with readable PEM files";
            readable_file(report, "mqtt_cert_file", Path::new(cert), fix);
            readable_file(report, "mqtt_key_file", Path::new(key), fix);
        }
    }
    app_logs(report, Path::new(&cfg.app_logs));
    if cfg.active_runtimes().is_empty() {
        report.warn(
            "virtualizations",
            "none is active: every deployment will fail",
            "NodeEngine config default restores the containerd runtime",
        );
    }
    cfg
}

/// The daemon creates the directory; its nearest existing ancestor must be
/// a writable directory.
fn app_logs(report: &mut Report, dir: &Path) {
    let subject = format!("app_logs {}", dir.display());
    if !dir.is_absolute() {
        report.fail(
            subject,
            "not an absolute path",
            "NodeEngine config applogs DIR",
        );
        return;
    }
    match dir.ancestors().find(|p| p.exists()) {
        Some(p) if p.is_dir() => report.ok(subject, "usable"),
        Some(p) => report.fail(
            subject,
            format!("{} is not a directory", p.display()),
            "NodeEngine config applogs DIR",
        ),
        None => report.fail(subject, "unusable", "NodeEngine config applogs DIR"),
    }
}

fn containerd(report: &mut Report, settings: &ContainerdSettings) -> Result<()> {
    let subject = format!("containerd {}", settings.socket.display());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting an async runtime")?;
    let answer = rt.block_on(async {
        let c = ContainerdRuntime::new(settings.clone())?;
        tokio::time::timeout(CONNECT_TIMEOUT, c.ping())
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {CONNECT_TIMEOUT:?}"))?
    });
    match answer {
        Ok(()) => report.ok(subject, "answers"),
        Err(e) => report.fail(
            subject,
            format!("{e:#}"),
            "start containerd (systemctl start containerd; apt install containerd), \
             or name its socket in CONTAINERD_ADDRESS as nodeengined gets it",
        ),
    }
    Ok(())
}

fn network(report: &mut Report, mode: &NetworkMode) {
    match mode {
        NetworkMode::Off => report.ok("overlay network", "off"),
        NetworkMode::Auto => match find_netmanager() {
            Some(bin) => report.ok(
                "overlay network",
                format!(
                    "auto: NetManager at {} (`NetManager config check` checks it)",
                    bin.display()
                ),
            ),
            None => report.fail(
                "overlay network",
                "auto, but no NetManager binary is on PATH or next to nodeengined",
                "install the NetManager package, or: NodeEngine config network off",
            ),
        },
        NetworkMode::Manual(sock) => {
            if std::os::unix::net::UnixStream::connect(sock).is_ok() {
                report.ok(
                    "overlay network",
                    format!("manual: NetManager answers on {}", sock.display()),
                );
            } else {
                report.warn(
                    "overlay network",
                    format!("manual, but nothing listens on {}", sock.display()),
                    "start your NetManager on that socket before deploying",
                );
            }
        }
    }
}

fn cluster(report: &mut Report, cfg: &Config, mqtt_port: u16) {
    let host = cfg.cluster_address.trim();
    if host.is_empty() || host == "0.0.0.0" {
        return; // already reported with the configuration
    }
    for (what, port) in [
        ("cluster registration", cfg.cluster_port),
        ("cluster MQTT broker", mqtt_port),
    ] {
        let subject = format!("{what} {host}:{port}");
        match tcp_reachable(host, port, CONNECT_TIMEOUT) {
            Ok(()) => report.ok(subject, "accepts TCP connections"),
            Err(e) => report.fail(
                subject,
                e,
                "check the address and port (NodeEngine config cluster), that the \
                 cluster runs, and the firewalls between this node and the cluster",
            ),
        }
    }
}
