//! NetManager's overlay dataplane: the per-packet half of upstream Oakestra's
//! userspace proxy, in two TC programs.
//!
//! - `container_egress`: TC ingress on the host end of every container veth
//!   (what a container sends). Service-addressed packets are translated
//!   (docs/contract.md §2.5 steps 1-4) and either delivered to a local container or
//!   tunnelled to the backend's node.
//! - `uplink_ingress`: TC ingress on every interface that carries one of the
//!   node's addresses. Datagrams to our tunnel port from the node that runs
//!   the sending instance (`peers`) are decapsulated, reverse-translated
//!   when this node owns the flow, and delivered straight into the
//!   container's namespace.
//! - `slow_path_ingress`: the same receive path, sender check included, for
//!   datagrams the kernel handed to NetManager's tunnel socket instead
//!   (fragmented, with IP options, or from an interface without the
//!   program), which NetManager writes back through the slow-path device;
//!   held tunnel datagrams NetManager has resolved come back this way too.
//! - `uplink_xdp` (xdp.rs): with the XDP uplink hook, in front of
//!   `uplink_ingress`, drops malformed and rejected tunnel datagrams
//!   before the stack sees them; with `--uplink-hook xdp-redirect` it also
//!   delivers what it can decide whole into the container's veth
//!   (xdp_redirect.rs).
#![no_std]
#![no_main]
// The atomic add of flows::count_opened (core has none for BPF).
#![feature(asm_experimental_arch)]

mod flows;
mod maps;
mod packet;
mod peers;
mod pmtu;
mod route;
mod route_cache;
mod tunnel;
mod xdp;
mod xdp_redirect;

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT},
    helpers::{bpf_redirect, bpf_redirect_peer, bpf_ringbuf_query, bpf_skb_load_bytes},
    macros::classifier,
    programs::TcContext,
};
use netmanager_common::{
    Addr, Config, Counter, DEFAULT_MISS_RING_BYTES, Flow, INSTANCE_LOCAL, Instance,
    MISS_FRAME_MAX, MissReason,
};

use maps::{FLOWS, INSTANCES, MISSES, PENDING, config, count};
use packet::{ETH_HLEN, Packet, ParseError};

#[classifier]
pub fn container_egress(ctx: TcContext) -> i32 {
    let Some(cfg) = config() else {
        return TC_ACT_OK;
    };
    let len = ctx.len();
    let verdict = match from_container(&ctx, cfg) {
        Ok(v) => v,
        Err(c) => Verdict::Drop(c),
    };
    finish(verdict, len)
}

#[classifier]
pub fn uplink_ingress(ctx: TcContext) -> i32 {
    let Some(cfg) = config() else {
        return TC_ACT_OK;
    };
    let Some(outer) = tunnel::tunnel_datagram(&ctx, cfg) else {
        // Not overlay traffic: untouched, and not even counted, to keep the
        // uplink's other traffic at zero cost beyond the header reads.
        return TC_ACT_OK;
    };
    let len = ctx.len();
    let verdict = match from_tunnel(&ctx, cfg, outer) {
        Ok(v) => v,
        Err(c) => Verdict::Drop(c),
    };
    finish(verdict, len)
}

#[classifier]
pub fn slow_path_ingress(ctx: TcContext) -> i32 {
    let Some(cfg) = config() else {
        return TC_ACT_SHOT;
    };
    let len = ctx.len();
    let verdict = match tunnel::tunnel_datagram(&ctx, cfg) {
        Some(outer) => match from_tunnel(&ctx, cfg, outer) {
            // Never back to the stack: it would hand the datagram to the
            // slow-path socket again.
            Ok(Verdict::Pass(_)) => Verdict::Drop(Counter::DropMalformed),
            Ok(v) => v,
            Err(c) => Verdict::Drop(c),
        },
        None => Verdict::Drop(Counter::DropMalformed),
    };
    finish(verdict, len)
}

/// What happened to a packet, with the counter it is accounted under.
pub(crate) enum Verdict {
    /// Continue in the kernel stack.
    Pass(Counter),
    /// Redirected by a helper; return its action.
    Redirect(Counter, i32),
    /// Handed to userspace (held) or consumed.
    Stolen(Counter),
    Drop(Counter),
}

#[inline(always)]
fn finish(v: Verdict, len: u32) -> i32 {
    match v {
        Verdict::Pass(c) => {
            count(c, len);
            TC_ACT_OK
        }
        Verdict::Redirect(c, action) => {
            // The redirect helpers answer TC_ACT_SHOT when the target is
            // unusable (e.g. a veth that vanished under a stale entry).
            count(
                if action == TC_ACT_REDIRECT {
                    c
                } else {
                    Counter::DropRedirect
                },
                len,
            );
            action
        }
        Verdict::Stolen(c) | Verdict::Drop(c) => {
            count(c, len);
            TC_ACT_SHOT
        }
    }
}

fn parse_error(e: ParseError) -> Verdict {
    match e {
        ParseError::NotIp => Verdict::Pass(Counter::Passed),
        ParseError::Malformed => Verdict::Drop(Counter::DropMalformed),
        ParseError::Fragment => Verdict::Drop(Counter::DropFragment),
        ParseError::Unsupported => Verdict::Drop(Counter::DropUnsupportedProto),
    }
}

/// The sender side of docs/contract.md §2.5.
#[inline(always)]
fn from_container(ctx: &TcContext, cfg: &Config) -> Result<Verdict, Counter> {
    let Ok(ethertype) = packet::ethertype(ctx) else {
        return Ok(Verdict::Pass(Counter::Passed));
    };
    // Only service addresses are ours; read the destination before the
    // full parse so everything else (bridge, internet) pays almost nothing.
    let Some(dst) = destination(ctx, ethertype) else {
        return Ok(Verdict::Pass(Counter::Passed));
    };
    if !packet::in_service_range(cfg, &dst) {
        return Ok(Verdict::Pass(Counter::Passed));
    }
    let mut slot = MaybeUninit::uninit();
    let p = Packet::init(&mut slot);
    if let Err(e) = packet::parse(ctx, ETH_HLEN, ethertype, p) {
        return Ok(parse_error(e));
    }
    if p.ttl <= 1 {
        return Err(Counter::DropTtl);
    }
    let mut ns_slot = MaybeUninit::uninit();
    let backend_ns = packet::init_addr(&mut ns_slot);
    let mut cached = flows::ABSENT;
    let mut current = None;
    let mut recheck = None;
    if let Some(flow) = FLOWS.get_ptr_mut(&p.key()) {
        // SAFETY: a valid map value pointer; concurrent writers race only on
        // the timestamp and on copies of the same INSTANCES entries (see
        // flows::refresh).
        let flow = unsafe { &mut *flow };
        cached = flows::state(p, flow, flows::instance_epoch(), flows::now_ns());
        if cached == flows::CURRENT {
            current = Some(&*flow);
        } else {
            packet::copy(&flow.backend, backend_ns);
            recheck = Some(flow);
        }
    }
    // One way on for both: two copies of the send path would double the
    // program's code.
    let (src_instance, backend_ns, backend): (&Addr, &Addr, &Instance) = match current {
        Some(flow) => {
            // The sender's and the backend's entries as of this epoch: the
            // checks `look_up` makes, without looking them up.
            if !sent_from_its_veth(ctx, cfg, flow.sender_ifindex) {
                return Err(Counter::DropSpoofedSource);
            }
            (&flow.src_instance, &flow.backend, &flow.target)
        }
        None => match look_up(ctx, cfg, p, cached, recheck, backend_ns) {
            Ok((sender, backend)) => (&sender.instance_ip, &*backend_ns, backend),
            Err(v) => return v,
        },
    };
    forward(ctx, cfg, p, src_instance, backend_ns, backend)
}

/// The sender's and the backend's INSTANCES entries for a packet whose
/// flow is `cached` (not [`flows::CURRENT`]; `backend_ns` holds the flow's
/// backend unless [`flows::ABSENT`], `entry` its entry when
/// [`flows::RECHECK`]): the sender's checks, then the flow's entry
/// refreshed, or a backend chosen, into `backend_ns`. Err: what becomes of
/// the packet instead.
#[inline(always)]
fn look_up(
    ctx: &TcContext,
    cfg: &Config,
    p: &Packet,
    cached: u32,
    entry: Option<&mut Flow>,
    backend_ns: &mut Addr,
) -> Result<(&'static Instance, &'static Instance), Result<Verdict, Counter>> {
    let mut cached = cached;
    // Read here, right before the lookups whose copies it stamps (see
    // flows::instance_epoch), not kept from the flow's state check: one
    // value less alive across the caller's frame, the deepest chain's.
    let epoch = flows::instance_epoch();
    // SAFETY (both lookups): plain lookups; the entries are only read.
    let Some(sender) = (unsafe { INSTANCES.get(p.src) }) else {
        return Err(Err(Counter::DropNotLocal));
    };
    if sender.flags & INSTANCE_LOCAL == 0 {
        return Err(Err(Counter::DropNotLocal));
    }
    if !sent_from_its_veth(ctx, cfg, sender.ifindex) {
        return Err(Err(Counter::DropSpoofedSource));
    }
    if sender.instance_ip.is_zero() {
        return Err(Ok(hold(ctx, cfg, MissReason::Sender, &p.src)));
    }
    // The key is built at each use, not kept: a key alive across the
    // whole block cost this frame 40 bytes, which the deepest call chain
    // (here -> flows::choose) cannot spare on Linux 6.1 (512 bytes, every
    // frame rounded up to 32).
    if let Some(flow) = entry.filter(|_| cached == flows::RECHECK) {
        if !flows::refresh(p, flow, sender, epoch) {
            // Its backend is gone: chosen anew, in place.
            cached = flows::STALE;
        }
    }
    if cached != flows::RECHECK {
        // A new flow takes one of the sender's FLOWS slots; a stale one is
        // replaced in place.
        let new = cached == flows::ABSENT;
        let owner = sender.ifindex;
        if new && !flows::quota_allows(owner, cfg.flows_per_container) {
            return Err(Err(Counter::DropFlowQuota));
        }
        match flows::choose(&p.key(), sender, backend_ns, new, epoch) {
            flows::CREATED => flows::count_opened(owner),
            flows::REPLACED => {}
            flows::UNKNOWN_SERVICE => return Err(Ok(hold(ctx, cfg, MissReason::Service, &p.dst))),
            flows::NO_BACKEND => return Err(Err(Counter::DropNoBackend)),
            _ => return Err(Err(Counter::DropFlowTableFull)),
        }
    }
    // Looked up here rather than passed back: BPF-to-BPF calls return
    // scalars only.
    let Some(backend) = (unsafe { INSTANCES.get(*backend_ns) }) else {
        return Err(Err(Counter::DropNoBackend));
    };
    Ok((sender, backend))
}

/// Translates and sends on a packet of a flow whose backend is `backend`
/// (namespace address `backend_ns`): tunnelled to its node, or delivered
/// here.
#[inline(always)]
fn forward(
    ctx: &TcContext,
    cfg: &Config,
    p: &mut Packet,
    src_instance: &Addr,
    backend_ns: &Addr,
    backend: &Instance,
) -> Result<Verdict, Counter> {
    if backend.flags & INSTANCE_LOCAL == 0 {
        return tunnel::send_to_peer(ctx, cfg, p, src_instance, backend_ns, backend);
    }
    packet::rewrite(ctx, p, src_instance, backend_ns, true).map_err(|_| Counter::DropMalformed)?;
    // Same-node service traffic: never encapsulated (step 4).
    deliver(ctx, p, backend, Counter::LocalDelivered)
}

/// Whether a container's packet arrived on `sender_ifindex`, the veth its
/// source address belongs to: otherwise it is sending as its neighbour. Frames NetManager
/// reinjects were checked when they were held.
#[inline(always)]
fn sent_from_its_veth(ctx: &TcContext, cfg: &Config, sender_ifindex: u32) -> bool {
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    ifindex == sender_ifindex || ifindex == cfg.inject_ifindex
}

/// Destination address of an IPv4/IPv6 packet after the Ethernet header.
#[inline(always)]
fn destination(ctx: &TcContext, ethertype: u16) -> Option<Addr> {
    match ethertype {
        packet::ETH_P_IP => {
            let d: [u8; 4] = packet::read(ctx, ETH_HLEN + 16)?;
            Some(Addr::from_v4_octets(d))
        }
        packet::ETH_P_IPV6 => {
            let d: [u8; 16] = packet::read(ctx, ETH_HLEN + 24)?;
            Some(Addr { bytes: d })
        }
        _ => None,
    }
}

/// A single (non-GSO) packet larger than the tunnel carries. GSO packets are
/// segmented to the container's MTU before they leave, so they always fit.
#[inline(always)]
pub(crate) fn too_big(ctx: &TcContext, cfg: &Config, p: &Packet) -> bool {
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    gso_size == 0 && p.ip_len > cfg.tunnel_mtu as u32
}

/// Answers a packet larger than `mtu` (the tunnel's, or what the route to
/// the peer leaves of it) with ICMP fragmentation-needed / packet-too-big.
#[inline(always)]
pub(crate) fn send_too_big(ctx: &TcContext, p: &Packet, mtu: u16) -> Verdict {
    // IPv4 without DF may legally be fragmented, but not by us: drop it.
    if !p.dont_fragment {
        return Verdict::Drop(Counter::DropTooBig);
    }
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if pmtu::to_icmp_too_big(ctx, p, mtu).is_err() {
        return Verdict::Drop(Counter::DropTooBig);
    }
    // Back out of the veth we are attached to, i.e. to the sender.
    let action = unsafe { bpf_redirect(ifindex, 0) };
    Verdict::Redirect(Counter::PmtuSent, action as i32)
}

/// The receiver side of docs/contract.md §2.5 (steps 5-6), for the fast and the slow
/// path alike: every check on the sending node belongs here, before the
/// outer headers go.
#[inline(never)]
fn from_tunnel(ctx: &TcContext, cfg: &Config, outer: tunnel::Outer) -> Result<Verdict, Counter> {
    let inner = outer.inner;
    let mut src_slot = MaybeUninit::uninit();
    let inner_src = packet::init_addr(&mut src_slot);
    match peers::check(ctx, cfg, outer, inner_src) {
        peers::ACCEPT => {}
        peers::HOLD => return Ok(hold(ctx, cfg, MissReason::Peer, inner_src)),
        peers::FORGED => return Err(Counter::DropForgedSource),
        peers::BAD_INNER_SOURCE => return Err(Counter::DropBadInnerSource),
        peers::NOT_LOCAL => return Err(Counter::DropNotLocal),
        _ => return Err(Counter::DropMalformed),
    }
    tunnel::decapsulate(ctx, outer).map_err(|_| Counter::DropMalformed)?;
    let mut slot = MaybeUninit::uninit();
    let p = Packet::init(&mut slot);
    match packet::parse(ctx, ETH_HLEN, inner, p) {
        Ok(()) => {}
        // Fragments and other protocols between instances still go through.
        Err(ParseError::Fragment) | Err(ParseError::Unsupported) => {
            packet::parse_addresses(ctx, ETH_HLEN, inner, p).map_err(|_| Counter::DropMalformed)?;
        }
        Err(e) => return Ok(parse_error(e)),
    }
    let Some(dest) = (unsafe { INSTANCES.get(p.dst) }) else {
        return Err(Counter::DropNotLocal);
    };
    let dest = *dest;
    if dest.flags & INSTANCE_LOCAL == 0 {
        return Err(Counter::DropNotLocal);
    }
    deliver(ctx, p, &dest, Counter::Decapsulated)
}

/// Hands a translated packet to a container on this node, restoring the
/// dialled service address as source when this node started the flow.
#[inline(always)]
fn deliver(
    ctx: &TcContext,
    p: &mut Packet,
    dest: &Instance,
    counter: Counter,
) -> Result<Verdict, Counter> {
    let mut counter = counter;
    if p.csum_off != 0 {
        if let Some(service) = flows::reverse_service(&p.key()) {
            let dst = p.dst;
            packet::rewrite(ctx, p, &service, &dst, false).map_err(|_| Counter::DropMalformed)?;
            counter = Counter::ReverseTranslated;
        }
    }
    ctx.store(0, &dest.mac, 0)
        .map_err(|_| Counter::DropMalformed)?;
    // Straight into the container's namespace: no second pass through the
    // bridge and the host stack.
    let action = unsafe { bpf_redirect_peer(dest.ifindex, 0) };
    Ok(Verdict::Redirect(counter, action as i32))
}

/// Reports a miss and keeps the frame (in the event) for userspace to
/// reinject once the address is resolved; at most `miss_hold` frames per
/// address while a resolution is pending. The pending count goes up only
/// once the event is sure to reach NetManager, which clears it: a full
/// ring never leaves a count behind.
#[inline(never)]
fn hold(ctx: &TcContext, cfg: &Config, reason: MissReason, addr: &Addr) -> Verdict {
    let pending = PENDING.get_ptr_mut(addr);
    if let Some(n) = pending {
        if unsafe { *n } >= cfg.miss_hold {
            return Verdict::Drop(Counter::DropMissOverflow);
        }
    }
    let held = if reason == MissReason::Peer {
        // Anyone on the underlay can send these: they may fill half the
        // ring, so containers' misses always find room.
        if ring_used() > DEFAULT_MISS_RING_BYTES as u64 / 2 {
            return Verdict::Drop(Counter::DropMissOverflow);
        }
        Counter::PeerHeld
    } else {
        Counter::MissHeld
    };
    let Some(mut entry) = MISSES.reserve(0) else {
        return Verdict::Drop(Counter::DropMissOverflow);
    };
    match pending {
        // Two CPUs may both pass the check above: one frame too many, at worst.
        Some(n) => unsafe { *n += 1 },
        None => {
            if PENDING.insert(addr, &1, 0).is_err() {
                entry.discard(0);
                return Verdict::Drop(Counter::DropMissOverflow);
            }
        }
    }
    let ev = entry.as_mut_ptr();
    let len = ctx.len();
    unsafe {
        (*ev).reason = reason as u32;
        (*ev).ifindex = (*ctx.skb.skb).ifindex;
        (*ev).addr = *addr;
        (*ev)._pad = 0;
        (*ev).frame_len = 0;
        if len > 0 && (len as usize) <= MISS_FRAME_MAX {
            // (len - 1) & mask + 1 proves 1..=MISS_FRAME_MAX to the verifier.
            let n = ((len - 1) & (MISS_FRAME_MAX as u32 - 1)) + 1;
            let dst = (*ev).frame.as_mut_ptr() as *mut core::ffi::c_void;
            if bpf_skb_load_bytes(ctx.skb.skb as *const _, 0, dst, n) == 0 {
                (*ev).frame_len = n;
            }
        }
    }
    entry.submit(0);
    Verdict::Stolen(held)
}

/// Bytes in the miss ring NetManager has not read yet.
#[inline(always)]
fn ring_used() -> u64 {
    // SAFETY: the map definition's address is what the helper takes (the
    // loader relocates it to the map).
    unsafe {
        bpf_ringbuf_query(
            &MISSES as *const _ as *mut core::ffi::c_void,
            BPF_RB_AVAIL_DATA as u64,
        )
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
