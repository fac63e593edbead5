//! The routes this node knows: table query results turned into dataplane
//! entries (`plan`), what each job wrote (`tables`), and the entries of the
//! local instances themselves.

pub mod plan;
mod tables;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Result;

pub use plan::LocalView;
pub use tables::{Limits, ServiceTables};

use crate::addresses::ServiceRanges;
use crate::cluster_link::TableResult;
use crate::dataplane::{InstanceEntry, LocalPort};
use crate::forwarding::Forwarding;
use crate::local::LocalState;
use crate::state::Deployment;
use crate::uplink::Uplink;

/// What resolving a miss needs from the routes. Narrow on purpose: the
/// resolver depends on this, not on the node.
pub trait RouteTables: Send + Sync {
    /// Write a table result (replacing the job's previous one).
    fn apply(&self, result: &TableResult) -> Result<()>;
    /// The job of the local instance with namespace address `ns`.
    fn local_job(&self, ns: IpAddr) -> Option<String>;
    /// Whether the local instance `ns` already has its own instance address.
    fn knows_instance_ip(&self, ns: IpAddr) -> bool;
    /// Whether the tables wrote service `addr` with a running instance
    /// behind it (a listed but not yet running one has no addresses).
    fn knows_service(&self, addr: IpAddr) -> bool;
    /// Task ids of the local instances (they hold interests in what they use).
    fn holders(&self) -> Vec<String>;
    /// The node address the tables give for the instance with instance
    /// address `ip` (the only sender its tunnel datagrams come from).
    fn instance_node(&self, ip: IpAddr) -> Option<IpAddr>;
}

pub struct Routes {
    tables: Mutex<ServiceTables>,
    fwd: Arc<dyn Forwarding>,
    local: Arc<LocalState>,
    uplink: Arc<Uplink>,
    service_ranges: ServiceRanges,
}

impl Routes {
    pub fn new(
        fwd: Arc<dyn Forwarding>,
        local: Arc<LocalState>,
        uplink: Arc<Uplink>,
        limits: Limits,
        service_ranges: ServiceRanges,
    ) -> Routes {
        Routes {
            tables: Mutex::new(ServiceTables::with_limits(limits)),
            fwd,
            local,
            uplink,
            service_ranges,
        }
    }

    fn tables(&self) -> MutexGuard<'_, ServiceTables> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn view(&self) -> LocalView {
        LocalView {
            node_ip: Some(self.uplink.ip()),
            node_port: self.uplink.port(),
            locals: self.local.ports(),
            owners: self.local.owners(),
            service_ranges: self.service_ranges.clone(),
        }
    }

    /// Recompute a job's entries from its last table, e.g. after a local
    /// instance went away, so services stop naming it at once.
    pub fn reapply(&self, job: &str) {
        let view = self.view();
        if let Err(e) = self.tables().reapply(self.fwd.as_ref(), job, &view) {
            tracing::warn!("updating routes of {job}: {e:#}");
        }
    }

    /// Forget a job's routes (its interest expired).
    pub fn forget(&self, job: &str) {
        let view = self.view();
        self.tables().forget(self.fwd.as_ref(), job, &view);
    }

    /// Forget every job's routes (the node's identity is being replaced).
    pub fn forget_all(&self) {
        for job in self.jobs() {
            self.forget(&job);
        }
    }

    pub fn jobs(&self) -> BTreeSet<String> {
        self.tables().jobs()
    }

    /// (instance entries, service entries) written, for status.
    pub fn counts(&self) -> (usize, usize) {
        self.tables().counts()
    }

    /// INSTANCES entries of a local deployment, with its instance address
    /// when its job's table already named it.
    pub fn write_local_entries(&self, d: &Deployment) -> Result<()> {
        let local = Some(LocalPort {
            ifindex: d.host_ifindex,
            mac: d.mac,
        });
        let tables = self.tables();
        for ns in [IpAddr::V4(d.addresses.v4), IpAddr::V6(d.addresses.v6)] {
            let entry = InstanceEntry {
                instance_ip: tables.instance(ns).and_then(|e| e.instance_ip),
                node_ip: self.uplink.ip(),
                node_port: self.uplink.port(),
                local,
            };
            self.fwd.upsert_instance(ns, entry)?;
        }
        Ok(())
    }
}

impl RouteTables for Routes {
    fn apply(&self, result: &TableResult) -> Result<()> {
        let view = self.view();
        self.tables().apply(self.fwd.as_ref(), result, &view)
    }

    fn local_job(&self, ns: IpAddr) -> Option<String> {
        self.local.by_ns(ns).map(|d| d.service_name)
    }

    fn knows_instance_ip(&self, ns: IpAddr) -> bool {
        self.tables()
            .instance(ns)
            .is_some_and(|e| e.instance_ip.is_some())
    }

    fn knows_service(&self, addr: IpAddr) -> bool {
        self.tables().has_service(addr)
    }

    fn holders(&self) -> Vec<String> {
        self.local.keys()
    }

    fn instance_node(&self, ip: IpAddr) -> Option<IpAddr> {
        self.tables().instance_by_address(ip).map(|e| e.node_ip)
    }
}
