//! The small state file that lets a restarted daemon (even after kill -9)
//! pick up where it was: node identity, subnet and every local deployment.
//! Written atomically and durably after every change (see `save`).

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

/// Write the state durably and atomically: a uniquely named temporary file
/// in the same directory (created exclusively, mode 0600), fsynced, renamed
/// over the old one, and the directory fsynced, so a crash or power loss
/// leaves either the old or the new state, never a torn or empty file.
pub fn save(path: &Path, state: &PersistedState) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let body = serde_json::to_vec_pretty(state)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".netmanager-state")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.write_all(&body)
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("writing {}", tmp.path().display()))?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("replacing {}", path.display()))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

pub fn remove(path: &Path) {
    let _ = std::fs::remove_file(path);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_is_atomic_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let state = PersistedState {
            node_id: "n".into(),
            cluster_address: "c".into(),
            subnet: Subnet::parse("10.18.0.64", "fc00::40").unwrap(),
            deployments: vec![],
        };
        save(&path, &state).unwrap();
        save(&path, &state).unwrap();
        assert_eq!(load(&path).unwrap(), Some(state));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // No temporary files left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
    }
}
