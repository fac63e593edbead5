//! Typed writes to the maps: configuration, instances (and the
//! instance -> node index derived from them), services with their backend
//! slices, the node's own addresses, trusted peers, flow expiry with the
//! per-container flow counts, pending misses and counters.

use std::collections::HashMap as StdHashMap;
use std::net::IpAddr;

use aya::Ebpf;
use aya::maps::lpm_trie::LpmTrie;
use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray};
use netmanager_common::{
    Addr, BackendKey, Config, Counter, CounterValue, Flow, FlowCountKey, FlowKey, INSTANCE_LOCAL,
    Instance, InstanceNode, MAX_BACKENDS, ReverseFlow, Service, ServiceKind, maps,
};

mod flows;
mod node;

use super::addr::to_addr;
use super::{DataplaneError, InstanceEntry, MapSizes, Result};

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
    instance_nodes: HashMap<MapData, Addr, InstanceNode>,
    trusted: LpmTrie<MapData, Addr, u32>,
    flow_counts: HashMap<MapData, FlowCountKey, u64>,
    route_epoch: Array<MapData, u32>,
    instance_epoch: Array<MapData, u32>,
    /// INSTANCES as written (namespace address -> entry), so INSTANCE_NODES
    /// can be kept equal to it and flows attributed to their container.
    mirror: StdHashMap<Addr, Instance>,
    /// Instance address -> the namespace addresses whose entries name it,
    /// in write order (the last one decides; more than one only when
    /// tables disagree).
    claims: StdHashMap<Addr, Vec<Addr>>,
    /// The container-side end of the reinjection pair (0: none).
    inject_ifindex: u32,
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
    /// Takes the maps and brings what NetManager owns up to date with what
    /// an earlier NetManager left pinned: the instance -> node index is
    /// rebuilt from INSTANCES, the flow counts recounted from FLOWS, and the
    /// pending marks -- whose resolutions died with that process -- dropped.
    pub fn take(ebpf: &mut Ebpf, inject_ifindex: u32) -> Result<Tables> {
        let mut t = Tables {
            config: take(ebpf, maps::CONFIG)?,
            services: take(ebpf, maps::SERVICES)?,
            backends: take(ebpf, maps::BACKENDS)?,
            instances: take(ebpf, maps::INSTANCES)?,
            flows: take(ebpf, maps::FLOWS)?,
            reverse: take(ebpf, maps::REVERSE_FLOWS)?,
            pending: take(ebpf, maps::PENDING)?,
            counters: take(ebpf, maps::COUNTERS)?,
            node_addresses: take(ebpf, maps::NODE_ADDRESSES)?,
            instance_nodes: take(ebpf, maps::INSTANCE_NODES)?,
            trusted: take(ebpf, maps::TRUSTED_PEERS)?,
            flow_counts: take(ebpf, maps::FLOW_COUNTS)?,
            route_epoch: take(ebpf, maps::ROUTE_EPOCH)?,
            instance_epoch: take(ebpf, maps::INSTANCE_EPOCH)?,
            mirror: StdHashMap::new(),
            claims: StdHashMap::new(),
            inject_ifindex,
        };
        t.rebuild_instance_nodes()?;
        t.recount_flows()?;
        // Whatever an earlier NetManager changed in INSTANCES before it
        // could start an epoch for it; and never epoch 0 (see
        // `new_instance_epoch`).
        t.new_instance_epoch()?;
        let stale: Vec<Addr> = t.pending.keys().filter_map(|k| k.ok()).collect();
        for k in stale {
            ignore_missing(t.pending.remove(&k), "clearing", maps::PENDING)?;
        }
        Ok(t)
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
        let ns = to_addr(ns_ip);
        self.instances
            .insert(ns, value, 0)
            .map_err(insert_err(maps::INSTANCES, "instances"))?;
        let old = self.mirror.insert(ns, value);
        if old != Some(value) {
            self.new_instance_epoch()?;
        }
        if let Some(old) = old.filter(|o| o.instance_ip != value.instance_ip) {
            self.unclaim(&old.instance_ip, &ns)?;
        }
        self.claim(&value.instance_ip, &ns)
    }

    pub fn remove_instance(&mut self, ns_ip: IpAddr) -> Result<()> {
        let ns = to_addr(ns_ip);
        ignore_missing(self.instances.remove(&ns), "removing from", maps::INSTANCES)?;
        match self.mirror.remove(&ns) {
            Some(old) => {
                self.new_instance_epoch()?;
                self.unclaim(&old.instance_ip, &ns)
            }
            None => Ok(()),
        }
    }

    /// Retires the copies of INSTANCES entries the flows carry (`Flow::epoch`):
    /// the next packet of every flow looks its sender and backend up again,
    /// so a changed or vanished one takes effect at once. Called after the
    /// change is in the map. Epoch 0 is skipped: it marks entries that never
    /// had copies.
    pub fn new_instance_epoch(&mut self) -> Result<()> {
        let epoch = self
            .instance_epoch
            .get(&0, 0)
            .map_err(map_err("reading", maps::INSTANCE_EPOCH))?;
        let next = match epoch.wrapping_add(1) {
            0 => 1,
            n => n,
        };
        self.instance_epoch
            .set(0, next, 0)
            .map_err(map_err("writing", maps::INSTANCE_EPOCH))
    }

    /// `ns`'s entry names instance address `ip`: it now decides where
    /// tunnel datagrams from `ip` may come from.
    fn claim(&mut self, ip: &Addr, ns: &Addr) -> Result<()> {
        if ip.is_zero() {
            return Ok(());
        }
        let c = self.claims.entry(*ip).or_default();
        c.retain(|n| n != ns);
        c.push(*ns);
        self.write_instance_node(ip)
    }

    fn unclaim(&mut self, ip: &Addr, ns: &Addr) -> Result<()> {
        if let Some(c) = self.claims.get_mut(ip) {
            c.retain(|n| n != ns);
            if c.is_empty() {
                self.claims.remove(ip);
            }
        }
        self.write_instance_node(ip)
    }

    /// Writes (or removes) the INSTANCE_NODES entry of `ip` from its claims.
    fn write_instance_node(&mut self, ip: &Addr) -> Result<()> {
        let node = self
            .claims
            .get(ip)
            .and_then(|c| c.last())
            .and_then(|ns| self.mirror.get(ns))
            .map(|i| i.node_ip);
        match node {
            Some(node_ip) => self
                .instance_nodes
                .insert(*ip, InstanceNode { node_ip }, 0)
                .map_err(insert_err(maps::INSTANCE_NODES, "instances")),
            None => ignore_missing(
                self.instance_nodes.remove(ip),
                "removing from",
                maps::INSTANCE_NODES,
            ),
        }
    }

    /// Mirror and claims from the INSTANCES map as found; INSTANCE_NODES
    /// made equal to them (it may be new, or stale after a crash).
    fn rebuild_instance_nodes(&mut self) -> Result<()> {
        let found: Vec<(Addr, Instance)> = self.instances.iter().filter_map(|r| r.ok()).collect();
        for (ns, i) in found {
            self.mirror.insert(ns, i);
            if !i.instance_ip.is_zero() {
                self.claims.entry(i.instance_ip).or_default().push(ns);
            }
        }
        let stale: Vec<Addr> = self
            .instance_nodes
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !self.claims.contains_key(k))
            .collect();
        for k in stale {
            ignore_missing(
                self.instance_nodes.remove(&k),
                "removing from",
                maps::INSTANCE_NODES,
            )?;
        }
        let ips: Vec<Addr> = self.claims.keys().copied().collect();
        for ip in ips {
            self.write_instance_node(&ip)?;
        }
        Ok(())
    }

    /// The node INSTANCE_NODES names for instance address `ip`.
    pub fn instance_node(&self, ip: IpAddr) -> Option<IpAddr> {
        self.instance_nodes
            .get(&to_addr(ip), 0)
            .ok()
            .map(|n| super::addr::from_addr(&n.node_ip))
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
            row(
                maps::INSTANCE_NODES,
                self.instance_nodes.keys().count(),
                sizes.instances,
            ),
        ]
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
