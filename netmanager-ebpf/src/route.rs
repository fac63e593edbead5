//! Where a tunnel datagram leaves: the kernel's FIB, asked with
//! `bpf_fib_lookup`, names the interface, the next hop's MAC and -- for a
//! node that does not own the address it advertises (behind NAT) -- the
//! source address. So a peer reachable only through a second interface gets
//! our traffic on that interface.
//!
//! The answer is cached per CPU ([`ROUTE_CACHE`], per peer and ingress
//! interface, with the route's MTU): a FIB lookup cost about an eighth of
//! the send path (perf). The cache is direct-mapped -- a per-CPU array
//! whose slot a hash of the key picks, the key stored in the slot -- so a
//! hit costs an array lookup and a comparison, no hash-table or LRU work;
//! two peers sharing a slot only cost FIB lookups. An entry is used while
//! it is younger than [`REFRESH_NS`] and the epoch it was made in
//! ([`ROUTE_EPOCH`]) is current. NetManager starts a new epoch whenever a
//! route, rule, neighbour, link or its own configuration changes, so such
//! changes take effect at once; what comes without an event (a path-MTU
//! exception learnt from an ICMP error) within [`REFRESH_NS`].

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LKUP_RET_UNSUPP_LWT, BPF_FIB_LOOKUP_SRC, bpf_fib_lookup,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_ktime_get_coarse_ns},
    programs::TcContext,
};
use netmanager_common::{
    Addr, CONFIG_FIB_SOURCE_V4, CONFIG_FIB_SOURCE_V6, Config, Instance,
};

use crate::maps::{ROUTE_CACHE, ROUTE_EPOCH, SCRATCH};
use crate::route_cache::RouteKey;
use crate::packet::IPPROTO_UDP;

/// Longest a cached route is used without asking the FIB again.
const REFRESH_NS: u64 = 20_000_000;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Outcome of [`lookup`], as a scalar so it can cross a BPF-to-BPF call.
/// Route known and the next hop's MAC too: `macs` are valid.
pub const RESOLVED: u32 = 0;
/// Route known, neighbour not (yet): let the kernel resolve it.
pub const NO_NEIGH: u32 = 1;
/// The FIB cannot answer for this packet (forwarding off on the ingress
/// interface, a lightweight-tunnel route): send out of the uplink and let
/// the kernel route it, as before the FIB lookup existed.
pub const FALLBACK: u32 = 2;
/// Larger than the route's MTU: `mtu` holds it.
pub const FRAG_NEEDED: u32 = 3;
/// Unreachable, blackhole, prohibited, local, or no source address.
pub const NO_ROUTE: u32 = 4;

pub struct Route {
    /// One of the outcomes above.
    pub kind: u32,
    pub ifindex: u32,
    /// Outer source address.
    pub src: Addr,
    /// Destination and source MAC, as the Ethernet header starts.
    pub macs: [u8; 12],
    pub mtu: u16,
}

impl Route {
    pub const EMPTY: Route = Route {
        kind: NO_ROUTE,
        ifindex: 0,
        src: Addr::ZERO,
        macs: [0; 12],
        mtu: 0,
    };
}

/// The way to `backend`'s node for a datagram of `tot_len` bytes (0: do
/// not check the MTU, a GSO packet): from the cache when it holds a current
/// answer, else from the FIB (and then cached). Writes the answer to `out`
/// and returns its kind.
#[inline(never)]
pub fn lookup(
    ctx: &TcContext,
    cfg: &Config,
    backend: &Instance,
    tot_len: u16,
    out: &mut Route,
) -> u32 {
    let key = RouteKey {
        peer: backend.node_ip,
        port: backend.node_port,
        _pad: 0,
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
    };
    // SAFETY: plain helper calls.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let epoch = ROUTE_EPOCH.get(0).copied().unwrap_or(0);
    let Some(c) = ROUTE_CACHE.get_ptr_mut(key.slot()) else {
        return fib(ctx, cfg, backend, tot_len, out);
    };
    // SAFETY: a valid map value pointer, this CPU's own slot.
    let c = unsafe { &mut *c };
    if c.made_ns != 0
        && c.key.same(&key)
        && c.epoch == epoch
        && now.wrapping_sub(c.made_ns) < REFRESH_NS
    {
        out.ifindex = c.ifindex;
        out.src = c.src;
        out.macs = c.macs;
        // The check the FIB makes with `tot_len` (path-MTU exceptions
        // included in the cached MTU).
        if tot_len != 0 && tot_len > c.mtu {
            out.mtu = c.mtu;
            out.kind = FRAG_NEEDED;
            return FRAG_NEEDED;
        }
        out.kind = c.kind;
        return c.kind;
    }
    // The route's MTU first: the FIB reports it only for a datagram larger
    // than it, so it is asked with the largest one.
    let mtu = match fib(ctx, cfg, backend, u16::MAX, out) {
        FRAG_NEEDED => out.mtu,
        _ => u16::MAX,
    };
    // Then exactly the question asked without the cache.
    let kind = fib(ctx, cfg, backend, tot_len, out);
    if kind == RESOLVED || kind == NO_NEIGH || kind == FALLBACK {
        c.key = key;
        c.kind = kind;
        c.ifindex = out.ifindex;
        c.src = out.src;
        c.macs = out.macs;
        c.mtu = mtu;
        c._pad = 0;
        c.epoch = epoch;
        c.made_ns = now;
    }
    kind
}

/// Asks the FIB (see [`lookup`]).
#[inline(never)]
fn fib(ctx: &TcContext, cfg: &Config, backend: &Instance, tot_len: u16, out: &mut Route) -> u32 {
    let peer = &backend.node_ip;
    // The per-CPU scratch buffer holds the parameters: no 64-byte zeroing
    // per packet (the compiler's memset is a byte loop on BPF). Every field
    // the kernel reads is written below.
    let Some(buf) = SCRATCH.get_ptr_mut(0) else {
        out.kind = FALLBACK;
        return FALLBACK;
    };
    // SAFETY: per-CPU slot, used by this program invocation only; 256
    // bytes, 8-byte aligned, room for the 64-byte bpf_fib_lookup.
    let params = unsafe { &mut *(buf as *mut bpf_fib_lookup) };
    params.l4_protocol = IPPROTO_UDP;
    params.sport = cfg.tunnel_port.to_be();
    params.dport = backend.node_port.to_be();
    params.__bindgen_anon_1.tot_len = tot_len;
    params.__bindgen_anon_2.flowinfo = 0;
    // The interface the packet came in on: the lookup is the one the kernel
    // would make forwarding it, policy rules included.
    params.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let from_fib = match peer.v4_octets() {
        Some(dst) => {
            params.family = AF_INET;
            params.__bindgen_anon_4.ipv6_dst = [u32::from_ne_bytes(dst), 0, 0, 0];
            out.src = Addr::from_v4_octets(cfg.src_v4);
            cfg.flags & CONFIG_FIB_SOURCE_V4 != 0
        }
        None => {
            params.family = AF_INET6;
            params.__bindgen_anon_4.ipv6_dst = words(&peer.bytes);
            out.src = cfg.src_v6;
            cfg.flags & CONFIG_FIB_SOURCE_V6 != 0
        }
    };
    if from_fib {
        params.__bindgen_anon_3.ipv6_src = [0; 4];
    } else {
        // The source is fixed (the advertised address, which this node
        // owns); it takes part in the lookup like a bound socket's would.
        set_source(params, &out.src);
    }
    let size = core::mem::size_of::<bpf_fib_lookup>() as i32;
    let ctx_ptr = ctx.skb.skb as *mut core::ffi::c_void;
    let mut rc = if from_fib {
        // SAFETY: params is a valid bpf_fib_lookup of `size` bytes.
        unsafe { fib_lookup(ctx_ptr, params, size, BPF_FIB_LOOKUP_SRC) }
    } else {
        -1
    };
    let mut fib_source = from_fib && rc >= 0;
    if rc < 0 {
        // Without the source flag (before Linux 6.7 it is refused, and
        // nothing else is touched then): `out.src`, the configured
        // fallback, stays.
        // SAFETY: as above.
        rc = unsafe { fib_lookup(ctx_ptr, params, size, 0) };
        fib_source = false;
    }
    let kind = match rc as u32 {
        _ if rc < 0 => FALLBACK,
        BPF_FIB_LKUP_RET_SUCCESS => RESOLVED,
        BPF_FIB_LKUP_RET_NO_NEIGH => NO_NEIGH,
        BPF_FIB_LKUP_RET_FRAG_NEEDED => {
            // SAFETY: the kernel wrote the MTU into the union.
            out.mtu = unsafe { params.__bindgen_anon_1.mtu_result };
            FRAG_NEEDED
        }
        BPF_FIB_LKUP_RET_FWD_DISABLED | BPF_FIB_LKUP_RET_UNSUPP_LWT => FALLBACK,
        _ => NO_ROUTE,
    };
    out.ifindex = params.ifindex;
    out.macs[..6].copy_from_slice(&params.dmac);
    out.macs[6..].copy_from_slice(&params.smac);
    let routed = kind == RESOLVED || kind == NO_NEIGH;
    if fib_source && routed {
        out.src = source(params, peer.is_v4());
    }
    if (routed || kind == FALLBACK)
        && (out.src.is_zero() || out.src == Addr::from_v4_octets([0; 4]))
    {
        // Nothing to send from (an IPv6-only node and an IPv4 peer, say).
        out.kind = NO_ROUTE;
        return NO_ROUTE;
    }
    out.kind = kind;
    kind
}

#[inline(always)]
fn words(b: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}

#[inline(always)]
fn set_source(params: &mut bpf_fib_lookup, src: &Addr) {
    params.__bindgen_anon_3.ipv6_src = match src.v4_octets() {
        Some(o) => [u32::from_ne_bytes(o), 0, 0, 0],
        None => words(&src.bytes),
    };
}

#[inline(always)]
fn source(params: &bpf_fib_lookup, v4: bool) -> Addr {
    // SAFETY: the union member of the family asked for.
    unsafe {
        if v4 {
            Addr::from_v4_octets(params.__bindgen_anon_3.ipv4_src.to_ne_bytes())
        } else {
            let w = params.__bindgen_anon_3.ipv6_src;
            let mut a = Addr::ZERO;
            a.bytes[..4].copy_from_slice(&w[0].to_ne_bytes());
            a.bytes[4..8].copy_from_slice(&w[1].to_ne_bytes());
            a.bytes[8..12].copy_from_slice(&w[2].to_ne_bytes());
            a.bytes[12..].copy_from_slice(&w[3].to_ne_bytes());
            a
        }
    }
}
