//! `/etc/netmanager/netcfg.json` (contract 2.1) and the runtime settings that
//! command line flags and environment variables override.
//!
//! The file is read field by field from a `serde_json::Value` rather than
//! through a derived struct, so that an invalid value produces an error naming
//! the file and the field, and absent fields fall back to upstream defaults.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Map, Value};

pub use worker_common::paths::NETMANAGER_CONFIG as DEFAULT_CONFIG_PATH;
pub use worker_common::paths::NETMANAGER_SOCKET as DEFAULT_SOCKET_PATH;
pub const DEFAULT_BPF_DIR: &str = "/sys/fs/bpf/oakestra";
pub const DEFAULT_STATE_PATH: &str = "/run/oakestra/netmanager-state.json";
pub const DEFAULT_LOG_PATH: &str = "/var/log/oakestra/netmanager.log";
pub const DEFAULT_TUNNEL_MTU: u16 = 1450;
pub const DEFAULT_TUNNEL_PORT: u16 = 50103;
pub const DEFAULT_MQTT_PORT: u16 = 10003;

/// The contents of netcfg.json, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// None: "0.0.0.0", infer from the default route and re-check periodically.
    pub node_public_address: Option<Ipv4Addr>,
    /// Tunnel UDP port (a string on disk).
    pub node_public_port: u16,
    /// None: "0.0.0.0", take the cluster address from the NodeEngine's /register.
    pub cluster_url: Option<String>,
    /// Cluster MQTT port (a string on disk).
    pub cluster_mqtt_port: u16,
    /// Interface to prefer when several default routes exist.
    pub default_interface: Option<String>,
    pub debug: bool,
    /// Upstream resolves the public address through an external service; we
    /// have no such service, so this only gets logged (see `address_watch`).
    pub public_ip_networking: bool,
    pub mqtt_cert: Option<PathBuf>,
    pub mqtt_key: Option<PathBuf>,
    /// Our extension (upstream ignores unknown keys): dataplane map sizes.
    pub tables: TableSizes,
}

/// Map sizes of the dataplane (max entries) and how many packets it holds
/// per unknown address. netcfg.json keys: `FlowTableSize`,
/// `ServiceTableSize`, `BackendTableSize`, `InstanceTableSize`,
/// `PendingTableSize`, `MissHold`. Pinned maps keep their size: changing one
/// takes effect after the pin directory is removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSizes {
    pub flows: u32,
    pub services: u32,
    pub backends: u32,
    pub instances: u32,
    pub pending: u32,
    pub miss_hold: u32,
}

impl Default for TableSizes {
    fn default() -> Self {
        TableSizes {
            flows: 65536,
            services: 4096,
            backends: 65536,
            instances: 8192,
            pending: 1024,
            miss_hold: 4,
        }
    }
}

impl TableSizes {
    fn parse(obj: &Map<String, Value>) -> Result<TableSizes> {
        let d = TableSizes::default();
        Ok(TableSizes {
            flows: opt_count(obj, "FlowTableSize")?.unwrap_or(d.flows),
            services: opt_count(obj, "ServiceTableSize")?.unwrap_or(d.services),
            backends: opt_count(obj, "BackendTableSize")?.unwrap_or(d.backends),
            instances: opt_count(obj, "InstanceTableSize")?.unwrap_or(d.instances),
            pending: opt_count(obj, "PendingTableSize")?.unwrap_or(d.pending),
            miss_hold: opt_count(obj, "MissHold")?.unwrap_or(d.miss_hold),
        })
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
            mqtt_cert: None,
            mqtt_key: None,
            tables: TableSizes::default(),
        }
    }
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
            anyhow!(
                "not valid JSON at line {} column {}: {e}",
                e.line(),
                e.column()
            )
        })?;
        let Value::Object(obj) = value else {
            bail!("top level must be a JSON object");
        };
        let d = NetConfig::default();
        let node_public_address =
            match opt_string(&obj, "NodePublicAddress")? {
                None => None,
                Some(s) if s.is_empty() || s == "0.0.0.0" => None,
                Some(s) => Some(s.parse::<Ipv4Addr>().map_err(|_| {
                    anyhow!("field NodePublicAddress: {s:?} is not an IPv4 address")
                })?),
            };
        let cluster_url = match opt_string(&obj, "ClusterUrl")? {
            Some(s) if !s.is_empty() && s != "0.0.0.0" => Some(s),
            _ => None,
        };
        Ok(NetConfig {
            node_public_address,
            node_public_port: opt_port(&obj, "NodePublicPort")?.unwrap_or(d.node_public_port),
            cluster_url,
            cluster_mqtt_port: opt_port(&obj, "ClusterMqttPort")?.unwrap_or(d.cluster_mqtt_port),
            default_interface: opt_string(&obj, "DefaultInterface")?.filter(|s| !s.is_empty()),
            debug: opt_bool(&obj, "Debug")?.unwrap_or(d.debug),
            public_ip_networking: opt_bool(&obj, "PublicIPNetworking")?.unwrap_or(false),
            mqtt_cert: opt_string(&obj, "MqttCert")?
                .filter(|s| !s.is_empty())
                .map(PathBuf::from),
            mqtt_key: opt_string(&obj, "MqttKey")?
                .filter(|s| !s.is_empty())
                .map(PathBuf::from),
            tables: TableSizes::parse(&obj)?,
        })
        .and_then(|c| c.validate())
    }

    fn validate(self) -> Result<NetConfig> {
        if self.mqtt_cert.is_some() != self.mqtt_key.is_some() {
            bail!("fields MqttCert and MqttKey: give both or neither");
        }
        Ok(self)
    }
}

fn opt_string(obj: &Map<String, Value>, field: &str) -> Result<Option<String>> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.trim().to_string())),
        Some(other) => bail!("field {field}: expected a string, found {other}"),
    }
}

fn opt_bool(obj: &Map<String, Value>, field: &str) -> Result<Option<bool>> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        // Hand-edited files sometimes quote booleans; accept the obvious spellings.
        Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(Some(true)),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(Some(false)),
        Some(other) => bail!("field {field}: expected true or false, found {other}"),
    }
}

/// A positive count (map size), as a number or a numeric string.
fn opt_count(obj: &Map<String, Value>, field: &str) -> Result<Option<u32>> {
    let text = match obj.get(field) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => s.trim().to_string(),
        Some(Value::Number(n)) => n.to_string(),
        Some(other) => bail!("field {field}: expected a number, found {other}"),
    };
    match text.parse::<u32>() {
        Ok(n) if n > 0 => Ok(Some(n)),
        _ => bail!("field {field}: {text:?} is not a positive number"),
    }
}

/// Ports are strings upstream ("50103"); a bare number is accepted too.
fn opt_port(obj: &Map<String, Value>, field: &str) -> Result<Option<u16>> {
    let text = match obj.get(field) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => return Ok(None),
        Some(Value::String(s)) => s.trim().to_string(),
        Some(Value::Number(n)) => n.to_string(),
        Some(other) => bail!("field {field}: expected a port number as a string, found {other}"),
    };
    match text.parse::<u16>() {
        Ok(p) if p != 0 => Ok(Some(p)),
        _ => bail!("field {field}: {text:?} is not a port number (1-65535)"),
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
    pub tunnel_mtu: u16,
    /// Run without loading eBPF (plumbing and control plane only).
    pub no_dataplane: bool,
    pub net: NetConfig,
}

/// TUN_MTU_SIZE as upstream reads it; a bad value is an error, not a silent default.
pub fn tunnel_mtu_from_env() -> Result<u16> {
    match std::env::var("TUN_MTU_SIZE") {
        Err(_) => Ok(DEFAULT_TUNNEL_MTU),
        Ok(s) if s.trim().is_empty() => Ok(DEFAULT_TUNNEL_MTU),
        Ok(s) => match s.trim().parse::<u16>() {
            Ok(m) if (576..=9000).contains(&m) => Ok(m),
            _ => bail!("environment TUN_MTU_SIZE: {s:?} is not an MTU between 576 and 9000"),
        },
    }
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
    fn bad_field_is_named() {
        let e = NetConfig::parse(r#"{"NodePublicPort": "port"}"#).unwrap_err();
        assert!(format!("{e:#}").contains("NodePublicPort"), "{e:#}");
        let e = NetConfig::parse(r#"{"Debug": 3}"#).unwrap_err();
        assert!(format!("{e:#}").contains("Debug"), "{e:#}");
        let e = NetConfig::parse(r#"{"NodePublicAddress": "1.2.3"}"#).unwrap_err();
        assert!(format!("{e:#}").contains("NodePublicAddress"), "{e:#}");
    }
}
