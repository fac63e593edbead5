//! The programs' maps by name, and their default sizes.
//!
//! The eBPF side declares each map as a `#[btf_map]` static whose Rust
//! identifier is its name in the object; userspace finds, sizes and pins the
//! maps through the constants here. A test in netmanager loads the built
//! object and checks that its maps are exactly [`MAP_NAMES`].

/// Declares one `&str` constant per map, equal to its identifier, and
/// [`MAP_NAMES`] listing them all.
macro_rules! map_names {
    ($($(#[$doc:meta])* $name:ident,)+) => {
        $($(#[$doc])* pub const $name: &str = stringify!($name);)+

        /// Every map of the programs, as pinned and as `bpftool map` shows them.
        pub const MAP_NAMES: [&str; [$($name),+].len()] = [$($name),+];
    };
}

map_names! {
    /// Node address, tunnel port, MTU, service ranges, miss hold (one entry).
    CONFIG,
    /// Service address -> kind and current backend generation.
    SERVICES,
    /// (service, generation, index) -> backend namespace address.
    BACKENDS,
    /// Namespace address -> where that instance lives.
    INSTANCES,
    /// Forward flow cache: the sender's 5-tuple -> chosen backend.
    FLOWS,
    /// Reverse flow cache: a reply's 5-tuple -> the service address to restore.
    REVERSE_FLOWS,
    /// Unknown address -> packets held for it so far.
    PENDING,
    /// Packets and bytes per counter, per CPU.
    COUNTERS,
    /// Ring buffer of miss events for NetManager.
    MISSES,
    /// Per-CPU scratch space for building ICMP errors.
    SCRATCH,
    /// This node's own underlay addresses: tunnel datagrams to any of them are ours.
    NODE_ADDRESSES,
    /// Instance address -> the node that runs it (the only sender a tunnel
    /// datagram with that inner source is accepted from).
    INSTANCE_NODES,
    /// Underlay prefixes the operator trusts like nodes (`TunnelPeers`).
    TRUSTED_PEERS,
    /// (container veth, opened/closed) -> flows; bounds each container's share of FLOWS.
    FLOW_COUNTS,
    /// (peer, port, ingress interface) -> the FIB's answer, per CPU: the
    /// send path's route cache.
    ROUTE_CACHE,
    /// The route cache's epoch: NetManager adds one on every route,
    /// neighbour, link or CONFIG change, retiring every cached route.
    ROUTE_EPOCH,
    /// The epoch of the `INSTANCES` copies in `FLOWS` entries: NetManager
    /// adds one after every change to `INSTANCES`.
    INSTANCE_EPOCH,
}

/// Default map sizes (max entries) of the daemon, the eBPF object and every
/// tool that loads it. The daemon's configuration overrides them per node.
pub const DEFAULT_FLOWS: u32 = 65_536;
pub const DEFAULT_SERVICES: u32 = 4_096;
pub const DEFAULT_BACKENDS: u32 = 65_536;
pub const DEFAULT_INSTANCES: u32 = 8_192;
pub const DEFAULT_PENDING: u32 = 1_024;
/// Packets held per unknown address while NetManager resolves it.
pub const DEFAULT_MISS_HOLD: u32 = 4;
/// Addresses a node may carry on its interfaces (fixed: not configurable).
pub const DEFAULT_NODE_ADDRESSES: u32 = 256;
/// Size of the `MISSES` ring buffer (fixed: not configurable).
pub const DEFAULT_MISS_RING_BYTES: u32 = 1 << 20;
/// Entries of `TRUSTED_PEERS`: the most `TunnelPeers` prefixes (fixed).
pub const DEFAULT_TRUSTED_PEERS: u32 = 64;
/// Entries of `FLOW_COUNTS`: two per local container (fixed; a node runs
/// at most a /26 of containers, plus room for veths being replaced).
pub const DEFAULT_FLOW_COUNTS: u32 = 1024;
/// Slots of `ROUTE_CACHE` per CPU (fixed, a power of two): a direct-mapped
/// cache of (peer node, container veth) routes; pairs sharing a slot only
/// cost FIB lookups.
pub const DEFAULT_ROUTE_CACHE: u32 = 256;

/// Map sizes of NetManager's `"TableProfile": "edge"`: for small boards
/// (1 GiB of memory) running a handful of containers. About a quarter of the
/// kernel memory of the defaults (docs/performance.md, Footprint); single
/// sizes given in netcfg.json still override them.
pub const EDGE_FLOWS: u32 = 16_384;
pub const EDGE_SERVICES: u32 = 1_024;
pub const EDGE_BACKENDS: u32 = 8_192;
pub const EDGE_INSTANCES: u32 = 2_048;
pub const EDGE_PENDING: u32 = 256;

/// Flows one container may hold when the configuration does not say: a
/// quarter of the flow table, so no single container can fill it.
pub const fn default_flows_per_container(flow_table: u32) -> u32 {
    let q = flow_table / 4;
    if q == 0 { 1 } else { q }
}
