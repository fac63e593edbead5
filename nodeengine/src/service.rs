//! The system service around the daemon: systemd when present, else nothing.

use std::process::Command;

use anyhow::{Context, Result, bail};

pub use worker_common::paths::{NETMANAGER_LOG, NODEENGINE_LOG};
pub use worker_common::systemd::{NETMANAGER_UNIT, NODEENGINE_UNIT};

/// Whether systemd runs this machine (sd_booted).
pub fn has_systemd() -> bool {
    worker_common::systemd::booted()
}

pub fn systemctl(args: &[&str]) -> Result<()> {
    let status = Command::new("systemctl")
        .args(args)
        .status()
        .with_context(|| format!("running systemctl {}", args.join(" ")))?;
    if !status.success() {
        bail!("systemctl {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Whether `unit` is active (`systemctl is-active`); false when systemctl
/// cannot be run.
pub fn is_active(unit: &str) -> bool {
    Command::new("systemctl")
        .args(["is-active", "--quiet", unit])
        .status()
        .is_ok_and(|s| s.success())
}

/// `systemctl status` output; never fails (a stopped unit exits non-zero).
pub fn systemctl_status(unit: &str) -> String {
    match Command::new("systemctl")
        .args(["status", "--no-pager", unit])
        .output()
    {
        Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
        Err(e) => format!("cannot run systemctl: {e}"),
    }
}
