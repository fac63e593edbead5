//! `/etc/netmanager/netcfg.json` (docs/contract.md, NetManager configuration)
//! and the runtime settings that the command line (and its environment
//! variables, see `cli`) adds.
//!
//! The file is read with serde; `serde_path_to_error` makes every error name
//! the field, and absent or empty fields take upstream's defaults. Upstream's
//! second file, `/etc/netmanager/tuncfg.json`, may override the service
//! ranges, the tunnel port and the tunnel MTU ([`TunConfig`]).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::Value;

pub use worker_common::paths::NETMANAGER_CONFIG as DEFAULT_CONFIG_PATH;
pub use worker_common::paths::NETMANAGER_SOCKET as DEFAULT_SOCKET_PATH;
pub const DEFAULT_BPF_DIR: &str = "/sys/fs/bpf/oakestra";
pub const DEFAULT_STATE_PATH: &str = "/run/oakestra/netmanager-state.json";
pub use worker_common::paths::NETMANAGER_LOG as DEFAULT_LOG_PATH;
pub const DEFAULT_TUNNEL_MTU: u16 = 1450;
pub const DEFAULT_TUNNEL_PORT: u16 = 50103;
pub const DEFAULT_MQTT_PORT: u16 = 10003;
pub use netmanager_common::DEFAULT_MISS_HOLD;
/// Upstream's tunnel configuration file.
pub const DEFAULT_TUN_CONFIG_PATH: &str = "/etc/netmanager/tuncfg.json";
/// Where PublicIPNetworking asks for the node's public address. Upstream
/// asks https://ifconfig.co, which answers over IPv6 on a dual-stack host;
/// this one answers over IPv4 only, and the tunnel underlay is IPv4.
pub const DEFAULT_PUBLIC_IP_URL: &str = "https://api.ipify.org";

use crate::addresses::ServiceRanges;

mod fields;
mod table_sizes;
mod tuncfg;

use crate::dataplane::{AttachMode, UplinkHook, XdpMode};
pub use fields::check_url;
use fields::*;
pub use table_sizes::{TableProfile, TableSizes};
pub use tuncfg::TunConfig;

/// The contents of netcfg.json, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// None: "0.0.0.0", infer from the default route and re-check
    /// periodically. IPv6 is our extension (upstream workers cannot use it).
    pub node_public_address: Option<IpAddr>,
    /// Tunnel UDP port (a string on disk).
    pub node_public_port: u16,
    /// None: "0.0.0.0", take the cluster address from the NodeEngine's /register.
    pub cluster_url: Option<String>,
    /// Cluster MQTT port (a string on disk).
    pub cluster_mqtt_port: u16,
    /// Interface to prefer when several default routes exist.
    pub default_interface: Option<String>,
    pub debug: bool,
    /// With no NodePublicAddress: advertise the address a discovery
    /// service sees us coming from (a NAT router's), as upstream does.
    pub public_ip_networking: bool,
    /// Our extension: the discovery service's URL (`PublicIPDiscoveryUrl`),
    /// answering the caller's address as plain text.
    pub public_ip_url: Option<String>,
    pub mqtt_cert: Option<PathBuf>,
    pub mqtt_key: Option<PathBuf>,
    /// Our extension (upstream has only client certificates): broker
    /// credentials and server-verified TLS without a client certificate.
    pub mqtt_auth: MqttAuth,
    /// Our extension (upstream ignores unknown keys): dataplane map sizes.
    pub tables: TableSizes,
    /// Our extension, `TunnelPeers`: underlay addresses or prefixes
    /// (address, prefix length) trusted to send tunnel datagrams for any
    /// instance, beyond the node that runs it (docs/security.md).
    pub tunnel_peers: Vec<(IpAddr, u8)>,
}

/// How NetManager authenticates to the cluster's broker beyond upstream's
/// client certificate. netcfg.json keys: `MqttTls` (TLS, verifying the
/// broker, even without a client certificate), `MqttCa` (extra CA file),
/// `MqttUsername`, `MqttPasswordFile` (the password, in a root-only file).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MqttAuth {
    pub tls: bool,
    pub ca: Option<PathBuf>,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
}

/// Map sizes of the dataplane (max entries), how many packets it holds
/// per unknown address and how many flows one container may hold.
impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            node_public_address: None,
            node_public_port: DEFAULT_TUNNEL_PORT,
            cluster_url: None,
            cluster_mqtt_port: DEFAULT_MQTT_PORT,
            default_interface: None,
            debug: false,
            public_ip_networking: false,
            public_ip_url: None,
            mqtt_cert: None,
            mqtt_key: None,
            mqtt_auth: MqttAuth::default(),
            tables: TableSizes::default(),
            tunnel_peers: Vec::new(),
        }
    }
}

/// netcfg.json as written; every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct File {
    #[serde(rename = "NodePublicAddress", deserialize_with = "unset_or_ip")]
    node_public_address: Option<IpAddr>,
    #[serde(rename = "NodePublicPort", deserialize_with = "port")]
    node_public_port: Option<u16>,
    #[serde(rename = "ClusterUrl", deserialize_with = "unset_or_text")]
    cluster_url: Option<String>,
    #[serde(rename = "ClusterMqttPort", deserialize_with = "port")]
    cluster_mqtt_port: Option<u16>,
    #[serde(rename = "DefaultInterface", deserialize_with = "text")]
    default_interface: Option<String>,
    #[serde(rename = "Debug", deserialize_with = "flag")]
    debug: Option<bool>,
    #[serde(rename = "PublicIPNetworking", deserialize_with = "flag")]
    public_ip_networking: Option<bool>,
    #[serde(rename = "PublicIPDiscoveryUrl", deserialize_with = "url")]
    public_ip_url: Option<String>,
    #[serde(rename = "MqttCert", deserialize_with = "text")]
    mqtt_cert: Option<String>,
    #[serde(rename = "MqttKey", deserialize_with = "text")]
    mqtt_key: Option<String>,
    #[serde(rename = "MqttTls", deserialize_with = "flag")]
    mqtt_tls: Option<bool>,
    #[serde(rename = "MqttCa", deserialize_with = "text")]
    mqtt_ca: Option<String>,
    #[serde(rename = "MqttUsername", deserialize_with = "text")]
    mqtt_username: Option<String>,
    #[serde(rename = "MqttPasswordFile", deserialize_with = "text")]
    mqtt_password_file: Option<String>,
    #[serde(rename = "TableProfile", deserialize_with = "text")]
    table_profile: Option<String>,
    #[serde(rename = "FlowTableSize", deserialize_with = "count")]
    flow_table_size: Option<u32>,
    #[serde(rename = "ServiceTableSize", deserialize_with = "count")]
    service_table_size: Option<u32>,
    #[serde(rename = "BackendTableSize", deserialize_with = "count")]
    backend_table_size: Option<u32>,
    #[serde(rename = "InstanceTableSize", deserialize_with = "count")]
    instance_table_size: Option<u32>,
    #[serde(rename = "PendingTableSize", deserialize_with = "count")]
    pending_table_size: Option<u32>,
    #[serde(rename = "MissHold", deserialize_with = "count")]
    miss_hold: Option<u32>,
    #[serde(rename = "FlowsPerContainer", deserialize_with = "count")]
    flows_per_container: Option<u32>,
    #[serde(rename = "TunnelPeers", deserialize_with = "prefixes")]
    tunnel_peers: Vec<(IpAddr, u8)>,
}

impl NetConfig {
    /// Read the file; a missing file means all defaults (upstream ships one,
    /// but a node without it should still come up).
    pub fn load(path: &Path) -> Result<NetConfig> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!(path = %path.display(), "configuration file absent, using defaults");
                return Ok(NetConfig::default());
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Self::parse(&text).with_context(|| format!("invalid configuration {}", path.display()))
    }

    /// Parse the JSON text; errors name the offending field.
    pub fn parse(text: &str) -> Result<NetConfig> {
        let value: Value = serde_json::from_str(text).map_err(|e| {
            anyhow::anyhow!(
                "not valid JSON at line {} column {}: {e}",
                e.line(),
                e.column()
            )
        })?;
        if !value.is_object() {
            bail!("top level must be a JSON object");
        }
        let file: File = serde_path_to_error::deserialize(value)
            .map_err(|e| anyhow::anyhow!("field {}: {}", e.path(), e.inner()))?;
        NetConfig::from_file(file)
    }

    fn from_file(f: File) -> Result<NetConfig> {
        if f.mqtt_cert.is_some() != f.mqtt_key.is_some() {
            bail!("fields MqttCert and MqttKey: give both or neither");
        }
        if f.mqtt_password_file.is_some() && f.mqtt_username.is_none() {
            bail!("field MqttPasswordFile: give MqttUsername too");
        }
        let d = NetConfig::default();
        let profile = match f.table_profile.as_deref() {
            None => TableProfile::Default,
            Some(p) => p
                .parse()
                .map_err(|e| anyhow::anyhow!("field TableProfile: {e}"))?,
        };
        let t = TableSizes::of_profile(profile);
        let flows = f.flow_table_size.unwrap_or(t.flows);
        Ok(NetConfig {
            node_public_address: f.node_public_address,
            node_public_port: f.node_public_port.unwrap_or(d.node_public_port),
            cluster_url: f.cluster_url,
            cluster_mqtt_port: f.cluster_mqtt_port.unwrap_or(d.cluster_mqtt_port),
            default_interface: f.default_interface,
            debug: f.debug.unwrap_or(d.debug),
            public_ip_networking: f.public_ip_networking.unwrap_or(d.public_ip_networking),
            public_ip_url: f.public_ip_url,
            mqtt_cert: f.mqtt_cert.map(PathBuf::from),
            mqtt_key: f.mqtt_key.map(PathBuf::from),
            mqtt_auth: MqttAuth {
                tls: f.mqtt_tls.unwrap_or(false),
                ca: f.mqtt_ca.map(PathBuf::from),
                username: f.mqtt_username,
                password_file: f.mqtt_password_file.map(PathBuf::from),
            },
            tables: TableSizes {
                flows,
                services: f.service_table_size.unwrap_or(t.services),
                backends: f.backend_table_size.unwrap_or(t.backends),
                instances: f.instance_table_size.unwrap_or(t.instances),
                pending: f.pending_table_size.unwrap_or(t.pending),
                miss_hold: f.miss_hold.unwrap_or(t.miss_hold),
                flows_per_container: f
                    .flows_per_container
                    .unwrap_or(netmanager_common::default_flows_per_container(flows)),
            },
            tunnel_peers: f.tunnel_peers,
        })
    }
}

/// Where the daemon keeps its files and which knobs it runs with; built from
/// the command line (which also reads the environment), see `cli`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub config_path: PathBuf,
    pub socket_path: PathBuf,
    pub bpf_dir: PathBuf,
    pub state_path: PathBuf,
    pub log_path: Option<PathBuf>,
    /// Uplink interface override (else DefaultInterface, else the default route's).
    pub uplink: Option<String>,
    /// `--tunnel-mtu`/TUN_MTU_SIZE, else tuncfg.json's MTUSize, else 1450.
    pub tunnel_mtu: u16,
    /// Where tunnel datagrams arrive and leave from: tuncfg.json's
    /// TunnelPort, else 50103. NodePublicPort is only what peers are told
    /// (behind NAT the router forwards it here).
    pub tunnel_port: u16,
    /// 10.30.0.0/16, fcef::/21, fdff::/16 unless tuncfg.json says otherwise.
    pub service_ranges: ServiceRanges,
    /// TCX links, classic tc filters, or what the kernel has.
    pub attach_mode: AttachMode,
    /// TC alone on the uplink, or XDP in front of it.
    pub uplink_hook: UplinkHook,
    /// The XDP mode with the XDP hook.
    pub xdp_mode: XdpMode,
    /// PublicIPNetworking's discovery service: the flag, else netcfg.json's
    /// PublicIPDiscoveryUrl, else upstream's.
    pub public_ip_url: String,
    /// Run without loading eBPF (plumbing and control plane only).
    pub no_dataplane: bool,
    /// How often an inferred node address is re-checked.
    pub address_check: Duration,
    /// Extra CA certificate (PEM) for the MQTT broker's TLS certificate.
    pub mqtt_ca: Option<PathBuf>,
    pub net: NetConfig,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_object_gives_defaults() {
        assert_eq!(NetConfig::parse("{}").unwrap(), NetConfig::default());
    }

    #[test]
    fn ports_as_numbers_or_strings() {
        let c = NetConfig::parse(r#"{"NodePublicPort": 5000, "ClusterMqttPort": "1883"}"#).unwrap();
        assert_eq!(c.node_public_port, 5000);
        assert_eq!(c.cluster_mqtt_port, 1883);
    }

    #[test]
    fn mqtt_credentials_and_tls_without_client_certificate() {
        let c = NetConfig::parse(
            r#"{"MqttTls": true, "MqttCa": "/etc/oak/ca.pem", "MqttUsername": "node1",
                "MqttPasswordFile": "/etc/oak/mqtt.pw"}"#,
        )
        .unwrap();
        assert_eq!(
            c.mqtt_auth,
            MqttAuth {
                tls: true,
                ca: Some("/etc/oak/ca.pem".into()),
                username: Some("node1".into()),
                password_file: Some("/etc/oak/mqtt.pw".into()),
            }
        );
        assert!(c.mqtt_cert.is_none());
        let e = NetConfig::parse(r#"{"MqttPasswordFile": "/x"}"#).unwrap_err();
        assert!(format!("{e:#}").contains("MqttUsername"), "{e:#}");
    }

    #[test]
    fn node_public_address_may_be_ipv6_and_unspecified_means_unset() {
        let c = NetConfig::parse(r#"{"NodePublicAddress": "2001:db8::5"}"#).unwrap();
        assert_eq!(c.node_public_address, Some("2001:db8::5".parse().unwrap()));
        for unset in ["0.0.0.0", "::", "", " "] {
            let c = NetConfig::parse(&format!(r#"{{"NodePublicAddress": "{unset}"}}"#)).unwrap();
            assert_eq!(c.node_public_address, None, "{unset:?}");
        }
    }

    #[test]
    fn bad_field_is_named() {
        for (body, field) in [
            (r#"{"NodePublicPort": "port"}"#, "NodePublicPort"),
            (r#"{"Debug": 3}"#, "Debug"),
            (r#"{"NodePublicAddress": "1.2.3"}"#, "NodePublicAddress"),
            (r#"{"DefaultInterface": 7}"#, "DefaultInterface"),
        ] {
            let e = NetConfig::parse(body).unwrap_err();
            assert!(format!("{e:#}").contains(field), "{body}: {e:#}");
        }
        assert!(NetConfig::parse("[]").is_err());
    }

    #[test]
    fn tunnel_peers_and_flow_limit() {
        let c = NetConfig::parse(
            r#"{"TunnelPeers": ["198.51.100.7", "10.99.0.0/16", "2001:db8::/32"],
                "FlowTableSize": 1000}"#,
        )
        .unwrap();
        assert_eq!(
            c.tunnel_peers,
            vec![
                ("198.51.100.7".parse().unwrap(), 32),
                ("10.99.0.0".parse().unwrap(), 16),
                ("2001:db8::".parse().unwrap(), 32),
            ]
        );
        assert_eq!(c.tables.flows_per_container, 250, "a quarter of the table");
        let c = NetConfig::parse(
            r#"{"TunnelPeers": "198.51.100.7, 198.51.100.8/31", "FlowsPerContainer": "99"}"#,
        )
        .unwrap();
        assert_eq!(c.tunnel_peers.len(), 2);
        assert_eq!(c.tables.flows_per_container, 99);
        for bad in [
            r#"{"TunnelPeers": ["10.0.0.0/33"]}"#,
            r#"{"TunnelPeers": ["host.example"]}"#,
            r#"{"TunnelPeers": [7]}"#,
            r#"{"FlowsPerContainer": 0}"#,
        ] {
            let e = NetConfig::parse(bad).unwrap_err();
            let text = format!("{e:#}");
            assert!(
                text.contains("TunnelPeers") || text.contains("FlowsPerContainer"),
                "{bad}: {text}"
            );
        }
    }
}
