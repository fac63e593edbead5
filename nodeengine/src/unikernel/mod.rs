//! Unikernels under qemu, as upstream runs them.
//!
//! The job's `image` lists image URLs (one per `arch[]` entry, comma
//! separated); the one for this machine is downloaded ([`fetch`]: HTTPS or a
//! pinned digest, streamed to disk) and unpacked ([`archive`]: `kernel`,
//! optional `files/` shared over 9p and `initramfs.cpio`). With the overlay
//! on, NetManager's `/unikernel/deploy` prepares a namespace named after the
//! task, qemu runs inside it, and the guest learns its address, gateway and
//! mask on the kernel command line ([`guest_net`]). qemu uses KVM where it
//! works, else TCG ([`accel`]), and is stopped with QMP `quit` ([`qmp`]).

pub mod accel;
pub mod archive;
pub mod fetch;
pub mod guest_net;
pub mod qemu;
pub mod qmp;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use sha2::{Digest, Sha256};
use tokio::sync::{oneshot, watch};

use crate::job::DeployRequest;
use crate::netmanager_client::{self, NetManagerClient, UndeployRequest};
use crate::node_report::{find_on_path, go_arch};
use accel::Accel;
use archive::Format;
use fetch::ImageSource;
use guest_net::{Backend, Namespace};
use qemu::VmConfig;
use qmp::Qmp;

/// How long qemu may take to serve QMP after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a guest may take to stop after QMP `quit` before it is killed.
const QUIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of the log a start failure quotes.
const LOG_QUOTE: u64 = 600;

/// A started VM: its exit code (None when killed) arrives here.
pub struct RunningVm {
    pub exit: oneshot::Receiver<Option<i32>>,
}

/// What [`UnikernelRuntime::stop`] needs of a running VM.
struct VmHandle {
    pid: Option<u32>,
    qmp: PathBuf,
    exited: watch::Receiver<bool>,
}

#[derive(Clone)]
pub struct UnikernelRuntime {
    state_dir: PathBuf,
    /// KVM or TCG, decided once (see [`accel`]).
    accel: Arc<tokio::sync::Mutex<Option<Accel>>>,
    vms: Arc<Mutex<HashMap<String, VmHandle>>>,
}

impl std::fmt::Debug for UnikernelRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnikernelRuntime")
            .field("state_dir", &self.state_dir)
            .finish()
    }
}

/// Picks this machine's image URL from the comma-separated list.
pub fn kernel_url(req: &DeployRequest) -> Result<String> {
    let urls: Vec<&str> = req
        .image
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    if urls.is_empty() {
        bail!("the job names no unikernel image");
    }
    let arch = go_arch();
    let idx = req.arch.iter().position(|a| *a == arch);
    match idx {
        Some(i) if i < urls.len() => Ok(urls[i].to_string()),
        None if req.arch.is_empty() => Ok(urls[0].to_string()),
        _ => bail!("the job offers no unikernel for architecture {arch}"),
    }
}

/// Where an unpacked image's parts are.
#[derive(Debug)]
struct Layout {
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    files: Option<PathBuf>,
}

/// Downloads and unpacks the image into `dir` (upstream's layout: `kernel`
/// at the top, optional `files/` or `files1/` and `initramfs.cpio`).
async fn prepare_image(source: &ImageSource, dir: &Path) -> Result<Layout> {
    let image = dir.join("image");
    source.download(&image).await?;
    let root = dir.join("rootfs");
    let unpacked = root.clone();
    let format = tokio::task::spawn_blocking(move || -> Result<Format> {
        let format = archive::detect(&image)?;
        if format != Format::Raw {
            std::fs::create_dir(&unpacked)
                .with_context(|| format!("creating {}", unpacked.display()))?;
            archive::unpack(&image, format, &unpacked)?;
            // The archive is not needed once unpacked.
            let _ = std::fs::remove_file(&image);
        }
        Ok(format)
    })
    .await
    .context("unpacking task")??;
    if format == Format::Raw {
        return Ok(Layout {
            kernel: dir.join("image"),
            initrd: None,
            files: None,
        });
    }
    let kernel = root.join("kernel");
    if !kernel.is_file() {
        bail!(
            "the unikernel archive has no ./kernel (expected: kernel, optional files/ and \
             initramfs.cpio)"
        );
    }
    let initrd = Some(root.join("initramfs.cpio")).filter(|p| p.is_file());
    let files = ["files", "files1"]
        .iter()
        .map(|d| root.join(d))
        .find(|p| p.is_dir());
    Ok(Layout {
        kernel,
        initrd,
        files,
    })
}

/// The last bytes of a log, for error messages.
fn log_tail(log: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(log) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(LOG_QUOTE)));
    let mut buf = Vec::new();
    let _ = f.take(LOG_QUOTE).read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).trim().to_string()
}

impl UnikernelRuntime {
    /// `accel`: what the operator chose; `auto` probes before the first VM.
    pub fn new(state_dir: impl Into<PathBuf>, accel: accel::AccelChoice) -> Self {
        UnikernelRuntime {
            state_dir: state_dir.into(),
            accel: Arc::new(tokio::sync::Mutex::new(accel.fixed())),
            vms: Default::default(),
        }
    }

    /// Why unikernels cannot run here, if they cannot.
    pub fn unavailable_reason() -> Option<String> {
        if find_on_path(qemu::binary()).is_none() {
            return Some(format!("{} is not installed on this node", qemu::binary()));
        }
        None
    }

    fn instance_dir(&self, id: &str) -> PathBuf {
        self.state_dir.join(id)
    }

    /// A short QMP socket path (unix socket paths are limited to 107 bytes,
    /// task ids are not).
    fn qmp_socket(&self, id: &str) -> PathBuf {
        let hash = Sha256::digest(id.as_bytes());
        let hex: String = hash[..8].iter().map(|b| format!("{b:02x}")).collect();
        self.state_dir.join("qmp").join(format!("{hex}.sock"))
    }

    /// KVM if it works here, else TCG; probed once.
    async fn accel(&self) -> Accel {
        let mut cached = self.accel.lock().await;
        if let Some(a) = *cached {
            return a;
        }
        let a = match accel::probe_kvm(qemu::binary(), qemu::machine()).await {
            Ok(()) => {
                tracing::info!("unikernels run under KVM");
                Accel::Kvm
            }
            Err(why) => {
                tracing::warn!("unikernels run under TCG (software emulation): {why}");
                Accel::Tcg
            }
        };
        *cached = Some(a);
        a
    }

    pub async fn start(
        &self,
        req: &DeployRequest,
        net: Option<&NetManagerClient>,
        log: &Path,
    ) -> Result<RunningVm> {
        if let Some(reason) = Self::unavailable_reason() {
            bail!("cannot run unikernel: {reason}");
        }
        let id = req.task_id();
        let source = ImageSource::parse(&kernel_url(req)?)?;
        let dir = self.instance_dir(&id);
        // A leftover of an earlier run of this instance is not reused.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let result = self.start_in(req, &source, &dir, net, log).await;
        if result.is_err() {
            if let Some(net) = net {
                let _ = net
                    .undeploy_unikernel(&UndeployRequest {
                        service_name: req.job_name.clone(),
                        instance_number: req.instance,
                    })
                    .await;
            }
            self.cleanup(&id);
        }
        result
    }

    async fn start_in(
        &self,
        req: &DeployRequest,
        source: &ImageSource,
        dir: &Path,
        net: Option<&NetManagerClient>,
        log: &Path,
    ) -> Result<RunningVm> {
        let id = req.task_id();
        let layout = prepare_image(source, dir).await?;
        let mut macvtap = None;
        let guest = match net {
            None => None,
            Some(net) => {
                net.deploy_unikernel(&netmanager_client::DeployRequest {
                    pid: 0,
                    service_name: req.job_name.clone(),
                    instance_number: req.instance,
                    port_mappings: req.port.clone(),
                })
                .await
                .context("preparing the unikernel network")?;
                let ns = Namespace::read(&id).await?;
                let guest = ns.guest_net()?;
                if let Backend::Macvtap { device } = &guest.backend {
                    macvtap = Some(
                        std::fs::OpenOptions::new()
                            .read(true)
                            .write(true)
                            .open(device)
                            .with_context(|| format!("opening {device}"))?,
                    );
                    if let Some((dev, a, p)) = ns.uplink() {
                        guest_net::release_address(&id, &dev, a, p).await?;
                    }
                }
                tracing::info!(
                    id, address = %guest.address, gateway = %guest.gateway,
                    mask = %guest.mask(), mac = %guest.mac, "unikernel network"
                );
                Some(guest)
            }
        };
        let qmp_socket = self.qmp_socket(&id);
        if let Some(d) = qmp_socket.parent() {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let mut config = VmConfig {
            name: id.clone(),
            kernel: layout.kernel,
            initrd: layout.initrd,
            files: layout.files,
            memory_mib: req.memory_mib,
            vcpus: req.vcpus,
            net: guest,
            cmd: req.cmd.clone(),
            qmp_socket,
            accel: self.accel().await,
        };
        let in_netns = net.is_some().then_some(id.as_str());
        let child = match self.launch(&config, in_netns, macvtap.as_ref(), log).await {
            Ok(c) => c,
            Err(e) if config.accel == Accel::Kvm => {
                tracing::warn!(
                    id,
                    "qemu did not start under KVM ({e:#}); using TCG from now on"
                );
                *self.accel.lock().await = Some(Accel::Tcg);
                config.accel = Accel::Tcg;
                self.launch(&config, in_netns, macvtap.as_ref(), log)
                    .await?
            }
            Err(e) => return Err(e),
        };
        Ok(self.supervise(id, child, config.qmp_socket))
    }

    /// Starts qemu and waits until it serves QMP with the guest running.
    async fn launch(
        &self,
        config: &VmConfig,
        netns: Option<&str>,
        macvtap: Option<&std::fs::File>,
        log: &Path,
    ) -> Result<tokio::process::Child> {
        let _ = std::fs::remove_file(&config.qmp_socket);
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let logf2 = logf.try_clone().context("duplicating the log file")?;
        let mut cmd = match netns {
            // `ip netns exec` execs qemu in the namespace (same pid), as upstream.
            Some(ns) => {
                let mut c = tokio::process::Command::new("ip");
                c.args(["netns", "exec", ns, qemu::binary()]);
                c
            }
            None => tokio::process::Command::new(qemu::binary()),
        };
        cmd.args(config.args())
            .stdin(Stdio::null())
            .stdout(logf)
            .stderr(logf2)
            .kill_on_drop(true);
        if let Some(dev) = macvtap {
            use std::os::fd::AsRawFd;
            let fd = dev.as_raw_fd();
            // SAFETY: dup2 is async-signal-safe; it gives the child the macvtap
            // device on the descriptor number the command line names (dup2
            // clears close-on-exec on the copy).
            unsafe {
                cmd.pre_exec(move || {
                    if libc::dup2(fd, qemu::MACVTAP_FD) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().context("starting qemu")?;
        match self.wait_started(&mut child, &config.qmp_socket).await {
            Ok(()) => Ok(child),
            Err(e) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                Err(anyhow!("{e:#}; qemu's output: {}", log_tail(log)))
            }
        }
    }

    async fn wait_started(&self, child: &mut tokio::process::Child, socket: &Path) -> Result<()> {
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().context("waiting for qemu")? {
                bail!("qemu exited at start ({status})");
            }
            if socket.exists()
                && let Ok(mut qmp) = Qmp::connect(socket).await
            {
                let status = qmp.status().await?;
                if matches!(status.as_str(), "running" | "prelaunch") {
                    return Ok(());
                }
                bail!("the VM is {status} right after start");
            }
            if tokio::time::Instant::now() > deadline {
                bail!("qemu served no QMP within {START_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for qemu in the background; returns where its exit code arrives.
    fn supervise(&self, id: String, mut child: tokio::process::Child, qmp: PathBuf) -> RunningVm {
        let (exited_tx, exited) = watch::channel(false);
        let pid = child.id();
        self.lock_vms()
            .insert(id.clone(), VmHandle { pid, qmp, exited });
        let (exit_tx, exit) = oneshot::channel();
        let vms = self.vms.clone();
        tokio::spawn(async move {
            let code = child.wait().await.ok().and_then(|s| s.code());
            let _ = exited_tx.send(true);
            vms.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            let _ = exit_tx.send(code);
        });
        RunningVm { exit }
    }

    fn lock_vms(&self) -> std::sync::MutexGuard<'_, HashMap<String, VmHandle>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops instance `id`'s VM as upstream does, with QMP `quit`; kills qemu
    /// if it has not exited after [`QUIT_TIMEOUT`]. Returns once it is gone.
    pub async fn stop(&self, id: &str) {
        let Some((pid, socket, mut exited)) = self
            .lock_vms()
            .get(id)
            .map(|h| (h.pid, h.qmp.clone(), h.exited.clone()))
        else {
            return;
        };
        if *exited.borrow() {
            return;
        }
        match Qmp::connect(&socket).await {
            Ok(qmp) => match qmp.quit().await {
                Ok(()) => tracing::info!(id, "sent QMP quit to the unikernel"),
                Err(e) => tracing::warn!(id, "QMP quit: {e:#}"),
            },
            Err(e) => tracing::warn!(id, "QMP: {e:#}"),
        }
        let stopped = tokio::time::timeout(QUIT_TIMEOUT, exited.wait_for(|e| *e))
            .await
            .is_ok();
        if stopped {
            tracing::info!(id, "unikernel stopped through QMP quit");
            return;
        }
        tracing::warn!(
            id,
            "unikernel still runs {QUIT_TIMEOUT:?} after QMP quit; killing qemu"
        );
        if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
            // SAFETY: kill(2) on qemu, our child, which has not been reaped
            // (the supervisor reaps it and only then marks it exited).
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        let _ = tokio::time::timeout(QUIT_TIMEOUT, exited.wait_for(|e| *e)).await;
    }

    pub fn cleanup(&self, id: &str) {
        let _ = std::fs::remove_file(self.qmp_socket(id));
        let _ = std::fs::remove_dir_all(self.instance_dir(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qmp_sockets_are_short() {
        let rt = UnikernelRuntime::new("/var/lib/oakestra/unikernel", accel::AccelChoice::Auto);
        let long = format!("{}.b.c.d.instance.0", "a".repeat(200));
        let s = rt.qmp_socket(&long);
        assert!(s.as_os_str().len() < 100, "{}", s.display());
        assert_ne!(s, rt.qmp_socket("a.b.c.d.instance.0"));
    }
}
