//! The Oakestra tunnel on the wire: the translated IP packet is the whole
//! payload of one UDP datagram between the nodes' tunnel ports -- no extra
//! header, byte-compatible with an upstream NetManager over IPv4. Between
//! our own workers the outer header may also be IPv6 (docs/dataplane.md,
//! "IPv6 underlay"), with a real UDP checksum.
//!
//! Sending: [`send_to_peer`] asks the FIB ([`crate::route`]) where the
//! backend's node is, translates, wraps and redirects. Receiving:
//! [`tunnel_datagram`] recognises a datagram to any of this node's
//! addresses, [`decapsulate`] strips the outer headers.

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_DECAP_L3_IPV6, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4,
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV6, BPF_F_ADJ_ROOM_ENCAP_L4_UDP, bpf_redir_neigh,
    },
    helpers::{bpf_csum_diff, bpf_redirect, bpf_redirect_neigh, bpf_skb_change_proto},
    programs::TcContext,
};
use netmanager_common::{Addr, Config, Counter, Instance};

use crate::maps::{NODE_ADDRESSES, SCRATCH};
use crate::packet::{
    self, ETH_HLEN, ETH_P_IP, ETH_P_IPV6, Frame, IPPROTO_ICMP, IPPROTO_UDP, Packet, fold16, read,
};
use crate::route::{self, Route};
use crate::{Verdict, send_too_big, too_big};

const BPF_ADJ_ROOM_MAC: u32 = aya_ebpf::bindings::bpf_adj_room_mode::BPF_ADJ_ROOM_MAC;

/// Outer IPv4 (no options) plus UDP.
pub const OUTER_V4_LEN: usize = 28;
/// Outer IPv6 (no extension headers) plus UDP.
pub const OUTER_V6_LEN: usize = 48;

/// Bytes of outer headers towards `peer`.
#[inline(always)]
pub fn overhead(peer: &Addr) -> usize {
    if peer.is_v4() {
        OUTER_V4_LEN
    } else {
        OUTER_V6_LEN
    }
}

/// The contract's sending side (2.5 step 4) for a backend on another node:
/// route, translate, wrap, redirect. `p` is the parsed, not yet translated
/// packet; `backend_ns` the backend's namespace address.
#[inline(always)]
pub fn send_to_peer(
    ctx: &TcContext,
    cfg: &Config,
    p: &mut Packet,
    src_instance: &Addr,
    backend_ns: &Addr,
    backend: &Instance,
) -> Result<Verdict, Counter> {
    let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
    if gso && !backend.node_ip.is_v4() {
        // A GSO packet would leave as segments that all carry one copy of
        // the outer header: over IPv6 their UDP checksums would be wrong.
        return Ok(resegment(ctx, cfg));
    }
    if too_big(ctx, cfg, p) {
        return Ok(send_too_big(ctx, p, cfg.tunnel_mtu));
    }
    let outer_len = overhead(&backend.node_ip);
    // GSO packets are checked per segment by the kernel; a single packet
    // against the route's MTU (path-MTU exceptions included) here.
    let tot_len = if gso {
        0
    } else {
        (p.ip_len as usize + outer_len) as u16
    };
    let mut r = Route::EMPTY;
    match route::lookup(ctx, cfg, backend, tot_len, &mut r) {
        route::RESOLVED | route::NO_NEIGH | route::FALLBACK => {}
        route::FRAG_NEEDED => {
            let mtu = (r.mtu as usize)
                .saturating_sub(outer_len)
                .min(cfg.tunnel_mtu as usize);
            return Ok(send_too_big(ctx, p, mtu as u16));
        }
        _ => return Err(Counter::DropNoRoute),
    }
    packet::rewrite(ctx, p, src_instance, backend_ns, true).map_err(|_| Counter::DropMalformed)?;
    encapsulate(ctx, cfg, p, backend, &r).map_err(|_| Counter::DropEncap)?;
    let action = match r.kind {
        // The FIB knew the next hop's MAC (written with the outer headers):
        // straight to the interface.
        route::RESOLVED => unsafe { bpf_redirect(r.ifindex, 0) },
        // The kernel resolves the neighbour (and queues until it answers).
        route::NO_NEIGH => unsafe {
            bpf_redirect_neigh(r.ifindex, core::ptr::null_mut::<bpf_redir_neigh>(), 0, 0)
        },
        _ => unsafe {
            bpf_redirect_neigh(
                cfg.uplink_ifindex,
                core::ptr::null_mut::<bpf_redir_neigh>(),
                0,
                0,
            )
        },
    };
    Ok(Verdict::Redirect(Counter::Tunnelled, action as i32))
}

/// Sends a GSO packet through the reinjection device, whose transmit path
/// cuts it into segments (its GSO limit is one segment); each segment comes
/// back through the container program and is tunnelled on its own.
#[inline(always)]
fn resegment(ctx: &TcContext, cfg: &Config) -> Verdict {
    let here = unsafe { (*ctx.skb.skb).ifindex };
    if cfg.segment_ifindex == 0 || here == cfg.segment_return_ifindex {
        // No device to segment through, or a packet that came back still
        // whole: it cannot be sent with correct checksums.
        return Verdict::Drop(Counter::DropEncap);
    }
    let action = unsafe { bpf_redirect(cfg.segment_ifindex, 0) };
    Verdict::Redirect(Counter::Resegmented, action as i32)
}

/// Wraps the IP packet after the Ethernet header into UDP towards the node
/// running `backend`, over IPv4 or IPv6 as that node's address is, from the
/// route's source; with the route's MACs when the FIB knew them. The caller
/// redirects it.
#[inline(never)]
fn encapsulate(
    ctx: &TcContext,
    cfg: &Config,
    p: &Packet,
    backend: &Instance,
    r: &Route,
) -> Result<(), ()> {
    let inner_len = ctx.len() as usize - ETH_HLEN;
    let udp_len = (inner_len + 8) as u16;
    let v6 = !backend.node_ip.is_v4();
    // Before the room is made (the checksum reads the inner packet where it
    // is now) and before the header is built (it may use the scratch
    // buffer).
    let check = if v6 {
        match udp6_checksum(ctx, cfg, p, backend, r) {
            CHECKSUM_FAILED => return Err(()),
            c => c as u16,
        }
    } else {
        0
    };
    // Ethernet header (MACs, type), outer IP header, UDP header, built in
    // the per-CPU scratch buffer (a zeroed stack array costs a byte-wise
    // memset on BPF) and written with one helper call. Every byte written
    // is set here.
    let buf = SCRATCH.get_ptr_mut(0).ok_or(())?;
    // SAFETY: per-CPU slot, used by this program invocation only.
    let buf: &mut [u8; 256] = unsafe { &mut *buf };
    let h = &mut buf[HEADER_AT..HEADER_AT + ETH_HLEN + OUTER_V6_LEN];
    h[..12].copy_from_slice(&r.macs);
    let outer_len = if v6 {
        h[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
        let l = udp_len.to_be_bytes();
        // Version 6, traffic class and flow label 0.
        h[14..18].copy_from_slice(&[0x60, 0, 0, 0]);
        h[18] = l[0];
        h[19] = l[1];
        h[20] = IPPROTO_UDP;
        h[21] = 64;
        h[22..38].copy_from_slice(&r.src.bytes);
        h[38..54].copy_from_slice(&backend.node_ip.bytes);
        udp_header(&mut h[54..62], cfg, backend, udp_len, check);
        OUTER_V6_LEN
    } else {
        let (Some(src), Some(dst)) = (r.src.v4_octets(), backend.node_ip.v4_octets()) else {
            return Err(());
        };
        // An IPv6 inner packet travels in IPv4 too.
        h[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
        let total = (inner_len + OUTER_V4_LEN) as u16;
        // DF like a Linux UDP socket doing path-MTU discovery (upstream's
        // sender).
        let ip = ipv4_header(total, 0, 0x4000, IPPROTO_UDP, &src, &dst);
        h[14..34].copy_from_slice(&ip);
        // UDP checksum 0: allowed over IPv4, and the inner packet carries
        // its own.
        udp_header(&mut h[34..42], cfg, backend, udp_len, 0);
        OUTER_V4_LEN
    };
    let flags = BPF_F_ADJ_ROOM_ENCAP_L4_UDP
        | if v6 {
            BPF_F_ADJ_ROOM_ENCAP_L3_IPV6
        } else {
            BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
        };
    ctx.adjust_room(outer_len as i32, BPF_ADJ_ROOM_MAC, flags as u64)
        .map_err(|_| ())?;
    // Without the FIB's MACs the frame keeps its own: the kernel's
    // neighbour output rewrites them.
    let (from, len) = match (r.kind == route::RESOLVED, v6) {
        (true, false) => (0, ETH_HLEN + OUTER_V4_LEN),
        (true, true) => (0, ETH_HLEN + OUTER_V6_LEN),
        (false, false) => (12, 2 + OUTER_V4_LEN),
        (false, true) => (12, 2 + OUTER_V6_LEN),
    };
    store(ctx, from, &h[from..], len)
}

/// Where in the scratch buffer [`encapsulate`] builds the headers: after
/// the FIB lookup's parameters ([`route::lookup`] uses the first 64 bytes).
const HEADER_AT: usize = 64;

#[inline(always)]
fn udp_header(h: &mut [u8], cfg: &Config, backend: &Instance, len: u16, check: u16) {
    let sp = cfg.tunnel_port.to_be_bytes();
    let dp = backend.node_port.to_be_bytes();
    let l = len.to_be_bytes();
    let c = check.to_be_bytes();
    h[..8].copy_from_slice(&[sp[0], sp[1], dp[0], dp[1], l[0], l[1], c[0], c[1]]);
}

/// Writes `len` bytes of `data` at `off` (both constant at each call site,
/// as the verifier needs).
#[inline(always)]
fn store(ctx: &TcContext, off: usize, data: &[u8], len: usize) -> Result<(), ()> {
    if data.len() < len {
        return Err(());
    }
    // SAFETY: `data` holds at least `len` bytes.
    let r = unsafe {
        aya_ebpf::helpers::bpf_skb_store_bytes(
            ctx.skb.skb,
            off as u32,
            data.as_ptr() as *const core::ffi::c_void,
            len as u32,
            0,
        )
    };
    if r == 0 { Ok(()) } else { Err(()) }
}

/// Sum of the big-endian 16-bit words of an address.
#[inline(always)]
fn sum_addr(a: &Addr) -> u64 {
    let mut s = 0u64;
    let mut i = 0;
    while i < 16 {
        s += u16::from_be_bytes([a.bytes[i], a.bytes[i + 1]]) as u64;
        i += 2;
    }
    s
}

/// The outer UDP checksum (RFC 8200 forbids zero over IPv6), computed the
/// way Linux's local checksum offload does for its own tunnels: a correct
/// L4 checksum makes the L4 segment sum to the complement of its pseudo
/// header, so only headers are summed -- never the payload, and whether the
/// inner checksum is already complete or still left to the NIC
/// (`CHECKSUM_PARTIAL`) does not matter. `p` is the translated packet.
/// [`udp6_checksum`] could not read the packet.
const CHECKSUM_FAILED: u32 = u32::MAX;

/// Returns the checksum, or [`CHECKSUM_FAILED`] (a scalar: BPF-to-BPF calls
/// return nothing larger).
#[inline(never)]
fn udp6_checksum(ctx: &TcContext, cfg: &Config, p: &Packet, backend: &Instance, r: &Route) -> u32 {
    udp6_checksum_inner(ctx, cfg, p, backend, r).map_or(CHECKSUM_FAILED, u32::from)
}

#[inline(always)]
fn udp6_checksum_inner(
    ctx: &TcContext,
    cfg: &Config,
    p: &Packet,
    backend: &Instance,
    r: &Route,
) -> Result<u16, ()> {
    let src = &r.src;
    let udp_len = (ctx.len() as usize - ETH_HLEN + 8) as u64;
    // Outer pseudo header and UDP header (checksum field zero).
    let mut sum = sum_addr(src)
        + sum_addr(&backend.node_ip)
        + udp_len
        + IPPROTO_UDP as u64
        + cfg.tunnel_port as u64
        + backend.node_port as u64
        + udp_len;
    let l4_len = p.ip_len as u64 - (p.l4 - p.l3) as u64;
    // The inner IP header. IPv4: its own checksum makes it sum to zero.
    if p.v6 {
        let word0: [u8; 4] = read(ctx, p.l3).ok_or(())?;
        sum += u16::from_be_bytes([word0[0], word0[1]]) as u64
            + u16::from_be_bytes([word0[2], word0[3]]) as u64
            + l4_len
            + u16::from_be_bytes([p.proto, p.ttl]) as u64
            + sum_addr(&p.src)
            + sum_addr(&p.dst);
    }
    // The inner L4 segment.
    let pseudo = if p.v6 {
        sum_addr(&p.src) + sum_addr(&p.dst) + l4_len + p.proto as u64
    } else {
        sum_addr(&p.src) + sum_addr(&p.dst) - 2 * 0xffff + l4_len + p.proto as u64
    };
    if p.proto == IPPROTO_ICMP {
        // ICMPv4 has no pseudo header: a correct message sums to zero.
    } else if p.proto == IPPROTO_UDP && !p.v6 && udp_checksum_absent(ctx, p)? {
        // IPv4 UDP may go without a checksum: nothing to lean on, sum it all.
        sum += sum_bytes(ctx, p.l4, l4_len as usize)? as u64;
    } else {
        sum += (!fold16(pseudo)) as u64;
    }
    let c = !fold16(sum);
    Ok(if c == 0 { 0xffff } else { c })
}

#[inline(always)]
fn udp_checksum_absent(ctx: &TcContext, p: &Packet) -> Result<bool, ()> {
    let c: [u8; 2] = read(ctx, p.csum_off).ok_or(())?;
    Ok(c == [0, 0])
}

/// Chunk size of [`sum_bytes`]: the per-CPU scratch buffer.
const CHUNK: usize = 256;
/// Longest L4 segment [`sum_bytes`] sums (a tunnel MTU of 1450 needs 1430).
const MAX_SUMMED: usize = 8 * CHUNK;

/// One's-complement sum (folded, of 16-bit big-endian words) of `len`
/// packet bytes from `off` (an even offset into the checksummed data), for
/// the rare inner IPv4 UDP datagram without checksum. Whole words go
/// through `bpf_csum_diff` a scratch buffer at a time, the last one to
/// three bytes one by one: constant bounds everywhere keep the verifier's
/// work small.
#[inline(never)]
fn sum_bytes(ctx: &TcContext, off: usize, len: usize) -> Result<u16, ()> {
    if len > MAX_SUMMED {
        return Err(());
    }
    let buf = SCRATCH.get_ptr_mut(0).ok_or(())?;
    // SAFETY: per-CPU slot, used by this program invocation only.
    let buf = unsafe { &mut *buf };
    let words = len & !3;
    let mut native: u64 = 0;
    let mut done = 0usize;
    for _ in 0..MAX_SUMMED / CHUNK {
        if done >= words {
            break;
        }
        let left = words - done;
        let n = if left > CHUNK { CHUNK } else { left } as u32;
        // 1..=CHUNK for the verifier (n is a multiple of 4 in that range).
        let n = ((n - 1) & (CHUNK as u32 - 1)) + 1;
        // SAFETY: n bytes into the CHUNK-byte buffer.
        let r = unsafe {
            aya_ebpf::helpers::bpf_skb_load_bytes(
                ctx.skb.skb as *const _,
                (off + done) as u32,
                buf.as_mut_ptr() as *mut core::ffi::c_void,
                n,
            )
        };
        if r != 0 {
            return Err(());
        }
        // SAFETY: n & !3 bytes of the buffer, a multiple of 4.
        let s = unsafe {
            bpf_csum_diff(
                core::ptr::null_mut(),
                0,
                buf.as_mut_ptr() as *mut u32,
                n & !3,
                0,
            )
        };
        if s < 0 {
            return Err(());
        }
        native += s as u64 & 0xffff_ffff;
        done += n as usize;
    }
    // bpf_csum_diff adds native-endian words: on a little-endian machine its
    // folded sum is the big-endian one byte-swapped (RFC 1071, 2.(B)).
    let mut sum = fold16(native).swap_bytes() as u64;
    for k in 0..3 {
        if words + k < len {
            let b: u8 = ctx.load(off + words + k).map_err(|_| ())?;
            // Even positions are a word's high byte.
            sum += if k % 2 == 0 {
                (b as u64) << 8
            } else {
                b as u64
            };
        }
    }
    Ok(fold16(sum))
}

/// A 20-byte IPv4 header (TTL 64, no options) with its checksum.
#[inline(always)]
pub fn ipv4_header(
    total: u16,
    tos: u8,
    frag: u16,
    proto: u8,
    src: &[u8; 4],
    dst: &[u8; 4],
) -> [u8; 20] {
    let t = total.to_be_bytes();
    let f = frag.to_be_bytes();
    // Every byte named: a zeroed array costs a memset call on BPF.
    let mut h = [
        0x45, tos, t[0], t[1], 0, 0, f[0], f[1], 64, proto, 0, 0, src[0], src[1], src[2], src[3],
        dst[0], dst[1], dst[2], dst[3],
    ];
    let c = ipv4_header_checksum(&h).to_be_bytes();
    h[10] = c[0];
    h[11] = c[1];
    h
}

#[inline(always)]
fn ipv4_header_checksum(h: &[u8; 20]) -> u16 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < 20 {
        sum += u16::from_be_bytes([h[i], h[i + 1]]) as u32;
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// A received tunnel datagram's outer headers, as far as the receive path
/// needs them. (Small enough to cross a BPF-to-BPF call in a register.)
#[derive(Clone, Copy)]
pub struct Outer {
    /// Ethertype of the inner packet.
    pub inner: u16,
    /// Whether the outer header is IPv6.
    pub v6: bool,
}

impl Outer {
    #[inline(always)]
    pub fn len(&self) -> usize {
        if self.v6 { OUTER_V6_LEN } else { OUTER_V4_LEN }
    }
}

/// Whether the Ethernet frame is a datagram to one of this node's addresses
/// and its tunnel port, and if so its outer headers. Outer IPv4 options,
/// fragments and IPv6 extension headers are left to the kernel, which hands
/// the (reassembled) datagram to the slow-path socket. Not inlined: the
/// outer header it reads stays off the receive path's deepest call chain
/// (older verifiers allow 512 bytes of stack along it).
#[inline(never)]
pub fn tunnel_datagram(ctx: &TcContext, cfg: &Config) -> Option<Outer> {
    let ethertype: [u8; 2] = read(ctx, 12)?;
    match u16::from_be_bytes(ethertype) {
        ETH_P_IP => outer_v4(ctx, cfg),
        ETH_P_IPV6 => outer_v6(ctx, cfg),
        _ => None,
    }
}

#[inline(always)]
fn outer_v4(ctx: &TcContext, cfg: &Config) -> Option<Outer> {
    outer_v4_header(ctx, cfg)?;
    Some(Outer {
        inner: inner_ethertype(ctx, OUTER_V4_LEN)?,
        v6: false,
    })
}

#[inline(always)]
fn outer_v6(ctx: &TcContext, cfg: &Config) -> Option<Outer> {
    outer_v6_header(ctx, cfg)?;
    Some(Outer {
        inner: inner_ethertype(ctx, OUTER_V6_LEN)?,
        v6: true,
    })
}

/// The outer IPv4 and UDP headers when the frame is a datagram to this
/// node's tunnel port without options or fragmentation (what TC and XDP
/// both take for tunnel traffic).
#[inline(always)]
pub(crate) fn outer_v4_header<C: Frame>(ctx: &C, cfg: &Config) -> Option<[u8; OUTER_V4_LEN]> {
    let h = ctx.read::<OUTER_V4_LEN>(ETH_HLEN)?;
    if h[0] != 0x45 || h[9] != IPPROTO_UDP || u16::from_be_bytes([h[6], h[7]]) & 0x3fff != 0 {
        return None;
    }
    // The port first: it turns away most other traffic on the uplink.
    if u16::from_be_bytes([h[22], h[23]]) != cfg.tunnel_port {
        return None;
    }
    // The usual destination is the configured source; any other address of
    // this node (behind NAT, a second interface) is looked up.
    if !own_address(cfg, &Addr::from_v4_octets([h[16], h[17], h[18], h[19]])) {
        return None;
    }
    Some(h)
}

/// The outer IPv6 and UDP headers when the frame is a datagram to this
/// node's tunnel port without extension headers.
#[inline(always)]
pub(crate) fn outer_v6_header<C: Frame>(ctx: &C, cfg: &Config) -> Option<[u8; OUTER_V6_LEN]> {
    let h = ctx.read::<OUTER_V6_LEN>(ETH_HLEN)?;
    if h[0] >> 4 != 6 || h[6] != IPPROTO_UDP {
        return None;
    }
    if u16::from_be_bytes([h[42], h[43]]) != cfg.tunnel_port {
        return None;
    }
    let mut dst = Addr { bytes: [0xff; 16] };
    dst.bytes.copy_from_slice(&h[24..40]);
    if !own_address(cfg, &dst) {
        return None;
    }
    Some(h)
}

/// Whether `a` is one of this node's addresses: the outer sources the
/// configuration names, or one in NODE_ADDRESSES.
#[inline(always)]
pub(crate) fn own_address(cfg: &Config, a: &Addr) -> bool {
    if a.is_zero() {
        return false;
    }
    *a == cfg.src_v6 || *a == Addr::from_v4_octets(cfg.src_v4) || node_address(a)
}

#[inline(always)]
fn node_address(a: &Addr) -> bool {
    unsafe { NODE_ADDRESSES.get(a) }.is_some()
}

#[inline(always)]
fn inner_ethertype(ctx: &TcContext, outer_len: usize) -> Option<u16> {
    let version: [u8; 1] = read(ctx, ETH_HLEN + outer_len)?;
    match version[0] >> 4 {
        4 => Some(ETH_P_IP),
        6 => Some(ETH_P_IPV6),
        _ => None,
    }
}

/// Whether `bpf_skb_adjust_room` takes `BPF_F_ADJ_ROOM_DECAP_L3_IPV4/6`
/// (Linux 6.3): 1 when it does. Probed and set by the loader before the
/// programs load; read-only, so the verifier sees a constant and drops the
/// path this kernel does not take. The default, 0, works on every kernel.
/// Its name is `netmanager_common::DECAP_L3_FLAG_GLOBAL`.
#[unsafe(no_mangle)]
static ADJUST_ROOM_DECAP_L3: u8 = 0;

/// Bytes by which `bpf_skb_change_proto` grows (IPv4 to IPv6) or shrinks
/// (IPv6 to IPv4) the packet right after the MAC header.
const FAMILY_SWITCH: i32 = 20;

/// Strips the outer headers; the inner packet follows the Ethernet header
/// afterwards, and `skb->protocol` names its family (the stack picks ip_rcv
/// or ipv6_rcv by it after the redirect).
#[inline(never)]
pub fn decapsulate(ctx: &TcContext, outer: Outer) -> Result<(), ()> {
    let len = outer.len() as i32;
    let inner_v6 = outer.inner == ETH_P_IPV6;
    if inner_v6 == outer.v6 {
        // Same family inside and out: no flag needed, on any kernel.
        ctx.adjust_room(-len, BPF_ADJ_ROOM_MAC, 0).map_err(|_| ())?;
    } else if decap_l3_flag() {
        let flag = if inner_v6 {
            BPF_F_ADJ_ROOM_DECAP_L3_IPV6
        } else {
            BPF_F_ADJ_ROOM_DECAP_L3_IPV4
        };
        ctx.adjust_room(-len, BPF_ADJ_ROOM_MAC, flag as u64)
            .map_err(|_| ())?;
    } else {
        // Before 6.3 only bpf_skb_change_proto switches skb->protocol; it
        // also inserts (to IPv6) or removes (to IPv4) 20 bytes after the
        // MAC header, which the room adjustment accounts for.
        // SAFETY: plain helper call on our own context.
        let r = unsafe { bpf_skb_change_proto(ctx.skb.skb, outer.inner.to_be(), 0) };
        if r != 0 {
            return Err(());
        }
        let rest = if inner_v6 {
            len + FAMILY_SWITCH
        } else {
            len - FAMILY_SWITCH
        };
        ctx.adjust_room(-rest, BPF_ADJ_ROOM_MAC, 0)
            .map_err(|_| ())?;
    }
    if inner_v6 == outer.v6 {
        // The outer header's ethertype, kept with the MACs, is already the
        // inner one's: a store less per packet.
        return Ok(());
    }
    ctx.store(12, &outer.inner.to_be(), 0).map_err(|_| ())
}

#[inline(always)]
fn decap_l3_flag() -> bool {
    // SAFETY: a plain read of our own global; volatile so the compiler
    // keeps the load the loader's value is patched into.
    unsafe { core::ptr::read_volatile(&ADJUST_ROOM_DECAP_L3) != 0 }
}
