//! `uplink_xdp`: the XDP program in front of `uplink_ingress` on every
//! interface that receives tunnel datagrams, when NetManager runs with
//! `--uplink-hook xdp` (docs/dataplane.md, "The uplink hook: TC or XDP").
//!
//! It drops what must never reach the stack, before the kernel builds an
//! skb for it (native mode) or before the stack looks at it (generic mode):
//!
//! - malformed tunnel datagrams: lengths that contradict each other or the
//!   frame, or a payload that is no IPv4/IPv6 packet;
//! - datagrams the sender check (`peers::check`, the very code
//!   `uplink_ingress` runs, on the same bytes) rejects outright: forged
//!   inner sources, inner sources outside every service range, unknown
//!   senders for no container here.
//!
//! Everything else passes on unchanged: other traffic, tunnel datagrams the
//! TC program accepts, and those from senders the tables do not name yet,
//! which TC holds while NetManager asks the cluster (never dropped here).
//!
//! With `--uplink-hook xdp-redirect` (`CONFIG_XDP_REDIRECT`), an accepted
//! datagram that `xdp_redirect` can deliver whole is decapsulated,
//! translated and redirected into the container's veth here instead;
//! whatever it cannot decide still passes to TC unchanged.
//!
//! Not a multi-buffer (`xdp.frags`) program: in generic mode the kernel
//! then hands it every skb linear, GSO ones included, and leaves them fit
//! for TC's decapsulation (a frags program saw GSO tunnel datagrams that
//! `uplink_ingress` could no longer decapsulate, measured in
//! tests/scripts/xdp_uplink_cost.sh). The price: native mode does not
//! attach to an interface whose MTU exceeds a page, and `--xdp-mode auto`
//! takes generic there.
//!
//! Direct packet access throughout (`packet::Frame`): every offset is a
//! constant at its read, checked against `data_end`.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    macros::xdp,
    programs::XdpContext,
};
use netmanager_common::{Addr, CONFIG_XDP_REDIRECT, Config, Counter};

use crate::maps::{config, count};
use crate::packet::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, Frame};
use crate::peers;
use crate::tunnel::{OUTER_V4_LEN, OUTER_V6_LEN, Outer, outer_v4_header, outer_v6_header};
use crate::xdp_redirect;

/// IPv4 header without options.
const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const UDP_HLEN: usize = 8;

#[xdp]
pub fn uplink_xdp(ctx: XdpContext) -> u32 {
    let Some(cfg) = config() else {
        return XDP_PASS;
    };
    let len = frame_len(&ctx) as u32;
    match screen(&ctx, cfg) {
        Screened::Pass => XDP_PASS,
        Screened::Drop(reason) => {
            count(reason, len);
            XDP_DROP
        }
        Screened::Accepted(outer) if cfg.flags & CONFIG_XDP_REDIRECT != 0 => {
            if outer.v6 {
                xdp_redirect::deliver::<{ ETH_HLEN + OUTER_V6_LEN }>(&ctx, cfg, outer, len)
            } else {
                xdp_redirect::deliver::<{ ETH_HLEN + OUTER_V4_LEN }>(&ctx, cfg, outer, len)
            }
        }
        Screened::Accepted(_) => XDP_PASS,
    }
}

/// What the screen made of a frame.
enum Screened {
    /// Not ours, or one TC holds: on to TC unchanged.
    Pass,
    Drop(Counter),
    /// A tunnel datagram the sender check accepts, with its outer headers.
    Accepted(Outer),
}

#[inline(always)]
fn screen(ctx: &XdpContext, cfg: &Config) -> Screened {
    let Some(ethertype) = ctx.read::<2>(12) else {
        return Screened::Pass;
    };
    match u16::from_be_bytes(ethertype) {
        ETH_P_IP => screen_v4(ctx, cfg),
        ETH_P_IPV6 => screen_v6(ctx, cfg),
        _ => Screened::Pass,
    }
}

/// A datagram over an IPv4 underlay. Options and fragments are not the fast
/// path's either: the kernel reassembles them for the slow-path socket.
#[inline(always)]
fn screen_v4(ctx: &XdpContext, cfg: &Config) -> Screened {
    let Some(h) = outer_v4_header(ctx, cfg) else {
        return Screened::Pass;
    };
    // A tunnel datagram for this node from here on.
    let ip_len = u16::from_be_bytes([h[2], h[3]]) as usize;
    let udp_len = u16::from_be_bytes([h[24], h[25]]) as usize;
    if ip_len < OUTER_V4_LEN
        || ETH_HLEN + ip_len > frame_len(ctx)
        || udp_len < UDP_HLEN
        || udp_len > ip_len - IPV4_HLEN
    {
        return Screened::Drop(Counter::XdpDropMalformed);
    }
    screen_inner::<{ ETH_HLEN + OUTER_V4_LEN }>(ctx, cfg, false, udp_len - UDP_HLEN)
}

/// A datagram over an IPv6 underlay (between our own workers). Extension
/// headers go to the slow path, as on TC.
#[inline(always)]
fn screen_v6(ctx: &XdpContext, cfg: &Config) -> Screened {
    let Some(h) = outer_v6_header(ctx, cfg) else {
        return Screened::Pass;
    };
    let payload = u16::from_be_bytes([h[4], h[5]]) as usize;
    let udp_len = u16::from_be_bytes([h[44], h[45]]) as usize;
    if payload < UDP_HLEN
        || ETH_HLEN + IPV6_HLEN + payload > frame_len(ctx)
        || udp_len < UDP_HLEN
        || udp_len > payload
    {
        return Screened::Drop(Counter::XdpDropMalformed);
    }
    screen_inner::<{ ETH_HLEN + OUTER_V6_LEN }>(ctx, cfg, true, udp_len - UDP_HLEN)
}

/// The inner packet at `AT`, `len` bytes per the UDP header: an IPv4 or
/// IPv6 packet that fits, from a sender the tables do not reject.
#[inline(always)]
fn screen_inner<const AT: usize>(
    ctx: &XdpContext,
    cfg: &Config,
    outer_v6: bool,
    len: usize,
) -> Screened {
    let Some(inner) = inner_family::<AT>(ctx, len) else {
        return Screened::Drop(Counter::XdpDropMalformed);
    };
    // The TC program's own sender check, on the same bytes.
    let outer = Outer {
        inner,
        v6: outer_v6,
    };
    let mut inner_src = Addr::ZERO;
    match peers::check(ctx, cfg, outer, &mut inner_src) {
        peers::ACCEPT => Screened::Accepted(outer),
        // TC holds it and NetManager asks the cluster.
        peers::HOLD => Screened::Pass,
        peers::FORGED => Screened::Drop(Counter::XdpDropForgedSource),
        peers::BAD_INNER_SOURCE => Screened::Drop(Counter::XdpDropBadInnerSource),
        peers::NOT_LOCAL => Screened::Drop(Counter::XdpDropNotLocal),
        _ => Screened::Drop(Counter::XdpDropMalformed),
    }
}

/// The ethertype of the inner packet at `AT`, `len` bytes per the UDP
/// header, or None when it is no IPv4 or IPv6 packet that fits.
#[inline(always)]
fn inner_family<const AT: usize>(ctx: &XdpContext, len: usize) -> Option<u16> {
    if len == 0 {
        return None;
    }
    let version = ctx.read::<1>(AT)?[0] >> 4;
    let inner = if version == 4 {
        if len < IPV4_HLEN {
            return None;
        }
        let h = ctx.read::<4>(AT)?;
        let ihl = ((h[0] & 0x0f) as usize) * 4;
        let total = u16::from_be_bytes([h[2], h[3]]) as usize;
        if ihl < IPV4_HLEN || total < ihl || total > len {
            return None;
        }
        ETH_P_IP
    } else if version == 6 {
        if len < IPV6_HLEN {
            return None;
        }
        let h = ctx.read::<6>(AT)?;
        if IPV6_HLEN + u16::from_be_bytes([h[4], h[5]]) as usize > len {
            return None;
        }
        ETH_P_IPV6
    } else {
        return None;
    };
    Some(inner)
}

/// The frame's length (one buffer: see the module's comment on `frags`).
#[inline(always)]
fn frame_len(ctx: &XdpContext) -> usize {
    ctx.data_end() - ctx.data()
}
