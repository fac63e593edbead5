//! Network mode `auto`: NodeEngine makes sure NetManager runs.
//!
//! With systemd the `netmanager` unit is started (systemd restarts it). Without
//! systemd, NetManager runs as our child process and is restarted when it dies,
//! as the unit's `Restart=always, RestartSec=5` would.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, anyhow};
use tokio::sync::watch;

use crate::node_report::find_on_path;
use crate::service;

const RESTART_DELAY: Duration = Duration::from_secs(5);

/// Finds the NetManager binary: on PATH, else next to our own executable.
pub fn find_netmanager() -> Option<PathBuf> {
    if let Some(p) = find_on_path("NetManager") {
        return Some(p);
    }
    let me = std::env::current_exe().ok()?;
    let sibling = me.parent()?.join("NetManager");
    sibling.is_file().then_some(sibling)
}

/// Starts NetManager; the returned task supervises a child process until shutdown.
pub fn start(shutdown: watch::Receiver<bool>) -> Result<Option<tokio::task::JoinHandle<()>>> {
    if service::has_systemd() {
        // Usually already running (our unit wants it). --no-block: never wait
        // on NetManager's readiness here, the socket wait does that.
        service::systemctl(&["start", "--no-block", service::NETMANAGER_UNIT])?;
        return Ok(None);
    }
    let bin = find_netmanager().ok_or_else(|| {
        anyhow!("network is `auto` but no NetManager binary is on PATH or next to nodeengined")
    })?;
    Ok(Some(tokio::spawn(supervise(bin, shutdown))))
}

async fn supervise(bin: PathBuf, mut shutdown: watch::Receiver<bool>) {
    loop {
        let mut child = match netmanager_command(&bin).and_then(|mut c| Ok(c.spawn()?)) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(bin = %bin.display(), "cannot start NetManager: {e}");
                if wait_or_shutdown(&mut shutdown, RESTART_DELAY).await {
                    return;
                }
                continue;
            }
        };
        tracing::info!(
            pid = child.id(),
            log = service::NETMANAGER_LOG,
            "NetManager started"
        );
        tokio::select! {
            st = child.wait() => {
                tracing::warn!("NetManager exited ({st:?}); restarting in {RESTART_DELAY:?}");
                if wait_or_shutdown(&mut shutdown, RESTART_DELAY).await {
                    return;
                }
            }
            _ = shutdown.changed() => {
                stop_child(&mut child).await;
                return;
            }
        }
    }
}

/// NetManager as our child: its output appended to its log file (which
/// `NetManager logs` follows without systemd), and none of systemd's
/// notification variables, which are ours.
fn netmanager_command(bin: &Path) -> Result<tokio::process::Command> {
    let out = worker_common::logging::open_append(Path::new(service::NETMANAGER_LOG))?;
    let err = out.try_clone()?;
    let mut cmd = tokio::process::Command::new(bin);
    cmd.kill_on_drop(true)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .env_remove("JOURNAL_STREAM");
    Ok(cmd)
}

/// SIGTERM, then SIGKILL if it does not leave within 5 s.
async fn stop_child(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: plain kill(2) on our own child's pid, which is not yet reaped.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    if tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

/// True when shutdown was requested during the wait.
async fn wait_or_shutdown(shutdown: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = shutdown.changed() => true,
        _ = tokio::time::sleep(d) => *shutdown.borrow(),
    }
}

/// Waits until the socket exists (NetManager creates it once ready).
pub async fn wait_for_socket(sock: &Path, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if sock.exists() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sock.exists()
}
