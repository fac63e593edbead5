//! What the daemon needs from a forwarding plane, as a small trait.
//!
//! The real implementation is the eBPF `Dataplane`; `InMemory` keeps the same
//! tables in userspace maps. It serves tests of the control plane and
//! `--no-dataplane` runs (plumbing and cluster protocol without eBPF).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Mutex;

use anyhow::{Context, Result};
use tokio::sync::mpsc;

use crate::dataplane::{
    Dataplane, DataplaneConfig, DataplaneStatus, InstanceEntry, Miss, ServiceKind,
};

pub trait Forwarding: Send + Sync {
    fn set_node_ip(&self, ip: IpAddr) -> Result<()>;
    /// Tunnel traffic moves to the uplink `ifname`, node address `ip`.
    fn set_uplink(&self, ifname: &str, ip: IpAddr) -> Result<()>;
    fn attach_container(&self, host_ifname: &str) -> Result<()>;
    fn detach_container(&self, host_ifname: &str) -> Result<()>;
    fn upsert_instance(&self, ns_ip: IpAddr, entry: InstanceEntry) -> Result<()>;
    fn remove_instance(&self, ns_ip: IpAddr) -> Result<()>;
    fn upsert_service(
        &self,
        service_ip: IpAddr,
        kind: ServiceKind,
        backends: &[IpAddr],
    ) -> Result<()>;
    fn remove_service(&self, service_ip: IpAddr) -> Result<()>;
    /// The miss stream, once; None when this plane never reports misses.
    fn take_misses(&self) -> Option<mpsc::Receiver<Miss>>;
    /// A held container frame, back through the container program.
    fn reinject(&self, frame: &[u8]) -> Result<()>;
    /// A held tunnel datagram, back through the uplink program.
    fn reinject_tunnel(&self, frame: &[u8]) -> Result<()>;
    fn resolved(&self, addr: IpAddr) -> Result<()>;
    fn expire_flows(&self) -> Result<usize>;
    fn status(&self) -> Result<DataplaneStatus>;
}

/// The eBPF dataplane. `Dataplane` locks internally (one mutex), so this
/// only adapts its errors and its miss stream to the trait.
pub struct Ebpf {
    dp: Dataplane,
}

impl Ebpf {
    pub fn open(cfg: &DataplaneConfig) -> Result<Ebpf> {
        let dp = Dataplane::open(cfg).context("loading the eBPF dataplane")?;
        Ok(Ebpf { dp })
    }
}

impl Forwarding for Ebpf {
    fn set_node_ip(&self, ip: IpAddr) -> Result<()> {
        Ok(self.dp.set_node_ip(ip)?)
    }
    fn set_uplink(&self, ifname: &str, ip: IpAddr) -> Result<()> {
        Ok(self.dp.set_uplink(ifname, ip)?)
    }
    fn attach_container(&self, host_ifname: &str) -> Result<()> {
        Ok(self.dp.attach_container(host_ifname)?)
    }
    fn detach_container(&self, host_ifname: &str) -> Result<()> {
        Ok(self.dp.detach_container(host_ifname)?)
    }
    fn upsert_instance(&self, ns_ip: IpAddr, entry: InstanceEntry) -> Result<()> {
        Ok(self.dp.upsert_instance(ns_ip, entry)?)
    }
    fn remove_instance(&self, ns_ip: IpAddr) -> Result<()> {
        Ok(self.dp.remove_instance(ns_ip)?)
    }
    fn upsert_service(
        &self,
        service_ip: IpAddr,
        kind: ServiceKind,
        backends: &[IpAddr],
    ) -> Result<()> {
        Ok(self.dp.upsert_service(service_ip, kind, backends)?)
    }
    fn remove_service(&self, service_ip: IpAddr) -> Result<()> {
        Ok(self.dp.remove_service(service_ip)?)
    }
    fn take_misses(&self) -> Option<mpsc::Receiver<Miss>> {
        let mut rx = match self.dp.misses() {
            Ok(rx) => rx,
            Err(e) => {
                tracing::error!("dataplane miss stream unavailable: {e}");
                return None;
            }
        };
        // Re-expose the receiver as a channel so the trait stays object safe.
        let (tx, out) = mpsc::channel(1024);
        tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                if tx.send(m).await.is_err() {
                    break;
                }
            }
        });
        Some(out)
    }
    fn reinject(&self, frame: &[u8]) -> Result<()> {
        Ok(self.dp.reinject(frame)?)
    }
    fn reinject_tunnel(&self, frame: &[u8]) -> Result<()> {
        Ok(self.dp.reinject_tunnel(frame)?)
    }
    fn resolved(&self, addr: IpAddr) -> Result<()> {
        Ok(self.dp.resolved(addr)?)
    }
    fn expire_flows(&self) -> Result<usize> {
        Ok(self.dp.expire_flows()?)
    }
    fn status(&self) -> Result<DataplaneStatus> {
        Ok(self.dp.status()?)
    }
}

/// Userspace copy of the tables, for tests and runs without eBPF.
#[derive(Default)]
pub struct InMemory {
    pub tables: Mutex<MemTables>,
}

#[derive(Default, Debug, Clone)]
pub struct MemTables {
    pub node_ip: Option<IpAddr>,
    pub uplink: Option<String>,
    pub attached: Vec<String>,
    pub instances: BTreeMap<IpAddr, InstanceEntry>,
    pub services: BTreeMap<IpAddr, (ServiceKind, Vec<IpAddr>)>,
    pub reinjected: usize,
}

impl InMemory {
    pub fn snapshot(&self) -> MemTables {
        self.t().clone()
    }
    fn t(&self) -> std::sync::MutexGuard<'_, MemTables> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Forwarding for InMemory {
    fn set_node_ip(&self, ip: IpAddr) -> Result<()> {
        self.t().node_ip = Some(ip);
        Ok(())
    }
    fn set_uplink(&self, ifname: &str, ip: IpAddr) -> Result<()> {
        let mut t = self.t();
        t.uplink = Some(ifname.to_string());
        t.node_ip = Some(ip);
        Ok(())
    }
    fn attach_container(&self, host_ifname: &str) -> Result<()> {
        let mut t = self.t();
        if !t.attached.iter().any(|a| a == host_ifname) {
            t.attached.push(host_ifname.to_string());
        }
        Ok(())
    }
    fn detach_container(&self, host_ifname: &str) -> Result<()> {
        self.t().attached.retain(|a| a != host_ifname);
        Ok(())
    }
    fn upsert_instance(&self, ns_ip: IpAddr, entry: InstanceEntry) -> Result<()> {
        self.t().instances.insert(ns_ip, entry);
        Ok(())
    }
    fn remove_instance(&self, ns_ip: IpAddr) -> Result<()> {
        self.t().instances.remove(&ns_ip);
        Ok(())
    }
    fn upsert_service(
        &self,
        service_ip: IpAddr,
        kind: ServiceKind,
        backends: &[IpAddr],
    ) -> Result<()> {
        self.t()
            .services
            .insert(service_ip, (kind, backends.to_vec()));
        Ok(())
    }
    fn remove_service(&self, service_ip: IpAddr) -> Result<()> {
        self.t().services.remove(&service_ip);
        Ok(())
    }
    fn take_misses(&self) -> Option<mpsc::Receiver<Miss>> {
        None
    }
    fn reinject(&self, _frame: &[u8]) -> Result<()> {
        self.t().reinjected += 1;
        Ok(())
    }
    fn reinject_tunnel(&self, _frame: &[u8]) -> Result<()> {
        self.t().reinjected += 1;
        Ok(())
    }
    fn resolved(&self, _addr: IpAddr) -> Result<()> {
        Ok(())
    }
    fn expire_flows(&self) -> Result<usize> {
        Ok(0)
    }
    fn status(&self) -> Result<DataplaneStatus> {
        let t = self.t();
        Ok(DataplaneStatus {
            attach_mode: "none (no eBPF)".to_string(),
            attachments: t
                .attached
                .iter()
                .map(|i| ("none (no eBPF)".to_string(), i.clone(), "-".to_string()))
                .collect(),
            maps: vec![
                ("instances (userspace)".into(), t.instances.len() as u32, 0),
                ("services (userspace)".into(), t.services.len() as u32, 0),
            ],
            counters: vec![],
            node_addresses: t.node_ip.iter().map(|a| a.to_string()).collect(),
            slow_path: None,
        })
    }
}
