//! The system service around the daemon: systemd when present, else nothing.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

pub const NODEENGINE_UNIT: &str = "nodeengine";
pub const NETMANAGER_UNIT: &str = "netmanager";
pub const NODEENGINE_LOG: &str = "/var/log/oakestra/nodeengine.log";
pub const NETMANAGER_LOG: &str = "/var/log/oakestra/netmanager.log";

/// systemd's own test (sd_booted): the directory exists only when systemd is PID 1.
pub fn has_systemd() -> bool {
    Path::new("/run/systemd/system").is_dir()
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
