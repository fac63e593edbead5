//! Typed writes to the maps: configuration, instances, services with their
//! backend slices, the node's own addresses, flow expiry, pending misses
//! and counters.

use std::collections::BTreeMap;
use std::net::IpAddr;

use aya::Ebpf;
use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray};
use netmanager_common::{
    Addr, BackendKey, CONFIG_FIB_SOURCE_V4, CONFIG_FIB_SOURCE_V6, Config, Counter, CounterValue,
    DEFAULT_NODE_ADDRESSES, FLOW_IDLE_NS, Flow, FlowKey, INSTANCE_LOCAL, Instance, MAX_BACKENDS,
    MAX_SERVICE_RANGES, Prefix, ReverseFlow, Service, ServiceKind, maps,
};

use super::addr::to_addr;
use super::underlay::UnderlayState;
use super::{DataplaneConfig, DataplaneError, InstanceEntry, MapSizes, Result};

pub struct Tables {
    config: Array<MapData, Config>,
    services: HashMap<MapData, Addr, Service>,
    backends: HashMap<MapData, BackendKey, Addr>,
    instances: HashMap<MapData, Addr, Instance>,
    flows: HashMap<MapData, FlowKey, Flow>,
    reverse: HashMap<MapData, FlowKey, ReverseFlow>,
    pending: HashMap<MapData, Addr, u32>,
    counters: PerCpuArray<MapData, CounterValue>,
    node_addresses: HashMap<MapData, Addr, u32>,
}

/// Takes map `name` out of the loaded object, typed.
pub(super) fn take<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| DataplaneError::Other(format!("the eBPF object has no map {name}")))?;
    T::try_from(map).map_err(|e| DataplaneError::bpf(format!("map {name}"), e))
}

/// A failed map operation, e.g. "reading COUNTERS: ...".
fn map_err(action: &'static str, map: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |e| DataplaneError::bpf(format!("{action} {map}"), e)
}

/// A failed insert, with the likely cause and its remedy.
fn insert_err(map: &'static str, size: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |e| DataplaneError::bpf(format!("writing {map} (full? raise the {size} size)"), e)
}

impl Tables {
    pub fn take(ebpf: &mut Ebpf) -> Result<Tables> {
        Ok(Tables {
            config: take(ebpf, maps::CONFIG)?,
            services: take(ebpf, maps::SERVICES)?,
            backends: take(ebpf, maps::BACKENDS)?,
            instances: take(ebpf, maps::INSTANCES)?,
            flows: take(ebpf, maps::FLOWS)?,
            reverse: take(ebpf, maps::REVERSE_FLOWS)?,
            pending: take(ebpf, maps::PENDING)?,
            counters: take(ebpf, maps::COUNTERS)?,
            node_addresses: take(ebpf, maps::NODE_ADDRESSES)?,
        })
    }

    pub fn write_config(&mut self, cfg: &DataplaneConfig, underlay: &UnderlayState) -> Result<()> {
        let value = config_value(cfg, underlay)?;
        self.config
            .set(0, value, 0)
            .map_err(map_err("writing", maps::CONFIG))
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

    pub fn upsert_instance(&mut self, ns_ip: IpAddr, e: &InstanceEntry) -> Result<()> {
        let (flags, ifindex, mac) = match e.local {
            Some(l) => (INSTANCE_LOCAL, l.ifindex, l.mac),
            None => (0, 0, [0; 6]),
        };
        let value = Instance {
            instance_ip: e.instance_ip.map(to_addr).unwrap_or(Addr::ZERO),
            node_ip: to_addr(e.node_ip),
            node_port: e.node_port,
            flags,
            ifindex,
            mac,
            _pad: [0; 2],
        };
        self.instances
            .insert(to_addr(ns_ip), value, 0)
            .map_err(insert_err(maps::INSTANCES, "instances"))
    }

    pub fn remove_instance(&mut self, ns_ip: IpAddr) -> Result<()> {
        ignore_missing(
            self.instances.remove(&to_addr(ns_ip)),
            "removing from",
            maps::INSTANCES,
        )
    }

    /// Writes the new backend slice under the next generation, then switches
    /// the service entry to it, then deletes the old slice: a program reads
    /// either the old or the new slice, never a mix.
    pub fn upsert_service(
        &mut self,
        service_ip: IpAddr,
        kind: ServiceKind,
        backends: &[IpAddr],
    ) -> Result<()> {
        if backends.len() > MAX_BACKENDS as usize {
            return Err(DataplaneError::Other(format!(
                "service {service_ip} has {} backends; at most {MAX_BACKENDS} are supported",
                backends.len()
            )));
        }
        let key = to_addr(service_ip);
        let old = self.services.get(&key, 0).ok();
        let generation = old.map(|s| s.generation.wrapping_add(1)).unwrap_or(1);
        for (index, ns_ip) in backends.iter().enumerate() {
            let bkey = BackendKey {
                service: key,
                generation,
                index: index as u32,
            };
            self.backends
                .insert(bkey, to_addr(*ns_ip), 0)
                .map_err(insert_err(maps::BACKENDS, "backends"))?;
        }
        let service = Service {
            kind: kind as u8,
            _pad0: 0,
            count: backends.len() as u16,
            generation,
            rr_cursor: old.map(|s| s.rr_cursor).unwrap_or(0),
            _pad1: 0,
        };
        self.services
            .insert(key, service, 0)
            .map_err(insert_err(maps::SERVICES, "services"))?;
        if let Some(old) = old {
            self.remove_slice(&key, &old)?;
        }
        Ok(())
    }

    pub fn remove_service(&mut self, service_ip: IpAddr) -> Result<()> {
        let key = to_addr(service_ip);
        let Ok(old) = self.services.get(&key, 0) else {
            return Ok(());
        };
        ignore_missing(self.services.remove(&key), "removing from", maps::SERVICES)?;
        self.remove_slice(&key, &old)
    }

    fn remove_slice(&mut self, key: &Addr, s: &Service) -> Result<()> {
        for index in 0..s.count as u32 {
            let bkey = BackendKey {
                service: *key,
                generation: s.generation,
                index,
            };
            ignore_missing(self.backends.remove(&bkey), "removing from", maps::BACKENDS)?;
        }
        Ok(())
    }

    pub fn clear_pending(&mut self, addr: IpAddr) -> Result<()> {
        ignore_missing(
            self.pending.remove(&to_addr(addr)),
            "removing from",
            maps::PENDING,
        )
    }

    /// Deletes flows (both directions) idle for longer than the contract's
    /// 60 s, so the maps' fill level means live flows.
    pub fn expire_flows(&mut self, now_ns: u64) -> Result<usize> {
        let stale = |last: u64| now_ns.saturating_sub(last) >= FLOW_IDLE_NS;
        let old_fwd: Vec<FlowKey> = self
            .flows
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(_, f)| stale(f.last_seen_ns))
            .map(|(k, _)| k)
            .collect();
        let old_rev: Vec<FlowKey> = self
            .reverse
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(_, f)| stale(f.last_seen_ns))
            .map(|(k, _)| k)
            .collect();
        for k in &old_fwd {
            ignore_missing(self.flows.remove(k), "expiring", maps::FLOWS)?;
        }
        for k in &old_rev {
            ignore_missing(self.reverse.remove(k), "expiring", maps::REVERSE_FLOWS)?;
        }
        Ok(old_fwd.len() + old_rev.len())
    }

    pub fn counters(&self) -> Result<Vec<(Counter, u64, u64)>> {
        let mut out = Vec::with_capacity(Counter::COUNT);
        for counter in Counter::ALL {
            let per_cpu = self
                .counters
                .get(&(counter as u32), 0)
                .map_err(map_err("reading", maps::COUNTERS))?;
            let (p, b) = per_cpu
                .iter()
                .fold((0, 0), |(p, b), v| (p + v.packets, b + v.bytes));
            out.push((counter, p, b));
        }
        Ok(out)
    }

    /// (map, entries, max entries) for the maps whose fill level matters.
    pub fn fill(&self, sizes: &MapSizes) -> Vec<(String, u32, u32)> {
        let row = |name: &str, entries: usize, max: u32| (name.to_string(), entries as u32, max);
        vec![
            row(maps::SERVICES, self.services.keys().count(), sizes.services),
            row(maps::BACKENDS, self.backends.keys().count(), sizes.backends),
            row(
                maps::INSTANCES,
                self.instances.keys().count(),
                sizes.instances,
            ),
            row(maps::FLOWS, self.flows.keys().count(), sizes.flows),
            row(
                maps::REVERSE_FLOWS,
                self.reverse.keys().count(),
                sizes.flows,
            ),
            row(maps::PENDING, self.pending.keys().count(), sizes.pending),
        ]
    }

    /// Read access for tests and inspection.
    pub fn flow(&self, key: &FlowKey) -> Option<Flow> {
        self.flows.get(key, 0).ok()
    }

    pub fn reverse_flow(&self, key: &FlowKey) -> Option<ReverseFlow> {
        self.reverse.get(key, 0).ok()
    }

    pub fn pending(&self, addr: IpAddr) -> Option<u32> {
        self.pending.get(&to_addr(addr), 0).ok()
    }
}

/// Deleting what is already gone is fine (a flow may expire under us).
fn ignore_missing(
    r: std::result::Result<(), MapError>,
    action: &'static str,
    map: &'static str,
) -> Result<()> {
    match r {
        Ok(()) => Ok(()),
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(map_err(action, map)(e)),
    }
}

fn config_value(cfg: &DataplaneConfig, underlay: &UnderlayState) -> Result<Config> {
    if cfg.service_ranges.len() > MAX_SERVICE_RANGES {
        return Err(DataplaneError::Other(format!(
            "{} service ranges configured; at most {MAX_SERVICE_RANGES}",
            cfg.service_ranges.len()
        )));
    }
    let mut ranges = [Prefix::default(); MAX_SERVICE_RANGES];
    for (slot, (ip, len)) in ranges.iter_mut().zip(&cfg.service_ranges) {
        let len = match ip {
            IpAddr::V4(_) if *len <= 32 => 96 + *len as u32,
            IpAddr::V6(_) if *len <= 128 => *len as u32,
            _ => {
                return Err(DataplaneError::Other(format!(
                    "service range {ip}/{len}: prefix length out of range"
                )));
            }
        };
        *slot = Prefix {
            addr: to_addr(*ip),
            len,
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
    })
}

/// ifindex of an interface in this network namespace; 0 for "none".
pub fn ifindex(name: &str) -> Result<u32> {
    if name.is_empty() {
        return Ok(0);
    }
    let c = std::ffi::CString::new(name)
        .map_err(|_| DataplaneError::Other(format!("bad interface name {name:?}")))?;
    // SAFETY: c is a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        return Err(DataplaneError::Other(format!("no interface named {name}")));
    }
    Ok(i)
}
