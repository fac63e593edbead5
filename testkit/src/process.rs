//! Child processes that are stopped when their guard goes (also when a test
//! panics), commands whose failure carries their output, and waiting.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::kill;
use nix::unistd::Pid;

pub use nix::sys::signal::Signal;

/// A child process: stopped on drop with its stop signal, then SIGKILL
/// after a grace period.
pub struct Proc {
    name: String,
    child: Child,
    stdout: Option<BufReader<ChildStdout>>,
    stop_signal: Signal,
    grace: Duration,
}

impl Proc {
    /// Starts `cmd` as configured by the caller (stdio included).
    pub fn spawn(name: &str, mut cmd: Command) -> Result<Proc> {
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        Ok(Proc {
            name: name.to_string(),
            stdout: None,
            child,
            stop_signal: Signal::SIGTERM,
            grace: Duration::from_secs(10),
        })
    }

    /// Starts `cmd` with stdin closed and stdout and stderr appended to `log`.
    pub fn spawn_logged(name: &str, mut cmd: Command, log: &Path) -> Result<Proc> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening log {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone().context("duplicating the log file")?)
            .stderr(out);
        Proc::spawn(name, cmd)
    }

    /// How the guard stops the process (default SIGTERM, 10 s, then SIGKILL).
    pub fn stop_with(mut self, signal: Signal, grace: Duration) -> Proc {
        self.stop_signal = signal;
        self.grace = grace;
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The exit status once it exited by itself.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for the exit (no signal).
    pub fn wait(&mut self) -> Result<ExitStatus> {
        self.child
            .wait()
            .with_context(|| format!("waiting for {}", self.name))
    }

    /// Sends `signal` and waits up to `grace`, then SIGKILL; the exit status
    /// when it ended by itself within the grace period.
    pub fn signal_and_wait(&mut self, signal: Signal, grace: Duration) -> Option<ExitStatus> {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = kill(Pid::from_raw(pid), signal);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(st) = self.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }

    /// Stops it the way the guard would.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        self.signal_and_wait(self.stop_signal, self.grace)
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn reader(&mut self) -> Result<&mut BufReader<ChildStdout>> {
        if self.stdout.is_none() {
            let out = self
                .child
                .stdout
                .take()
                .with_context(|| format!("{}: stdout is not piped", self.name))?;
            self.stdout = Some(BufReader::new(out));
        }
        self.stdout.as_mut().context("stdout reader")
    }

    /// The next line of the child's piped stdout, trimmed ("" at its end).
    /// Lines read stay consumed; nothing read ahead is lost between calls.
    pub fn read_line(&mut self) -> Result<String> {
        let name = self.name.clone();
        let mut line = String::new();
        self.reader()?
            .read_line(&mut line)
            .with_context(|| format!("reading the output of {name}"))?;
        Ok(line.trim().to_string())
    }

    /// The rest of the child's piped stdout, until it closes it.
    pub fn read_rest(&mut self) -> Result<String> {
        let name = self.name.clone();
        let mut rest = String::new();
        std::io::Read::read_to_string(self.reader()?, &mut rest)
            .with_context(|| format!("reading the output of {name}"))?;
        Ok(rest)
    }

    /// Waits for the child to print `ready` as its first line.
    pub fn wait_ready(&mut self) -> Result<()> {
        let line = self.read_line()?;
        if line != "ready" {
            bail!("{} did not become ready (said {line:?})", self.name);
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.alive() {
            self.signal_and_wait(self.stop_signal, self.grace);
        } else {
            let _ = self.child.wait();
        }
    }
}

/// Prints a daemon's log when the test is failing (panicking), so the
/// failure shows what the daemon did.
pub fn print_log_if_panicking(what: &str, log: &Path) {
    if std::thread::panicking() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        eprintln!("---- {what} log {} ----\n{text}", log.display());
    }
}

/// Runs `cmd` to completion; its stdout, or an error with its output.
pub fn output(mut cmd: Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    checked(&cmd, out)
}

fn checked(cmd: &Command, out: Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "{:?} {:?} failed ({}): {}{}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>(),
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `program args...`; its stdout, or an error with its output.
pub fn run<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Result<String> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    output(cmd)
}

/// Runs a shell command line (`sh -c`), for pipelines of test tools.
pub fn sh(script: &str) -> Result<String> {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(script);
    output(cmd)
}

/// Polls `f` every 50 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, f: impl FnMut() -> bool) {
    if let Err(e) = wait_for(what, timeout, f) {
        panic!("{e}");
    }
}

/// Polls `f` every 50 ms until it holds; an error naming `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if f() {
        return Ok(());
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

/// SIGKILLs processes whose command line (NULs as spaces) satisfies `pred`.
/// Callers match only what they started (e.g. by a unique directory).
pub fn kill_matching(pred: impl Fn(&str) -> bool) {
    for pid in all_pids() {
        let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if !raw.is_empty() && pred(&String::from_utf8_lossy(&raw).replace('\0', " ")) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// Every process id in /proc.
pub fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
                .collect()
        })
        .unwrap_or_default()
}

/// Writes an executable shell script to `path` (a stand-in for a tool a
/// test puts first on a daemon's PATH: nvidia-smi, dpkg, a runtime, ...).
pub fn write_script(path: &Path, body: &str) -> Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    std::fs::write(path, format!("#!/bin/sh\n{body}"))
        .with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .with_context(|| format!("chmod {}", path.display()))
}

/// This process's `PATH` with `dir` first.
pub fn path_with(dir: &Path) -> String {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::iter::once(dir.to_path_buf()).chain(std::env::split_paths(&path));
    std::env::join_paths(dirs)
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| dir.display().to_string())
}

/// Sends `sig` to process `pid` (one the test started by other means than
/// [`Proc`], e.g. a daemon that detached itself); gone is fine.
pub fn signal(pid: u32, sig: Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(pid), sig);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failing_commands_carry_their_output() {
        let e = sh("echo to-stderr >&2; exit 3").unwrap_err().to_string();
        assert!(e.contains("to-stderr") && e.contains("3"), "{e}");
        assert_eq!(run("echo", &["a", "b"]).unwrap(), "a b\n");
    }

    #[test]
    fn lines_ready_and_stop() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo ready; echo two; echo three; sleep 30"])
            .stdout(Stdio::piped());
        let mut p = Proc::spawn("sh", cmd).unwrap();
        p.wait_ready().unwrap();
        assert_eq!(p.read_line().unwrap(), "two");
        assert_eq!(p.read_line().unwrap(), "three");
        assert!(p.alive());
        let st = p.stop();
        assert!(st.is_some_and(|s| !s.success()), "{st:?}");
        assert!(!p.alive());
    }

    #[test]
    fn waiting_names_what_timed_out() {
        let e = wait_for("the impossible", Duration::from_millis(100), || false).unwrap_err();
        assert!(e.to_string().contains("the impossible"));
        wait_until("the obvious", Duration::from_millis(100), || true);
    }
}
