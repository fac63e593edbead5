//! What the programs know about this node: CONFIG (its addresses, ports,
//! ranges and devices), the addresses tunnel datagrams are accepted on, and
//! the underlay prefixes trusted to send for any instance.

use std::collections::BTreeMap;
use std::net::IpAddr;

use aya::maps::lpm_trie::Key as LpmKey;
use netmanager_common::{
    Addr, CONFIG_FIB_SOURCE_V4, CONFIG_FIB_SOURCE_V6, CONFIG_XDP_REDIRECT, Config,
    DEFAULT_NODE_ADDRESSES, MAX_SERVICE_RANGES, Prefix, maps,
};

use super::super::addr::to_addr;
use super::super::underlay::UnderlayState;
use super::super::{DataplaneConfig, DataplaneError};
use super::{Result, Tables, ifindex, ignore_missing, insert_err, map_err};

impl Tables {
    pub fn write_config(&mut self, cfg: &DataplaneConfig, underlay: &UnderlayState) -> Result<()> {
        let value = config_value(cfg, underlay, self.inject_ifindex)?;
        self.config
            .set(0, value, 0)
            .map_err(map_err("writing", maps::CONFIG))?;
        // The cached routes were made with the old sources.
        self.new_route_epoch()
    }

    /// Retires every route the programs cached (ROUTE_CACHE): the next
    /// packet to each peer asks the FIB again.
    pub fn new_route_epoch(&mut self) -> Result<()> {
        let epoch = self
            .route_epoch
            .get(&0, 0)
            .map_err(map_err("reading", maps::ROUTE_EPOCH))?;
        self.route_epoch
            .set(0, epoch.wrapping_add(1), 0)
            .map_err(map_err("writing", maps::ROUTE_EPOCH))
    }

    /// Makes `NODE_ADDRESSES` hold exactly `addresses` (address -> ifindex).
    pub fn sync_node_addresses(&mut self, addresses: &BTreeMap<IpAddr, u32>) -> Result<()> {
        if addresses.len() > DEFAULT_NODE_ADDRESSES as usize {
            return Err(DataplaneError::Other(format!(
                "{} node addresses; the dataplane tracks at most {DEFAULT_NODE_ADDRESSES}",
                addresses.len()
            )));
        }
        let wanted: BTreeMap<Addr, u32> =
            addresses.iter().map(|(a, i)| (to_addr(*a), *i)).collect();
        let stale: Vec<Addr> = self
            .node_addresses
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(a, i)| wanted.get(a) != Some(i))
            .map(|(a, _)| a)
            .collect();
        for a in &stale {
            ignore_missing(
                self.node_addresses.remove(a),
                "removing from",
                maps::NODE_ADDRESSES,
            )?;
        }
        for (a, i) in wanted {
            self.node_addresses
                .insert(a, i, 0)
                .map_err(map_err("writing", maps::NODE_ADDRESSES))?;
        }
        Ok(())
    }

    /// Replaces TRUSTED_PEERS with `prefixes` (address, prefix length).
    pub fn write_trusted_peers(&mut self, prefixes: &[(IpAddr, u8)]) -> Result<()> {
        let mut wanted = Vec::new();
        for (ip, len) in prefixes {
            let len = prefix_len_128(*ip, *len).ok_or_else(|| {
                DataplaneError::Other(format!(
                    "tunnel peer {ip}/{len}: prefix length out of range"
                ))
            })?;
            wanted.push(LpmKey::new(len, to_addr(*ip)));
        }
        let old: Vec<LpmKey<Addr>> = self.trusted.keys().filter_map(|k| k.ok()).collect();
        for k in old {
            ignore_missing(
                self.trusted.remove(&k),
                "removing from",
                maps::TRUSTED_PEERS,
            )?;
        }
        for k in wanted {
            self.trusted
                .insert(&k, 1, 0)
                .map_err(insert_err(maps::TRUSTED_PEERS, "TunnelPeers (at most 64)"))?;
        }
        Ok(())
    }
}

/// A prefix length counted on the 128-bit form (an IPv4 /16 is 112).
fn prefix_len_128(ip: IpAddr, len: u8) -> Option<u32> {
    match ip {
        IpAddr::V4(_) if len <= 32 => Some(96 + u32::from(len)),
        IpAddr::V6(_) if len <= 128 => Some(u32::from(len)),
        _ => None,
    }
}

fn config_value(
    cfg: &DataplaneConfig,
    underlay: &UnderlayState,
    inject_ifindex: u32,
) -> Result<Config> {
    if cfg.service_ranges.len() > MAX_SERVICE_RANGES {
        return Err(DataplaneError::Other(format!(
            "{} service ranges configured; at most {MAX_SERVICE_RANGES}",
            cfg.service_ranges.len()
        )));
    }
    let mut ranges = [Prefix::default(); MAX_SERVICE_RANGES];
    for (slot, (ip, len)) in ranges.iter_mut().zip(&cfg.service_ranges) {
        let len = prefix_len_128(*ip, *len).ok_or_else(|| {
            DataplaneError::Other(format!(
                "service range {ip}/{len}: prefix length out of range"
            ))
        })?;
        *slot = Prefix {
            addr: to_addr(*ip),
            len,
            _pad: 0,
        };
    }
    let sources = underlay.sources();
    let mut flags = 0;
    if sources.v4.from_fib {
        flags |= CONFIG_FIB_SOURCE_V4;
    }
    if sources.v6.from_fib {
        flags |= CONFIG_FIB_SOURCE_V6;
    }
    if cfg.uplink_hook.redirects() {
        flags |= CONFIG_XDP_REDIRECT;
    }
    Ok(Config {
        src_v4: sources.v4.address.map(|a| a.octets()).unwrap_or([0; 4]),
        tunnel_port: cfg.tunnel_port,
        tunnel_mtu: cfg.tunnel_mtu,
        uplink_ifindex: ifindex(&cfg.uplink)?,
        n_ranges: cfg.service_ranges.len() as u32,
        service_ranges: ranges,
        miss_hold: cfg.miss_hold,
        flags,
        src_v6: sources
            .v6
            .address
            .map(|a| Addr { bytes: a.octets() })
            .unwrap_or(Addr::ZERO),
        segment_ifindex: underlay.segment.map(|s| s.0).unwrap_or(0),
        segment_return_ifindex: underlay.segment.map(|s| s.1).unwrap_or(0),
        inject_ifindex,
        flows_per_container: cfg.flows_per_container(),
    })
}
