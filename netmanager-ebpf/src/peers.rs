//! Who may send us tunnel datagrams. A datagram's inner source is the
//! sending instance's address (docs/contract.md §2.5 step 1), and the tables say
//! which node runs each instance (`INSTANCE_NODES`): only that node may send
//! it. An underlay prefix the operator trusts (`TRUSTED_PEERS`, from
//! `TunnelPeers`) may send for any instance.
//!
//! A datagram whose inner source no known node runs is held, never dropped
//! blindly: it may be the first SYN of a client on a node whose tables we
//! have never needed. NetManager asks the cluster which node runs the
//! instance and reinjects the datagram only if that node sent it.
//!
//! So is one for a container here whose inner source the tables say
//! another node runs: nodes change address (the uplink moves, DHCP
//! renumbers it) and our tables learn it only when they are refreshed. The
//! cluster's answer decides, as for an unknown source: it rewrites
//! INSTANCE_NODES, so a node that really moved is accepted from then on.
//! Anything else with a known instance's address from the wrong node (not
//! for a container here, or an instance of this very node) is dropped as
//! forged (`drop_forged_source`).
//!
//! The same check runs on the fast path (`uplink_ingress`) and the slow
//! path (`slow_path_ingress`, datagrams NetManager's socket received under a
//! header rebuilt from the socket's addresses), for datagrams to any of the
//! node's addresses, over an IPv4 or an IPv6 underlay; and in the XDP
//! program in front of the fast path (`crate::xdp`), which reads the same
//! frame through the same code (`packet::Frame`).
//!
//! Everything is read from the datagram as it arrived, before
//! decapsulation, so a held frame can be reinjected whole; directly from
//! the packet where its headers are linear (they almost always are), which
//! spares a helper call per field.

use aya_ebpf::maps::lpm_trie::Key;
use netmanager_common::{Addr, Config, INSTANCE_LOCAL};

use crate::maps::{INSTANCE_NODES, INSTANCES, TRUSTED_PEERS};
use crate::packet::{ETH_HLEN, ETH_P_IP, Frame, in_service_range};
use crate::tunnel::{Outer, own_address};

/// Outcome of [`check`], as a scalar so it can cross a BPF-to-BPF call.
/// The sender runs the inner source's instance, or is trusted.
pub const ACCEPT: u32 = 0;
/// The frame, for a container here, comes from a node the tables do not
/// name for its inner source (nobody, or another node, which may have
/// moved): hold it and ask.
pub const HOLD: u32 = 1;
/// The inner source is an instance of another node, and the datagram is
/// not for a container here.
pub const FORGED: u32 = 2;
/// The inner source is no instance address at all.
pub const BAD_INNER_SOURCE: u32 = 3;
/// Nobody known sends it, and it is not for a container here either.
pub const NOT_LOCAL: u32 = 4;
pub const MALFORMED: u32 = 5;

/// Decides on the tunnel datagram in `ctx`, whose outer headers
/// `tunnel::tunnel_datagram` has read; writes the inner source to
/// `inner_src`.
#[inline(never)]
pub fn check<C: Frame>(ctx: &C, cfg: &Config, outer: Outer, inner_src: &mut Addr) -> u32 {
    let Some(sender) = outer_source(ctx, outer) else {
        return MALFORMED;
    };
    let inner_ethertype = outer.inner;
    let at = ETH_HLEN + outer.len();
    if inner_ethertype == ETH_P_IP {
        let Some(a) = ctx.read::<4>(at + 12) else {
            return MALFORMED;
        };
        *inner_src = Addr::from_v4_octets(a);
    } else {
        let Some(a) = ctx.read::<16>(at + 8) else {
            return MALFORMED;
        };
        inner_src.bytes = a;
    }
    // SAFETY: a plain lookup; the entry is only read.
    if let Some(node) = unsafe { INSTANCE_NODES.get(*inner_src) } {
        if node.node_ip == sender || trusted(&sender) {
            return ACCEPT;
        }
        // The node may have moved; only the cluster knows. Not worth a
        // question when it is not for a container here, nor when the
        // tables say this node runs the instance: it never comes from
        // outside.
        if !own_address(cfg, &node.node_ip) && for_local_container(ctx, at, inner_ethertype) {
            return HOLD;
        }
        return FORGED;
    }
    if !in_service_range(cfg, inner_src) {
        return BAD_INNER_SOURCE;
    }
    if trusted(&sender) {
        return ACCEPT;
    }
    // Only worth asking about when it is for a container here.
    if !for_local_container(ctx, at, inner_ethertype) {
        return NOT_LOCAL;
    }
    HOLD
}

/// The outer source address: the sending node.
#[inline(always)]
fn outer_source<C: Frame>(ctx: &C, outer: Outer) -> Option<Addr> {
    Some(if outer.v6 {
        Addr {
            bytes: ctx.read::<16>(ETH_HLEN + 8)?,
        }
    } else {
        Addr::from_v4_octets(ctx.read::<4>(ETH_HLEN + 12)?)
    })
}

#[inline(always)]
fn trusted(sender: &Addr) -> bool {
    let key = Key::new(128, *sender);
    TRUSTED_PEERS.get(&key).is_some()
}

#[inline(always)]
fn for_local_container<C: Frame>(ctx: &C, inner_at: usize, inner_ethertype: u16) -> bool {
    let dst = if inner_ethertype == ETH_P_IP {
        let Some(a) = ctx.read::<4>(inner_at + 16) else {
            return false;
        };
        Addr::from_v4_octets(a)
    } else {
        let Some(a) = ctx.read::<16>(inner_at + 24) else {
            return false;
        };
        Addr { bytes: a }
    };
    // SAFETY: a plain lookup; the entry is only read.
    unsafe { INSTANCES.get(dst) }.is_some_and(|i| i.flags & INSTANCE_LOCAL != 0)
}
