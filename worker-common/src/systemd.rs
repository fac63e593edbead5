//! Living under systemd: the unit names, readiness and watchdog
//! notifications (sd_notify(3), through the `sd-notify` crate), and whether
//! systemd runs this machine at all.
//!
//! Without systemd every call here is a no-op: `NOTIFY_SOCKET` and
//! `WATCHDOG_USEC` are unset, so the daemons run the same code either way.
//! (Those two are the protocol's own variables, read by `sd-notify`; they
//! are not command-line settings.)

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use sd_notify::NotifyState;

/// NodeEngine's unit (`systemctl start nodeengine`, `journalctl -u nodeengine`).
pub const NODEENGINE_UNIT: &str = "nodeengine";
/// NetManager's unit.
pub const NETMANAGER_UNIT: &str = "netmanager";

/// systemd's own test (sd_booted(3)): the directory exists only when systemd
/// is PID 1.
pub fn booted() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// Tells the service manager that start-up is complete, with a line for
/// `systemctl status`. Call once the daemon does its job (for NetManager:
/// its API answers); never after waiting on the other daemon, whose unit may
/// be ordered after this one.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Updates the line `systemctl status` shows.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// Tells the service manager the daemon is shutting down on purpose.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        // Never fatal: the service manager then reports a timeout itself.
        tracing::warn!("cannot notify the service manager: {e}");
    }
}

/// The interval the service manager expects keep-alives at (half its
/// `WatchdogSec=`, as sd_watchdog_enabled(3) advises), if it asked for them.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .filter(|t| !t.is_zero())
        .map(|t| t / 2)
}

/// Sends `WATCHDOG=1` every [`watchdog_interval`] while `probe` succeeds,
/// on the caller's tokio runtime. A probe that fails or takes longer than
/// one interval skips that keep-alive (and logs why), so a daemon whose
/// runtime or main service is stuck stops sending them and the service
/// manager restarts it after `WatchdogSec=`. Without a watchdog this
/// returns `None` and starts nothing.
pub fn spawn_watchdog<F, Fut>(probe: F) -> Option<tokio::task::JoinHandle<()>>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    let interval = watchdog_interval()?;
    tracing::debug!(?interval, "sending watchdog keep-alives");
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match tokio::time::timeout(interval, probe()).await {
                Ok(Ok(())) => send(&[NotifyState::Watchdog]),
                Ok(Err(why)) => {
                    tracing::warn!("health probe failed, no watchdog keep-alive: {why}")
                }
                Err(_) => tracing::warn!(
                    ?interval,
                    "health probe did not answer in time, no watchdog keep-alive"
                ),
            }
        }
    }))
}

/// The receiving end of the notification protocol, what systemd does with
/// `NOTIFY_SOCKET`: a datagram socket that collects the daemons' messages.
/// For tests and for supervisors that run a daemon outside systemd.
pub struct NotifyListener {
    socket: std::os::unix::net::UnixDatagram,
    path: std::path::PathBuf,
}

impl NotifyListener {
    /// Binds `path` (removed again on drop).
    pub fn bind(path: &Path) -> std::io::Result<NotifyListener> {
        let _ = std::fs::remove_file(path);
        let socket = std::os::unix::net::UnixDatagram::bind(path)?;
        Ok(NotifyListener {
            socket,
            path: path.to_path_buf(),
        })
    }

    /// The value for the daemon's `NOTIFY_SOCKET`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next message's `KEY=VALUE` lines, or None after `timeout`.
    pub fn recv(&self, timeout: Duration) -> std::io::Result<Option<Vec<String>>> {
        self.socket.set_read_timeout(Some(timeout))?;
        let mut buf = vec![0u8; 4096];
        match self.socket.recv(&mut buf) {
            Ok(n) => Ok(Some(
                String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .filter(|l| !l.is_empty())
                    .map(str::to_string)
                    .collect(),
            )),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Waits up to `timeout` for a message with line `line` (e.g.
    /// `READY=1`); returns every message received before it, in order.
    pub fn wait_for(&self, line: &str, timeout: Duration) -> std::io::Result<Vec<Vec<String>>> {
        let deadline = std::time::Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no {line} within {timeout:?}; received {seen:?}"),
                ));
            }
            if let Some(msg) = self.recv(left)? {
                let found = msg.iter().any(|l| l == line);
                seen.push(msg);
                if found {
                    return Ok(seen);
                }
            }
        }
    }
}

impl Drop for NotifyListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_collects_messages_until_the_one_asked_for() {
        let dir = tempfile::tempdir().expect("tempdir");
        let listener = NotifyListener::bind(&dir.path().join("notify")).expect("bind");
        let sender = std::os::unix::net::UnixDatagram::unbound().expect("socket");
        for msg in ["STATUS=starting\n", "READY=1\nSTATUS=serving\n"] {
            sender
                .send_to(msg.as_bytes(), listener.path())
                .expect("send");
        }
        let seen = listener
            .wait_for("READY=1", Duration::from_secs(10))
            .expect("READY=1");
        assert_eq!(
            seen,
            [
                vec!["STATUS=starting".to_string()],
                vec!["READY=1".to_string(), "STATUS=serving".to_string()]
            ]
        );
        // Nothing more arrives: a timeout is None, not an error.
        assert_eq!(
            listener.recv(Duration::from_millis(10)).expect("recv"),
            None
        );
    }
}
