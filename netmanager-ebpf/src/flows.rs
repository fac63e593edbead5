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
    Instance, MAX_BACKENDS, ReverseFlow, ServiceKind,
};

use crate::maps::{
    BACKENDS, FLOW_COUNTS, FLOWS, INSTANCE_EPOCH, INSTANCES, REVERSE_FLOWS, SCRATCH, SERVICES,
};
use crate::packet::{Packet, copy, reverse_key};

/// Refresh a flow's last-seen stamp at most this often: writing it on every
/// packet would bounce the cache line between CPUs for nothing.
const TOUCH_EVERY_NS: u64 = 1_000_000_000;

/// The flows' clock: CLOCK_MONOTONIC at the kernel tick's resolution,
/// which is all a 60 s idle timeout and a 1 s touch interval need, for a
/// fraction of `bpf_ktime_get_ns`'s cost (no clock source read). NetManager
/// compares the stamps with CLOCK_MONOTONIC, the same clock.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: a plain helper call.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// The current epoch of the `INSTANCES` copies in flow entries. Read
/// before any `INSTANCES` lookup of a packet: a change NetManager makes
/// after it starts a new epoch, which the next packet sees.
#[inline(always)]
pub fn instance_epoch() -> u32 {
    INSTANCE_EPOCH.get(0).copied().unwrap_or(0)
}

/// What a packet finds in FLOWS ([`state`]).
/// A fresh flow whose copies of `INSTANCES` are current: nothing else to look up.
pub const CURRENT: u32 = 0;
/// No entry: a new flow.
pub const ABSENT: u32 = 1;
/// An entry idle for too long (or, says the caller, whose backend is gone):
/// chosen anew in place.
pub const STALE: u32 = 2;
/// A fresh flow whose copies were taken in an earlier epoch: its sender and
/// backend are looked up again ([`refresh`]).
pub const RECHECK: u32 = 3;

/// The state of the fresh-or-not entry `flow` at `now` in epoch `epoch`;
/// refreshes the last-seen stamps of a [`CURRENT`] one once a second.
#[inline(always)]
pub fn state(p: &Packet, flow: &mut Flow, epoch: u32, now: u64) -> u32 {
    let idle = now.saturating_sub(flow.last_seen_ns);
    if idle >= FLOW_IDLE_NS {
        return STALE;
    }
    // Epoch 0 is never current: entries migrated from an older layout
    // carry it, with zeroed copies.
    if flow.epoch != epoch || epoch == 0 {
        return RECHECK;
    }
    if idle > TOUCH_EVERY_NS {
        touch(p, flow, now);
    }
    CURRENT
}

/// Stamps the flow of `p` and its reverse entry as used at `now`. (Its
/// key is built here: not in the caller's frame, which is on the deepest
/// call chain.)
#[inline(never)]
fn touch(p: &Packet, flow: &mut Flow, now: u64) {
    flow.last_seen_ns = now;
    touch_reverse(&p.key(), &flow.target.instance_ip, now);
}

#[inline(always)]
fn touch_reverse(key: &FlowKey, backend_instance: &Addr, now: u64) {
    let rkey = reverse_key(key, *backend_instance);
    if let Some(r) = REVERSE_FLOWS.get_ptr_mut(&rkey) {
        unsafe { (*r).last_seen_ns = now };
    }
}

/// Outcome of [`choose`], as a scalar so it can cross a BPF-to-BPF call.
/// A new entry was written (it counts against the sender's quota).
pub const CREATED: u32 = 0;
/// An existing entry was overwritten.
pub const REPLACED: u32 = 1;
pub const UNKNOWN_SERVICE: u32 = 2;
pub const NO_BACKEND: u32 = 3;
pub const TABLE_FULL: u32 = 4;

/// The entry of flow `key` with `sender`'s and `backend`'s current
/// `INSTANCES` entries, built in the per-CPU scratch buffer (a 96-byte
/// value on the stack would not fit the deepest call chain's frame).
#[inline(always)]
fn entry(
    backend_ns: &Addr,
    sender: &Instance,
    backend: &Instance,
    epoch: u32,
    now: u64,
) -> Option<&'static Flow> {
    let buf = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: per-CPU slot, used by this program invocation only; 256
    // bytes, 8-byte aligned, room for a Flow (checked below).
    let flow = unsafe { &mut *(buf as *mut Flow) };
    flow.backend = *backend_ns;
    flow.src_instance = sender.instance_ip;
    flow.last_seen_ns = now;
    flow.epoch = epoch;
    flow.sender_ifindex = sender.ifindex;
    flow.target = *backend;
    Some(flow)
}

const _: () = assert!(core::mem::size_of::<Flow>() <= 256);

/// Takes new copies of `INSTANCES` into `flow`, the [`RECHECK`] entry of
/// the flow of `p`. False when its backend is gone (the caller chooses
/// anew).
///
/// Written in place, the epoch last, rather than as a whole new value: the
/// kernel recycles a replaced element for this CPU's next update -- possibly
/// another flow's -- while a packet on another CPU may still be reading it.
/// In place, a packet of this flow on another CPU at that moment reads the
/// old copies or the new ones (or, on a weakly ordered CPU, some of each):
/// all of it what `INSTANCES` held a moment ago, for this flow.
#[inline(never)]
pub fn refresh(p: &Packet, flow: &mut Flow, sender: &Instance, epoch: u32) -> bool {
    let now = now_ns();
    // SAFETY: a plain lookup; the entry is only read.
    let Some(backend) = (unsafe { INSTANCES.get(flow.backend) }) else {
        return false;
    };
    copy(&sender.instance_ip, &mut flow.src_instance);
    flow.sender_ifindex = sender.ifindex;
    copy(backend, &mut flow.target);
    flow.last_seen_ns = now;
    // A compiler barrier (an empty asm may touch any memory): the copies
    // are stored before the epoch. (`compiler_fence` has no BPF lowering.)
    // SAFETY: no instruction.
    unsafe { core::arch::asm!("", options(nostack)) };
    // SAFETY: a field of a valid map value.
    unsafe { core::ptr::write_volatile(&mut flow.epoch, epoch) };
    touch_reverse(&p.key(), &backend.instance_ip, now);
    true
}

/// Picks a backend for a new flow per the service's kind, remembers the
/// choice in both directions (with the copies of `sender`'s and the
/// backend's `INSTANCES` entries, taken in `epoch`), and writes the
/// backend's namespace address to `out`. `new`: no entry existed.
#[inline(never)]
pub fn choose(key: &FlowKey, sender: &Instance, out: &mut Addr, new: bool, epoch: u32) -> u32 {
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
    let Some(backend_ns) = (unsafe { BACKENDS.get(&bkey) }) else {
        return NO_BACKEND;
    };
    let Some(inst) = (unsafe { INSTANCES.get(*backend_ns) }) else {
        return NO_BACKEND;
    };
    let Some(flow) = entry(backend_ns, sender, inst, epoch, now) else {
        return TABLE_FULL;
    };
    // Only a new key may create an entry; when another CPU created it
    // meanwhile, overwriting it creates nothing.
    let mut outcome = REPLACED;
    if new && FLOWS.insert(key, flow, BPF_NOEXIST as u64).is_ok() {
        outcome = CREATED;
    } else if FLOWS.insert(key, flow, BPF_ANY as u64).is_err() {
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
    *out = *backend_ns;
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
