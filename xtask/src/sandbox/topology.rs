//! The sandbox's networks: one underlay namespace holding the bridge
//! `br0` with 198.51.100.254/24 (where the cluster stand-in listens) and one
//! namespace per worker with uplink `eth0` = 198.51.100.<n>/24 into it.
//! Nothing is added to the root namespace, so the host network is untouched.

use std::path::PathBuf;

use anyhow::{Context, Result};

use super::procs::sh;

/// Address of the cluster stand-in on the underlay.
pub const CLUSTER_IP: &str = "198.51.100.254";

/// Namespaces created under one prefix; deleted on drop.
pub struct Topology {
    pub prefix: String,
    pub underlay: String,
    namespaces: Vec<String>,
}

pub fn netns_path(ns: &str) -> PathBuf {
    PathBuf::from(format!("/run/netns/{ns}"))
}

fn add_ns(name: &str) -> Result<()> {
    // A leftover from a crashed run would make `ip netns add` fail.
    let _ = sh(&format!("ip netns del {name} 2>/dev/null"));
    sh(&format!("ip netns add {name}"))?;
    sh(&format!("ip -n {name} link set lo up"))?;
    Ok(())
}

impl Topology {
    /// Creates the underlay namespace `<prefix>-under`.
    pub fn new(prefix: &str) -> Result<Topology> {
        let underlay = format!("{prefix}-under");
        add_ns(&underlay).context("creating the underlay namespace")?;
        let mut t = Topology {
            prefix: prefix.to_string(),
            underlay: underlay.clone(),
            namespaces: vec![underlay.clone()],
        };
        sh(&format!(
            "ip -n {underlay} link add br0 type bridge && ip -n {underlay} link set br0 up && \
             ip -n {underlay} addr add {CLUSTER_IP}/24 dev br0"
        ))
        .context("creating the underlay bridge")?;
        t.namespaces.shrink_to_fit();
        Ok(t)
    }

    /// Creates worker namespace `<prefix>-w<index>` with 198.51.100.<index>.
    pub fn worker(&mut self, index: u8) -> Result<(String, String)> {
        let ns = format!("{}-w{index}", self.prefix);
        let ip = format!("198.51.100.{index}");
        add_ns(&ns).with_context(|| format!("creating worker namespace {ns}"))?;
        self.namespaces.push(ns.clone());
        let u = &self.underlay;
        let peer = format!("u-w{index}");
        sh(&format!(
            "ip link add eth0 netns {ns} type veth peer name {peer} netns {u} && \
             ip -n {u} link set {peer} master br0 && ip -n {u} link set {peer} up && \
             ip -n {ns} addr add {ip}/24 dev eth0 && ip -n {ns} link set eth0 up && \
             ip -n {ns} route add default via {CLUSTER_IP}"
        ))
        .with_context(|| format!("wiring {ns} into the underlay"))?;
        Ok((ns, ip))
    }
}

/// Kills what still runs in a namespace and deletes it.
pub fn delete_ns(ns: &str) {
    let _ = sh(&format!("ip netns pids {ns} | xargs -r kill -9"));
    let _ = sh(&format!("ip netns del {ns}"));
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            delete_ns(ns);
        }
    }
}
