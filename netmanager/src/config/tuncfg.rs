//! Upstream's second configuration file, `/etc/netmanager/tuncfg.json`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::Value;

use super::fields::*;
use crate::addresses::{SERVICE_RANGES, ServiceRanges};

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
pub(super) fn v4_range(net: Option<&str>, mask: Option<&str>) -> Result<(Ipv4Addr, u8), String> {
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
pub(super) fn v6_range(net: Option<&str>, len: Option<u32>) -> Result<(Ipv6Addr, u8), String> {
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
