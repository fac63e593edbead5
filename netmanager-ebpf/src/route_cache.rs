//! The shape of a ROUTE_CACHE slot and of its key (`route` fills and
//! reads them; `maps` declares the cache): apart from both, so neither
//! imports the other.

use netmanager_common::{Addr, DEFAULT_ROUTE_CACHE};

/// What the FIB's answer depends on: the peer, its port and the interface
/// the packet came in on (policy rules may match it).
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct RouteKey {
    pub peer: Addr,
    pub port: u16,
    pub _pad: u16,
    pub ifindex: u32,
}

impl RouteKey {
    #[inline(always)]
    pub fn words(&self) -> [u64; 3] {
        // SAFETY: 24 bytes, 8-byte aligned, no uninitialised padding (the
        // pad field is written).
        unsafe { *(self as *const RouteKey as *const [u64; 3]) }
    }

    /// Whether `other` is the same key. Word by word: comparing the arrays
    /// (`words() == words()`) compiles to a call of the byte-at-a-time
    /// `memcmp` subprogram on BPF, 4 % of the send path under perf.
    #[inline(always)]
    pub fn same(&self, other: &RouteKey) -> bool {
        let (a, b) = (self.words(), other.words());
        (a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) == 0
    }

    /// Its ROUTE_CACHE slot.
    #[inline(always)]
    pub fn slot(&self) -> u32 {
        let w = self.words();
        let mut h = w[0] ^ w[1].rotate_left(17) ^ w[2].rotate_left(31);
        h ^= h >> 32;
        h ^= h >> 16;
        (h as u32) & (DEFAULT_ROUTE_CACHE - 1)
    }
}

/// A ROUTE_CACHE slot: the key it holds and the FIB's answer for it, a
/// `route::Route` of kind RESOLVED, NO_NEIGH or FALLBACK, with the route's MTU
/// (`u16::MAX`: none to check).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CachedRoute {
    pub key: RouteKey,
    pub kind: u32,
    pub ifindex: u32,
    pub src: Addr,
    pub macs: [u8; 12],
    pub mtu: u16,
    pub _pad: u16,
    /// `ROUTE_EPOCH` when it was made.
    pub epoch: u32,
    /// `bpf_ktime_get_coarse_ns` when it was made (0: never; a fresh slot
    /// is zero).
    pub made_ns: u64,
}

const _: () = assert!(DEFAULT_ROUTE_CACHE.is_power_of_two());
