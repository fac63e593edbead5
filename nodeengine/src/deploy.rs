//! Deployments: turns `control/deploy` and `control/delete` into running or removed
//! instances, watches them, and reports their status (docs/contract.md §1.5).
//!
//! Each instance (task id `<job_name>.instance.<n>`) has its own async lock, so a
//! delete that arrives while the deploy is still pulling waits for it, and an exit
//! racing with a delete is reported once. Control messages for one instance
//! queue in arrival order in a bounded queue; queues and locks are dropped as
//! soon as nothing uses them, so a stream of distinct job names cannot grow
//! the daemon's memory.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tokio::sync::{mpsc, oneshot};

use crate::app_logs::AppLogs;
use crate::cgroup_stats;
use crate::config::LocalPolicy;
use crate::containerd_runtime::{
    self, ContainerdRuntime, LABEL_INSTANCE, LABEL_JOB, LABEL_ONE_SHOT, LABEL_VIRT, NewContainer,
    RuntimeChoice,
};
use crate::csi::VolumeManager;
use crate::image_user::{self, ProcessUser};
use crate::job::{
    self, DeleteRequest, DeployRequest, JobStatus, ResourcesReport, ServiceResources, StatusReport,
};
use crate::metrics::{Metrics, Outcome, Report};
use crate::netmanager_client::{self, NetManagerClient, UndeployRequest};
use crate::node_report::NodeIp;
use crate::oci_spec::{self, HostDevice, SpecInput};
use crate::runtimes::{Placement, Runtimes};
use crate::unikernel::UnikernelRuntime;
use crate::{gpu, node_report, resolv_conf};

/// Grace period between SIGTERM and SIGKILL when removing an instance.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How much of an application log the resources report carries.
const LOG_TAIL: u64 = 1024;
/// Control messages one instance may have waiting; the cluster sends one
/// deploy and one delete per instance, so more is a misbehaving peer.
const QUEUE_DEPTH: usize = 16;
/// Instances that may have control messages waiting at once.
const MAX_QUEUES: usize = 4096;
/// Status reports waiting for the MQTT session.
const STATUS_QUEUE: usize = 4096;

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
    pub app_logs: AppLogs,
    pub runtimes: Runtimes,
    pub policy: LocalPolicy,
    /// Where the daemon keeps its own files (the fallback resolv.conf).
    pub state_dir: PathBuf,
    /// The node's current `ip`, reported as `publicip` in status messages.
    pub node_ip: NodeIp,
    /// Deploy outcomes and latency, lost status reports.
    pub metrics: Metrics,
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
    queues: Mutex<HashMap<String, mpsc::Sender<Control>>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    status_tx: mpsc::Sender<StatusReport>,
}

/// Why the node's local policy refuses a job (the FAILED report's detail).
#[derive(Debug, thiserror::Error)]
#[error(
    "privileged jobs are refused by this node's local policy \
     (local_policy.allow_privileged in the node's conf.json; \
     `NodeEngine config policy privileged allow`)"
)]
pub struct PrivilegedRefused;

/// Sizes of the engine's bookkeeping, for tests and `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bookkeeping {
    pub instances: usize,
    pub queues: usize,
    pub locks: usize,
}

/// Where a container deploy's time went, step by step, for the log line
/// that says it runs (deploy -> CREATED is a measured goal,
/// docs/performance.md).
struct Steps {
    at: Instant,
    took: Vec<(&'static str, Duration)>,
}

impl Steps {
    fn new() -> Steps {
        Steps {
            at: Instant::now(),
            took: Vec::new(),
        }
    }

    fn done(&mut self, step: &'static str) {
        let now = Instant::now();
        self.took.push((step, now - self.at));
        self.at = now;
    }
}

impl std::fmt::Display for Steps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let total: Duration = self.took.iter().map(|(_, d)| *d).sum();
        write!(f, "{:.1} ms (", total.as_secs_f64() * 1e3)?;
        for (i, (step, d)) in self.took.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{step} {:.1}", d.as_secs_f64() * 1e3)?;
        }
        write!(f, ")")
    }
}

/// Runs blocking file work on tokio's blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| anyhow!("blocking task failed: {e}"))
}

impl Engine {
    /// Returns the engine and the stream of status reports to publish.
    pub fn new(s: EngineSettings) -> (Arc<Engine>, mpsc::Receiver<StatusReport>) {
        let (status_tx, rx) = mpsc::channel(STATUS_QUEUE);
        let engine = Engine {
            s,
            instances: Mutex::new(HashMap::new()),
            queues: Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
            status_tx,
        };
        (Arc::new(engine), rx)
    }

    fn instances(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instance>> {
        // A panic while holding this lock would be a bug; the data stays usable.
        self.instances.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn locks(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<tokio::sync::Mutex<()>>>> {
        self.locks.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn queues(&self) -> std::sync::MutexGuard<'_, HashMap<String, mpsc::Sender<Control>>> {
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_for(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks().entry(id.to_string()).or_default().clone()
    }

    /// Forgets the lock of `id` when nobody holds or waits for it (the map's
    /// own reference is the only one left).
    fn release_lock(&self, id: &str) {
        let mut locks = self.locks();
        if locks.get(id).is_some_and(|l| Arc::strong_count(l) == 1) {
            locks.remove(id);
        }
    }

    pub fn bookkeeping(&self) -> Bookkeeping {
        Bookkeeping {
            instances: self.instances().len(),
            queues: self.queues().len(),
            locks: self.locks().len(),
        }
    }

    fn report(&self, job_name: &str, instance: u32, status: JobStatus, detail: String) {
        let report = StatusReport {
            sname: job_name.to_string(),
            status,
            status_detail: detail,
            instance,
            publicip: self.s.node_ip.get(),
        };
        tracing::info!(job = job_name, instance, status = ?status, detail = %report.status_detail, "status");
        if let Err(e) = self.status_tx.try_send(report) {
            self.s.metrics.publish_failed(Report::Status);
            tracing::error!(job = job_name, instance, "status report lost: {e}");
        }
    }

    pub fn instance_count(&self) -> usize {
        self.instances().len()
    }

    /// Running instances by the virtualization their job asked for (the
    /// `running_instances` metric). Only names a runtime accepted appear:
    /// a request for an unknown one never becomes an instance.
    pub fn running_by_virtualization(&self) -> BTreeMap<String, u64> {
        let mut by = BTreeMap::new();
        for i in self.instances().values() {
            *by.entry(i.virtualization.clone()).or_default() += 1;
        }
        by
    }

    /// Queues a control message; returns at once.
    pub fn submit(self: &Arc<Self>, c: Control) {
        let payload = match &c {
            Control::Deploy(p) | Control::Delete(p) => p,
        };
        let Some((job_name, instance)) = job::identify(payload) else {
            // Not addressable to an instance: only a log line comes of it.
            let what = match &c {
                Control::Deploy(p) => job::parse_deploy(p).err(),
                Control::Delete(p) => job::parse_delete(p).err(),
            };
            if let Some(e) = what {
                tracing::warn!("ignoring control message: {e}");
            }
            return;
        };
        let key = job::task_id(&job_name, instance);
        let mut queues = self.queues();
        let c = match queues.get(&key) {
            None => c,
            Some(tx) => match tx.try_send(c) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(c)) => {
                    drop(queues);
                    return self.refuse(
                        c,
                        &job_name,
                        instance,
                        "too many control messages waiting",
                    );
                }
                // The worker just ended: start a new one.
                Err(mpsc::error::TrySendError::Closed(c)) => c,
            },
        };
        if queues.len() >= MAX_QUEUES {
            drop(queues);
            return self.refuse(
                c,
                &job_name,
                instance,
                "too many instances with control messages waiting",
            );
        }
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        // A fresh channel has room.
        let _ = tx.try_send(c);
        queues.insert(key.clone(), tx);
        let engine = self.clone();
        tokio::spawn(async move { engine.queue_worker(key, rx).await });
    }

    /// A control message that does not fit: a deploy is answered FAILED so
    /// the cluster places the instance elsewhere; a delete is logged.
    fn refuse(&self, c: Control, job_name: &str, instance: u32, why: &str) {
        match c {
            Control::Deploy(_) => self.report(job_name, instance, JobStatus::Failed, why.into()),
            Control::Delete(_) => {
                tracing::error!(job = job_name, instance, "delete dropped: {why}")
            }
        }
    }

    async fn queue_worker(self: Arc<Self>, key: String, mut rx: mpsc::Receiver<Control>) {
        loop {
            match tokio::time::timeout(QUEUE_IDLE, rx.recv()).await {
                Ok(Some(c)) => self.handle(c).await,
                Ok(None) => return,
                Err(_) => {
                    let mut queues = self.queues();
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
                self.s.metrics.deploy(Outcome::Failed, None);
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
        let guard = lock.lock().await;
        self.deploy_locked(&req, &id).await;
        drop(guard);
        drop(lock);
        self.release_lock(&id);
    }

    async fn deploy_locked(self: &Arc<Self>, req: &DeployRequest, id: &str) {
        if self.instances().contains_key(id) {
            // MQTT QoS 1 may deliver a deploy twice; upstream's FAILED here
            // would make the cluster replace a healthy instance.
            tracing::warn!(id, "deploy for an instance that already runs here; ignored");
            self.s.metrics.deploy(Outcome::Duplicate, None);
            return;
        }
        let began = Instant::now();
        let result = self.deploy(req).await;
        let outcome = if result.is_ok() {
            Outcome::Created
        } else {
            Outcome::Failed
        };
        self.s
            .metrics
            .deploy(outcome, Some(began.elapsed().as_secs_f64()));
        match result {
            Ok(started) => {
                self.instances().insert(
                    id.to_string(),
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
                    self.spawn_vm_waiter(id.to_string(), exit);
                } else {
                    self.spawn_container_waiter(id.to_string());
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
        // The node's own policy first: no job document can change it.
        if req.privileged && !self.s.policy.allow_privileged {
            return Err(PrivilegedRefused.into());
        }
        match self.s.runtimes.place(&req.virtualization)? {
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
                let log = self.create_log(&req.task_id()).await?;
                let vm = uk.start(req, self.s.netmanager.as_ref(), &log).await?;
                Ok(Started {
                    kind: Kind::Unikernel,
                    vm_exit: Some(vm.exit),
                })
            }
        }
    }

    /// A new, empty application log for the instance.
    async fn create_log(&self, id: &str) -> Result<PathBuf> {
        let logs = self.s.app_logs.clone();
        let id = id.to_string();
        blocking(move || logs.create(&id)).await?
    }

    fn containerd(&self) -> Result<&ContainerdRuntime> {
        self.s
            .containerd
            .as_ref()
            .ok_or_else(|| anyhow!("the containerd runtime is not active on this node"))
    }

    /// What a job's spec needs from the host besides the job: the resolver
    /// file, the privileged device and the GPU hook (all blocking work).
    async fn host_parts(&self, req: &DeployRequest) -> Result<HostParts> {
        let state_dir = self.s.state_dir.clone();
        let (privileged, vgpus) = (req.privileged, req.vgpus);
        blocking(move || -> Result<HostParts> {
            let resolv_conf = resolv_conf::resolver_file(&state_dir)?;
            let devices = if privileged {
                vec![
                    HostDevice::from_host(oci_spec::PRIVILEGED_DEVICE)
                        .context("the privileged job's device")?,
                ]
            } else {
                Vec::new()
            };
            let hooks = if vgpus > 0 {
                vec![gpu::hook_for(vgpus)?]
            } else {
                Vec::new()
            };
            Ok(HostParts {
                resolv_conf,
                devices,
                hooks,
            })
        })
        .await?
    }

    async fn deploy_container(&self, req: &DeployRequest, runtime: &RuntimeChoice) -> Result<()> {
        let rt = self.containerd()?;
        let id = req.task_id();
        let mut steps = Steps::new();
        let host = self.host_parts(req).await?;
        steps.done("host");
        let platform = containerd_runtime::platform_of(&req.platform);
        let image = rt.ensure_image(&req.image, &platform).await?;
        steps.done("image");
        // Before the container exists: runc binds the published volumes when it
        // creates the container's mount namespace.
        let mounted = self.s.volumes.mount_all(&id, &req.volumes).await?;
        let spec_for = |user: &ProcessUser| {
            let mut spec = oci_spec::build_spec(&SpecInput {
                namespace: &rt.settings().namespace,
                id: &id,
                instance: req.instance,
                image: &image.defaults,
                cmd: &req.cmd,
                environment: &req.environment,
                vcpus: req.vcpus,
                memory_mib: req.memory_mib,
                user,
                resolv_conf: &host.resolv_conf,
                devices: &host.devices,
                prestart_hooks: &host.hooks,
            });
            crate::csi::volumes::add_to_spec(&mut spec, &mounted);
            spec
        };
        let log = match self.create_log(&id).await {
            Ok(l) => l,
            Err(e) => {
                self.s.volumes.release(&id).await;
                return Err(e);
            }
        };
        let labels = HashMap::from([
            (LABEL_JOB.to_string(), req.job_name.clone()),
            (LABEL_INSTANCE.to_string(), req.instance.to_string()),
            (LABEL_VIRT.to_string(), req.virtualization.clone()),
            (LABEL_ONE_SHOT.to_string(), req.one_shot.to_string()),
        ]);
        let root = ProcessUser::default();
        steps.done("volumes+log");
        let rootfs = match rt
            .create_container(NewContainer {
                id: &id,
                image: &image,
                spec: spec_for(&root),
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
        steps.done("container+snapshot");
        let mut net_attached = false;
        let result = async {
            // The image's USER is resolved in the image's own files.
            let user_name = image.defaults.user.clone();
            let mounts = rootfs.clone();
            let user =
                blocking(move || image_user::resolve_in_rootfs(&user_name, &mounts)).await??;
            if user != root {
                rt.update_spec(&id, &spec_for(&user)).await?;
            }
            steps.done("user");
            self.start_container(req, rt, rootfs, &log, &mut net_attached, &mut steps)
                .await
        }
        .await;
        if result.is_ok() {
            tracing::info!(id, took = %steps, "container running");
        }
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
        steps: &mut Steps,
    ) -> Result<()> {
        let id = req.task_id();
        let pid = rt.create_task(&id, rootfs, log).await?;
        steps.done("task");
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
            steps.done("network");
            tracing::info!(id, address = %answer.ns_address, "network attached");
        }
        rt.start_task(&id).await?;
        steps.done("start");
        Ok(())
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
        let guard = lock.lock().await;
        let removed = self.instances().remove(id);
        if let Some(inst) = removed {
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
        drop(guard);
        drop(lock);
        self.release_lock(id);
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
        let guard = lock.lock().await;
        let removed = self.instances().remove(&id);
        match removed {
            Some(inst) => {
                self.teardown(&id, inst).await;
                self.report(
                    &req.job_name,
                    req.instance,
                    JobStatus::Undeployed,
                    String::new(),
                );
            }
            None => tracing::info!(
                id,
                "delete for an instance this node does not run; nothing to do"
            ),
        }
        drop(guard);
        drop(lock);
        self.release_lock(&id);
    }

    // ------------------------------------------------------- reconcile & report

    /// At daemon start: with `adopt`, running containers of ours are adopted
    /// (the cluster still counts them: the last report went out within its
    /// window); otherwise, and for anything stopped or unrecognised, they are
    /// removed, as upstream removes everything at every start, because the
    /// cluster has marked them FAILED and placed replacements elsewhere.
    pub async fn reconcile(self: &Arc<Self>, adopt: bool) -> Result<()> {
        let rt = self.containerd()?;
        for c in rt.list_ours().await? {
            let label = |k: &str| c.labels.get(k).cloned().unwrap_or_default();
            let parsed = job::parse_task_id(&c.id).filter(|(job, n)| {
                *job == label(LABEL_JOB) && n.to_string() == label(LABEL_INSTANCE)
            });
            match (parsed, c.running_pid) {
                (Some((job_name, instance)), Some(pid)) if adopt => {
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
                (parsed, pid) => {
                    if pid.is_some() {
                        tracing::warn!(id = %c.id, "removing an instance the cluster has replaced by now");
                    } else {
                        tracing::info!(id = %c.id, "removing stopped or unrecognised instance");
                    }
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

    /// The `jobs/resources` document for all current instances, with the
    /// values upstream computes: CPU in percent of the whole machine,
    /// `memory_percent` as used bytes over the node's available memory (a
    /// fraction, despite the name), both with `%f`'s six decimals.
    pub async fn resources(&self) -> ResourcesReport {
        let ns = self
            .s
            .containerd
            .as_ref()
            .map(|r| r.settings().namespace.clone())
            .unwrap_or_default();
        let ids: Vec<(String, Kind)> = self
            .instances()
            .iter()
            .map(|(id, i)| (id.clone(), i.kind))
            .collect();
        let mut disks = HashMap::new();
        for (id, kind) in &ids {
            if let (Kind::Container, Some(rt)) = (kind, &self.s.containerd) {
                disks.insert(id.clone(), rt.disk_usage(id).await.unwrap_or(0));
            }
        }
        // cgroup files and logs are read on the blocking pool.
        let logs = self.s.app_logs.clone();
        let sampled = blocking(move || {
            let node = node_report::MemoryFigures::read();
            let per_instance: Vec<_> = ids
                .into_iter()
                .map(|(id, kind)| {
                    let reading = (kind == Kind::Container)
                        .then(|| cgroup_stats::read(&format!("/{ns}/{id}")))
                        .flatten();
                    logs.enforce_cap(&id);
                    let tail = logs.tail(&id, LOG_TAIL);
                    (id, reading, tail)
                })
                .collect();
            (node, per_instance)
        })
        .await;
        let Ok((node, per_instance)) = sampled else {
            return ResourcesReport::default();
        };
        let cores = node_report::cpu_count();
        let available = node.map(|m| m.available_mib()).unwrap_or(0);
        let mut services = Vec::new();
        let mut instances = self.instances();
        for (id, reading, logs) in per_instance {
            let Some(inst) = instances.get_mut(&id) else {
                continue;
            };
            let (cpu, mem) = match reading {
                Some(r) => {
                    let cpu = inst
                        .last_cpu
                        .map(|prev| cgroup_stats::cpu_percent(&prev, &r, cores))
                        .unwrap_or(0.0);
                    inst.last_cpu = Some(r);
                    (cpu, cgroup_stats::memory_share(&r, available))
                }
                None => (0.0, 0.0),
            };
            services.push(ServiceResources {
                cpu_percent: format!("{cpu:.6}"),
                memory_percent: format!("{mem:.6}"),
                disk: disks.get(&id).copied().unwrap_or(0).to_string(),
                logs,
                job_name: inst.job_name.clone(),
                virtualization: inst.virtualization.clone(),
                instance: inst.instance,
            });
        }
        ResourcesReport { services }
    }
}

/// Host pieces of a job's spec.
struct HostParts {
    resolv_conf: PathBuf,
    devices: Vec<HostDevice>,
    hooks: Vec<serde_json::Value>,
}

struct Started {
    kind: Kind,
    vm_exit: Option<oneshot::Receiver<Option<i32>>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn engine(
        policy: LocalPolicy,
    ) -> (Arc<Engine>, mpsc::Receiver<StatusReport>, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = Config {
            local_policy: policy.clone(),
            ..Config::default()
        };
        let (engine, rx) = Engine::new(EngineSettings {
            containerd: None,
            unikernel: None,
            netmanager: None,
            volumes: VolumeManager::new(crate::csi::Registry::new(&[]), dir.path().join("csi")),
            app_logs: AppLogs::open(dir.path(), crate::app_logs::DEFAULT_MAX_BYTES).expect("logs"),
            runtimes: Runtimes::new(&cfg, &dir.path().join("no-containerd.toml")),
            policy,
            state_dir: dir.path().to_path_buf(),
            node_ip: NodeIp::default(),
            metrics: Metrics::default(),
        });
        (engine, rx, dir)
    }

    fn job(name: &str, extra: &str) -> bytes::Bytes {
        bytes::Bytes::from(format!(
            r#"{{"job_name":"{name}","instance_number":0,"image":"x"{extra}}}"#
        ))
    }

    #[tokio::test]
    async fn privileged_jobs_are_refused_by_the_local_policy() {
        let (engine, mut rx, _dir) = engine(LocalPolicy::default());
        engine
            .handle_deploy(&job("a.b.c.d", r#","privileged":true"#))
            .await;
        let r = rx.recv().await.expect("report");
        assert_eq!(r.status, JobStatus::Failed);
        assert!(
            r.status_detail.contains("local_policy.allow_privileged"),
            "{}",
            r.status_detail
        );
    }

    #[tokio::test]
    async fn locks_and_queues_are_dropped_when_done() {
        let (engine, mut rx, _dir) = engine(LocalPolicy::default());
        for i in 0..50 {
            engine.submit(Control::Deploy(job(
                &format!("a.b.c.d{i}"),
                r#","virtualization":"no-such-runtime""#,
            )));
            engine.submit(Control::Delete(job(&format!("a.b.c.d{i}"), "")));
        }
        for _ in 0..50 {
            let r = rx.recv().await.expect("report");
            assert_eq!(r.status, JobStatus::Failed);
        }
        // The deletes of instances that never ran leave nothing behind either.
        let settled = async {
            while engine.bookkeeping().locks != 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), settled)
            .await
            .expect("locks released");
        assert_eq!(engine.bookkeeping().instances, 0);
    }

    #[tokio::test]
    async fn a_flood_for_one_instance_is_bounded() {
        let (engine, mut rx, _dir) = engine(LocalPolicy::default());
        // Hold the instance's lock so nothing drains its queue.
        let lock = engine.lock_for("a.b.c.d.instance.0");
        let guard = lock.lock().await;
        for _ in 0..(QUEUE_DEPTH + 10) {
            engine.submit(Control::Deploy(job("a.b.c.d", "")));
        }
        assert_eq!(engine.bookkeeping().queues, 1);
        // What did not fit is answered at once: FAILED, with the reason.
        let r = rx.recv().await.expect("report");
        assert_eq!(r.status, JobStatus::Failed);
        assert!(r.status_detail.contains("too many"), "{}", r.status_detail);
        drop(guard);
    }
}
