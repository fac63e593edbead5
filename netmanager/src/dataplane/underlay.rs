//! The node's place on the underlay as the programs need it: the address it
//! advertises, the addresses it really has, and from these the outer source
//! address of what it tunnels (docs/dataplane.md, "Nodes behind NAT").
//!
//! Upstream's NetManager listens on every address and sends through the
//! kernel's routing; `NodePublicAddress` is only what it advertises. So do
//! we: a datagram to any of the node's addresses is ours, and the source is
//! the advertised address only when the node owns it -- behind NAT it is
//! whatever the route to the peer gives, which the router then rewrites to
//! the advertised one.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// What the dataplane knows of the node's addresses.
#[derive(Debug, Clone)]
pub struct UnderlayState {
    /// The address the cluster knows this node by.
    pub advertised: IpAddr,
    /// Every address a peer may send tunnel datagrams to, with the
    /// interface that carries it.
    pub addresses: BTreeMap<IpAddr, u32>,
    /// The uplink's ifindex (0: none): its addresses are the preferred
    /// fallback source.
    pub uplink_ifindex: u32,
    /// (reinjection device, its far end) when GSO packets can be cut into
    /// segments through it.
    pub segment: Option<(u32, u32)>,
}

/// The outer source address for one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source<A> {
    /// The fixed source, or the fallback when `from_fib`; None: the node
    /// has no address of this family.
    pub address: Option<A>,
    /// Ask the FIB per peer (the node does not own what it advertises).
    pub from_fib: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sources {
    pub v4: Source<Ipv4Addr>,
    pub v6: Source<Ipv6Addr>,
}

impl UnderlayState {
    pub fn new(advertised: IpAddr, uplink_ifindex: u32) -> UnderlayState {
        UnderlayState {
            advertised,
            addresses: BTreeMap::new(),
            uplink_ifindex,
            segment: None,
        }
    }

    /// Whether the node owns the address it advertises.
    pub fn owns_advertised(&self) -> bool {
        self.addresses.contains_key(&self.advertised)
    }

    pub fn sources(&self) -> Sources {
        Sources {
            v4: self.source(|a| match a {
                IpAddr::V4(v) => Some(v),
                IpAddr::V6(_) => None,
            }),
            v6: self.source(|a| match a {
                IpAddr::V6(v) => Some(v),
                IpAddr::V4(_) => None,
            }),
        }
    }

    fn source<A>(&self, family: impl Fn(IpAddr) -> Option<A>) -> Source<A> {
        if let Some(a) = family(self.advertised)
            && self.owns_advertised()
        {
            // Peers know us by this address: send from it.
            return Source {
                address: Some(a),
                from_fib: false,
            };
        }
        // Behind NAT, or the other family: the route's source per peer;
        // should the kernel not tell (before Linux 6.7), an address of the
        // uplink, else any of the node's.
        let on_uplink = self
            .addresses
            .iter()
            .filter(|(_, i)| **i == self.uplink_ifindex)
            .find_map(|(a, _)| family(*a));
        let anywhere = || self.addresses.keys().find_map(|a| family(*a));
        Source {
            address: on_uplink.or_else(anywhere),
            from_fib: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn state(advertised: &str, addrs: &[(&str, u32)]) -> UnderlayState {
        let mut s = UnderlayState::new(ip(advertised), 2);
        s.addresses = addrs.iter().map(|(a, i)| (ip(a), *i)).collect();
        s
    }

    #[test]
    fn an_owned_advertised_address_is_the_source() {
        let s = state(
            "198.51.100.1",
            &[
                ("198.51.100.1", 2),
                ("198.51.100.129", 3),
                ("2001:db8::1", 2),
            ],
        );
        let src = s.sources();
        assert_eq!(
            src.v4,
            Source {
                address: Some("198.51.100.1".parse().unwrap()),
                from_fib: false
            }
        );
        // The other family asks the FIB, with the uplink's address to fall back on.
        assert_eq!(
            src.v6,
            Source {
                address: Some("2001:db8::1".parse().unwrap()),
                from_fib: true
            }
        );
    }

    #[test]
    fn behind_nat_the_route_gives_the_source() {
        // Advertised: the router's public address, which the node lacks.
        let s = state(
            "198.51.100.3",
            &[("198.51.100.130", 2), ("198.51.100.200", 5)],
        );
        assert!(!s.owns_advertised());
        assert_eq!(
            s.sources().v4,
            Source {
                address: Some("198.51.100.130".parse().unwrap()),
                from_fib: true
            }
        );
    }

    #[test]
    fn an_ipv6_only_node_has_no_ipv4_source() {
        let s = state("2001:db8::2", &[("2001:db8::2", 2)]);
        let src = s.sources();
        assert_eq!(src.v4.address, None);
        assert_eq!(
            src.v6,
            Source {
                address: Some("2001:db8::2".parse().unwrap()),
                from_fib: false
            }
        );
    }

    #[test]
    fn with_the_uplink_bare_any_address_falls_back() {
        let s = state("198.51.100.3", &[("198.51.100.200", 5)]);
        assert_eq!(
            s.sources().v4.address,
            Some("198.51.100.200".parse().unwrap())
        );
    }
}
