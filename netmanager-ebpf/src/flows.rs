//! Backend choice and the flow cache (contract 2.5 step 2).

use aya_ebpf::helpers::bpf_ktime_get_ns;
use netmanager_common::{
    Addr, BackendKey, FLOW_IDLE_NS, Flow, FlowKey, MAX_BACKENDS, ReverseFlow, ServiceKind,
};

use crate::maps::{BACKENDS, FLOWS, INSTANCES, REVERSE_FLOWS, SERVICES};
use crate::packet::reverse_key;

/// Refresh a flow's last-seen stamp at most this often: writing it on every
/// packet would bounce the cache line between CPUs for nothing.
const TOUCH_EVERY_NS: u64 = 1_000_000_000;

/// Outcome of [`choose`], as a scalar so it can cross a BPF-to-BPF call.
pub const CHOSEN: u32 = 0;
pub const UNKNOWN_SERVICE: u32 = 1;
pub const NO_BACKEND: u32 = 2;
pub const TABLE_FULL: u32 = 3;

/// The cached backend of the flow `key`, written to `out`, while the flow is
/// fresh and its backend still exists (stickiness, contract 2.5 step 2).
#[inline(never)]
pub fn cached_backend(key: &FlowKey, out: &mut Addr) -> bool {
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(flow) = FLOWS.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: a valid map value pointer; a concurrent update only races
    // on the timestamp.
    let flow = unsafe { &mut *flow };
    if now.saturating_sub(flow.last_seen_ns) >= FLOW_IDLE_NS {
        return false;
    }
    let Some(inst) = (unsafe { INSTANCES.get(flow.backend) }) else {
        return false;
    };
    if now - flow.last_seen_ns > TOUCH_EVERY_NS {
        flow.last_seen_ns = now;
        touch_reverse(key, &inst.instance_ip, now);
    }
    *out = flow.backend;
    true
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
/// to `out`.
#[inline(never)]
pub fn choose(key: &FlowKey, src_instance: &Addr, out: &mut Addr) -> u32 {
    let now = unsafe { bpf_ktime_get_ns() };
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
    if FLOWS.insert(key, &flow, 0).is_err() {
        return TABLE_FULL;
    }
    let reverse = ReverseFlow {
        service: key.dst,
        last_seen_ns: now,
    };
    if REVERSE_FLOWS
        .insert(&reverse_key(key, inst.instance_ip), &reverse, 0)
        .is_err()
    {
        return TABLE_FULL;
    }
    *out = backend;
    CHOSEN
}

/// The service address to restore as the source of a packet arriving with
/// key `key`, when this node started the flow it answers.
#[inline(always)]
pub fn reverse_service(key: &FlowKey) -> Option<Addr> {
    let r = unsafe { REVERSE_FLOWS.get(key) }?;
    let now = unsafe { bpf_ktime_get_ns() };
    if now.saturating_sub(r.last_seen_ns) >= FLOW_IDLE_NS {
        return None;
    }
    Some(r.service)
}
