//! `NetManager config check`: netcfg.json and what the daemon needs of this
//! machine (kernel features, bpffs, nft, an uplink, optionally the broker),
//! each finding with its fix (docs/operations.md). Changes nothing.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use worker_common::check::{Report, readable_file, tcp_reachable};

use crate::cli::Cli;
use crate::config::{self, NetConfig};
use crate::dataplane::UplinkHook;
use crate::kernel_support::{self, MINIMUM_KERNEL};
use crate::plumbing::Plumbing;

/// `statfs(2)`'s magic number of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe4a11;
const BROKER_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs every check, prints the report; an error when anything failed.
/// `broker`: None, don't try the broker; Some(""), ClusterUrl:ClusterMqttPort;
/// Some("HOST[:PORT]"), that address.
pub async fn run(cli: &Cli, broker: Option<&str>) -> Result<()> {
    let mut report = Report::default();
    let net = configuration(&mut report, &cli.config);
    if let Some(ca) = &cli.mqtt_ca {
        readable_file(
            &mut report,
            "--mqtt-ca",
            ca,
            "give a readable PEM file or drop the setting",
        );
    }
    if worker_common::privileges::is_root() {
        kernel(&mut report, &uplink_hook(cli));
        bpffs(&mut report, &cli.bpf_dir());
    } else {
        report.warn(
            "kernel features and bpffs",
            "not probed: that needs root",
            "run it as root: sudo NetManager config check",
        );
    }
    nft(&mut report);
    uplink(
        &mut report,
        cli.uplink.as_deref().or(net.default_interface.as_deref()),
    )
    .await;
    if let Some(target) = broker {
        reachable_broker(&mut report, &net, target).await;
    }
    report.finish()?;
    Ok(())
}

/// The file parses (else the field and the error); absent means defaults.
/// Returns what the daemon would run with.
fn configuration(report: &mut Report, path: &Path) -> NetConfig {
    let subject = format!("configuration {}", path.display());
    if !path.exists() {
        report.warn(
            subject,
            "absent: the daemon runs with the defaults",
            "install the default netcfg.json (the package ships one) or create it; \
             docs/contract.md §2.1 lists the fields",
        );
        return NetConfig::default();
    }
    let net = match NetConfig::load(path) {
        Ok(net) => net,
        Err(e) => {
            report.fail(
                subject,
                format!("{e:#}"),
                "correct the field named above; docs/contract.md §2.1 lists the fields \
                 and their types",
            );
            return NetConfig::default();
        }
    };
    report.ok(
        subject,
        format!(
            "valid (tunnel port {}, broker port {}, cluster {})",
            net.node_public_port,
            net.cluster_mqtt_port,
            net.cluster_url
                .as_deref()
                .unwrap_or("from NodeEngine's /register")
        ),
    );
    if let (Some(cert), Some(key)) = (&net.mqtt_cert, &net.mqtt_key) {
        let fix = "give readable PEM files in MqttCert and MqttKey, or remove both";
        readable_file(report, "MqttCert", cert, fix);
        readable_file(report, "MqttKey", key, fix);
    }
    net
}

/// The uplink hook as configured, for the kernel finding.
fn uplink_hook(cli: &Cli) -> String {
    match cli.uplink_hook {
        UplinkHook::Tc => "the TC program screens the uplink".to_string(),
        UplinkHook::Xdp => format!(
            "XDP ({} mode) screens the uplink in front of TC",
            cli.xdp_mode
        ),
        UplinkHook::XdpRedirect => format!(
            "XDP ({} mode) screens the uplink and delivers into containers' veths, TC behind it",
            cli.xdp_mode
        ),
    }
}

fn kernel(report: &mut Report, hook: &str) {
    let k = kernel_support::probe();
    if k.below_minimum || !k.missing.is_empty() {
        let missing: Vec<String> = k.missing.iter().map(ToString::to_string).collect();
        report.fail(
            format!("kernel {}", k.release),
            if missing.is_empty() {
                format!("older than Linux {MINIMUM_KERNEL}")
            } else {
                format!("lacks {}", missing.join(", "))
            },
            format!(
                "run Linux {MINIMUM_KERNEL} or newer with BPF enabled \
                 (docs/old-kernels.md lists what is used and since when)"
            ),
        );
        return;
    }
    let attach = if k.tcx {
        "TCX links"
    } else {
        "classic tc (no TCX before Linux 6.6)"
    };
    report.ok(
        format!("kernel {}", k.release),
        format!("every required BPF feature; programs attach with {attach}; {hook}"),
    );
}

/// The pin directory must be on bpffs (it is created at start when absent,
/// so its nearest existing ancestor is what counts).
fn bpffs(report: &mut Report, dir: &Path) {
    let subject = format!("bpffs for {}", dir.display());
    let Some(existing) = dir.ancestors().find(|p| p.exists()) else {
        report.fail(
            subject,
            "no part of the path exists",
            "mount -t bpf bpf /sys/fs/bpf",
        );
        return;
    };
    match fs_magic(existing) {
        Ok(BPF_FS_MAGIC) => report.ok(subject, "mounted"),
        Ok(_) => report.fail(
            subject,
            format!("{} is not on a bpf filesystem", existing.display()),
            "mount -t bpf bpf /sys/fs/bpf (systemd does so at boot; elsewhere add \
             `bpf /sys/fs/bpf bpf defaults 0 0` to /etc/fstab)",
        ),
        Err(e) => report.fail(
            subject,
            format!("statfs {}: {e}", existing.display()),
            "check the path",
        ),
    }
}

fn fs_magic(path: &Path) -> std::io::Result<i64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut buf = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: a valid NUL-terminated path and a buffer of the right type.
    if unsafe { libc::statfs(c.as_ptr(), buf.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statfs succeeded and filled the buffer.
    #[allow(clippy::unnecessary_cast)]
    Ok(unsafe { buf.assume_init() }.f_type as i64)
}

fn nft(report: &mut Report) {
    match std::process::Command::new("nft").arg("--version").output() {
        Ok(o) if o.status.success() => {
            report.ok("nft", String::from_utf8_lossy(&o.stdout).trim().to_string())
        }
        Ok(o) => report.fail(
            "nft",
            format!(
                "`nft --version` failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            "reinstall nftables",
        ),
        Err(e) => report.fail(
            "nft",
            format!("cannot run nft: {e}"),
            "install nftables (apt install nftables): NetManager's NAT uses it",
        ),
    }
}

/// The interface and address the tunnel uses, as the daemon would find them.
async fn uplink(report: &mut Report, preferred: Option<&str>) {
    let found = match Plumbing::new(config::DEFAULT_TUNNEL_MTU) {
        Ok(p) => p.uplink(preferred).await,
        Err(e) => Err(e),
    };
    match found {
        Ok(up) => report.ok("uplink", format!("{} with {}", up.name, up.addr)),
        Err(e) => report.fail(
            "uplink",
            format!("{e:#}"),
            match preferred {
                Some(_) => {
                    "name an interface that exists and has an address \
                            (DefaultInterface in netcfg.json or --uplink)"
                }
                None => "add a default route, or set DefaultInterface in netcfg.json",
            },
        ),
    }
}

async fn reachable_broker(report: &mut Report, net: &NetConfig, target: &str) {
    let (host, port) = match broker_address(net, target) {
        Ok(a) => a,
        Err(why) => {
            report.fail("MQTT broker", why, "give the broker: --broker HOST[:PORT]");
            return;
        }
    };
    let subject = format!("MQTT broker {host}:{port}");
    let probe_host = host.clone();
    let result =
        tokio::task::spawn_blocking(move || tcp_reachable(&probe_host, port, BROKER_TIMEOUT))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
    match result {
        Ok(()) => report.ok(subject, "accepts TCP connections"),
        Err(e) => report.fail(
            subject,
            e,
            "check the address and ClusterMqttPort, that the cluster runs, and the \
             firewalls between this node and the cluster",
        ),
    }
}

/// `HOST[:PORT]` from the flag, else ClusterUrl and ClusterMqttPort.
fn broker_address(net: &NetConfig, target: &str) -> Result<(String, u16), String> {
    let target = target.trim();
    if target.is_empty() {
        let host = net.cluster_url.clone().ok_or_else(|| {
            "ClusterUrl is unset (NetManager takes the cluster address from NodeEngine's \
             /register)"
                .to_string()
        })?;
        return Ok((host, net.cluster_mqtt_port));
    }
    match target.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') || host.starts_with('[') => {
            let port = port
                .parse()
                .map_err(|_| format!("{port:?} in --broker is not a port number"))?;
            Ok((host.trim_matches(['[', ']']).to_string(), port))
        }
        _ => Ok((target.to_string(), net.cluster_mqtt_port)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_addresses() {
        let mut net = NetConfig::default();
        assert!(broker_address(&net, "").is_err());
        net.cluster_url = Some("cluster.example".into());
        assert_eq!(
            broker_address(&net, ""),
            Ok(("cluster.example".into(), config::DEFAULT_MQTT_PORT))
        );
        assert_eq!(
            broker_address(&net, "10.0.0.1:1883"),
            Ok(("10.0.0.1".into(), 1883))
        );
        assert_eq!(
            broker_address(&net, "broker"),
            Ok(("broker".into(), config::DEFAULT_MQTT_PORT))
        );
        assert_eq!(broker_address(&net, "[::1]:8883"), Ok(("::1".into(), 8883)));
        assert_eq!(
            broker_address(&net, "::1"),
            Ok(("::1".into(), config::DEFAULT_MQTT_PORT))
        );
        assert!(broker_address(&net, "host:port").is_err());
    }

    #[test]
    fn bpffs_is_told_apart() {
        let mut report = Report::default();
        bpffs(&mut report, Path::new("/proc/nonexistent/oakestra"));
        assert_eq!(report.findings[0].level, worker_common::check::Level::Fail);
        assert!(
            report.findings[0].detail.contains("/proc"),
            "{:?}",
            report.findings
        );
    }
}
