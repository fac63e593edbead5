//! Conversions between std addresses and the maps' 16-byte form.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netmanager_common::Addr;

pub fn to_addr(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => Addr::from_v4_octets(v4.octets()),
        IpAddr::V6(v6) => Addr { bytes: v6.octets() },
    }
}

pub fn from_addr(a: &Addr) -> IpAddr {
    match a.v4_octets() {
        Some(o) => IpAddr::V4(Ipv4Addr::from(o)),
        None => IpAddr::V6(Ipv6Addr::from(a.bytes)),
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_coarse_ns` reads
/// (at the tick's resolution) for the flows' last-seen stamps.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_both_families() {
        for ip in ["10.30.0.3", "fdff::3", "::1"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(from_addr(&to_addr(ip)), ip);
        }
    }
}
