//! The sandbox as a workbench: a user's own services, described as for
//! Oakestra (an upstream SLA), deployed on the sandbox's workers; listed,
//! scaled, their logs read and undeployed again. The cluster double does
//! the cluster's part (deploy documents, service addresses, table
//! answers); the workbench plays the scheduler and remembers what it
//! placed where. The control API (`control`) drives it from other shells.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use testkit::JobSpec;

use super::Sandbox;
use super::control::Op;
use super::placement::{Candidate, place};
use super::sla::{self, ServiceSpec};
use super::workers::Worker;

/// Largest instance count one service may have (the sandbox runs on one
/// machine; each instance is a container with its own namespace).
pub const MAX_INSTANCES: u64 = 50;

/// Where a service's image comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum Image {
    /// An OCI or docker-save archive on this machine, imported into every
    /// worker's containerd under `name`.
    Archive { path: PathBuf, name: String },
    /// A registry reference NodeEngine pulls (a worker reports FAILED with
    /// the pull error when the registry is unreachable).
    Registry(String),
}

impl Image {
    /// An existing file is an archive; anything else a registry reference.
    pub fn of(code: &str) -> Image {
        let path = Path::new(code);
        if !path.is_file() {
            return Image::Registry(code.to_string());
        }
        let stem: String = path
            .file_name()
            .and_then(|f| f.to_str())
            .map(|f| f.split('.').next().unwrap_or(f))
            .unwrap_or("image")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        Image::Archive {
            path: path.to_path_buf(),
            name: format!("sandbox.local/{stem}:latest"),
        }
    }

    /// The name the deploy document carries.
    pub fn name(&self) -> &str {
        match self {
            Image::Archive { name, .. } => name,
            Image::Registry(r) => r,
        }
    }
}

/// One service the workbench deployed.
#[derive(Debug)]
struct Service {
    spec: ServiceSpec,
    image: Image,
    /// Instance number -> worker index.
    instances: BTreeMap<u64, u8>,
    /// Upstream never reuses an instance number within a service.
    next: u64,
}

#[derive(Debug, Default)]
pub struct Workbench {
    services: BTreeMap<String, Service>,
}

impl Workbench {
    /// Carries out one call of the control API.
    pub fn handle(&mut self, sb: &Sandbox, op: Op) -> Result<Value> {
        match op {
            Op::Deploy { sla, instances } => self.deploy(sb, &sla, instances),
            Op::Ps => Ok(self.ps(sb)),
            Op::Scale { service, instances } => self.scale(sb, &service, instances),
            Op::Logs { service, instance } => self.logs(sb, &service, instance),
            Op::Undeploy { service } => self.undeploy(sb, &service),
        }
    }

    /// Records a service deployed outside the workbench (the sandbox's
    /// samples), so `ps`, `logs`, `scale` and `undeploy` know it.
    pub fn adopt(&mut self, job: &JobSpec, instances: &[(u64, u8)]) {
        let spec = ServiceSpec {
            job: job.job_name.clone(),
            code: job.image.clone(),
            cmd: job.cmd.clone(),
            environment: job.environment.clone(),
            requirements: sla::Requirements {
                virtualization: "docker".into(),
                ..Default::default()
            },
            document: Default::default(),
        };
        let next = instances.iter().map(|(n, _)| n + 1).max().unwrap_or(0);
        self.services.insert(
            job.job_name.clone(),
            Service {
                image: Image::Registry(job.image.clone()),
                spec,
                instances: instances.iter().copied().collect(),
                next,
            },
        );
    }

    /// Deploys every microservice of `sla` with `count` instances each and
    /// waits until their NetManagers reported them; the services as `ps`
    /// shows them.
    pub fn deploy(&mut self, sb: &Sandbox, sla: &Value, count: u64) -> Result<Value> {
        ensure!(
            (1..=MAX_INSTANCES).contains(&count),
            "instances must be 1..={MAX_INSTANCES}"
        );
        let specs = sla::services(sla)?;
        for s in &specs {
            if self.services.contains_key(&s.job) {
                bail!("{} is already deployed (scale or undeploy it)", s.job);
            }
        }
        let mut jobs = Vec::new();
        if let Err(e) = self.deploy_each(sb, specs, count, &mut jobs) {
            // All or nothing: the services of this SLA deployed before the
            // failing one go too, so a retry starts from a clean slate.
            for job in &jobs {
                self.discard(sb, job);
            }
            return Err(e);
        }
        Ok(Value::Array(
            jobs.iter().map(|j| self.describe(sb, j)).collect(),
        ))
    }

    /// Deploys the services one after another, naming each in `jobs` as
    /// soon as it has something to undo.
    fn deploy_each(
        &mut self,
        sb: &Sandbox,
        specs: Vec<ServiceSpec>,
        count: u64,
        jobs: &mut Vec<String>,
    ) -> Result<()> {
        for spec in specs {
            let image = Image::of(&spec.code);
            if let Image::Archive { path, name } = &image {
                for w in &sb.workers {
                    w.import_archive(path, name)?;
                }
            }
            let job = spec.job.clone();
            self.services.insert(
                job.clone(),
                Service {
                    spec,
                    image,
                    instances: BTreeMap::new(),
                    next: 0,
                },
            );
            jobs.push(job.clone());
            self.scale(sb, &job, count)?;
        }
        Ok(())
    }

    /// Brings `job` to `count` instances: new ones on the least loaded
    /// fitting workers, the newest removed first; waits until the workers
    /// confirmed.
    pub fn scale(&mut self, sb: &Sandbox, job: &str, count: u64) -> Result<Value> {
        ensure!(
            count <= MAX_INSTANCES,
            "instances must be 0..={MAX_INSTANCES}"
        );
        let have = self.service(job)?.instances.len() as u64;
        let mut started = Vec::new();
        if count > have {
            started = self.grow(sb, job, count - have)?;
        } else {
            let doomed: Vec<u64> = self
                .service(job)?
                .instances
                .keys()
                .rev()
                .take((have - count) as usize)
                .copied()
                .collect();
            for n in doomed {
                self.remove_instance(sb, job, n)?;
            }
        }
        sb.cluster.wait_instances(job, count as usize)?;
        // NetManager may report an instance before NodeEngine does.
        for n in started {
            sb.cluster.wait_status(job, n, "CREATED", 1)?;
        }
        Ok(self.describe(sb, job))
    }

    /// Places and deploys `more` instances; their numbers.
    fn grow(&mut self, sb: &Sandbox, job: &str, more: u64) -> Result<Vec<u64>> {
        let candidates = self.candidates(sb);
        let svc = self.service(job)?;
        let workers = place(&candidates, &svc.spec.requirements, more as usize)
            .with_context(|| format!("placing {job}"))?;
        let spec = JobSpec {
            job_name: job.to_string(),
            image: svc.image.name().to_string(),
            cmd: svc.spec.cmd.clone(),
            environment: svc.spec.environment.clone(),
        };
        let document = svc.spec.document.clone();
        let mut numbers = Vec::new();
        for index in workers {
            let w = sb.worker(index)?;
            let svc = self.service_mut(job)?;
            let n = svc.next;
            svc.next += 1;
            svc.instances.insert(n, index);
            sb.cluster
                .deploy_with(&w.id, &spec, n, &document)
                .with_context(|| format!("deploying {job} instance {n} on worker {index}"))?;
            numbers.push(n);
        }
        Ok(numbers)
    }

    /// Undeploys instance `n` and waits for its worker's UNDEPLOYED.
    fn remove_instance(&mut self, sb: &Sandbox, job: &str, n: u64) -> Result<()> {
        let index = self
            .service_mut(job)?
            .instances
            .remove(&n)
            .with_context(|| format!("{job} has no instance {n}"))?;
        let w = sb.worker(index)?;
        let before = undeployed_reports(sb, job, n);
        sb.cluster.undeploy(&w.id, job, n)?;
        sb.cluster.wait_status(job, n, "UNDEPLOYED", before + 1)
    }

    /// Removes every instance of `job` and the cluster's record of it, so
    /// its service addresses stop resolving.
    pub fn undeploy(&mut self, sb: &Sandbox, job: &str) -> Result<Value> {
        let numbers: Vec<u64> = self.service(job)?.instances.keys().copied().collect();
        for n in &numbers {
            self.remove_instance(sb, job, *n)?;
        }
        self.services.remove(job);
        sb.cluster.forget_job(job);
        Ok(json!({"service": job, "removed_instances": numbers}))
    }

    /// Removes `job` without waiting for its workers (its instances may
    /// have failed and never answer).
    fn discard(&mut self, sb: &Sandbox, job: &str) {
        if let Some(svc) = self.services.remove(job) {
            for (n, index) in svc.instances {
                if let Ok(w) = sb.worker(index) {
                    let _ = sb.cluster.undeploy(&w.id, job, n);
                }
            }
        }
        sb.cluster.forget_job(job);
    }

    /// Every service: addresses, instances, where they run and their state.
    pub fn ps(&self, sb: &Sandbox) -> Value {
        Value::Array(self.services.keys().map(|j| self.describe(sb, j)).collect())
    }

    /// The output of instance `n` of `job` (NodeEngine's log file for it).
    pub fn logs(&self, sb: &Sandbox, job: &str, n: u64) -> Result<Value> {
        let svc = self.service(job)?;
        let index = *svc.instances.get(&n).with_context(|| {
            format!(
                "{job} has no instance {n} (instances: {:?})",
                svc.instances.keys().collect::<Vec<_>>()
            )
        })?;
        let path = sb.worker(index)?.app_log(job, n);
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        Ok(json!({"service": job, "instance": n, "worker": index,
                  "file": path, "log": text}))
    }

    fn service(&self, job: &str) -> Result<&Service> {
        self.services.get(job).with_context(|| {
            format!(
                "no service {job} (deployed: {:?})",
                self.services.keys().collect::<Vec<_>>()
            )
        })
    }

    fn service_mut(&mut self, job: &str) -> Result<&mut Service> {
        let known: Vec<String> = self.services.keys().cloned().collect();
        self.services
            .get_mut(job)
            .with_context(|| format!("no service {job} (deployed: {known:?})"))
    }

    /// The workers with what they registered and how many instances the
    /// workbench placed on each.
    fn candidates(&self, sb: &Sandbox) -> Vec<Candidate> {
        let registrations = sb.cluster.registrations();
        sb.workers
            .iter()
            .map(|w| {
                let doc = registrations
                    .iter()
                    .rev()
                    .find(|d| d["host"] == w.ns.as_str())
                    .cloned()
                    .unwrap_or(Value::Null);
                let load = self
                    .services
                    .values()
                    .flat_map(|s| s.instances.values())
                    .filter(|i| **i == w.index)
                    .count();
                Candidate::from_registration(w.index, &w.ns, &doc, load)
            })
            .collect()
    }

    fn describe(&self, sb: &Sandbox, job: &str) -> Value {
        let Some(svc) = self.services.get(job) else {
            return Value::Null;
        };
        let c = &sb.cluster;
        let (rr, closest) = c.service_ips(job);
        let reported: BTreeMap<u64, _> = c.instances(job).into_iter().collect();
        let instances: Vec<Value> = svc
            .instances
            .iter()
            .map(|(n, index)| {
                let state = c.instance_state(job, *n);
                let (iip, iip6) = c.instance_ip(job, *n);
                let worker = sb.worker(*index).ok();
                json!({
                    "instance": n,
                    "worker": index,
                    "node": worker.map(|w| w.ns.as_str()),
                    "status": state.as_ref().map(|s| s.status.as_str()),
                    "detail": state.as_ref().map(|s| s.detail.as_str()),
                    "instance_ip": iip, "instance_ip_v6": iip6,
                    "namespace_ip": reported.get(n).map(|i| i.ns_ip.as_str()),
                    "namespace_ip_v6": reported.get(n).map(|i| i.ns_ip6.as_str()),
                })
            })
            .collect();
        json!({
            "service": job,
            "image": svc.image.name(),
            "rr_ip": rr.0, "rr_ip_v6": rr.1,
            "closest_ip": closest.0, "closest_ip_v6": closest.1,
            "instances": instances,
        })
    }
}

fn undeployed_reports(sb: &Sandbox, job: &str, n: u64) -> usize {
    sb.cluster
        .statuses(job, n)
        .iter()
        .filter(|s| *s == "UNDEPLOYED")
        .count()
}

impl Worker {
    /// Imports an image archive into this worker's containerd as `name`.
    pub fn import_archive(&self, archive: &Path, name: &str) -> Result<()> {
        let path = archive.to_string_lossy();
        self.ctr(&["images", "import", "--index-name", name, &path])
            .map(drop)
            .with_context(|| {
                format!(
                    "importing {} into worker {}'s containerd",
                    archive.display(),
                    self.index
                )
            })
    }
}
