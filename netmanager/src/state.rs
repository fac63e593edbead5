//! The small state file that lets a restarted daemon (even after kill -9)
//! pick up where it was: node identity, subnet and every local deployment.
//! Written atomically (temp file + rename) after every change.

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::addresses::{AddressPair, Subnet};
use crate::plumbing::nft::PortMapping;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeploymentKind {
    Container,
    Unikernel,
}

impl DeploymentKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DeploymentKind::Container => "container",
            DeploymentKind::Unikernel => "unikernel",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    pub service_name: String,
    pub instance: u32,
    pub kind: DeploymentKind,
    /// Container process (0 for unikernels).
    pub pid: u32,
    /// Named namespace (unikernels).
    #[serde(default)]
    pub netns: Option<String>,
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub mac: [u8; 6],
    pub addresses: AddressPair,
    /// As the NodeEngine sent it (kept for status and the state file).
    #[serde(default)]
    pub port_mappings: String,
    /// `port_mappings` parsed once, when the deployment is made or adopted.
    #[serde(skip)]
    pub ports: Vec<PortMapping>,
}

impl Deployment {
    /// "<job>.instance.<n>": the task id upstream uses, also our map key.
    pub fn key(&self) -> String {
        worker_common::task_id::task_id(&self.service_name, self.instance)
    }

    /// Whether `ns` is one of this deployment's namespace addresses.
    pub fn owns(&self, ns: std::net::IpAddr) -> bool {
        ns == std::net::IpAddr::V4(self.addresses.v4)
            || ns == std::net::IpAddr::V6(self.addresses.v6)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedState {
    pub node_id: String,
    pub cluster_address: String,
    pub subnet: Subnet,
    #[serde(default)]
    pub deployments: Vec<Deployment>,
}

pub fn load(path: &Path) -> Result<Option<PersistedState>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("parsing state file {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading state file {}", path.display())),
    }
}

pub fn save(path: &Path, state: &PersistedState) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("json.tmp");
    let body = serde_json::to_vec_pretty(state)?;
    std::fs::write(&tmp, body).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

pub fn remove(path: &Path) {
    let _ = std::fs::remove_file(path);
}
