//! Child processes inside network namespaces, shell helpers and waiting.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Runs a command line through `sh -c`, failing with its output.
pub fn sh(cmd: &str) -> Result<String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "`{cmd}` failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `sh -c` inside a named network namespace. `ip netns exec` remounts /sys,
/// hiding bpffs: start anything that pins eBPF objects with `enter_netns`.
pub fn ns_sh(ns: &str, cmd: &str) -> Result<String> {
    sh(&format!(
        "ip netns exec {ns} sh -c '{}'",
        cmd.replace('\'', "'\\''")
    ))
}

/// Polls `f` every 100 ms until it holds; the error names `what`.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if f() {
        return Ok(());
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

/// Makes `cmd` start inside the network namespace at `netns`. We call
/// setns(2) ourselves rather than `ip netns exec`, which also remounts /sys
/// and would hide /sys/fs/bpf from NetManager.
pub fn enter_netns(cmd: &mut Command, netns: &Path) -> Result<()> {
    let f = File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    // SAFETY: setns is async-signal-safe; `f` is moved into the closure and
    // stays open until exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// A child process: SIGTERM, a grace period, then SIGKILL on drop.
pub struct Proc {
    pub name: String,
    child: Child,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Proc> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening log {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        Ok(Proc {
            name: name.to_string(),
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Stops with `sig`, escalating to SIGKILL after `grace`.
    pub fn stop_with(&mut self, sig: i32, grace: Duration) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill(2) on our own child, not reaped yet.
            unsafe {
                libc::kill(pid, sig);
            }
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if !self.alive() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop_with(libc::SIGTERM, Duration::from_secs(10));
    }
}

/// Whether something accepts TCP on 127.0.0.1:`port` inside `netns`
/// (probed from a short-lived thread that enters the namespace).
pub fn netns_connect(netns: &Path, port: u16) -> bool {
    let Ok(f) = File::open(netns) else {
        return false;
    };
    std::thread::spawn(move || {
        // SAFETY: setns on this short-lived thread only.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return false;
        }
        std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_millis(500),
        )
        .is_ok()
    })
    .join()
    .unwrap_or(false)
}

/// Kills processes whose command line satisfies `pred` (by pid).
pub fn kill_matching(pred: impl Fn(&str) -> bool) {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if pred(&String::from_utf8_lossy(&raw).replace('\0', " ")) {
            // SAFETY: kill(2); callers match only processes they started.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}
