//! Working inside other network namespaces.
//!
//! A netlink socket talks to the namespace it was created in, and `setns`
//! moves only the calling thread. So work for another namespace runs on a
//! short-lived thread that enters it, opens its own netlink connection on a
//! private single-threaded runtime, does the work and exits -- the daemon's
//! own threads never change namespace.

use std::fs::File;
use std::future::Future;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use tokio::sync::oneshot;

/// Directory of named namespaces, as `ip netns` uses it.
pub const NETNS_DIR: &str = "/run/netns";

/// Which namespace a deployment's interface goes into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetnsRef {
    /// The namespace of a running process (containers).
    Pid(u32),
    /// A named namespace under /run/netns (unikernels).
    Named(String),
}

impl NetnsRef {
    pub fn path(&self) -> PathBuf {
        match self {
            NetnsRef::Pid(pid) => PathBuf::from(format!("/proc/{pid}/ns/net")),
            NetnsRef::Named(name) => Path::new(NETNS_DIR).join(name),
        }
    }

    /// Open the namespace handle; fails cleanly when the process is gone.
    pub fn open(&self) -> Result<File> {
        let path = self.path();
        File::open(&path).map_err(|e| match (self, e.kind()) {
            (NetnsRef::Pid(pid), std::io::ErrorKind::NotFound) => {
                anyhow!("no process with pid {pid} (cannot open {})", path.display())
            }
            _ => anyhow!("opening network namespace {}: {e}", path.display()),
        })
    }
}

fn setns(ns: &File) -> Result<()> {
    // SAFETY: plain syscall on a valid fd; affects only the calling thread.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Run `f` with a netlink handle inside the namespace `ns`.
pub async fn in_netns<F, Fut, T>(ns: File, f: F) -> Result<T>
where
    F: FnOnce(rtnetlink::Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>>,
    T: Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("netns-worker".into())
        .spawn(move || {
            let run = || -> Result<T> {
                setns(&ns)?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("runtime for namespace work")?;
                rt.block_on(async move {
                    let (conn, handle, _) =
                        rtnetlink::new_connection().context("netlink socket in namespace")?;
                    tokio::spawn(conn);
                    f(handle).await
                })
            };
            let _ = tx.send(run());
        })
        .context("spawning namespace worker thread")?;
    rx.await
        .map_err(|_| anyhow!("namespace worker thread died"))?
}

/// Run a blocking closure inside the namespace (e.g. ioctl, or `nft`, whose
/// child process inherits the thread's namespace).
pub async fn blocking_in_netns<F, T>(ns: File, f: F) -> Result<T>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("netns-worker".into())
        .spawn(move || {
            let _ = tx.send(setns(&ns).and_then(|_| f()));
        })
        .context("spawning namespace worker thread")?;
    rx.await
        .map_err(|_| anyhow!("namespace worker thread died"))?
}

/// Create a named namespace like `ip netns add`: a fresh namespace bind-mounted
/// on /run/netns/<name> so it outlives the thread that made it.
pub async fn create_named(name: &str) -> Result<()> {
    validate_name(name)?;
    let path = Path::new(NETNS_DIR).join(name);
    if path.exists() {
        bail!("network namespace {name} already exists");
    }
    std::fs::create_dir_all(NETNS_DIR).with_context(|| format!("creating {NETNS_DIR}"))?;
    let target = path.clone();
    let (tx, rx) = oneshot::channel();
    std::thread::spawn(move || {
        let run = || -> Result<()> {
            File::create(&target).with_context(|| format!("creating {}", target.display()))?;
            // SAFETY: unshare only affects this thread, which exits right after.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                bail!("unshare: {}", std::io::Error::last_os_error());
            }
            let src = std::ffi::CString::new("/proc/thread-self/ns/net")?;
            let dst = std::ffi::CString::new(target.as_os_str().as_encoded_bytes())?;
            // SAFETY: valid NUL-terminated paths; bind mount with no data.
            let rc = unsafe {
                libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                )
            };
            if rc != 0 {
                bail!(
                    "bind-mounting namespace: {}",
                    std::io::Error::last_os_error()
                );
            }
            Ok(())
        };
        let r = run();
        if r.is_err() {
            let _ = std::fs::remove_file(&target);
        }
        let _ = tx.send(r);
    });
    rx.await
        .map_err(|_| anyhow!("namespace creation thread died"))?
        .with_context(|| format!("creating network namespace {name}"))
}

/// Remove a named namespace (like `ip netns del`); absent is fine.
pub fn delete_named(name: &str) -> Result<()> {
    validate_name(name)?;
    let path = Path::new(NETNS_DIR).join(name);
    if !path.exists() {
        return Ok(());
    }
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: valid NUL-terminated path.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))
}

fn validate_name(name: &str) -> Result<()> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." || name.len() > 200 {
        bail!("invalid network namespace name {name:?}");
    }
    Ok(())
}
