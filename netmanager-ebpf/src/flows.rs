//! Backend choice and the flow cache (docs/contract.md §2.5 step 2).
//!
//! The flow maps are plain hashes: an entry stays until NetManager expires
//! it (idle 60 s), so one container's churn can never evict another's
//! established flows. Instead, each container may hold at most
//! `flows_per_container` of them (`FLOW_COUNTS`).

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_ktime_get_coarse_ns,
};
use netmanager_common::{
    Addr, BackendKey, FLOW_IDLE_NS, FLOWS_CLOSED, FLOWS_OPENED, Flow, FlowCountKey, FlowKey,
    MAX_BACKENDS, ReverseFlow, ServiceKind,
};

use crate::maps::{BACKENDS, FLOW_COUNTS, FLOWS, INSTANCES, REVERSE_FLOWS, SERVICES};
use crate::packet::reverse_key;

/// Refresh a flow's last-seen stamp at most this often: writing it on every
/// packet would bounce the cache line between CPUs for nothing.
const TOUCH_EVERY_NS: u64 = 1_000_000_000;

/// The flows' clock: CLOCK_MONOTONIC at the kernel tick's resolution,
/// which is all a 60 s idle timeout and a 1 s touch interval need, for a
/// fraction of `bpf_ktime_get_ns`'s cost (no clock source read). NetManager
/// compares the stamps with CLOCK_MONOTONIC, the same clock.
#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: a plain helper call.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Outcome of [`cached_backend`], as a scalar so it can cross a BPF-to-BPF call.
/// A fresh flow (whether its backend still exists is the caller's question).
pub const HIT: u32 = 0;
/// No entry: a new flow.
pub const ABSENT: u32 = 1;
/// An entry idle for too long (or, says the caller, whose backend is gone):
/// chosen anew in place.
pub const STALE: u32 = 2;

/// Outcome of [`choose`].
/// A new entry was written (it counts against the sender's quota).
pub const CREATED: u32 = 0;
/// An existing entry was overwritten.
pub const REPLACED: u32 = 1;
pub const UNKNOWN_SERVICE: u32 = 2;
pub const NO_BACKEND: u32 = 3;
pub const TABLE_FULL: u32 = 4;

/// The cached backend of the flow `key`, written to `out` on a [`HIT`], while
/// the flow is fresh (stickiness, docs/contract.md §2.5 step 2). Whether the
/// backend still exists is the caller's question: it looks the backend up
/// anyway, and treats a vanished one as [`STALE`].
#[inline(never)]
pub fn cached_backend(key: &FlowKey, out: &mut Addr) -> u32 {
    let now = now_ns();
    let Some(flow) = FLOWS.get_ptr_mut(key) else {
        return ABSENT;
    };
    // SAFETY: a valid map value pointer; a concurrent update only races
    // on the timestamp.
    let flow = unsafe { &mut *flow };
    if now.saturating_sub(flow.last_seen_ns) >= FLOW_IDLE_NS {
        return STALE;
    }
    if now.saturating_sub(flow.last_seen_ns) > TOUCH_EVERY_NS {
        // Once a second: the reverse entry's key needs the backend's
        // instance address (a vanished backend is the caller's STALE).
        if let Some(inst) = unsafe { INSTANCES.get(flow.backend) } {
            flow.last_seen_ns = now;
            touch_reverse(key, &inst.instance_ip, now);
        }
    }
    *out = flow.backend;
    HIT
}

#[inline(always)]
fn touch_reverse(key: &FlowKey, backend_instance: &Addr, now: u64) {
    let rkey = reverse_key(key, *backend_instance);
    if let Some(r) = REVERSE_FLOWS.get_ptr_mut(&rkey) {
        unsafe { (*r).last_seen_ns = now };
    }
}

/// Picks a backend for a new flow per the service's kind, remembers the
/// choice in both directions, and writes the backend's namespace address
/// to `out`. `new`: no entry existed (see [`cached_backend`]).
#[inline(never)]
pub fn choose(key: &FlowKey, src_instance: &Addr, out: &mut Addr, new: bool) -> u32 {
    let now = now_ns();
    let Some(svc) = SERVICES.get_ptr_mut(&key.dst) else {
        return UNKNOWN_SERVICE;
    };
    // SAFETY: valid map value; the cursor race is documented on `Service`.
    let svc = unsafe { &mut *svc };
    let count = svc.count.min(MAX_BACKENDS) as u32;
    if count == 0 {
        return NO_BACKEND;
    }
    let index = match ServiceKind::from_u8(svc.kind) {
        Some(ServiceKind::RoundRobin) => {
            let i = svc.rr_cursor % count;
            svc.rr_cursor = svc.rr_cursor.wrapping_add(1);
            i
        }
        // Userspace orders Closest backends nearest first; Instance has one.
        Some(ServiceKind::Closest) | Some(ServiceKind::Instance) => 0,
        None => return NO_BACKEND,
    };
    let bkey = BackendKey {
        service: key.dst,
        generation: svc.generation,
        index,
    };
    let Some(backend) = (unsafe { BACKENDS.get(&bkey) }) else {
        return NO_BACKEND;
    };
    let backend = *backend;
    let Some(inst) = (unsafe { INSTANCES.get(backend) }) else {
        return NO_BACKEND;
    };
    let flow = Flow {
        backend,
        src_instance: *src_instance,
        last_seen_ns: now,
    };
    // Only a new key may create an entry; when another CPU created it
    // meanwhile, overwriting it creates nothing.
    let mut outcome = REPLACED;
    if new && FLOWS.insert(key, &flow, BPF_NOEXIST as u64).is_ok() {
        outcome = CREATED;
    } else if FLOWS.insert(key, &flow, BPF_ANY as u64).is_err() {
        return TABLE_FULL;
    }
    let reverse = ReverseFlow {
        service: key.dst,
        last_seen_ns: now,
    };
    if REVERSE_FLOWS
        .insert(
            &reverse_key(key, inst.instance_ip),
            &reverse,
            BPF_ANY as u64,
        )
        .is_err()
    {
        // No half flows: a forward entry without its reverse would leave
        // replies unrestored.
        let _ = FLOWS.remove(key);
        return TABLE_FULL;
    }
    *out = backend;
    outcome
}

/// Whether the container behind `ifindex` may open another flow.
#[inline(never)]
pub fn quota_allows(ifindex: u32, limit: u32) -> bool {
    let count = |kind| {
        // SAFETY: a plain lookup; the value is only read.
        unsafe { FLOW_COUNTS.get(FlowCountKey { ifindex, kind }) }
            .copied()
            .unwrap_or(0)
    };
    count(FLOWS_OPENED).saturating_sub(count(FLOWS_CLOSED)) < limit as u64
}

/// Counts a flow opened by the container behind `ifindex`.
#[inline(never)]
pub fn count_opened(ifindex: u32) {
    let key = FlowCountKey {
        ifindex,
        kind: FLOWS_OPENED,
    };
    if add_one(&key) {
        return;
    }
    // Its first flow. Another CPU may create the entry at the same time:
    // then add to that one.
    if FLOW_COUNTS.insert(&key, &1, BPF_NOEXIST as u64).is_err() {
        add_one(&key);
    }
}

#[inline(always)]
fn add_one(key: &FlowCountKey) -> bool {
    let Some(v) = FLOW_COUNTS.get_ptr_mut(key) else {
        return false;
    };
    // The programs on every CPU add to it, so the add is atomic. core has
    // no atomic read-modify-write for BPF; this is the instruction it
    // would emit (BPF_ATOMIC | BPF_ADD, which the verifier allows on map
    // values).
    // SAFETY: `v` is a valid, 8-byte aligned map value.
    unsafe {
        core::arch::asm!(
            "lock *(u64 *)({v} + 0) += {one}",
            v = in(reg) v,
            one = in(reg) 1u64,
            options(nostack),
        );
    }
    true
}

/// The service address to restore as the source of a packet arriving with
/// key `key`, when this node started the flow it answers.
#[inline(always)]
pub fn reverse_service(key: &FlowKey) -> Option<Addr> {
    let r = unsafe { REVERSE_FLOWS.get(key) }?;
    let now = now_ns();
    if now.saturating_sub(r.last_seen_ns) >= FLOW_IDLE_NS {
        return None;
    }
    Some(r.service)
}
