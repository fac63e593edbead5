//! Every map the programs use. A static's identifier is the map's name in
//! the object: it must be one of `netmanager_common::MAP_NAMES` (a netmanager
//! test checks the built object against that list). Sizes are the common
//! defaults: the loader overrides them from NetManager's configuration, and
//! pins every map under one bpffs directory so a restarted NetManager adopts it.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    macros::btf_map,
};
use netmanager_common::{
    Addr, BackendKey, Config, Counter, CounterValue, DEFAULT_BACKENDS, DEFAULT_FLOW_COUNTS,
    DEFAULT_FLOWS, DEFAULT_INSTANCES, DEFAULT_MISS_RING_BYTES, DEFAULT_NODE_ADDRESSES,
    DEFAULT_PENDING, DEFAULT_ROUTE_CACHE, DEFAULT_SERVICES, DEFAULT_TRUSTED_PEERS, Flow,
    FlowCountKey, FlowKey, Instance, InstanceNode, MissEvent, ReverseFlow, Service,
};

use crate::route_cache::CachedRoute;

/// Node address, tunnel port, MTU, service ranges (one entry).
#[btf_map]
pub static CONFIG: Array<Config, 1> = Array::new();

/// Service address -> kind and current backend generation.
#[btf_map]
pub static SERVICES: HashMap<Addr, Service, { DEFAULT_SERVICES as usize }> = HashMap::new();

/// (service, generation, index) -> backend namespace address.
#[btf_map]
pub static BACKENDS: HashMap<BackendKey, Addr, { DEFAULT_BACKENDS as usize }> = HashMap::new();

/// Namespace address -> where that instance lives.
#[btf_map]
pub static INSTANCES: HashMap<Addr, Instance, { DEFAULT_INSTANCES as usize }> = HashMap::new();

/// Forward flow cache: the sender's 5-tuple -> chosen backend. A plain
/// hash, not an LRU: an established flow is never evicted to make room for
/// someone else's (NetManager expires idle ones, and FLOW_COUNTS bounds
/// each container's share).
#[btf_map]
pub static FLOWS: HashMap<FlowKey, Flow, { DEFAULT_FLOWS as usize }> = HashMap::new();

/// Reverse flow cache: a reply's 5-tuple -> the service address to restore.
/// Created and expired together with its FLOWS entry.
#[btf_map]
pub static REVERSE_FLOWS: HashMap<FlowKey, ReverseFlow, { DEFAULT_FLOWS as usize }> =
    HashMap::new();

/// (container veth, FLOWS_OPENED / FLOWS_CLOSED) -> flows: the programs
/// count what they open, NetManager what it expires.
#[btf_map]
pub static FLOW_COUNTS: HashMap<FlowCountKey, u64, { DEFAULT_FLOW_COUNTS as usize }> =
    HashMap::new();

/// Instance address -> the node that runs it: the only sender a tunnel
/// datagram with that inner source is accepted from.
#[btf_map]
pub static INSTANCE_NODES: HashMap<Addr, InstanceNode, { DEFAULT_INSTANCES as usize }> =
    HashMap::new();

/// Underlay prefixes the operator trusts like nodes (`TunnelPeers`).
#[btf_map]
pub static TRUSTED_PEERS: LpmTrie<Addr, u32, { DEFAULT_TRUSTED_PEERS as usize }> = LpmTrie::new();

/// Unknown address -> packets held for it so far (bounded by `miss_hold`).
#[btf_map]
pub static PENDING: LruHashMap<Addr, u32, { DEFAULT_PENDING as usize }> = LruHashMap::new();

/// Packets and bytes per verdict and drop reason.
#[btf_map]
pub static COUNTERS: PerCpuArray<CounterValue, { Counter::COUNT }> = PerCpuArray::new();

/// Misses (with the held frame) for NetManager to resolve.
#[btf_map]
pub static MISSES: RingBuf<MissEvent, { DEFAULT_MISS_RING_BYTES as usize }> = RingBuf::new();

/// Adds one packet of `bytes` to counter `c`.
#[inline(always)]
pub fn count(c: Counter, bytes: u32) {
    if let Some(v) = COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*v).packets += 1;
            (*v).bytes += bytes as u64;
        }
    }
}

#[inline(always)]
pub fn config() -> Option<&'static Config> {
    CONFIG.get(0)
}

/// Per-CPU scratch space for building ICMP errors: the 512-byte BPF stack
/// cannot hold them next to the rest of the program's state.
#[btf_map]
pub static SCRATCH: PerCpuArray<[u8; 256], 1> = PerCpuArray::new();

/// This node's underlay addresses (value: the interface carrying each),
/// kept in step with the kernel's by NetManager: a tunnel datagram to any of
/// them is ours, whatever address the node advertises.
#[btf_map]
pub static NODE_ADDRESSES: HashMap<Addr, u32, { DEFAULT_NODE_ADDRESSES as usize }> = HashMap::new();

/// The FIB's answers per (peer, port, ingress interface), per CPU, in a
/// direct-mapped cache (`route::lookup`).
#[btf_map]
pub static ROUTE_CACHE: PerCpuArray<CachedRoute, { DEFAULT_ROUTE_CACHE as usize }> =
    PerCpuArray::new();

/// The current epoch of ROUTE_CACHE: NetManager adds one when a route, a
/// neighbour, a link or CONFIG changes, which retires every cached route.
#[btf_map]
pub static ROUTE_EPOCH: Array<u32, 1> = Array::new();

/// The current epoch of the `INSTANCES` copies in `FLOWS` entries
/// (`Flow::epoch`): NetManager adds one after every change to `INSTANCES`,
/// which sends the next packet of every flow to look its sender and
/// backend up again.
#[btf_map]
pub static INSTANCE_EPOCH: Array<u32, 1> = Array::new();
