//! The Oakestra tunnel on the wire: the translated IP packet is the whole
//! payload of one UDP datagram between the nodes' tunnel ports -- no extra
//! header, byte-compatible with an upstream NetManager.

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_DECAP_L3_IPV6, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
    },
    helpers::bpf_skb_change_proto,
    programs::TcContext,
};
use netmanager_common::{Config, Instance};

use crate::packet::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IPPROTO_UDP};

const BPF_ADJ_ROOM_MAC: u32 = aya_ebpf::bindings::bpf_adj_room_mode::BPF_ADJ_ROOM_MAC;

/// Outer IPv4 (no options) plus UDP.
pub const OUTER_LEN: usize = 28;

#[repr(C)]
struct Outer {
    ip: [u8; 20],
    udp: [u8; 8],
}

/// Wraps the IP packet after the Ethernet header into IPv4/UDP towards the
/// node running `backend`. The caller redirects it out of the uplink.
#[inline(never)]
pub fn encapsulate(ctx: &TcContext, cfg: &Config, backend: &Instance) -> Result<(), ()> {
    let inner_len = ctx.len() as usize - ETH_HLEN;
    let flags = (BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP) as u64;
    ctx.adjust_room(OUTER_LEN as i32, BPF_ADJ_ROOM_MAC, flags)
        .map_err(|_| ())?;
    let outer = outer_headers(cfg, backend, inner_len);
    ctx.store(ETH_HLEN, &outer, 0).map_err(|_| ())?;
    // An IPv6 inner packet now travels in IPv4.
    ctx.store(12, &ETH_P_IP.to_be(), 0).map_err(|_| ())
}

#[inline(always)]
fn outer_headers(cfg: &Config, backend: &Instance, inner_len: usize) -> Outer {
    let total = (inner_len + OUTER_LEN) as u16;
    let udp_len = (inner_len + 8) as u16;
    // DF like a Linux UDP socket doing path-MTU discovery (upstream's sender).
    let ip = ipv4_header(
        total,
        0,
        0x4000,
        IPPROTO_UDP,
        &cfg.node_ip,
        &backend.node_ip,
    );
    let sp = cfg.tunnel_port.to_be_bytes();
    let dp = backend.node_port.to_be_bytes();
    let l = udp_len.to_be_bytes();
    // UDP checksum 0: allowed over IPv4, and the inner packet carries its own.
    Outer {
        ip,
        udp: [sp[0], sp[1], dp[0], dp[1], l[0], l[1], 0, 0],
    }
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
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[1] = tos;
    h[2] = t[0];
    h[3] = t[1];
    h[6] = f[0];
    h[7] = f[1];
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(src);
    h[16..20].copy_from_slice(dst);
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

/// Whether the Ethernet frame is a datagram to this node's tunnel port.
/// Returns the ethertype of the inner packet when it is.
#[inline(always)]
pub fn is_tunnel_datagram(ctx: &TcContext, cfg: &Config) -> Option<u16> {
    let ethertype: u16 = ctx.load(12).ok()?;
    if u16::from_be(ethertype) != ETH_P_IP {
        return None;
    }
    let h: [u8; 28] = ctx.load(ETH_HLEN).ok()?;
    // Outer options or fragments are left to the kernel.
    if h[0] != 0x45 || h[9] != IPPROTO_UDP || u16::from_be_bytes([h[6], h[7]]) & 0x3fff != 0 {
        return None;
    }
    if [h[16], h[17], h[18], h[19]] != cfg.node_ip {
        return None;
    }
    if u16::from_be_bytes([h[22], h[23]]) != cfg.tunnel_port {
        return None;
    }
    let inner: u8 = ctx.load(ETH_HLEN + OUTER_LEN).ok()?;
    match inner >> 4 {
        4 => Some(ETH_P_IP),
        6 => Some(ETH_P_IPV6),
        _ => None,
    }
}

/// Whether `bpf_skb_adjust_room` takes `BPF_F_ADJ_ROOM_DECAP_L3_IPV6`
/// (Linux 6.3): 1 when it does. Probed and set by the loader before the
/// programs load; read-only, so the verifier sees a constant and drops the
/// path this kernel does not take. The default, 0, works on every kernel.
/// Its name is `netmanager_common::DECAP_L3_FLAG_GLOBAL`.
#[unsafe(no_mangle)]
static ADJUST_ROOM_DECAP_L3: u8 = 0;

/// Bytes `bpf_skb_change_proto` inserts after the MAC header when it turns
/// an IPv4 skb into an IPv6 one (the header size difference).
const V4_TO_V6_GROWTH: i32 = 20;

/// Strips the outer IPv4/UDP headers; the inner packet follows the
/// Ethernet header afterwards, and `skb->protocol` names its family (the
/// stack picks ip_rcv or ipv6_rcv by it after the redirect).
#[inline(never)]
pub fn decapsulate(ctx: &TcContext, inner_ethertype: u16) -> Result<(), ()> {
    if inner_ethertype != ETH_P_IPV6 {
        // Same family inside and out: no flag needed, on any kernel.
        ctx.adjust_room(-(OUTER_LEN as i32), BPF_ADJ_ROOM_MAC, 0)
            .map_err(|_| ())?;
    } else if decap_l3_flag() {
        ctx.adjust_room(
            -(OUTER_LEN as i32),
            BPF_ADJ_ROOM_MAC,
            BPF_F_ADJ_ROOM_DECAP_L3_IPV6 as u64,
        )
        .map_err(|_| ())?;
    } else {
        // Before 6.3 only bpf_skb_change_proto switches skb->protocol to
        // IPv6; it also inserts 20 bytes after the MAC header, which go
        // out together with the outer headers.
        // SAFETY: plain helper call on our own context.
        let r = unsafe { bpf_skb_change_proto(ctx.skb.skb, ETH_P_IPV6.to_be(), 0) };
        if r != 0 {
            return Err(());
        }
        ctx.adjust_room(
            -(OUTER_LEN as i32 + V4_TO_V6_GROWTH),
            BPF_ADJ_ROOM_MAC,
            0,
        )
        .map_err(|_| ())?;
    }
    ctx.store(12, &inner_ethertype.to_be(), 0).map_err(|_| ())
}

#[inline(always)]
fn decap_l3_flag() -> bool {
    // SAFETY: a plain read of our own global; volatile so the compiler
    // keeps the load the loader's value is patched into.
    unsafe { core::ptr::read_volatile(&ADJUST_ROOM_DECAP_L3) != 0 }
}
