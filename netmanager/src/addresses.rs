//! The node subnet the cluster hands out (docs/contract.md §2.3 `subnetwork/result`)
//! and the allocation of container addresses from it.
//!
//! The subnet is an IPv4 /26 and an IPv6 /120. The gateway (bridge) takes the
//! first address after the one the cluster sent, containers the following ones.
//! v4 and v6 addresses are allocated as a pair with the same offset, so a
//! container's two addresses can always be derived from each other and a
//! restarted daemon can re-reserve both from either.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use std::net::IpAddr;

/// Where namespace (container) addresses come from: the cluster hands each
/// node a /26 inside 10.16.0.0/12 and a /120 of ULA space
/// (docs/contract.md §2.4). Anything else in a cluster message is refused.
pub const NAMESPACE_V4: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 16, 0, 0), 12);
pub const NAMESPACE_V6: (Ipv6Addr, u8) = (Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7);

/// Service address ranges: 10.30.0.0/16, the contract's IPv6 proxy subnet
/// fcef::/21, and fdff::/16, which upstream clusters actually hand out.
pub const SERVICE_RANGES: [(IpAddr, u8); 3] = [
    (IpAddr::V4(Ipv4Addr::new(10, 30, 0, 0)), 16),
    (IpAddr::V6(Ipv6Addr::new(0xfcef, 0, 0, 0, 0, 0, 0, 0)), 21),
    (IpAddr::V6(Ipv6Addr::new(0xfdff, 0, 0, 0, 0, 0, 0, 0)), 16),
];

/// Whether `ip` lies in `net/len` (same family only).
pub fn in_prefix(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(len.min(32)))
                .unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(len.min(128)))
                .unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

pub fn is_service_address(ip: IpAddr) -> bool {
    SERVICE_RANGES.iter().any(|&(n, l)| in_prefix(ip, n, l))
}

/// The service ranges in force: [`SERVICE_RANGES`] unless upstream's
/// tuncfg.json overrides one (`config::TunConfig`). The programs treat
/// exactly these destinations as services, and cluster messages may name
/// only these as service addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRanges(Vec<(IpAddr, u8)>);

impl Default for ServiceRanges {
    fn default() -> Self {
        ServiceRanges(SERVICE_RANGES.to_vec())
    }
}

impl ServiceRanges {
    /// Ranges as given, without duplicates.
    pub fn new(ranges: impl IntoIterator<Item = (IpAddr, u8)>) -> ServiceRanges {
        let mut v: Vec<(IpAddr, u8)> = Vec::new();
        for r in ranges {
            if !v.contains(&r) {
                v.push(r);
            }
        }
        ServiceRanges(v)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|&(n, l)| in_prefix(ip, n, l))
    }

    pub fn as_slice(&self) -> &[(IpAddr, u8)] {
        &self.0
    }

    /// A range that contains addresses of `subnet` (the node's containers):
    /// their traffic would be taken for service traffic.
    pub fn collision(&self, subnet: &Subnet) -> Option<(IpAddr, u8)> {
        let v4 = (IpAddr::V4(subnet.v4_network()), V4_PREFIX);
        let v6 = (IpAddr::V6(subnet.v6_network()), V6_PREFIX);
        // Two prefixes overlap when one holds the other's first address.
        self.0.iter().copied().find(|&(n, l)| {
            [v4, v6]
                .iter()
                .any(|&(s, sl)| in_prefix(s, n, l) || in_prefix(n, s, sl))
        })
    }
}

pub fn is_namespace_address(ip: IpAddr) -> bool {
    in_prefix(ip, IpAddr::V4(NAMESPACE_V4.0), NAMESPACE_V4.1)
        || in_prefix(ip, IpAddr::V6(NAMESPACE_V6.0), NAMESPACE_V6.1)
}

/// A plausible underlay address of a node: a unicast address that is not
/// loopback, unspecified, link-local, broadcast or multicast, and not an
/// overlay address (a "node" inside the overlay would tunnel into the overlay
/// itself; a forged table could otherwise aim a service at a container). IPv6
/// is our extension: only our own workers can use an IPv6 underlay. For IPv6
/// only the service ranges are excluded, since private IPv6 underlays commonly
/// use ULA space, which is also where namespace addresses come from.
pub fn is_node_address(ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    if is_service_address(ip) || (ip.is_ipv4() && is_namespace_address(ip)) {
        return false;
    }
    match ip {
        IpAddr::V4(ip) => {
            !(ip.is_loopback()
                || ip.is_unspecified()
                || ip.is_link_local()
                || ip.is_broadcast()
                || ip.is_multicast())
        }
        IpAddr::V6(ip) => {
            !(ip.is_loopback()
                || ip.is_unspecified()
                || ip.is_unicast_link_local()
                || ip.is_multicast())
        }
    }
}

pub const V4_PREFIX: u8 = 26;
pub const V6_PREFIX: u8 = 120;
/// Addresses in a /26.
const V4_SPAN: u32 = 1 << (32 - V4_PREFIX as u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subnet {
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

/// A container's pair of namespace addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressPair {
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

impl Subnet {
    /// The cluster's answer, e.g. `{"address": "10.18.0.64", "addressv6": "fc00::40"}`;
    /// both must lie in the namespace ranges.
    pub fn parse(v4: &str, v6: &str) -> Result<Subnet> {
        let Ok(v4) = v4.trim().parse::<Ipv4Addr>() else {
            bail!("subnet address {v4:?} is not an IPv4 address");
        };
        let Ok(v6) = v6.trim().parse::<Ipv6Addr>() else {
            bail!("subnet addressv6 {v6:?} is not an IPv6 address");
        };
        if !is_namespace_address(IpAddr::V4(v4)) || !is_namespace_address(IpAddr::V6(v6)) {
            bail!("subnet {v4} / {v6} lies outside the namespace ranges 10.16.0.0/12 and fc00::/7");
        }
        Ok(Subnet { v4, v6 })
    }

    /// Address at `offset` from the start of the subnet.
    pub fn at(&self, offset: u32) -> AddressPair {
        AddressPair {
            v4: Ipv4Addr::from(u32::from(self.v4).wrapping_add(offset)),
            v6: Ipv6Addr::from(u128::from(self.v6).wrapping_add(offset as u128)),
        }
    }

    pub fn gateway(&self) -> AddressPair {
        self.at(1)
    }

    /// Network address of the /26 the gateway lies in (for nft rules).
    pub fn v4_network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.v4) & !(V4_SPAN - 1))
    }

    pub fn v6_network(&self) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.v6) & !0xffu128)
    }

    /// Offset of a v4 address inside this subnet, when it is a container address.
    pub fn offset_of(&self, v4: Ipv4Addr) -> Option<u32> {
        let off = u32::from(v4).checked_sub(u32::from(self.v4))?;
        (FIRST_CONTAINER..self.end()).contains(&off).then_some(off)
    }

    /// One past the last usable offset: stay inside the /26 the start lies in
    /// and never hand out its broadcast address.
    fn end(&self) -> u32 {
        let start_in_block = u32::from(self.v4) & (V4_SPAN - 1);
        V4_SPAN - 1 - start_in_block
    }
}

const FIRST_CONTAINER: u32 = 2;

/// Free list of container offsets; lowest free first, so addresses are
/// predictable in tests and after a restart.
#[derive(Debug, Clone)]
pub struct AddressPool {
    subnet: Subnet,
    free: BTreeSet<u32>,
}

impl AddressPool {
    pub fn new(subnet: Subnet) -> AddressPool {
        let free = (FIRST_CONTAINER..subnet.end()).collect();
        AddressPool { subnet, free }
    }

    pub fn subnet(&self) -> Subnet {
        self.subnet
    }

    pub fn allocate(&mut self) -> Result<AddressPair> {
        let Some(off) = self.free.pop_first() else {
            bail!("node subnet {}/{V4_PREFIX} is exhausted", self.subnet.v4);
        };
        Ok(self.subnet.at(off))
    }

    /// Mark an address used (state restored after a restart).
    pub fn reserve(&mut self, v4: Ipv4Addr) -> Result<AddressPair> {
        let Some(off) = self.subnet.offset_of(v4) else {
            bail!(
                "{v4} is not a container address of subnet {}",
                self.subnet.v4
            );
        };
        if !self.free.remove(&off) {
            bail!("{v4} is already in use");
        }
        Ok(self.subnet.at(off))
    }

    pub fn release(&mut self, v4: Ipv4Addr) {
        if let Some(off) = self.subnet.offset_of(v4) {
            self.free.insert(off);
        }
    }

    pub fn free_count(&self) -> usize {
        self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet() -> Subnet {
        Subnet::parse("10.18.0.64", "fc00::40").unwrap()
    }

    #[test]
    fn ranges() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(is_service_address(ip("10.30.255.1")));
        assert!(is_service_address(ip("fdff::3")));
        assert!(is_service_address(ip("fcef:7ff::1")));
        assert!(!is_service_address(ip("fcef:800::1")));
        assert!(!is_service_address(ip("10.31.0.1")));
        let subnet = Subnet::parse("10.18.0.64", "fc00::40").unwrap();
        assert_eq!(ServiceRanges::default().collision(&subnet), None);
        let wide = ServiceRanges::new([(ip("fc00::"), 7)]);
        assert_eq!(wide.collision(&subnet), Some((ip("fc00::"), 7)));
        let narrow = ServiceRanges::new([(ip("10.18.0.96"), 28)]);
        assert!(narrow.collision(&subnet).is_some());
        let beside = ServiceRanges::new([(ip("10.18.0.128"), 26)]);
        assert_eq!(beside.collision(&subnet), None);
        assert!(is_namespace_address(ip("10.18.0.66")));
        assert!(is_namespace_address(ip("10.31.255.1")));
        assert!(!is_namespace_address(ip("10.32.0.1")));
        assert!(!is_namespace_address(ip("192.168.1.1")));
        assert!(is_namespace_address(ip("fc00::42")));
        assert!(!is_namespace_address(ip("2001:db8::1")));
        assert!(is_node_address(ip("198.51.100.2")));
        assert!(!is_node_address(ip("127.0.0.1")));
        assert!(!is_node_address(ip("224.0.0.1")));
        assert!(is_node_address(ip("2001:db8::2")));
        assert!(!is_node_address(ip("fe80::1")));
        assert!(!is_node_address(ip("::1")));
        assert!(!is_node_address(ip("::ffff:127.0.0.1")));
        // Overlay addresses are never node addresses; ULA underlays are.
        assert!(!is_node_address(ip("10.18.0.5")));
        assert!(!is_node_address(ip("10.30.0.5")));
        assert!(!is_node_address(ip("::ffff:10.30.0.5")));
        assert!(!is_node_address(ip("fdff::5")));
        assert!(is_node_address(ip("fd12:3456::2")));
        assert!(Subnet::parse("192.168.0.0", "fc00::").is_err());
        assert!(Subnet::parse("10.18.0.64", "2001:db8::").is_err());
    }

    #[test]
    fn gateway_and_first_container() {
        let s = subnet();
        assert_eq!(s.gateway().v4, Ipv4Addr::new(10, 18, 0, 65));
        let mut p = AddressPool::new(s);
        let a = p.allocate().unwrap();
        assert_eq!(a.v4, Ipv4Addr::new(10, 18, 0, 66));
        assert_eq!(a.v6, "fc00::42".parse::<Ipv6Addr>().unwrap());
    }

    #[test]
    fn exhaustion_release_and_reserve() {
        let mut p = AddressPool::new(subnet());
        // .66 ... .126: 61 container addresses, broadcast .127 excluded
        let n = p.free_count();
        assert_eq!(n, 61);
        let all: Vec<_> = (0..n).map(|_| p.allocate().unwrap()).collect();
        assert_eq!(all.last().unwrap().v4, Ipv4Addr::new(10, 18, 0, 126));
        assert!(p.allocate().is_err());
        p.release(all[3].v4);
        assert_eq!(p.allocate().unwrap(), all[3]);
        p.release(all[5].v4);
        assert!(p.reserve(all[5].v4).is_ok());
        assert!(p.reserve(all[5].v4).is_err());
        assert!(p.reserve(Ipv4Addr::new(10, 18, 0, 65)).is_err());
    }
}
