//! Packet building and checking for the dataplane fixtures. Checksums here
//! are computed from first principles (RFC 1071), independently of the
//! programs' incremental updates, so a wrong update cannot hide.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0x0a, 0x12, 0, 0x02];
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0, 0x0a, 0x12, 0, 0x01];

pub fn sum16(data: &[u8]) -> u32 {
    let mut s = 0u32;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        s += w as u32;
    }
    s
}

pub fn finish(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

pub fn checksum(data: &[u8]) -> u16 {
    finish(sum16(data))
}

fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.push(0);
            p.push(proto);
            p.extend_from_slice(&(len as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&(len as u32).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, proto]);
        }
        _ => panic!("mixed families"),
    }
    p
}

/// An L4 segment: TCP, UDP or ICMP echo, serialised with its checksum.
#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        payload: Vec<u8>,
    },
    Udp {
        sport: u16,
        dport: u16,
        payload: Vec<u8>,
    },
    Echo {
        request: bool,
        id: u16,
        seq: u16,
        payload: Vec<u8>,
    },
    Raw {
        proto: u8,
        bytes: Vec<u8>,
    },
}

impl L4 {
    pub fn proto(&self, v6: bool) -> u8 {
        match self {
            L4::Tcp { .. } => 6,
            L4::Udp { .. } => 17,
            L4::Echo { .. } => {
                if v6 {
                    58
                } else {
                    1
                }
            }
            L4::Raw { proto, .. } => *proto,
        }
    }

    pub fn bytes(&self, src: IpAddr, dst: IpAddr) -> Vec<u8> {
        let v6 = src.is_ipv6();
        let proto = self.proto(v6);
        match self {
            L4::Tcp {
                sport,
                dport,
                flags,
                payload,
            } => {
                let mut b = Vec::new();
                b.extend_from_slice(&sport.to_be_bytes());
                b.extend_from_slice(&dport.to_be_bytes());
                b.extend_from_slice(&1000u32.to_be_bytes());
                b.extend_from_slice(&0u32.to_be_bytes());
                b.push(0x50);
                b.push(*flags);
                b.extend_from_slice(&64240u16.to_be_bytes());
                b.extend_from_slice(&[0, 0, 0, 0]);
                b.extend_from_slice(payload);
                let mut s = pseudo(src, dst, proto, b.len());
                s.extend_from_slice(&b);
                let c = checksum(&s);
                b[16..18].copy_from_slice(&c.to_be_bytes());
                b
            }
            L4::Udp {
                sport,
                dport,
                payload,
            } => {
                let mut b = Vec::new();
                b.extend_from_slice(&sport.to_be_bytes());
                b.extend_from_slice(&dport.to_be_bytes());
                b.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
                b.extend_from_slice(&[0, 0]);
                b.extend_from_slice(payload);
                let mut s = pseudo(src, dst, proto, b.len());
                s.extend_from_slice(&b);
                let mut c = checksum(&s);
                if c == 0 {
                    c = 0xffff;
                }
                b[6..8].copy_from_slice(&c.to_be_bytes());
                b
            }
            L4::Echo {
                request,
                id,
                seq,
                payload,
            } => {
                let t = match (v6, request) {
                    (false, true) => 8,
                    (false, false) => 0,
                    (true, true) => 128,
                    (true, false) => 129,
                };
                let mut b = vec![t, 0, 0, 0];
                b.extend_from_slice(&id.to_be_bytes());
                b.extend_from_slice(&seq.to_be_bytes());
                b.extend_from_slice(payload);
                let c = if v6 {
                    let mut s = pseudo(src, dst, proto, b.len());
                    s.extend_from_slice(&b);
                    checksum(&s)
                } else {
                    checksum(&b)
                };
                b[2..4].copy_from_slice(&c.to_be_bytes());
                b
            }
            L4::Raw { bytes, .. } => bytes.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Ip {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub ttl: u8,
    /// IPv4 options (multiple of 4 bytes).
    pub options: Vec<u8>,
    /// IPv4 flags+fragment offset word.
    pub frag: u16,
    /// IPv4 identification.
    pub id: u16,
    pub l4: L4,
}

impl Ip {
    pub fn new(src: &str, dst: &str, l4: L4) -> Ip {
        Ip {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            ttl: 64,
            options: vec![],
            frag: 0x4000,
            id: 0x1234,
            l4,
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        let l4 = self.l4.bytes(self.src, self.dst);
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => ipv4(
                s,
                d,
                self.ttl,
                self.l4.proto(false),
                &self.options,
                self.frag,
                self.id,
                &l4,
            ),
            (IpAddr::V6(s), IpAddr::V6(d)) => ipv6(s, d, self.ttl, self.l4.proto(true), &l4),
            _ => panic!("mixed families"),
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub fn ipv4(
    s: Ipv4Addr,
    d: Ipv4Addr,
    ttl: u8,
    proto: u8,
    options: &[u8],
    frag: u16,
    id: u16,
    payload: &[u8],
) -> Vec<u8> {
    let ihl = 20 + options.len();
    let total = ihl + payload.len();
    let mut h = vec![(0x40 | (ihl / 4)) as u8, 0];
    h.extend_from_slice(&(total as u16).to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&frag.to_be_bytes());
    h.push(ttl);
    h.push(proto);
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(&s.octets());
    h.extend_from_slice(&d.octets());
    h.extend_from_slice(options);
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

pub fn ipv6(s: Ipv6Addr, d: Ipv6Addr, hop: u8, next: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    h.push(next);
    h.push(hop);
    h.extend_from_slice(&s.octets());
    h.extend_from_slice(&d.octets());
    h.extend_from_slice(payload);
    h
}

pub fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A frame from the client container to the gateway.
pub fn from_container(ip: &Ip) -> Vec<u8> {
    let et = if ip.src.is_ipv6() { 0x86dd } else { 0x0800 };
    eth(GATEWAY_MAC, CLIENT_MAC, et, &ip.bytes())
}

/// The Oakestra tunnel: the IP packet as the whole payload of one datagram.
pub fn tunnel_datagram(
    outer_src: Ipv4Addr,
    outer_dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    inner: &[u8],
) -> Vec<u8> {
    let udp = udp_without_checksum(sport, dport, inner);
    ipv4(outer_src, outer_dst, 64, 17, &[], 0x4000, 0, &udp)
}

/// A UDP datagram carrying `inner`, its checksum left zero (IPv4 allows
/// that; the IPv6 caller fills it in).
fn udp_without_checksum(sport: u16, dport: u16, inner: &[u8]) -> Vec<u8> {
    let mut udp = Vec::new();
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&((8 + inner.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(inner);
    udp
}

/// Checks every checksum of an IP packet from scratch: IPv4 header, and
/// TCP/UDP/ICMP/ICMPv6 over their pseudo headers.
pub fn assert_checksums(ip: &[u8]) {
    let v6 = ip[0] >> 4 == 6;
    let (src, dst, proto, l4) = if v6 {
        let s: [u8; 16] = ip[8..24].try_into().unwrap();
        let d: [u8; 16] = ip[24..40].try_into().unwrap();
        (IpAddr::from(s), IpAddr::from(d), ip[6], &ip[40..])
    } else {
        let ihl = ((ip[0] & 0xf) * 4) as usize;
        assert_eq!(checksum(&ip[..ihl]), 0, "IPv4 header checksum");
        let s: [u8; 4] = ip[12..16].try_into().unwrap();
        let d: [u8; 4] = ip[16..20].try_into().unwrap();
        (IpAddr::from(s), IpAddr::from(d), ip[9], &ip[ihl..])
    };
    match proto {
        6 | 17 | 58 => {
            if proto == 17 && !v6 && l4[6..8] == [0, 0] {
                return;
            }
            let mut s = pseudo(src, dst, proto, l4.len());
            s.extend_from_slice(l4);
            assert_eq!(checksum(&s), 0, "L4 checksum (proto {proto})");
        }
        1 => assert_eq!(checksum(l4), 0, "ICMP checksum"),
        _ => {}
    }
}

/// The Oakestra tunnel over IPv6 (our extension): the IP packet as the whole
/// payload of one datagram, with the UDP checksum IPv6 requires.
pub fn tunnel_datagram_v6(
    outer_src: Ipv6Addr,
    outer_dst: Ipv6Addr,
    sport: u16,
    dport: u16,
    inner: &[u8],
) -> Vec<u8> {
    let mut udp = udp_without_checksum(sport, dport, inner);
    let mut s = pseudo(outer_src.into(), outer_dst.into(), 17, udp.len());
    s.extend_from_slice(&udp);
    let mut c = checksum(&s);
    if c == 0 {
        c = 0xffff;
    }
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    ipv6(outer_src, outer_dst, 64, 17, &udp)
}

/// MACs of the underlay a [`FibNetns`] sets up.
pub const UNDER0_MAC: [u8; 6] = [0x02, 0, 0xc6, 0x33, 0x64, 0x01];
pub const UNDER1_MAC: [u8; 6] = [0x02, 0, 0xc6, 0x33, 0x64, 0x81];
pub const PEER_MAC: [u8; 6] = [0x02, 0, 0xc6, 0x33, 0x64, 0x02];
pub const PEER2_MAC: [u8; 6] = [0x02, 0, 0xc6, 0x33, 0x64, 0x82];

/// A private network namespace the calling thread moves into, so the
/// programs' FIB lookups (which run in the caller's namespace under
/// BPF_PROG_TEST_RUN) see a known underlay, never the host's:
/// - `under0`, 198.51.100.1/25 and 2001:db8::1/64, neighbours 198.51.100.2
///   and 2001:db8::2 at [`PEER_MAC`]; 198.51.100.3 without a neighbour
///   entry; 198.51.100.99 behind a route with MTU 1400;
/// - `under1`, 198.51.100.129/25, neighbour 198.51.100.130 at [`PEER2_MAC`];
/// - 198.51.100.77 blackholed.
///
/// Removed on drop (the thread stays in it until it ends).
pub struct FibNetns {
    pub ns: testkit::Netns,
}

impl FibNetns {
    /// `tag` names the namespace (with the kit's unique suffix).
    pub fn enter(tag: &str) -> FibNetns {
        use std::net::IpAddr;
        use testkit::{LinkSettings, Route};
        let short: String = tag
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(8)
            .collect();
        let ns = testkit::Netns::new(&format!("fib{short}")).expect("a namespace for the FIB");
        for (dev, wire, mac) in [
            ("under0", "under0p", UNDER0_MAC),
            ("under1", "under1p", UNDER1_MAC),
        ] {
            ns.add_veth(dev, wire, None).expect("veth").keep();
            ns.set_link(
                dev,
                &LinkSettings {
                    up: true,
                    mac: Some(mac),
                    ..Default::default()
                },
            )
            .expect("up");
            ns.set_up(wire).expect("up");
        }
        for (dev, addr) in [
            ("under0", "198.51.100.1/25"),
            ("under1", "198.51.100.129/25"),
            ("under0", "2001:db8::1/64"),
        ] {
            ns.add_address(dev, addr).expect("address").keep();
        }
        let ip = |s: &str| s.parse::<IpAddr>().expect("an address");
        for (dev, addr, mac) in [
            ("under0", "198.51.100.2", PEER_MAC),
            ("under1", "198.51.100.130", PEER2_MAC),
            ("under0", "2001:db8::2", PEER_MAC),
            ("under0", "198.51.100.99", PEER_MAC),
        ] {
            ns.add_neighbour(dev, ip(addr), mac).expect("neighbour");
        }
        // Locked: for forwarded traffic (the FIB lookup is a forwarding
        // one) a route MTU counts when locked, or as a path-MTU exception.
        ns.add_route(
            &Route::to("198.51.100.99/32")
                .expect("route")
                .dev("under0")
                .mtu_locked(1400),
        )
        .expect("route with MTU 1400")
        .keep();
        ns.add_route(&Route::blackhole("198.51.100.77/32").expect("route"))
            .expect("blackhole route")
            .keep();
        ns.sysctl("net/ipv4/ip_forward", "1").expect("forwarding");
        ns.sysctl("net/ipv6/conf/all/forwarding", "1")
            .expect("forwarding");
        ns.enter_this_thread().expect("into the FIB's namespace");
        FibNetns { ns }
    }

    /// ifindex of an interface of the namespace.
    pub fn ifindex(&self, dev: &str) -> u32 {
        self.ns.ifindex(dev).expect("the interface")
    }
}
