//! What `GET /status` answers and `NetManager status` prints: one typed
//! struct on both sides, so the two cannot drift.

use serde::{Deserialize, Serialize};

use crate::cluster_link::LinkStats;
use crate::dataplane::DataplaneStatus;
use crate::resolver::ResolverStats;
use crate::state::{Deployment, DeploymentKind};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub registered: bool,
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node_id: String,
    pub cluster_address: String,
    /// `a.b.c.d/26`
    pub subnet: String,
    /// `fc00::/120`
    pub subnet_v6: String,
    pub node_ip: String,
    pub tunnel_port: u16,
    pub uplink: String,
    pub deployments: Vec<DeploymentStatus>,
    /// Jobs whose `updates_available` we follow.
    pub interests: Vec<String>,
    pub routes: RouteCounts,
    /// Miss resolution so far.
    #[serde(default)]
    pub resolver: ResolverStats,
    /// The MQTT link to the cluster.
    #[serde(default)]
    pub mqtt: LinkStats,
    /// Whether the daemon runs without eBPF (`--no-dataplane`).
    #[serde(default)]
    pub no_dataplane: bool,
    pub dataplane: DataplaneReport,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentStatus {
    #[serde(rename = "serviceName")]
    pub service_name: String,
    pub instance: u32,
    pub kind: DeploymentKind,
    pub pid: u32,
    pub veth: String,
    #[serde(rename = "nsAddress")]
    pub ns_address: String,
    #[serde(rename = "nsAddressv6")]
    pub ns_address_v6: String,
    #[serde(rename = "portMappings")]
    pub port_mappings: String,
}

impl From<&Deployment> for DeploymentStatus {
    fn from(d: &Deployment) -> Self {
        DeploymentStatus {
            service_name: d.service_name.clone(),
            instance: d.instance,
            kind: d.kind,
            pid: d.pid,
            veth: d.host_ifname.clone(),
            ns_address: d.addresses.v4.to_string(),
            ns_address_v6: d.addresses.v6.to_string(),
            port_mappings: d.port_mappings.clone(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RouteCounts {
    pub jobs: Vec<String>,
    pub instances: usize,
    pub services: usize,
}

/// The dataplane's own report, or why it could not give one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DataplaneReport {
    Ok(DataplaneStatus),
    Error { error: String },
}

impl Status {
    /// Ready means: registered, the programs attached (unless running
    /// without eBPF) and the cluster broker connected. Otherwise, why not.
    pub fn not_ready(&self) -> Vec<String> {
        let Some(n) = &self.node else {
            return vec!["not registered (NodeEngine has not called /register)".into()];
        };
        let mut why = Vec::new();
        if !n.mqtt.connected {
            why.push("not connected to the cluster's MQTT broker".into());
        }
        match &n.dataplane {
            DataplaneReport::Error { error } => why.push(format!("dataplane: {error}")),
            DataplaneReport::Ok(dp) if dp.attachments.is_empty() && !n.no_dataplane => {
                why.push("no eBPF program attached".into())
            }
            DataplaneReport::Ok(_) => {}
        }
        why
    }

    /// Human-readable form for `NetManager status`.
    pub fn render(&self) -> String {
        match &self.node {
            None => "NetManager is running; node not registered yet\n".to_string(),
            Some(n) => n.render(),
        }
    }
}

impl NodeStatus {
    fn render(&self) -> String {
        let mut out = format!(
            "MQTT {}  ({} connections; table queries {} sent, {} answered, {} timed out)\n",
            if self.mqtt.connected {
                "connected"
            } else {
                "DISCONNECTED"
            },
            self.mqtt.connections,
            self.mqtt.queries_sent,
            self.mqtt.queries_answered,
            self.mqtt.queries_timed_out
        );
        out.push_str(&format!(
            "node {}  cluster {}\nsubnet {} {}  node address {}:{} via {}\n",
            self.node_id,
            self.cluster_address,
            self.subnet,
            self.subnet_v6,
            self.node_ip,
            self.tunnel_port,
            self.uplink
        ));
        out.push_str(&format!("\ndeployments ({}):\n", self.deployments.len()));
        for d in &self.deployments {
            out.push_str(&format!(
                "  {}.instance.{}  {}  {} {}  veth {}  ports {}\n",
                d.service_name,
                d.instance,
                d.kind.as_str(),
                d.ns_address,
                d.ns_address_v6,
                d.veth,
                if d.port_mappings.is_empty() {
                    "-"
                } else {
                    &d.port_mappings
                }
            ));
        }
        match &self.dataplane {
            DataplaneReport::Error { error } => {
                out.push_str(&format!("\ndataplane: error {error}\n"))
            }
            DataplaneReport::Ok(dp) => out.push_str(&render_dataplane(dp)),
        }
        out.push_str(&format!(
            "\nroutes: {} jobs, {} instance entries, {} service entries; interests: {}\n",
            self.routes.jobs.len(),
            self.routes.instances,
            self.routes.services,
            self.interests.len()
        ));
        let r = &self.resolver;
        out.push_str(&format!(
            "misses: {} resolved, {} failed, refused {} busy / {} rate / {} recently failed; \
             {} tunnel datagrams from a node that does not run their source; \
             {} failures answered early by a table result, {} parked frames sent through\n",
            r.resolved,
            r.failed,
            r.refused_busy,
            r.refused_rate,
            r.refused_recent_failure,
            r.refused_wrong_node,
            r.negative_cleared,
            r.parked_reinjected
        ));
        out
    }
}

fn render_dataplane(dp: &DataplaneStatus) -> String {
    let mut out = format!(
        "\nprograms attached in {} mode (program, interface, hook):\n",
        dp.attach_mode
    );
    for (program, iface, hook) in &dp.attachments {
        out.push_str(&format!("  {program:<24} {iface:<16} {hook}\n"));
    }
    out.push_str("maps (entries / max):\n");
    for (map, n, max) in &dp.maps {
        out.push_str(&format!("  {map:<24} {n:>8} / {max}\n"));
    }
    out.push_str("counters (packets, bytes):\n");
    for (counter, packets, bytes) in &dp.counters {
        out.push_str(&format!("  {counter:<32} {packets:>12} {bytes:>14}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unregistered_round_trip() {
        let json = serde_json::to_value(Status::default()).unwrap();
        assert_eq!(json, serde_json::json!({"registered": false}));
        let back: Status = serde_json::from_value(json).unwrap();
        assert_eq!(back, Status::default());
        assert!(back.render().contains("not registered"));
    }

    #[test]
    fn registered_round_trip_and_render() {
        let s = Status {
            registered: true,
            node: Some(NodeStatus {
                node_id: "n1".into(),
                cluster_address: "c".into(),
                subnet: "10.18.0.64/26".into(),
                subnet_v6: "fc00::40/120".into(),
                node_ip: "198.51.100.1".into(),
                tunnel_port: 50103,
                uplink: "eth0".into(),
                deployments: vec![],
                interests: vec!["a.b.c.d".into()],
                routes: RouteCounts::default(),
                resolver: ResolverStats::default(),
                mqtt: LinkStats::default(),
                no_dataplane: false,
                dataplane: DataplaneReport::Error {
                    error: "no eBPF".into(),
                },
            }),
        };
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["node_ip"], "198.51.100.1");
        assert_eq!(json["dataplane"]["error"], "no eBPF");
        let back: Status = serde_json::from_value(json).unwrap();
        assert_eq!(back, s);
        let text = back.render();
        assert!(
            text.contains("node address 198.51.100.1:50103 via eth0"),
            "{text}"
        );
        assert!(text.contains("dataplane: error no eBPF"), "{text}");
    }
}
