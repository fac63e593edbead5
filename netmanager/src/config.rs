//! `/etc/netmanager/netcfg.json` (docs/contract.md, NetManager configuration)
//! and the runtime settings that the command line (and its environment
//! variables, see `cli`) adds.
//!
//! The file is read with serde; `serde_path_to_error` makes every error name
//! the field, and absent or empty fields take upstream's defaults. Upstream's
//! second file, `/etc/netmanager/tuncfg.json`, may override the service
//! ranges, the tunnel port and the tunnel MTU ([`TunConfig`]).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde::de::{self, Deserializer};
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

use crate::addresses::{SERVICE_RANGES, ServiceRanges};
use crate::dataplane::AttachMode;

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
/// netcfg.json keys: `FlowTableSize`, `ServiceTableSize`,
/// `BackendTableSize`, `InstanceTableSize`, `PendingTableSize`, `MissHold`,
/// `FlowsPerContainer`. A changed size takes effect at the next start: the
/// pinned map is replaced by one of the new size with its entries copied
/// over (those that fit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSizes {
    pub flows: u32,
    pub services: u32,
    pub backends: u32,
    pub instances: u32,
    pub pending: u32,
    pub miss_hold: u32,
    /// Default: a quarter of `flows`.
    pub flows_per_container: u32,
}

impl Default for TableSizes {
    fn default() -> Self {
        TableSizes {
            flows: netmanager_common::DEFAULT_FLOWS,
            services: netmanager_common::DEFAULT_SERVICES,
            backends: netmanager_common::DEFAULT_BACKENDS,
            instances: netmanager_common::DEFAULT_INSTANCES,
            pending: netmanager_common::DEFAULT_PENDING,
            miss_hold: DEFAULT_MISS_HOLD,
            flows_per_container: netmanager_common::default_flows_per_container(
                netmanager_common::DEFAULT_FLOWS,
            ),
        }
    }
}

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
        let t = TableSizes::default();
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

/// A trimmed string; absent, `null` and empty are unset.
fn text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        Value::String(s) if s.trim().is_empty() => Ok(None),
        Value::String(s) => Ok(Some(s.trim().to_string())),
        other => Err(de::Error::custom(format!(
            "expected a string, found {other}"
        ))),
    }
}

/// An http(s) URL.
fn url<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    match text(d)? {
        None => Ok(None),
        Some(u) => check_url(&u).map(|()| Some(u)).map_err(de::Error::custom),
    }
}

/// A URL the HTTP client can ask: http or https with a host.
pub fn check_url(u: &str) -> Result<(), String> {
    let rest = u
        .strip_prefix("http://")
        .or_else(|| u.strip_prefix("https://"))
        .ok_or_else(|| format!("{u:?} is not an http:// or https:// URL"))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(format!("{u:?} has no host"));
    }
    Ok(())
}

/// Like [`text`], with upstream's "0.0.0.0" meaning unset too.
fn unset_or_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(text(d)?.filter(|s| s != "0.0.0.0"))
}

/// An address; "0.0.0.0" (upstream's unset) and "::" are unset too.
fn unset_or_ip<'de, D: Deserializer<'de>>(d: D) -> Result<Option<IpAddr>, D::Error> {
    match unset_or_text(d)? {
        None => Ok(None),
        Some(s) => match s.parse::<IpAddr>() {
            Ok(ip) if ip.is_unspecified() => Ok(None),
            Ok(ip) => Ok(Some(ip)),
            Err(_) => Err(de::Error::custom(format!("{s:?} is not an IP address"))),
        },
    }
}

/// Ports are strings upstream ("50103"); a bare number is accepted too.
fn port<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    let text = match Value::deserialize(d)? {
        Value::Null => return Ok(None),
        Value::String(s) if s.trim().is_empty() => return Ok(None),
        Value::String(s) => s.trim().to_string(),
        Value::Number(n) => n.to_string(),
        other => {
            return Err(de::Error::custom(format!(
                "expected a port number as a string, found {other}"
            )));
        }
    };
    match text.parse::<u16>() {
        Ok(p) if p != 0 => Ok(Some(p)),
        _ => Err(de::Error::custom(format!(
            "{text:?} is not a port number (1-65535)"
        ))),
    }
}

/// A boolean; hand-edited files sometimes quote it.
fn flag<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        Value::Bool(b) => Ok(Some(b)),
        Value::String(s) if s.eq_ignore_ascii_case("true") => Ok(Some(true)),
        Value::String(s) if s.eq_ignore_ascii_case("false") => Ok(Some(false)),
        other => Err(de::Error::custom(format!(
            "expected true or false, found {other}"
        ))),
    }
}

/// A positive count (map size), as a number or a numeric string.
fn count<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let text = match Value::deserialize(d)? {
        Value::Null => return Ok(None),
        Value::String(s) => s.trim().to_string(),
        Value::Number(n) => n.to_string(),
        other => {
            return Err(de::Error::custom(format!(
                "expected a number, found {other}"
            )));
        }
    };
    match text.parse::<u32>() {
        Ok(n) if n > 0 => Ok(Some(n)),
        _ => Err(de::Error::custom(format!(
            "{text:?} is not a positive number"
        ))),
    }
}

/// Upstream's `/etc/netmanager/tuncfg.json`, as far as it means anything
/// to an eBPF dataplane: the service ranges, the tunnel port and the MTU.
/// Its TUN device keys (`HostTunnelDeviceName`, `TunnelIP`, `TunNetIPv6`)
/// configure upstream's userspace proxy, which the programs replace; they
/// are read and ignored. Keys match without regard to case, as Go's JSON
/// decoder matches them (upstream's own sample file writes `Mtusize`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TunConfig {
    /// `ProxySubnetwork` / `ProxySubnetworkMask`: the IPv4 service range.
    pub service_v4: Option<(Ipv4Addr, u8)>,
    /// `ProxySubnetworkIPv6` / `ProxySubnetworkIPv6Prefix`: the IPv6 service
    /// range upstream routes to its proxy (fcef::/21 by default; its
    /// built-in fc00::/7 would take in container addresses, which the node
    /// refuses once it knows its subnet).
    pub service_v6: Option<(Ipv6Addr, u8)>,
    /// `TunnelPort`: where tunnel datagrams are received and sent from.
    pub tunnel_port: Option<u16>,
    /// `MTUSize`.
    pub mtu: Option<u16>,
}

/// tuncfg.json as written (keys lowercased); every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct TunFile {
    #[serde(rename = "proxysubnetwork", deserialize_with = "text")]
    proxy_subnetwork: Option<String>,
    #[serde(rename = "proxysubnetworkmask", deserialize_with = "text")]
    proxy_subnetwork_mask: Option<String>,
    #[serde(rename = "proxysubnetworkipv6", deserialize_with = "text")]
    proxy_subnetwork_v6: Option<String>,
    #[serde(rename = "proxysubnetworkipv6prefix", deserialize_with = "count")]
    proxy_subnetwork_v6_prefix: Option<u32>,
    #[serde(rename = "tunnelport", deserialize_with = "port")]
    tunnel_port: Option<u16>,
    #[serde(rename = "mtusize", deserialize_with = "count")]
    mtu: Option<u32>,
}

/// Keys of upstream's TUN device, which has no counterpart here.
const TUN_DEVICE_KEYS: [&str; 3] = ["hosttunneldevicename", "tunnelip", "tunnetipv6"];

impl TunConfig {
    /// Read the file; a missing file changes nothing (upstream logs it and
    /// runs on its defaults too).
    pub fn load(path: &Path) -> Result<TunConfig> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(TunConfig::default()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Self::parse(&text)
            .with_context(|| format!("invalid tunnel configuration {}", path.display()))
    }

    /// Parse the JSON text; errors name the field as the file spells it.
    pub fn parse(text: &str) -> Result<TunConfig> {
        let value: Value = serde_json::from_str(text).map_err(|e| {
            anyhow::anyhow!(
                "not valid JSON at line {} column {}: {e}",
                e.line(),
                e.column()
            )
        })?;
        let Value::Object(map) = value else {
            bail!("top level must be a JSON object");
        };
        let mut spelled = HashMap::new();
        let mut lower = serde_json::Map::new();
        for (key, v) in map {
            let k = key.to_ascii_lowercase();
            if TUN_DEVICE_KEYS.contains(&k.as_str()) {
                tracing::debug!(
                    key,
                    "tuncfg.json: a setting of upstream's TUN device; ignored"
                );
            }
            spelled.insert(k.clone(), key);
            lower.insert(k, v);
        }
        let named = |k: &str| spelled.get(k).cloned().unwrap_or_else(|| k.to_string());
        let f: TunFile = serde_path_to_error::deserialize(Value::Object(lower)).map_err(|e| {
            anyhow::anyhow!("field {}: {}", named(&e.path().to_string()), e.inner())
        })?;
        let service_v4 = match (&f.proxy_subnetwork, &f.proxy_subnetwork_mask) {
            (None, None) => None,
            (net, mask) => Some(v4_range(net.as_deref(), mask.as_deref()).map_err(|e| {
                anyhow::anyhow!(
                    "fields {} / {}: {e}",
                    named("proxysubnetwork"),
                    named("proxysubnetworkmask")
                )
            })?),
        };
        let service_v6 = match (&f.proxy_subnetwork_v6, f.proxy_subnetwork_v6_prefix) {
            (None, None) => None,
            (net, len) => Some(v6_range(net.as_deref(), len).map_err(|e| {
                anyhow::anyhow!(
                    "fields {} / {}: {e}",
                    named("proxysubnetworkipv6"),
                    named("proxysubnetworkipv6prefix")
                )
            })?),
        };
        let mtu = match f.mtu {
            None => None,
            Some(m) if (576..=9000).contains(&m) => Some(m as u16),
            Some(m) => bail!(
                "field {}: {m} is not an MTU between 576 and 9000",
                named("mtusize")
            ),
        };
        Ok(TunConfig {
            service_v4,
            service_v6,
            tunnel_port: f.tunnel_port,
            mtu,
        })
    }

    /// The service ranges with this file's overrides: its IPv4 range
    /// replaces 10.30.0.0/16, its IPv6 range replaces fcef::/21; fdff::/16,
    /// which upstream clusters hand out in practice, stays.
    pub fn service_ranges(&self) -> ServiceRanges {
        let [v4, v6, rest] = SERVICE_RANGES;
        ServiceRanges::new([
            self.service_v4.map_or(v4, |(n, l)| (IpAddr::V4(n), l)),
            self.service_v6.map_or(v6, |(n, l)| (IpAddr::V6(n), l)),
            rest,
        ])
    }
}

/// Upstream's defaults fill a half-given range: 10.30.0.0, 255.255.0.0.
fn v4_range(net: Option<&str>, mask: Option<&str>) -> Result<(Ipv4Addr, u8), String> {
    let net: Ipv4Addr = net
        .unwrap_or("10.30.0.0")
        .parse()
        .map_err(|_| format!("{:?} is not an IPv4 address", net.unwrap_or_default()))?;
    let mask_text = mask.unwrap_or("255.255.0.0");
    let mask: Ipv4Addr = mask_text
        .parse()
        .map_err(|_| format!("{mask_text:?} is not an IPv4 netmask"))?;
    let bits = u32::from(mask);
    let len = bits.leading_ones();
    if bits.checked_shl(len).unwrap_or(0) != 0 || len == 0 {
        return Err(format!(
            "{mask_text:?} is not a contiguous, non-empty netmask"
        ));
    }
    let net = Ipv4Addr::from(u32::from(net) & bits);
    // Whether it collides with this node's containers is checked once the
    // cluster has handed out the subnet (`ServiceRanges::collision`).
    Ok((net, len as u8))
}

/// A missing address or prefix keeps fcef::/21's part.
fn v6_range(net: Option<&str>, len: Option<u32>) -> Result<(Ipv6Addr, u8), String> {
    let text = net.unwrap_or("fcef::");
    let net: Ipv6Addr = text
        .parse()
        .map_err(|_| format!("{text:?} is not an IPv6 address"))?;
    let len = len.unwrap_or(21);
    if len > 128 {
        return Err(format!("prefix length {len} is larger than 128"));
    }
    let len = len as u8;
    let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
    Ok((Ipv6Addr::from(u128::from(net) & mask), len))
}

/// Address prefixes, as a JSON list of strings or one comma-separated
/// string: "198.51.100.7", "198.51.100.0/24", "2001:db8::/32".
fn prefixes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(IpAddr, u8)>, D::Error> {
    let items: Vec<String> = match Value::deserialize(d)? {
        Value::Null => return Ok(Vec::new()),
        Value::String(s) => s.split(',').map(str::to_string).collect(),
        Value::Array(a) => a
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                other => Err(de::Error::custom(format!(
                    "expected an address or prefix as a string, found {other}"
                ))),
            })
            .collect::<Result<_, _>>()?,
        other => {
            return Err(de::Error::custom(format!(
                "expected a list of addresses or prefixes, found {other}"
            )));
        }
    };
    items
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| parse_prefix(s).map_err(de::Error::custom))
        .collect()
}

fn parse_prefix(s: &str) -> Result<(IpAddr, u8), String> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let ip: IpAddr = addr
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not an address or prefix"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(l) => match l.trim().parse::<u8>() {
            Ok(n) if n <= max => n,
            _ => return Err(format!("{s:?}: prefix length must be 0-{max}")),
        },
    };
    Ok((ip, len))
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
