//! KVM when it works, else TCG.
//!
//! Upstream always runs `-enable-kvm -cpu host`. Some hosts expose a /dev/kvm
//! that cannot run a guest with the host CPU model (nested or emulated KVM:
//! qemu aborts setting MSRs, or the guest hangs). So before the first
//! unikernel, qemu is started once with KVM and `-cpu host`, paused (`-S`),
//! and asked over QMP for its status and to quit: only a clean exit counts as
//! usable KVM. The answer is kept for the daemon's lifetime; a VM that still
//! dies at start under KVM is started again with TCG ([`super`]).

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

/// How qemu executes the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation with the host CPU model (upstream's choice).
    Kvm,
    /// qemu's software emulation.
    Tcg,
}

impl Accel {
    /// qemu arguments selecting it.
    pub fn args(self) -> &'static [&'static str] {
        match (self, std::env::consts::ARCH) {
            (Accel::Kvm, _) => &["-accel", "kvm", "-cpu", "host"],
            (Accel::Tcg, "aarch64") => &["-accel", "tcg", "-cpu", "max"],
            (Accel::Tcg, _) => &["-accel", "tcg"],
        }
    }
}

/// `nodeengined --unikernel-accel`'s variable.
pub const ACCEL_ENV: &str = "NODEENGINE_UNIKERNEL_ACCEL";

/// What the operator asks for (`--unikernel-accel`). `auto` probes; `tcg`
/// is for hosts whose KVM passes the probe but cannot boot the guests'
/// kernels (PVM and some nested setups run SeaBIOS, then hang in Linux).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelChoice {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl AccelChoice {
    /// The accelerator, when the choice needs no probe.
    pub fn fixed(self) -> Option<Accel> {
        match self {
            AccelChoice::Auto => None,
            AccelChoice::Kvm => Some(Accel::Kvm),
            AccelChoice::Tcg => Some(Accel::Tcg),
        }
    }
}

const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// Whether `qemu` can run a guest under KVM here; the error says why not.
pub async fn probe_kvm(qemu: &str, machine: &str) -> Result<(), String> {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Err(format!("/dev/kvm: {e}"));
    }
    let mut child = tokio::process::Command::new(qemu)
        .args(Accel::Kvm.args())
        .args(["-machine", machine, "-S", "-nodefaults", "-display", "none"])
        .args(["-qmp", "stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("starting {qemu}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        // The VM never runs (-S); qemu only sets up the vCPUs, which is what
        // fails on a broken KVM.
        let _ = stdin
            .write_all(
                b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"query-status\"}\n{\"execute\":\"quit\"}\n",
            )
            .await;
    }
    match tokio::time::timeout(PROBE_TIMEOUT, child.wait_with_output()).await {
        Err(_) => Err(format!(
            "qemu under KVM did not quit within {PROBE_TIMEOUT:?}"
        )),
        Ok(Err(e)) => Err(format!("waiting for qemu: {e}")),
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let why = stderr.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            Err(format!("qemu under KVM failed ({}): {why}", out.status))
        }
    }
}
