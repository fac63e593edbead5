//! Deployments: turns `control/deploy` and `control/delete` into running or removed
//! instances, watches them, and reports their status (contract 1.5).
//!
//! Each instance (task id `<job_name>.instance.<n>`) has its own async lock, so a
//! delete that arrives while the deploy is still pulling waits for it, and an exit
//! racing with a delete is reported once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tokio::sync::{mpsc, oneshot};

use crate::cgroup_stats;
use crate::config::{RUNTIME_CONTAINER, RUNTIME_UNIKERNEL};
use crate::containerd_runtime::{
    self, ContainerdRuntime, LABEL_INSTANCE, LABEL_JOB, LABEL_ONE_SHOT, LABEL_VIRT, NewContainer,
};
use crate::csi::VolumeManager;
use crate::job::{
    self, DeleteRequest, DeployRequest, JobStatus, ResourcesReport, ServiceResources, StatusReport,
};
use crate::netmanager_client::{self, NetManagerClient, UndeployRequest};
use crate::oci_spec::{self, SpecInput};
use crate::unikernel::UnikernelRuntime;

/// Grace period between SIGTERM and SIGKILL when removing an instance.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How much of an application log the resources report carries.
const LOG_TAIL: u64 = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Container,
    Unikernel,
}

struct Instance {
    job_name: String,
    instance: u32,
    virtualization: String,
    one_shot: bool,
    kind: Kind,
    last_cpu: Option<cgroup_stats::Reading>,
}

/// Wiring the engine needs from the daemon.
pub struct EngineSettings {
    pub containerd: Option<ContainerdRuntime>,
    pub unikernel: Option<UnikernelRuntime>,
    pub netmanager: Option<NetManagerClient>,
    /// Mounts jobs' CSI volumes.
    pub volumes: VolumeManager,
    pub app_logs: PathBuf,
    /// Reported as `publicip` in status messages.
    pub node_ip: String,
}

/// A control message from the cluster.
pub enum Control {
    Deploy(bytes::Bytes),
    Delete(bytes::Bytes),
}

/// How long an idle per-instance queue worker lingers.
const QUEUE_IDLE: Duration = Duration::from_secs(60);

pub struct Engine {
    s: EngineSettings,
    instances: Mutex<HashMap<String, Instance>>,
    /// Control messages for one instance are handled in arrival order (a deploy
    /// followed by a delete must not be swapped); different instances in parallel.
    queues: Mutex<HashMap<String, mpsc::UnboundedSender<Control>>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    status_tx: mpsc::UnboundedSender<StatusReport>,
    machine_memory: u64,
}

/// How a virtualization name maps onto our runtimes.
#[derive(Debug, PartialEq)]
enum Placement {
    Containerd(String),
    Unikernel,
}

fn placement(virtualization: &str) -> Result<Placement> {
    match virtualization.trim() {
        "" | RUNTIME_CONTAINER | "containerd" => Ok(Placement::Containerd(
            containerd_runtime::RUNC_RUNTIME.to_string(),
        )),
        RUNTIME_UNIKERNEL => Ok(Placement::Unikernel),
        other if other.starts_with("io.containerd.") && other.len() < 100 => {
            Ok(Placement::Containerd(other.to_string()))
        }
        other => bail!("unknown virtualization {other:?}"),
    }
}

/// Last `LOG_TAIL` bytes of the application log (lossy UTF-8).
fn log_tail(path: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if f.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL)))
        .is_err()
    {
        return String::new();
    }
    let mut buf = Vec::with_capacity(LOG_TAIL as usize);
    let _ = f.take(LOG_TAIL).read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

impl Engine {
    /// Returns the engine and the stream of status reports to publish.
    pub fn new(s: EngineSettings) -> (Arc<Engine>, mpsc::UnboundedReceiver<StatusReport>) {
        let (status_tx, rx) = mpsc::unbounded_channel();
        let machine_memory = sysinfo::System::new()
            .map(|mut sys| {
                sys.refresh_memory();
                sys.total_memory()
            })
            .unwrap_or(0);
        let engine = Engine {
            s,
            instances: Mutex::new(HashMap::new()),
            queues: Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
            status_tx,
            machine_memory,
        };
        (Arc::new(engine), rx)
    }

    fn instances(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instance>> {
        // A panic while holding this lock would be a bug; the data stays usable.
        self.instances.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_for(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(id.to_string()).or_default().clone()
    }

    fn report(&self, job_name: &str, instance: u32, status: JobStatus, detail: String) {
        let report = StatusReport {
            sname: job_name.to_string(),
            status,
            status_detail: detail,
            instance,
            publicip: self.s.node_ip.clone(),
        };
        tracing::info!(job = job_name, instance, status = ?status, detail = %report.status_detail, "status");
        let _ = self.status_tx.send(report);
    }

    pub fn instance_count(&self) -> usize {
        self.instances().len()
    }

    /// Queues a control message; returns at once.
    pub fn submit(self: &Arc<Self>, c: Control) {
        let payload = match &c {
            Control::Deploy(p) | Control::Delete(p) => p,
        };
        let Some((job_name, instance)) = job::identify(payload) else {
            // Not addressable to an instance: only a log line will come of it.
            let engine = self.clone();
            tokio::spawn(async move { engine.handle(c).await });
            return;
        };
        let key = job::task_id(&job_name, instance);
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        let c = match queues.get(&key) {
            Some(tx) => match tx.send(c) {
                Ok(()) => return,
                Err(mpsc::error::SendError(c)) => c,
            },
            None => c,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(c);
        queues.insert(key.clone(), tx);
        let engine = self.clone();
        tokio::spawn(async move { engine.queue_worker(key, rx).await });
    }

    async fn queue_worker(self: Arc<Self>, key: String, mut rx: mpsc::UnboundedReceiver<Control>) {
        loop {
            match tokio::time::timeout(QUEUE_IDLE, rx.recv()).await {
                Ok(Some(c)) => self.handle(c).await,
                Ok(None) => return,
                Err(_) => {
                    let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
                    if rx.is_empty() {
                        queues.remove(&key);
                        return;
                    }
                }
            }
        }
    }

    async fn handle(self: &Arc<Self>, c: Control) {
        match c {
            Control::Deploy(p) => self.handle_deploy(&p).await,
            Control::Delete(p) => self.handle_delete(&p).await,
        }
    }

    // ------------------------------------------------------------------ deploy

    /// Handles one `control/deploy` payload. Never panics on peer input: a payload
    /// that names an instance gets a FAILED report, anything else a log line.
    pub async fn handle_deploy(self: &Arc<Self>, payload: &[u8]) {
        let req = match job::parse_deploy(payload) {
            Ok(r) => r,
            Err(e) => {
                match job::identify(payload) {
                    Some((name, n)) => {
                        self.report(&name, n, JobStatus::Failed, format!("invalid job: {e}"))
                    }
                    None => tracing::warn!("ignoring deploy request: {e}"),
                }
                return;
            }
        };
        let id = req.task_id();
        let lock = self.lock_for(&id);
        let _guard = lock.lock().await;
        if self.instances().contains_key(&id) {
            tracing::warn!(id, "deploy for an instance that already runs here; ignored");
            return;
        }
        match self.deploy(&req).await {
            Ok(started) => {
                self.instances().insert(
                    id.clone(),
                    Instance {
                        job_name: req.job_name.clone(),
                        instance: req.instance,
                        virtualization: req.virtualization.clone(),
                        one_shot: req.one_shot,
                        kind: started.kind,
                        last_cpu: None,
                    },
                );
                self.report(
                    &req.job_name,
                    req.instance,
                    JobStatus::Created,
                    String::new(),
                );
                if let Some(exit) = started.vm_exit {
                    self.spawn_vm_waiter(id, exit);
                } else {
                    self.spawn_container_waiter(id);
                }
            }
            Err(e) => self.report(
                &req.job_name,
                req.instance,
                JobStatus::Failed,
                format!("{e:#}"),
            ),
        }
    }

    async fn deploy(&self, req: &DeployRequest) -> Result<Started> {
        match placement(&req.virtualization)? {
            Placement::Containerd(runtime) => {
                self.deploy_container(req, &runtime).await?;
                Ok(Started {
                    kind: Kind::Container,
                    vm_exit: None,
                })
            }
            Placement::Unikernel => {
                if !req.volumes.is_empty() {
                    bail!("CSI volumes are supported for containers only, not for unikernels");
                }
                let uk = self.s.unikernel.as_ref().ok_or_else(|| {
                    anyhow!(
                        "the unikernel runtime is not enabled on this node \
                         (NodeEngine config virtualization unikernel on)"
                    )
                })?;
                let log = self.log_path(&req.task_id())?;
                let vm = uk.start(req, self.s.netmanager.as_ref(), &log).await?;
                Ok(Started {
                    kind: Kind::Unikernel,
                    vm_exit: Some(vm.exit),
                })
            }
        }
    }

    fn log_path(&self, id: &str) -> Result<PathBuf> {
        std::fs::create_dir_all(&self.s.app_logs).with_context(|| {
            format!(
                "creating the app log directory {}",
                self.s.app_logs.display()
            )
        })?;
        Ok(self.s.app_logs.join(id))
    }

    fn containerd(&self) -> Result<&ContainerdRuntime> {
        self.s
            .containerd
            .as_ref()
            .ok_or_else(|| anyhow!("the containerd runtime is not active on this node"))
    }

    async fn deploy_container(&self, req: &DeployRequest, runtime: &str) -> Result<()> {
        let rt = self.containerd()?;
        let id = req.task_id();
        let platform = containerd_runtime::platform_of(&req.platform);
        let image = rt.ensure_image(&req.image, &platform).await?;
        if !image.defaults.user.is_empty() && oci_spec::parse_user(&image.defaults.user).is_none() {
            tracing::warn!(id, user = %image.defaults.user, "non-numeric image user; running as root");
        }
        let mut spec = oci_spec::build_spec(&SpecInput {
            namespace: &rt.settings().namespace,
            id: &id,
            instance: req.instance,
            image: &image.defaults,
            cmd: &req.cmd,
            environment: &req.environment,
            vcpus: req.vcpus,
            memory_mib: req.memory_mib,
            privileged: req.privileged,
            host_network: self.s.netmanager.is_none(),
        });
        let log = self.log_path(&id)?;
        // Before the container exists: runc binds the published volumes when it
        // creates the container's mount namespace.
        let mounted = self.s.volumes.mount_all(&id, &req.volumes).await?;
        crate::csi::volumes::add_to_spec(&mut spec, &mounted);
        let labels = HashMap::from([
            (LABEL_JOB.to_string(), req.job_name.clone()),
            (LABEL_INSTANCE.to_string(), req.instance.to_string()),
            (LABEL_VIRT.to_string(), req.virtualization.clone()),
            (LABEL_ONE_SHOT.to_string(), req.one_shot.to_string()),
        ]);
        let rootfs = match rt
            .create_container(NewContainer {
                id: &id,
                image: &image,
                spec,
                runtime,
                labels,
            })
            .await
        {
            Ok(r) => r,
            Err(e) => {
                self.s.volumes.release(&id).await;
                return Err(e);
            }
        };
        let mut net_attached = false;
        let result = self
            .start_container(req, rt, rootfs, &log, &mut net_attached)
            .await;
        if result.is_err() {
            // Leave nothing half-made behind: the cluster will retry elsewhere.
            if net_attached {
                self.detach_network(&req.job_name, req.instance, Kind::Container)
                    .await;
            }
            if let Err(e) = rt.remove(&id, Duration::from_secs(1)).await {
                tracing::warn!(id, "cleanup after failed deploy: {e:#}");
            }
            self.s.volumes.release(&id).await;
        }
        result
    }

    async fn start_container(
        &self,
        req: &DeployRequest,
        rt: &ContainerdRuntime,
        rootfs: Vec<containerd_client::types::Mount>,
        log: &Path,
        net_attached: &mut bool,
    ) -> Result<()> {
        let id = req.task_id();
        let pid = rt.create_task(&id, rootfs, log).await?;
        // The address must exist before the process runs: attach between create and start.
        if let Some(net) = &self.s.netmanager {
            let answer = net
                .deploy_container(&netmanager_client::DeployRequest {
                    pid,
                    service_name: req.job_name.clone(),
                    instance_number: req.instance,
                    port_mappings: req.port.clone(),
                })
                .await
                .context("attaching the overlay network")?;
            *net_attached = true;
            tracing::info!(id, address = %answer.ns_address, "network attached");
        }
        rt.start_task(&id).await
    }

    async fn detach_network(&self, job_name: &str, instance: u32, kind: Kind) {
        let Some(net) = &self.s.netmanager else {
            return;
        };
        let body = UndeployRequest {
            service_name: job_name.to_string(),
            instance_number: instance,
        };
        let res = match kind {
            Kind::Container => net.undeploy_container(&body).await,
            Kind::Unikernel => net.undeploy_unikernel(&body).await,
        };
        if let Err(e) = res {
            tracing::warn!(job = job_name, instance, "network detach: {e:#}");
        }
    }

    // --------------------------------------------------------------- lifecycle

    fn spawn_container_waiter(self: &Arc<Self>, id: String) {
        let engine = self.clone();
        tokio::spawn(async move {
            let code = engine.wait_container_exit(&id).await;
            engine.on_exit(&id, code).await;
        });
    }

    /// Waits for the task to exit, riding out containerd restarts.
    async fn wait_container_exit(&self, id: &str) -> Option<u32> {
        let Ok(rt) = self.containerd() else {
            return None;
        };
        let mut delay = Duration::from_millis(500);
        loop {
            match rt.wait_task(id).await {
                Ok(code) => return Some(code),
                Err(s) if s.code() == containerd_client::tonic::Code::NotFound => return None,
                Err(s) => {
                    if !self.instances().contains_key(id) {
                        return None;
                    }
                    tracing::warn!(id, "waiting for task: {}; retrying", s.message());
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    fn spawn_vm_waiter(self: &Arc<Self>, id: String, exit: oneshot::Receiver<Option<i32>>) {
        let engine = self.clone();
        tokio::spawn(async move {
            let code = exit
                .await
                .ok()
                .flatten()
                .and_then(|c| u32::try_from(c).ok());
            engine.on_exit(&id, code).await;
        });
    }

    /// A natural exit: COMPLETED (exit 0 and one_shot) or DEAD, then cleanup.
    /// Does nothing when a delete already took the instance.
    async fn on_exit(self: &Arc<Self>, id: &str, code: Option<u32>) {
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        let Some(inst) = self.instances().remove(id) else {
            return;
        };
        let status = if code == Some(0) && inst.one_shot {
            JobStatus::Completed
        } else {
            JobStatus::Dead
        };
        let detail = match code {
            Some(c) => format!("exited with code {c}"),
            None => "exited (exit code unknown)".to_string(),
        };
        self.report(&inst.job_name, inst.instance, status, detail);
        self.teardown(id, inst).await;
    }

    async fn teardown(&self, id: &str, inst: Instance) {
        // The VM goes before its network namespace (QMP quit, as upstream).
        if inst.kind == Kind::Unikernel
            && let Some(uk) = &self.s.unikernel
        {
            uk.stop(id).await;
        }
        self.detach_network(&inst.job_name, inst.instance, inst.kind)
            .await;
        match inst.kind {
            Kind::Container => {
                if let Ok(rt) = self.containerd()
                    && let Err(e) = rt.remove(id, STOP_GRACE).await
                {
                    tracing::warn!(id, "removing container: {e:#}");
                }
            }
            Kind::Unikernel => {
                if let Some(uk) = &self.s.unikernel {
                    uk.cleanup(id);
                }
            }
        }
        // After the container is gone: nothing holds the volumes any more.
        self.s.volumes.release(id).await;
    }

    // ------------------------------------------------------------------ delete

    /// Handles one `control/delete` payload: exactly one UNDEPLOYED per instance
    /// that was ours.
    pub async fn handle_delete(self: &Arc<Self>, payload: &[u8]) {
        let req: DeleteRequest = match job::parse_delete(payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("ignoring delete request: {e}");
                return;
            }
        };
        let id = job::task_id(&req.job_name, req.instance);
        let lock = self.lock_for(&id);
        let _guard = lock.lock().await;
        let Some(inst) = self.instances().remove(&id) else {
            tracing::info!(
                id,
                "delete for an instance this node does not run; nothing to do"
            );
            return;
        };
        self.teardown(&id, inst).await;
        self.report(
            &req.job_name,
            req.instance,
            JobStatus::Undeployed,
            String::new(),
        );
    }

    // ------------------------------------------------------- reconcile & report

    /// Adopts our running containers and removes dead ones (daemon start).
    pub async fn reconcile(self: &Arc<Self>) -> Result<()> {
        let rt = self.containerd()?;
        for c in rt.list_ours().await? {
            let label = |k: &str| c.labels.get(k).cloned().unwrap_or_default();
            let parsed = job::parse_task_id(&c.id).filter(|(job, n)| {
                *job == label(LABEL_JOB) && n.to_string() == label(LABEL_INSTANCE)
            });
            match (parsed, c.running_pid) {
                (Some((job_name, instance)), Some(pid)) => {
                    tracing::info!(id = %c.id, pid, "adopting running instance");
                    self.instances().insert(
                        c.id.clone(),
                        Instance {
                            job_name,
                            instance,
                            virtualization: label(LABEL_VIRT),
                            one_shot: label(LABEL_ONE_SHOT) == "true",
                            kind: Kind::Container,
                            last_cpu: None,
                        },
                    );
                    self.spawn_container_waiter(c.id);
                }
                (parsed, _) => {
                    tracing::info!(id = %c.id, "removing stopped or unrecognised instance");
                    if let Some((job_name, instance)) = parsed {
                        self.detach_network(&job_name, instance, Kind::Container)
                            .await;
                    }
                    if let Err(e) = rt.remove(&c.id, Duration::from_secs(1)).await {
                        tracing::warn!(id = %c.id, "{e:#}");
                    }
                }
            }
        }
        Ok(())
    }

    /// Releases the CSI volumes of instances that no longer run here (daemon
    /// start, after [`Engine::reconcile`] adopted the running ones).
    pub async fn release_orphaned_volumes(&self) {
        self.s
            .volumes
            .sweep(|id| self.instances().contains_key(id))
            .await;
    }

    /// The `jobs/resources` document for all current instances.
    pub async fn resources(&self) -> ResourcesReport {
        let ns = self
            .s
            .containerd
            .as_ref()
            .map(|r| r.settings().namespace.clone())
            .unwrap_or_default();
        let mut services = Vec::new();
        let ids: Vec<(String, Kind)> = self
            .instances()
            .iter()
            .map(|(id, i)| (id.clone(), i.kind))
            .collect();
        for (id, kind) in ids {
            let disk = match (kind, &self.s.containerd) {
                (Kind::Container, Some(rt)) => rt.disk_usage(&id).await.unwrap_or(0),
                _ => 0,
            };
            let reading = (kind == Kind::Container)
                .then(|| cgroup_stats::read(&format!("/{ns}/{id}")))
                .flatten();
            let mut instances = self.instances();
            let Some(inst) = instances.get_mut(&id) else {
                continue;
            };
            let (cpu, mem) = match reading {
                Some(r) => {
                    let cpu = inst
                        .last_cpu
                        .map(|prev| cgroup_stats::cpu_percent(&prev, &r))
                        .unwrap_or(0.0);
                    inst.last_cpu = Some(r);
                    (cpu, cgroup_stats::memory_percent(&r, self.machine_memory))
                }
                None => (0.0, 0.0),
            };
            services.push(ServiceResources {
                cpu_percent: format!("{cpu:.2}"),
                memory_percent: format!("{mem:.2}"),
                disk: disk.to_string(),
                logs: log_tail(&self.s.app_logs.join(&id)),
                job_name: inst.job_name.clone(),
                virtualization: inst.virtualization.clone(),
                instance: inst.instance,
            });
        }
        ResourcesReport { services }
    }
}

struct Started {
    kind: Kind,
    vm_exit: Option<oneshot::Receiver<Option<i32>>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placements() {
        assert!(matches!(placement("docker"), Ok(Placement::Containerd(_))));
        assert_eq!(placement("unikernel").ok(), Some(Placement::Unikernel));
        assert_eq!(
            placement("io.containerd.runsc.v1").ok(),
            Some(Placement::Containerd("io.containerd.runsc.v1".into()))
        );
        assert!(placement("wasm").is_err());
    }
}
