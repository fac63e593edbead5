//! Unikernels: the job's `image` lists kernel URLs (one per `arch[]` entry, comma
//! separated); the kernel for this machine is fetched and booted with qemu.
//! With the overlay on, NetManager's `/unikernel/deploy` prepares a netns named
//! after the task with a tap device, and qemu runs inside that netns.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tokio::sync::oneshot;
use worker_common::http;
use worker_common::tls::ClientTls;

use crate::job::DeployRequest;
use crate::netmanager_client::{self, NetManagerClient, UndeployRequest};
use crate::node_report::{find_on_path, go_arch};

/// Largest kernel archive we download.
const MAX_KERNEL: usize = 512 << 20;
const KERNEL_DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(300);
/// The tap device NetManager creates in the instance's netns.
const TAP_NAME: &str = "tap0";

pub struct RunningVm {
    pub kill: oneshot::Sender<()>,
    pub exit: oneshot::Receiver<Option<i32>>,
}

#[derive(Debug, Clone)]
pub struct UnikernelRuntime {
    state_dir: PathBuf,
}

fn qemu_binary() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "qemu-system-aarch64",
        _ => "qemu-system-x86_64",
    }
}

/// Picks this machine's kernel URL from the comma-separated list.
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

impl UnikernelRuntime {
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        UnikernelRuntime {
            state_dir: state_dir.into(),
        }
    }

    /// Why unikernels cannot run here, if they cannot.
    pub fn unavailable_reason() -> Option<String> {
        if find_on_path(qemu_binary()).is_none() {
            return Some(format!("{} is not installed on this node", qemu_binary()));
        }
        None
    }

    fn instance_dir(&self, id: &str) -> PathBuf {
        self.state_dir.join(id)
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
        let dir = self.instance_dir(&id);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let kernel = fetch_kernel(&kernel_url(req)?, &dir).await?;
        if let Some(net) = net {
            net.deploy_unikernel(&netmanager_client::DeployRequest {
                pid: 0,
                service_name: req.job_name.clone(),
                instance_number: req.instance,
                port_mappings: req.port.clone(),
            })
            .await
            .context("preparing the unikernel network")?;
        }
        match spawn_qemu(req, &kernel, net.is_some(), log) {
            Ok(vm) => Ok(vm),
            Err(e) => {
                if let Some(net) = net {
                    let _ = net
                        .undeploy_unikernel(&UndeployRequest {
                            service_name: req.job_name.clone(),
                            instance_number: req.instance,
                        })
                        .await;
                }
                self.cleanup(&id);
                Err(e)
            }
        }
    }

    pub fn cleanup(&self, id: &str) {
        let _ = std::fs::remove_dir_all(self.instance_dir(id));
    }
}

async fn fetch_kernel(url: &str, dir: &Path) -> Result<PathBuf> {
    let tls = ClientTls::system_roots()
        .build()
        .context("TLS setup for kernel downloads")?;
    let answer = http::Client::tcp(tls)
        .timeout(KERNEL_DOWNLOAD_TIMEOUT)
        .max_body(MAX_KERNEL)
        .user_agent(crate::cluster_link::USER_AGENT)
        .get(url)
        .await?
        .success()?;
    let is_archive = [".tar.gz", ".tgz", ".tar"].iter().any(|s| url.ends_with(s));
    if !is_archive {
        let k = dir.join("kernel");
        std::fs::write(&k, &answer.body).context("saving the kernel")?;
        return Ok(k);
    }
    let archive = dir.join("kernel.tar.gz");
    std::fs::write(&archive, &answer.body).context("saving the kernel archive")?;
    let status = tokio::process::Command::new("tar")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(dir)
        .status()
        .await
        .context("running tar")?;
    if !status.success() {
        bail!("unpacking {url} failed");
    }
    find_kernel_file(dir).ok_or_else(|| anyhow!("no kernel found in {url}"))
}

/// A file named like a kernel, else the largest regular file (not the archive).
fn find_kernel_file(dir: &Path) -> Option<PathBuf> {
    let mut best: Option<(u64, PathBuf)> = None;
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().to_string();
        if !p.is_file() || name.starts_with("kernel.tar") {
            continue;
        }
        if name == "kernel" || name.ends_with("_kvm-x86_64") || name.ends_with(".kernel") {
            return Some(p);
        }
        let size = e.metadata().map(|m| m.len()).unwrap_or(0);
        if best.as_ref().is_none_or(|(s, _)| size > *s) {
            best = Some((size, p));
        }
    }
    best.map(|(_, p)| p)
}

fn spawn_qemu(req: &DeployRequest, kernel: &Path, in_netns: bool, log: &Path) -> Result<RunningVm> {
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let logf2 = logf.try_clone().context("duplicating the log file")?;
    let mut cmd = if in_netns {
        let mut c = tokio::process::Command::new("ip");
        c.args(["netns", "exec", &req.task_id(), qemu_binary()]);
        c
    } else {
        tokio::process::Command::new(qemu_binary())
    };
    let mem = req.memory_mib.max(64);
    let cpus = (req.vcpus.ceil() as u64).max(1);
    cmd.arg("-kernel")
        .arg(kernel)
        .args(["-m", &format!("{mem}M"), "-smp", &cpus.to_string()])
        .args([
            "-nographic",
            "-nodefaults",
            "-serial",
            "stdio",
            "-no-reboot",
        ]);
    if Path::new("/dev/kvm").exists() {
        cmd.args(["-enable-kvm", "-cpu", "host"]);
    }
    if in_netns {
        cmd.args([
            "-netdev",
            &format!("tap,id=n0,ifname={TAP_NAME},script=no,downscript=no"),
            "-device",
            "virtio-net-pci,netdev=n0",
        ]);
    }
    if !req.cmd.is_empty() {
        cmd.arg("-append").arg(req.cmd.join(" "));
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(logf)
        .stderr(logf2)
        .kill_on_drop(true)
        .spawn()
        .context("starting qemu")?;
    let (kill_tx, kill_rx) = oneshot::channel::<()>();
    let (exit_tx, exit_rx) = oneshot::channel();
    tokio::spawn(async move {
        let code = tokio::select! {
            st = child.wait() => st.ok().and_then(|s| s.code()),
            _ = kill_rx => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                None
            }
        };
        let _ = exit_tx.send(code);
    });
    Ok(RunningVm {
        kill: kill_tx,
        exit: exit_rx,
    })
}
