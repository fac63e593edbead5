//! Network namespaces: references to one (a named namespace, a process's),
//! running programs and closures inside one, and the guard of a named
//! namespace the kit created, which kills what still runs in it and
//! deletes it on drop -- also when the test panics.
//!
//! `setns` moves only the calling thread, so work inside a namespace runs
//! on a thread of its own; programs enter it between fork and exec (unlike
//! `ip netns exec`, no new mount namespace, so bpffs stays visible).

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::process::{Proc, all_pids, output};

/// Where named namespaces live (as `ip netns` keeps them).
pub const NETNS_DIR: &str = "/run/netns";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call, `<tag><pid>-<n>`: tests of
/// several helpers and CI jobs run side by side on one machine.
pub fn unique(tag: &str) -> String {
    format!(
        "{tag}{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    )
}

/// A network namespace by its file: `/run/netns/<name>` or
/// `/proc/<pid>/ns/net`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NsPath(PathBuf);

impl NsPath {
    pub fn named(name: &str) -> NsPath {
        NsPath(Path::new(NETNS_DIR).join(name))
    }

    /// The namespace process `pid` lives in.
    pub fn of_pid(pid: u32) -> NsPath {
        NsPath(PathBuf::from(format!("/proc/{pid}/ns/net")))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn open(&self) -> Result<File> {
        File::open(&self.0)
            .with_context(|| format!("opening network namespace {}", self.0.display()))
    }

    /// Makes `cmd` start inside this namespace.
    pub fn enter(&self, cmd: &mut Command) -> Result<()> {
        let ns = self.open()?;
        // SAFETY: setns(2) is async-signal-safe; the descriptor moves into
        // the closure and stays open until exec.
        unsafe {
            cmd.pre_exec(move || {
                nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
            });
        }
        Ok(())
    }

    /// A command that runs `program` inside this namespace.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Result<Command> {
        let mut cmd = Command::new(program);
        self.enter(&mut cmd)?;
        Ok(cmd)
    }

    /// Runs `args[0] args[1..]` inside; its stdout or an error with its output.
    pub fn run<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<String> {
        let (program, rest) = args.split_first().context("an empty command")?;
        let mut cmd = self.command(program)?;
        cmd.args(rest).stdin(Stdio::null());
        output(cmd)
    }

    /// Runs a shell command line inside (pipelines of test tools).
    pub fn sh(&self, script: &str) -> Result<String> {
        self.run(&["sh", "-c", script])
    }

    /// Starts a long-running program inside; stdout piped (for
    /// [`Proc::read_line`]), stderr inherited.
    pub fn spawn<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Proc> {
        let (program, rest) = args.split_first().context("an empty command")?;
        let mut cmd = self.command(program)?;
        cmd.args(rest).stdin(Stdio::null()).stdout(Stdio::piped());
        Proc::spawn(&program.as_ref().to_string_lossy(), cmd)
    }

    /// [`spawn`](Self::spawn), then waits until the program prints `ready`.
    pub fn spawn_ready<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Proc> {
        let mut p = self.spawn(args)?;
        p.wait_ready()?;
        Ok(p)
    }

    /// Starts a long-running program inside with its output discarded (a
    /// chatty program would block on a pipe nobody reads).
    pub fn spawn_quiet<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Proc> {
        let (program, rest) = args.split_first().context("an empty command")?;
        let mut cmd = self.command(program)?;
        cmd.args(rest)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        Proc::spawn(&program.as_ref().to_string_lossy(), cmd)
    }

    /// Moves the calling thread into this namespace for good (until the
    /// thread ends): for code that must run in the caller's namespace, e.g.
    /// BPF_PROG_TEST_RUN, whose FIB lookups answer from it. Other threads
    /// stay where they are.
    pub fn enter_this_thread(&self) -> Result<()> {
        let ns = self.open()?;
        nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET)
            .map_err(|e| anyhow!("setns into {}: {e}", self.0.display()))
    }

    /// The index of interface `dev` inside.
    pub fn ifindex(&self, dev: &str) -> Result<u32> {
        self.link(dev)?
            .map(|l| l.index)
            .with_context(|| format!("no interface {dev} in {}", self.0.display()))
    }

    /// Runs `f` on a thread inside this namespace and waits for it; sockets
    /// it creates belong to the namespace.
    pub fn within<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let ns = self.open()?;
        std::thread::scope(|s| {
            s.spawn(move || {
                nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET)
                    .map_err(|e| anyhow!("setns: {e}"))?;
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow!("a thread inside {} panicked", self.0.display()))?
        })
    }

    /// Like [`within`](Self::within), but in the background.
    pub fn spawn_within<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<std::thread::JoinHandle<Result<T>>> {
        let ns = self.open()?;
        Ok(std::thread::spawn(move || {
            nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|e| anyhow!("setns: {e}"))?;
            Ok(f())
        }))
    }

    /// `GET url` from inside this namespace with the workers' shared HTTP
    /// client (`worker_common::http`); the answer whatever its status.
    pub fn http_get(&self, url: &str, timeout: Duration) -> Result<worker_common::http::Response> {
        // The client's runtime threads are made inside, so its sockets are too.
        self.within(|| -> Result<worker_common::http::Response> {
            let tls = worker_common::tls::ClientTls::default().build()?;
            let client = worker_common::http::blocking::Client::new(
                worker_common::http::Client::tcp(tls).timeout(timeout),
            )?;
            Ok(client.get(url)?)
        })?
    }

    /// Whether something inside accepts TCP connections on `addr`.
    pub fn accepts(&self, addr: std::net::SocketAddr) -> bool {
        self.within(|| {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
        })
        .unwrap_or(false)
    }

    /// Writes a sysctl of this namespace, e.g. `("net/ipv4/ip_forward", "1")`.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = Path::new("/proc/sys").join(key);
        self.within(|| std::fs::write(&path, value))?
            .with_context(|| format!("writing {} in {}", path.display(), self.0.display()))
    }

    /// Reads a sysctl of this namespace.
    pub fn read_sysctl(&self, key: &str) -> Result<String> {
        let path = Path::new("/proc/sys").join(key);
        self.within(|| std::fs::read_to_string(&path))?
            .with_context(|| format!("reading {} in {}", path.display(), self.0.display()))
            .map(|v| v.trim().to_string())
    }

    /// Processes whose (main thread's) network namespace this is.
    pub fn pids(&self) -> Vec<i32> {
        let Ok(target) = std::fs::metadata(&self.0) else {
            return Vec::new();
        };
        use std::os::unix::fs::MetadataExt;
        let me = std::process::id() as i32;
        all_pids()
            .into_iter()
            .filter(|&p| p != me)
            .filter(|p| {
                std::fs::metadata(format!("/proc/{p}/ns/net"))
                    .is_ok_and(|m| m.ino() == target.ino() && m.dev() == target.dev())
            })
            .collect()
    }

    /// SIGKILLs every process inside (daemons, shims, containers a test left).
    pub fn kill_all(&self) {
        for pid in self.pids() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// A named network namespace this kit created, with `lo` up; on drop,
/// whatever runs inside is killed and the namespace deleted (its links,
/// addresses and routes go with it).
pub struct Netns {
    name: String,
    ns: NsPath,
}

impl std::ops::Deref for Netns {
    type Target = NsPath;
    fn deref(&self) -> &NsPath {
        &self.ns
    }
}

impl Netns {
    /// A namespace with a unique name starting with `oak<tag>`.
    pub fn new(tag: &str) -> Result<Netns> {
        Netns::named(&unique(&format!("oak{tag}")))
    }

    /// A namespace with a fixed name (the sandbox's); a leftover of a
    /// crashed run with that name is removed first.
    pub fn named(name: &str) -> Result<Netns> {
        delete_named(name);
        create_named(name).with_context(|| format!("creating network namespace {name}"))?;
        let ns = Netns {
            name: name.to_string(),
            ns: NsPath::named(name),
        };
        ns.set_up("lo")?;
        Ok(ns)
    }

    /// The guard of a named namespace something else creates (the daemon
    /// under test): whatever is there at drop is removed.
    pub fn adopt(name: &str) -> Netns {
        Netns {
            name: name.to_string(),
            ns: NsPath::named(name),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Debugging aid: leave everything in place for inspection.
        if std::env::var_os("OAK_KEEP_NETNS").is_some() {
            eprintln!("OAK_KEEP_NETNS: leaving network namespace {}", self.name);
            return;
        }
        delete_named(&self.name);
    }
}

/// Creates `/run/netns/<name>` like `ip netns add`: the run directory is a
/// shared mount (so namespaces show in mount namespaces made later), and a
/// thread that unshared its network namespace bind-mounts it there.
fn create_named(name: &str) -> Result<()> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        bail!("invalid namespace name {name:?}");
    }
    let dir = Path::new(NETNS_DIR);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {NETNS_DIR}"))?;
    share_run_dir(dir)?;
    let target = dir.join(name);
    File::options()
        .write(true)
        .create_new(true)
        .open(&target)
        .with_context(|| format!("creating {}", target.display()))?;
    let bound = std::thread::scope(|s| {
        s.spawn(|| -> Result<()> {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).context("unshare(CLONE_NEWNET)")?;
            nix::mount::mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .context("bind-mounting the new namespace")
        })
        .join()
        .map_err(|_| anyhow!("the namespace creation thread panicked"))?
    });
    if bound.is_err() {
        let _ = std::fs::remove_file(&target);
    }
    bound
}

/// Makes the run directory a shared mount point (bind-mounted onto itself
/// first when it is none), as iproute2 does.
fn share_run_dir(dir: &Path) -> Result<()> {
    let shared = || {
        nix::mount::mount(
            None::<&str>,
            dir,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    if shared().is_ok() {
        return Ok(());
    }
    nix::mount::mount(
        Some(dir),
        dir,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .with_context(|| format!("bind-mounting {NETNS_DIR} onto itself"))?;
    shared().with_context(|| format!("making {NETNS_DIR} a shared mount"))
}

/// Kills what runs in namespace `name` and deletes it; absent is fine.
pub fn delete_named(name: &str) {
    let ns = NsPath::named(name);
    if !ns.path().exists() {
        return;
    }
    ns.kill_all();
    let _ = nix::mount::umount2(ns.path(), MntFlags::MNT_DETACH);
    let _ = std::fs::remove_file(ns.path());
}

/// The named namespaces on this machine.
pub fn list_named() -> Vec<String> {
    std::fs::read_dir(NETNS_DIR)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_differ_and_carry_the_pid() {
        let (a, b) = (unique("x"), unique("x"));
        assert_ne!(a, b);
        assert!(a.starts_with(&format!("x{}-", std::process::id())), "{a}");
    }
}
