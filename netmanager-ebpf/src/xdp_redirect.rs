//! Delivery in XDP (`--uplink-hook xdp-redirect`): a tunnel datagram the
//! sender check accepted is decapsulated with `bpf_xdp_adjust_head`,
//! reverse-translated where this node owns the flow, given the Ethernet
//! header the TC path gives it, and redirected into the host end of the
//! container's veth -- what `uplink_ingress` does with `bpf_skb_adjust_room`
//! and `bpf_redirect_peer`, with the same parser (`packet::parse`), the same
//! tables and the same header arithmetic (`packet::v4_header_rewritten`,
//! `packet::l4_pseudo_diff`).
//!
//! Only what it can decide whole, before it changes a byte: a TCP, UDP or
//! ICMP echo packet without IPv4 options, no larger than the tunnel MTU (a
//! larger one is a GSO packet generic XDP linearised, whose skb TC must
//! decapsulate), for a container on this node. Everything else -- other
//! protocols, fragments, options, unknown destinations -- passes to TC
//! unchanged, which delivers or drops it as before.
//!
//! The L4 checksum is updated as the full checksum it is on the wire: XDP
//! has no skb to say otherwise. docs/dataplane.md ("The uplink hook")
//! says where that holds (native XDP) and what generic XDP does with it.

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::{bpf_redirect, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use netmanager_common::{Addr, Config, Counter, INSTANCE_LOCAL};

use crate::flows;
use crate::maps::{INSTANCES, count};
use crate::packet::{
    self, ETH_HLEN, ETH_P_IPV6, Frame, IPPROTO_UDP, Packet, checksum_changed, direct_write,
};
use crate::tunnel::Outer;

/// Delivers the accepted tunnel datagram of `len` bytes whose inner packet
/// starts at `AT`, counting it, or leaves it to TC untouched and uncounted;
/// returns the XDP action. Not inlined: its packet must not share a stack
/// frame with the screen's (512 bytes along the deepest call chain).
#[inline(never)]
pub fn deliver<const AT: usize>(ctx: &XdpContext, cfg: &Config, outer: Outer, len: u32) -> u32 {
    let (counter, action) = decide::<AT>(ctx, cfg, outer);
    if let Some(c) = counter {
        count(c, len);
    }
    action
}

/// [`deliver`]'s work: the counter to add the frame to (None: not
/// counted) and the XDP action.
#[inline(always)]
fn decide<const AT: usize>(ctx: &XdpContext, cfg: &Config, outer: Outer) -> (Option<Counter>, u32) {
    let mut slot = MaybeUninit::uninit();
    let p = Packet::init(&mut slot);
    if packet::parse(ctx, AT, outer.inner, p).is_err() {
        return (None, XDP_PASS);
    }
    // IPv4 options: the offsets below are constants. Larger than the
    // tunnel carries: a GSO packet in generic mode.
    if (!p.v6 && p.l4 != AT + 20) || p.ip_len > cfg.tunnel_mtu as u32 {
        return (None, XDP_PASS);
    }
    // SAFETY: a plain lookup; only the two fields needed are copied.
    let Some((mac, ifindex)) = (unsafe { INSTANCES.get(p.dst) })
        .filter(|d| d.flags & INSTANCE_LOCAL != 0 && d.ifindex != 0)
        .map(|d| (d.mac, d.ifindex))
    else {
        return (None, XDP_PASS);
    };
    // Decided: from here on the frame is ours.
    if p.csum_off != 0 {
        if let Some(service) = flows::reverse_service(&p.key()) {
            if translate::<AT>(ctx, p, &service) != 0 {
                return (Some(Counter::DropMalformed), XDP_DROP);
            }
        }
    }
    if ethernet::<AT>(ctx, &mac, outer.inner).is_none() {
        return (Some(Counter::DropMalformed), XDP_DROP);
    }
    // SAFETY: a plain helper call on our own context; the outer headers
    // lie inside the frame (the screen checked their lengths).
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, (AT - ETH_HLEN) as i32) } != 0 {
        return (Some(Counter::DropMalformed), XDP_DROP);
    }
    // Into the host end of the container's veth, whose far end (in the
    // container) has NAPI for it (NetManager enables GRO there).
    let action = unsafe { bpf_redirect(ifindex, 0) } as u32;
    (Some(Counter::XdpRedirected), action)
}

/// Restores `service` as the source of the packet at `AT` (the reverse
/// translation of `uplink_ingress`'s `deliver`): header bytes and L4
/// checksum written in place. 0 when done (a scalar: BPF-to-BPF calls
/// return nothing larger). Not inlined: its buffers stay off
/// [`deliver`]'s frame.
#[inline(never)]
fn translate<const AT: usize>(ctx: &XdpContext, p: &Packet, service: &Addr) -> u32 {
    translate_inner::<AT>(ctx, p, service).map_or(1, |()| 0)
}

#[inline(always)]
fn translate_inner<const AT: usize>(ctx: &XdpContext, p: &Packet, service: &Addr) -> Option<()> {
    let (start, end) = (ctx.data(), ctx.data_end());
    let dst = p.dst;
    if let Some(diff) = packet::l4_pseudo_diff(p, service, &dst) {
        let zero_none = packet::zero_means_none(p);
        // The checksum's offset: TCP 16, UDP 6, ICMPv6 2 into the L4 header,
        // which follows a fixed-size IP header here.
        let l4 = if p.v6 { AT + 40 } else { AT + 20 };
        let at = if p.proto == packet::IPPROTO_TCP {
            l4 + 16
        } else if p.proto == IPPROTO_UDP {
            l4 + 6
        } else {
            l4 + 2
        };
        let field = ctx.read::<2>(at)?;
        direct_write::<2>(start, end, at, &checksum_changed(field, diff, zero_none))?;
    }
    if p.v6 {
        let h = packet::v6_header_rewritten(service, &dst, p.ttl);
        direct_write::<33>(start, end, AT + 7, &h)
    } else {
        let mut h = ctx.read::<12>(AT + 8)?;
        packet::v4_header_rewritten(&mut h, service, &dst, p.ttl);
        direct_write::<12>(start, end, AT + 8, &h)
    }
}

/// Writes the Ethernet header the container receives right before the
/// inner packet at `AT`: its own MAC as destination, the sender's MAC kept
/// as source (as TC keeps it), the inner packet's ethertype.
#[inline(always)]
fn ethernet<const AT: usize>(ctx: &XdpContext, dest_mac: &[u8; 6], inner: u16) -> Option<()> {
    let s = ctx.read::<6>(6)?;
    let t = if inner == ETH_P_IPV6 {
        ETH_P_IPV6.to_be_bytes()
    } else {
        packet::ETH_P_IP.to_be_bytes()
    };
    let d = dest_mac;
    // Every byte named: a zeroed array costs a memset call on BPF.
    let h = [
        d[0], d[1], d[2], d[3], d[4], d[5], s[0], s[1], s[2], s[3], s[4], s[5], t[0], t[1],
    ];
    direct_write::<14>(ctx.data(), ctx.data_end(), AT - ETH_HLEN, &h)
}
