//! Layouts of everything the NetManager eBPF programs and the userspace loader
//! exchange: map keys and values, configuration, counters and miss events.
//!
//! Every type is `#[repr(C)]`, padded explicitly and free of implicit holes, so
//! the kernel, the programs and `bpftool map dump` (through BTF) agree on the
//! bytes. Addresses are stored in network byte order; IPv4 addresses use the
//! IPv4-mapped IPv6 form (`::ffff:a.b.c.d`) so one map serves both families.
#![no_std]

mod counters;
pub mod maps;

pub use counters::{COUNTER_NAMES, Counter, CounterKind, CounterValue};
pub use maps::{
    DEFAULT_BACKENDS, DEFAULT_FLOW_COUNTS, DEFAULT_FLOWS, DEFAULT_INSTANCES, DEFAULT_MISS_HOLD,
    DEFAULT_MISS_RING_BYTES, DEFAULT_NODE_ADDRESSES, DEFAULT_PENDING, DEFAULT_ROUTE_CACHE,
    DEFAULT_SERVICES, DEFAULT_TRUSTED_PEERS, EDGE_BACKENDS, EDGE_FLOWS, EDGE_INSTANCES,
    EDGE_PENDING, EDGE_SERVICES, MAP_NAMES, default_flows_per_container,
};

/// A 16-byte address: IPv6, or IPv4-mapped IPv6 for IPv4.
///
/// 8-byte aligned: on BPF, which has no unaligned loads, an address whose
/// alignment the compiler cannot see is copied and compared a byte (or two)
/// at a time -- 16 loads and 16 stores per copy, and the programs copy
/// addresses into every key. Aligned, a copy is two 64-bit moves. Every
/// struct holding one has it at a multiple of 8 (the layout test below).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Addr {
    pub bytes: [u8; 16],
}

impl Addr {
    pub const ZERO: Addr = Addr { bytes: [0; 16] };

    /// IPv4 address given as its four octets in network order.
    #[inline(always)]
    pub const fn from_v4_octets(o: [u8; 4]) -> Addr {
        // One 128-bit value, not an array literal: on BPF the literal's run
        // of zeros becomes a call to a byte-at-a-time memset.
        let v = (0xffff_u128 << 32) | u32::from_be_bytes(o) as u128;
        Addr {
            bytes: v.to_be_bytes(),
        }
    }

    /// The IPv4 octets when this is an IPv4-mapped address.
    #[inline(always)]
    pub fn v4_octets(&self) -> Option<[u8; 4]> {
        let b = &self.bytes;
        if b[..10] == [0; 10] && b[10] == 0xff && b[11] == 0xff {
            Some([b[12], b[13], b[14], b[15]])
        } else {
            None
        }
    }

    #[inline(always)]
    pub fn is_zero(&self) -> bool {
        self.bytes == [0; 16]
    }

    /// Whether this is an IPv4(-mapped) address.
    #[inline(always)]
    pub fn is_v4(&self) -> bool {
        self.v4_octets().is_some()
    }
}

/// How a service address picks among its backends (docs/contract.md §2.3/2.5).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceKind {
    /// Round robin: consecutive new flows rotate over the backends.
    RoundRobin = 1,
    /// Closest: userspace orders the backends nearest first; take the first.
    Closest = 2,
    /// instance_ip: exactly one backend, the instance it names.
    Instance = 3,
}

impl ServiceKind {
    pub fn from_u8(v: u8) -> Option<ServiceKind> {
        match v {
            1 => Some(ServiceKind::RoundRobin),
            2 => Some(ServiceKind::Closest),
            3 => Some(ServiceKind::Instance),
            _ => None,
        }
    }
}

/// Value of the `SERVICES` map, keyed by service address.
///
/// Backends live in `BACKENDS` under `(service, generation, index)`; userspace
/// writes a new generation completely before it switches `generation` and
/// `count` here, so a program never sees a half-written slice.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// A [`ServiceKind`] as u8.
    pub kind: u8,
    pub _pad0: u8,
    /// Number of backends in the current generation (at most [`MAX_BACKENDS`]).
    pub count: u16,
    /// Generation of the backend slice currently in use.
    pub generation: u32,
    /// Round-robin cursor. Updated without atomics: two CPUs racing may hand
    /// out the same backend twice, which only skews the rotation slightly.
    pub rr_cursor: u32,
    pub _pad1: u32,
}

/// Upper bound on backends per service; bounds the program's loops.
pub const MAX_BACKENDS: u16 = 64;

/// Key of the `BACKENDS` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BackendKey {
    pub service: Addr,
    pub generation: u32,
    pub index: u32,
}

/// Value of the `INSTANCES` map, keyed by namespace address: where an instance
/// lives and which service address names it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Instance {
    /// The instance's own `instance_ip` (same family as the key). Zero while
    /// a local container's own table entry is still unknown.
    pub instance_ip: Addr,
    /// Underlay address of the node that runs it (IPv4-mapped for an IPv4
    /// underlay): the outer destination of what is tunnelled to it.
    pub node_ip: Addr,
    /// Tunnel UDP port of that node, host order.
    pub node_port: u16,
    /// [`INSTANCE_LOCAL`] when it runs on this node.
    pub flags: u16,
    /// Host end of the container's veth (local instances only).
    pub ifindex: u32,
    /// MAC address of the container's own interface (local instances only).
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

pub const INSTANCE_LOCAL: u16 = 1;

/// Key of the flow cache: the 5-tuple as the sending container wrote it.
/// ICMP echo uses the identifier as source port and 0 as destination port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: Addr,
    pub dst: Addr,
    /// Network order.
    pub src_port: u16,
    /// Network order.
    pub dst_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Value of the forward flow cache (`FLOWS`).
///
/// Besides the choice itself it carries copies of what a packet of the
/// flow needs from `INSTANCES` -- the sender's veth and the backend's
/// entry -- taken in `INSTANCE_EPOCH` `epoch`: while that is the current
/// epoch, a packet of the flow costs one hash lookup. NetManager starts a
/// new epoch after every change to `INSTANCES`, so the next packet of every
/// flow looks both up again (and finds a vanished backend or sender).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// Namespace address of the chosen backend.
    pub backend: Addr,
    /// The sender's own instance address (the new source).
    pub src_instance: Addr,
    /// `bpf_ktime_get_coarse_ns()` when last used (refreshed at most once a
    /// second).
    pub last_seen_ns: u64,
    /// The `INSTANCE_EPOCH` the copies below were taken in (0: never; the
    /// epoch NetManager runs in is never 0).
    pub epoch: u32,
    /// Host end of the sender's veth, from its `INSTANCES` entry.
    pub sender_ifindex: u32,
    /// The backend's `INSTANCES` entry.
    pub target: Instance,
}

/// Value of the reverse flow cache (`REVERSE_FLOWS`), keyed by the 5-tuple of
/// a reply as it arrives here (src = backend's instance address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReverseFlow {
    /// The service address the local container originally dialled.
    pub service: Addr,
    pub last_seen_ns: u64,
}

/// Flows idle for longer than this are treated as gone (docs/contract.md §2.5).
pub const FLOW_IDLE_NS: u64 = 60 * 1_000_000_000;

/// Key of `FLOW_COUNTS`: one container (by the ifindex of its veth's host
/// end) and which of its two counts. The two have different writers --
/// the programs add to [`FLOWS_OPENED`] atomically, NetManager adds to
/// [`FLOWS_CLOSED`] when it expires a flow -- so neither ever overwrites
/// the other's updates; the container's live flows are the difference.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowCountKey {
    pub ifindex: u32,
    /// [`FLOWS_OPENED`] or [`FLOWS_CLOSED`].
    pub kind: u32,
}

/// `FlowCountKey::kind`: flows the programs created for the container.
pub const FLOWS_OPENED: u32 = 0;
/// `FlowCountKey::kind`: flows of the container NetManager removed.
pub const FLOWS_CLOSED: u32 = 1;

/// Value of `INSTANCE_NODES`, keyed by an instance address: the node that
/// runs the instance, i.e. the only sender a tunnel datagram with that
/// inner source is accepted from.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InstanceNode {
    /// Underlay address of the node (IPv4-mapped for IPv4).
    pub node_ip: Addr,
}

/// An address range (`prefix/len`) in [`Addr`] form.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Prefix {
    pub addr: Addr,
    /// Prefix length counted on the 128-bit form (an IPv4 /16 is 112).
    pub len: u32,
    pub _pad: u32,
}

pub const MAX_SERVICE_RANGES: usize = 4;

/// Single entry of the `CONFIG` array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Outer source towards IPv4 peers, network order: the advertised node
    /// address when this node owns it, else its address on the uplink
    /// (zero: none). Also the first address the receive path compares a
    /// tunnel datagram's destination with before it asks `NODE_ADDRESSES`.
    pub src_v4: [u8; 4],
    /// Tunnel port we listen on and send from, host order.
    pub tunnel_port: u16,
    /// Largest inner IP packet the tunnel carries (1450 by default).
    pub tunnel_mtu: u16,
    /// Interface the tunnel leaves by when the FIB gives no usable answer.
    pub uplink_ifindex: u32,
    /// How many entries of `service_ranges` are valid.
    pub n_ranges: u32,
    pub service_ranges: [Prefix; MAX_SERVICE_RANGES],
    /// Packets held per unknown service address while userspace resolves it.
    pub miss_hold: u32,
    /// [`CONFIG_FIB_SOURCE_V4`], [`CONFIG_FIB_SOURCE_V6`] and
    /// [`CONFIG_XDP_REDIRECT`].
    pub flags: u32,
    /// Outer source towards IPv6 peers, like `src_v4` (zero: none).
    pub src_v6: Addr,
    /// Where a GSO packet for an IPv6-underlay peer is sent to be cut into
    /// segments: the reinjection device, whose far end runs the container
    /// program again on each segment (0: no such device).
    pub segment_ifindex: u32,
    /// The far end of that device: a packet arriving there is never sent
    /// around again.
    pub segment_return_ifindex: u32,
    /// The reinjection device's container-side end (set whether or not it
    /// segments): frames arriving there are NetManager's reinjected held
    /// frames or segments of packets checked before, so they are exempt
    /// from the source-to-veth check.
    pub inject_ifindex: u32,
    /// Most flows one container may have in `FLOWS` at a time.
    pub flows_per_container: u32,
}

/// `Config::flags`: this node does not own the address it advertises for
/// IPv4 (it is behind NAT); ask the FIB for the route's source address per
/// peer, `src_v4` being the fallback on kernels without
/// `BPF_FIB_LOOKUP_SRC` (Linux 6.7).
pub const CONFIG_FIB_SOURCE_V4: u32 = 1;
/// The same for IPv6 peers.
pub const CONFIG_FIB_SOURCE_V6: u32 = 2;
/// `Config::flags`: the XDP uplink program decapsulates the tunnel datagrams
/// it can deliver whole and redirects them into the container's veth
/// (`--uplink-hook xdp-redirect`); without it, it only screens.
pub const CONFIG_XDP_REDIRECT: u32 = 4;

/// Why the programs raised a miss event (`MissEvent::reason`).
#[repr(u32)]
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum MissReason {
    /// A packet to a service address with no `SERVICES` entry.
    Service = 1,
    /// A local container (by namespace address) whose own instance address is
    /// not known yet.
    Sender = 2,
    /// A tunnel datagram whose inner source (the address) is no instance of
    /// a node this node knows; the frame is the datagram as it arrived.
    Peer = 3,
}

impl TryFrom<u32> for MissReason {
    /// The unknown raw value.
    type Error = u32;

    fn try_from(raw: u32) -> Result<MissReason, u32> {
        match raw {
            1 => Ok(MissReason::Service),
            2 => Ok(MissReason::Sender),
            3 => Ok(MissReason::Peer),
            other => Err(other),
        }
    }
}

/// Largest frame a miss event carries (container MTU plus Ethernet header,
/// with room to spare). Larger frames are reported without their bytes.
/// A power of two: the program masks the length with it for the verifier.
pub const MISS_FRAME_MAX: usize = 2048;

/// Record in the `MISSES` ring buffer.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct MissEvent {
    /// A [`MissReason`] as u32 (userspace converts it checked).
    pub reason: u32,
    /// Interface the packet came in on.
    pub ifindex: u32,
    /// The unknown address: the service address, or the sender's namespace address.
    pub addr: Addr,
    /// Bytes of `frame` that are valid (0 when the frame was too large to keep).
    pub frame_len: u32,
    pub _pad: u32,
    /// The whole Ethernet frame, to be reinjected once the miss is resolved.
    pub frame: [u8; MISS_FRAME_MAX],
}

/// Read-only global of the programs the loader sets before loading them: 1
/// when `bpf_skb_adjust_room` accepts `BPF_F_ADJ_ROOM_DECAP_L3_IPV6` (Linux
/// 6.3), 0 (the default) for the fallback through `bpf_skb_change_proto`.
pub const DECAP_L3_FLAG_GLOBAL: &str = "ADJUST_ROOM_DECAP_L3";

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), contain only integers and byte arrays,
    // and have no implicit padding (checked by the layout tests below).
    unsafe impl aya::Pod for Addr {}
    unsafe impl aya::Pod for Service {}
    unsafe impl aya::Pod for BackendKey {}
    unsafe impl aya::Pod for Instance {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for Flow {}
    unsafe impl aya::Pod for ReverseFlow {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for CounterValue {}
    unsafe impl aya::Pod for FlowCountKey {}
    unsafe impl aya::Pod for InstanceNode {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<Addr>(), 16);
        assert_eq!(size_of::<Service>(), 16);
        assert_eq!(size_of::<BackendKey>(), 24);
        assert_eq!(size_of::<Instance>(), 16 + 16 + 2 + 2 + 4 + 6 + 2);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(
            size_of::<Flow>(),
            16 + 16 + 8 + 4 + 4 + size_of::<Instance>()
        );
        assert_eq!(size_of::<ReverseFlow>(), 24);
        assert_eq!(size_of::<Prefix>(), 24);
        assert_eq!(
            size_of::<Config>(),
            16 + 24 * MAX_SERVICE_RANGES + 8 + 16 + 8 + 8
        );
        assert_eq!(size_of::<FlowCountKey>(), 8);
        assert_eq!(size_of::<InstanceNode>(), 16);
    }

    #[test]
    fn miss_reasons_convert_checked() {
        for r in [MissReason::Service, MissReason::Sender, MissReason::Peer] {
            assert_eq!(MissReason::try_from(r.clone() as u32), Ok(r));
        }
        assert_eq!(MissReason::try_from(0), Err(0));
        assert_eq!(MissReason::try_from(4), Err(4));
    }

    #[test]
    fn v4_mapped_round_trip() {
        let a = Addr::from_v4_octets([10, 30, 0, 3]);
        assert_eq!(a.v4_octets(), Some([10, 30, 0, 3]));
        assert_eq!(Addr::ZERO.v4_octets(), None);
    }
}
