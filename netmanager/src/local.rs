//! The instances running on this node: their deployments, the address pool
//! they draw from, and the state file that lets a restarted daemon (even
//! after kill -9) take them back.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use anyhow::{Context, Result};

use crate::addresses::{AddressPair, AddressPool, Subnet};
use crate::dataplane::LocalPort;
use crate::state::{self, Deployment, PersistedState};

/// Who this node is, as the state file records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub node_id: String,
    pub cluster_address: String,
    pub subnet: Subnet,
}

struct Inner {
    pool: AddressPool,
    deployments: BTreeMap<String, Deployment>,
}

pub struct LocalState {
    identity: Identity,
    state_path: PathBuf,
    inner: Mutex<Inner>,
}

impl LocalState {
    pub fn new(identity: Identity, state_path: PathBuf) -> LocalState {
        LocalState {
            inner: Mutex::new(Inner {
                pool: AddressPool::new(identity.subnet),
                deployments: BTreeMap::new(),
            }),
            identity,
            state_path,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Plain collections only: a panic elsewhere leaves nothing half-done here.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn get(&self, key: &str) -> Option<Deployment> {
        self.lock().deployments.get(key).cloned()
    }

    pub fn list(&self) -> Vec<Deployment> {
        self.lock().deployments.values().cloned().collect()
    }

    /// Task ids of the local instances.
    pub fn keys(&self) -> Vec<String> {
        self.lock().deployments.keys().cloned().collect()
    }

    /// The local deployment owning a namespace address.
    pub fn by_ns(&self, ns: IpAddr) -> Option<Deployment> {
        self.lock()
            .deployments
            .values()
            .find(|d| d.owns(ns))
            .cloned()
    }

    /// Namespace address (v4 and v6) of each local instance -> its veth.
    pub fn ports(&self) -> HashMap<IpAddr, LocalPort> {
        let mut ports = HashMap::new();
        for d in self.lock().deployments.values() {
            let port = LocalPort {
                ifindex: d.host_ifindex,
                mac: d.mac,
            };
            ports.insert(IpAddr::V4(d.addresses.v4), port);
            ports.insert(IpAddr::V6(d.addresses.v6), port);
        }
        ports
    }

    /// Namespace address (v4 and v6) of each local instance -> its job.
    pub fn owners(&self) -> HashMap<IpAddr, String> {
        let mut owners = HashMap::new();
        for d in self.lock().deployments.values() {
            owners.insert(IpAddr::V4(d.addresses.v4), d.service_name.clone());
            owners.insert(IpAddr::V6(d.addresses.v6), d.service_name.clone());
        }
        owners
    }

    pub fn allocate(&self) -> Result<AddressPair> {
        self.lock().pool.allocate()
    }

    /// Mark an address used (a deployment taken back after a restart).
    pub fn reserve(&self, v4: Ipv4Addr) -> Result<AddressPair> {
        self.lock().pool.reserve(v4)
    }

    pub fn release(&self, v4: Ipv4Addr) {
        self.lock().pool.release(v4);
    }

    pub fn insert(&self, d: Deployment) {
        self.lock().deployments.insert(d.key(), d);
    }

    pub fn remove(&self, key: &str) -> Option<Deployment> {
        self.lock().deployments.remove(key)
    }

    /// Write the state file. The file write runs off the async workers.
    pub async fn save(&self) -> Result<()> {
        let snapshot = PersistedState {
            node_id: self.identity.node_id.clone(),
            cluster_address: self.identity.cluster_address.clone(),
            subnet: self.identity.subnet,
            deployments: self.list(),
        };
        let path = self.state_path.clone();
        tokio::task::spawn_blocking(move || state::save(&path, &snapshot))
            .await
            .context("saving the state file")?
    }
}
