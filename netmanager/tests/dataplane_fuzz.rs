//! Packet fuzzing of the three programs through BPF_PROG_TEST_RUN:
//! generated frames -- well-formed ones from every side (containers, and
//! the tunnel over an IPv4 or an IPv6 underlay to any of the node's
//! addresses, on the fast and the slow path; IPv4 and IPv6 inside; known
//! and unknown senders and services, odd TTLs, fragments, options,
//! oversize), the same mutated (bit flips, overwritten header fields,
//! truncation, trailing bytes), and plain random bytes -- each checked
//! against invariants:
//!
//! - nothing from a host that does not run the inner source's instance (and
//!   is not trusted) is delivered, on either path, and nothing a container
//!   sends leaves with another source than its own instance address;
//! - a container's packet to a service address is never handed to the host
//!   stack, other traffic is left byte for byte; the slow path hands
//!   nothing to the stack;
//! - frames with valid checksums leave with valid checksums;
//! - every tunnel datagram, every slow-path frame and every container frame
//!   moves exactly one counter, other uplink traffic none;
//! - a held tunnel datagram is one from an unknown instance and an untrusted
//!   host;
//! - the XDP program (`uplink_xdp`, run on every uplink frame before the TC
//!   program, with `--uplink-hook xdp-redirect`) passes frames byte for
//!   byte and drops only datagrams to the tunnel port, each under one
//!   counter, and none that the TC program would deliver or hold; what it
//!   delivers itself (one counter) the TC program delivers too, as the
//!   same bytes.
//!
//! `OAK_FUZZ_FRAMES` frames (default 60,000: the CI share) from seed
//! `OAK_FUZZ_SEED` (default fixed); `cargo xtask fuzz` runs 1,000,000 with a
//! fresh seed. A failure names the seed and the frame. Needs root and bpffs.

mod packet_support;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use aya::programs::TestRunOptions;
use netmanager::dataplane::{
    CONTAINER_PROGRAM, Dataplane, DataplaneConfig, InstanceEntry, LocalPort, MapSizes, MissReason,
    SLOW_PATH_PROGRAM, ServiceKind, UPLINK_PROGRAM, UPLINK_XDP_PROGRAM, UplinkHook,
};
use packet_support::*;
use testkit::PinDir;

testkit::main! {
    generated_frames_keep_the_dataplane_invariants: [Root, Bpffs],
}

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

const NODE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// The node's second address (on `under1` of the [`FibNetns`]).
const NODE_2: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 129);
const NODE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const PEER_NODE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// A peer on the IPv6 underlay.
const PEER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
const STRANGER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 3);
const STRANGER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 3);
/// Inside the trusted prefix 198.51.100.64/26.
const TRUSTED: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 70);
/// BPF_PROG_TEST_RUN runs the programs on the loopback device: the
/// client's veth.
const CLIENT_IFINDEX: u32 = 1;
const DEFAULT_FRAMES: u64 = 60_000;
const DEFAULT_SEED: u64 = 0x5eed_0a4e_57a5;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// What the dataplane was told, for the oracle.
struct World {
    /// Instance address -> node that runs it.
    instance_node: HashMap<IpAddr, IpAddr>,
    /// Source addresses whose packets may arrive on the client's veth.
    client_sources: Vec<IpAddr>,
    /// The client's instance addresses (the translated source).
    client_instances: Vec<IpAddr>,
    /// Namespace addresses of the containers on this node.
    local_containers: Vec<IpAddr>,
}

impl World {
    fn trusted(&self, a: IpAddr) -> bool {
        matches!(a, IpAddr::V4(v) if u32::from(v) >> 6 == u32::from(TRUSTED) >> 6)
    }
}

fn in_service_range(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(v) => v.octets()[..2] == [10, 30],
        IpAddr::V6(v) => v.octets()[..2] == [0xfd, 0xff],
    }
}

/// The dataplane of node 198.51.100.1 (also 198.51.100.129 and
/// 2001:db8::1) inside `netns`.
fn dataplane(pin_dir: &PinDir, netns: &FibNetns) -> (Dataplane, World) {
    let cfg = DataplaneConfig {
        pin_dir: pin_dir.to_path_buf(),
        uplink: String::new(),
        node_ip: IpAddr::V4(NODE),
        tunnel_port: 50103,
        tunnel_mtu: 1450,
        service_ranges: vec![(ip("10.30.0.0"), 16), (ip("fdff::"), 16)],
        sizes: MapSizes {
            flows: 4096,
            services: 256,
            backends: 1024,
            instances: 256,
            pending: 256,
        },
        miss_hold: 2,
        container_bridge: String::new(),
        attach_mode: netmanager::dataplane::AttachMode::Auto,
        // The XDP program screens and delivers: both paths are fuzzed.
        uplink_hook: UplinkHook::XdpRedirect,
        xdp_mode: Default::default(),
        trusted_peers: vec![(ip("198.51.100.64"), 26)],
        flows_per_container: 0,
    };
    let dp = Dataplane::open(&cfg).expect("loading the dataplane");
    dp.set_node_addresses(&[
        (IpAddr::V4(NODE), netns.ifindex("under0")),
        (IpAddr::V4(NODE_2), netns.ifindex("under1")),
        (IpAddr::V6(NODE_V6), netns.ifindex("under0")),
    ])
    .unwrap();
    let local = |ifindex, mac| Some(LocalPort { ifindex, mac });
    let (node, peer, peer_v6) = (IpAddr::V4(NODE), IpAddr::V4(PEER_NODE), IpAddr::V6(PEER_V6));
    let instances = [
        (
            "10.18.0.2",
            "10.30.0.3",
            node,
            local(CLIENT_IFINDEX, CLIENT_MAC),
        ),
        (
            "fc00::2",
            "fdff::3",
            node,
            local(CLIENT_IFINDEX, CLIENT_MAC),
        ),
        ("10.18.0.3", "10.30.0.4", node, local(8, [2, 0, 0, 0, 0, 3])),
        ("fc00::3", "fdff::4", node, local(8, [2, 0, 0, 0, 0, 3])),
        ("10.18.0.130", "10.30.0.5", peer, None),
        ("fc00::82", "fdff::5", peer, None),
        ("10.18.0.131", "10.30.0.6", peer_v6, None),
        ("fc00::83", "fdff::6", peer_v6, None),
    ];
    let mut instance_node = HashMap::new();
    let mut local_containers = Vec::new();
    for (ns, inst, node, local) in instances {
        if local.is_some() {
            local_containers.push(ip(ns));
        }
        dp.upsert_instance(
            ip(ns),
            InstanceEntry {
                instance_ip: Some(ip(inst)),
                node_ip: node,
                node_port: 50103,
                local,
            },
        )
        .unwrap();
        instance_node.insert(ip(inst), node);
    }
    let services: [(&str, ServiceKind, &[&str]); 10] = [
        ("10.30.55.56", ServiceKind::RoundRobin, &["10.18.0.130"]),
        // Behind a node on the IPv6 underlay.
        ("10.30.55.58", ServiceKind::RoundRobin, &["10.18.0.131"]),
        ("fdff:2000::55:58", ServiceKind::RoundRobin, &["fc00::83"]),
        (
            "10.30.55.57",
            ServiceKind::Closest,
            &["10.18.0.3", "10.18.0.130"],
        ),
        ("10.30.0.3", ServiceKind::Instance, &["10.18.0.2"]),
        ("10.30.0.4", ServiceKind::Instance, &["10.18.0.3"]),
        ("10.30.0.5", ServiceKind::Instance, &["10.18.0.130"]),
        ("fdff:2000::55:56", ServiceKind::RoundRobin, &["fc00::82"]),
        ("fdff:2000::55:57", ServiceKind::Closest, &["fc00::3"]),
        ("fdff::5", ServiceKind::Instance, &["fc00::82"]),
    ];
    for (svc, kind, backends) in services {
        let b: Vec<IpAddr> = backends.iter().map(|s| ip(s)).collect();
        dp.upsert_service(ip(svc), kind, &b).unwrap();
    }
    let world = World {
        instance_node,
        client_sources: vec![ip("10.18.0.2"), ip("fc00::2")],
        client_instances: vec![ip("10.30.0.3"), ip("fdff::3")],
        local_containers,
    };
    (dp, world)
}

/// One generated frame and what it is.
struct Case {
    frame: Vec<u8>,
    program: &'static str,
    /// Built well-formed, not mutated since, and its checksums are right:
    /// then the output's must be right too.
    valid: bool,
}

impl Case {
    fn well_formed(frame: Vec<u8>, program: &'static str, inner_at: usize) -> Case {
        let valid = checksums_ok(&frame[14..]).is_ok()
            && (inner_at == 14 || checksums_ok(&frame[inner_at..]).is_ok());
        Case {
            frame,
            program,
            valid,
        }
    }
}

struct Gen {
    rng: fastrand::Rng,
}

impl Gen {
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.rng.usize(..items.len())]
    }

    fn payload(&mut self) -> Vec<u8> {
        let len = match self.rng.u8(..10) {
            0 => self.rng.usize(1300..1700),
            1..=3 => 0,
            _ => self.rng.usize(1..200),
        };
        let mut p = vec![0u8; len];
        self.rng.fill(&mut p);
        p
    }

    fn l4(&mut self) -> L4 {
        let (sport, dport) = (self.rng.u16(1..), self.pick(&[80, 53, 9000, 1]));
        match self.rng.u8(..10) {
            0..=3 => L4::Tcp {
                sport,
                dport,
                flags: self.pick(&[0x02, 0x10, 0x12, 0x11, 0x04, 0x18]),
                payload: self.payload(),
            },
            4..=6 => L4::Udp {
                sport,
                dport,
                payload: self.payload(),
            },
            7 | 8 => L4::Echo {
                request: self.rng.bool(),
                id: self.rng.u16(..),
                seq: self.rng.u16(..),
                payload: self.payload(),
            },
            _ => L4::Raw {
                proto: self.pick(&[1, 58, 47, 132, 0]),
                bytes: {
                    // ICMP types other than echo, or other protocols.
                    let mut b = vec![self.pick(&[3, 11, 5, 1, 2, 135]), 0, 0, 0, 0, 0, 0, 0];
                    b.extend(self.payload());
                    b
                },
            },
        }
    }

    /// An IP packet of family `v6`.
    fn ip(&mut self, src: IpAddr, dst: IpAddr) -> Ip {
        let mut p = Ip {
            src,
            dst,
            ttl: self.pick(&[64, 64, 64, 2, 1, 0, 255]),
            options: vec![],
            frag: self.pick(&[0x4000, 0x4000, 0x4000, 0, 0x2000, 0x0001]),
            id: self.rng.u16(..),
            l4: self.l4(),
        };
        if src.is_ipv4() && self.rng.u8(..8) == 0 {
            let words = self.rng.usize(1..=10);
            p.options = vec![1; words * 4];
        }
        p
    }

    fn container(&mut self) -> Case {
        let v6 = self.rng.bool();
        let src = if v6 {
            self.pick(&[
                "fc00::2",
                "fc00::2",
                "fc00::3",
                "fc00::50",
                "fdff::3",
                "2001:db8::1",
            ])
        } else {
            self.pick(&[
                "10.18.0.2",
                "10.18.0.2",
                "10.18.0.3",
                "10.18.0.50",
                "10.30.0.3",
                "192.0.2.1",
            ])
        };
        let dst = if v6 {
            self.pick(&[
                "fdff:2000::55:56",
                "fdff:2000::55:57",
                "fdff:2000::55:58",
                "fdff::5",
                "fdff::77",
                "fdff:2000::99",
                "2001:db8::9",
            ])
        } else {
            self.pick(&[
                "10.30.55.56",
                "10.30.55.57",
                "10.30.55.58",
                "10.30.0.4",
                "10.30.0.5",
                "10.30.0.3",
                "10.30.99.1",
                "192.0.2.9",
            ])
        };
        let p = self.ip(ip(src), ip(dst));
        Case::well_formed(from_container(&p), CONTAINER_PROGRAM, 14)
    }

    fn tunnel(&mut self) -> Case {
        let v6 = self.rng.bool();
        let src = if v6 {
            self.pick(&["fdff::5", "fdff::6", "fdff::3", "fdff::77", "2001:db8::1"])
        } else {
            self.pick(&[
                "10.30.0.5",
                "10.30.0.6",
                "10.30.0.3",
                "10.30.0.77",
                "10.30.55.56",
                "192.0.2.1",
            ])
        };
        let dst = if v6 {
            self.pick(&["fc00::2", "fc00::3", "fc00::82", "fc00::99"])
        } else {
            self.pick(&["10.18.0.2", "10.18.0.3", "10.18.0.130", "10.18.0.99"])
        };
        let inner = self.ip(ip(src), ip(dst)).bytes();
        // The slow path rebuilds datagrams from the socket's addresses: the
        // peer's port may be anything (NAT).
        let (program, sport) = match self.rng.u8(..5) {
            0 => (SLOW_PATH_PROGRAM, self.pick(&[50103, 38211])),
            _ => (UPLINK_PROGRAM, 50103),
        };
        let dport = if self.rng.u8(..10) == 0 { 50104 } else { 50103 };
        let (frame, inner_at) = if self.rng.u8(..3) == 0 {
            let sender = self.pick(&[PEER_V6, PEER_V6, STRANGER_V6, NODE_V6]);
            let to = self.pick(&[NODE_V6, NODE_V6, NODE_V6, PEER_V6]);
            let d = tunnel_datagram_v6(sender, to, sport, dport, &inner);
            (eth([0xaa; 6], [0xbb; 6], 0x86dd, &d), 14 + 48)
        } else {
            let sender = self.pick(&[PEER_NODE, PEER_NODE, STRANGER, TRUSTED, NODE]);
            let to = self.pick(&[NODE, NODE, NODE, NODE, NODE, NODE_2, NODE_2, PEER_NODE]);
            let d = tunnel_datagram(sender, to, sport, dport, &inner);
            (eth([0xaa; 6], [0xbb; 6], 0x0800, &d), 14 + 28)
        };
        Case::well_formed(frame, program, inner_at)
    }

    /// 1-4 mutations of a well-formed frame.
    fn mutated(&mut self) -> Case {
        let mut c = if self.rng.bool() {
            self.container()
        } else {
            self.tunnel()
        };
        c.valid = false;
        for _ in 0..self.rng.usize(1..=4) {
            let f = &mut c.frame;
            if f.is_empty() {
                break;
            }
            match self.rng.u8(..6) {
                0 => {
                    let i = self.rng.usize(..f.len());
                    f[i] ^= 1 << self.rng.u8(..8);
                }
                1 => {
                    let i = self.rng.usize(..f.len());
                    f[i] = self.rng.u8(..);
                }
                // A header field: within the first 80 bytes.
                2 => {
                    let i = self.rng.usize(..f.len().min(80));
                    f[i] = self.pick(&[0, 0xff, 0x45, 0x46, 0x4f, 0x60, 6, 17, 1, 58, 44]);
                }
                // BPF_PROG_TEST_RUN takes nothing shorter than Ethernet.
                3 => {
                    let n = self.rng.usize(14..f.len().max(15));
                    f.truncate(n);
                }
                4 => {
                    let extra = self.rng.usize(1..64);
                    f.extend((0..extra).map(|_| self.rng.u8(..)));
                }
                _ => {
                    // Lengths: IPv4 total length or IPv6 payload length,
                    // outer or inner.
                    let at = self.pick(&[16, 18, 42 + 2, 42 + 4, 38, 18 + 28, 62 + 2, 62 + 4]);
                    if at + 1 < f.len() {
                        let v = self.rng.u16(..).to_be_bytes();
                        f[at] = v[0];
                        f[at + 1] = v[1];
                    }
                }
            }
        }
        if self.rng.bool() {
            c.program = self.pick(&[CONTAINER_PROGRAM, UPLINK_PROGRAM, SLOW_PATH_PROGRAM]);
        }
        c
    }

    fn random(&mut self) -> Case {
        let mut f = vec![0u8; self.rng.usize(14..200)];
        self.rng.fill(&mut f);
        if self.rng.bool() {
            let et: u16 = self.pick(&[0x0800, 0x86dd]);
            f[12..14].copy_from_slice(&et.to_be_bytes());
            if f.len() > 14 {
                f[14] = (f[14] & 0x0f) | if et == 0x0800 { 0x40 } else { 0x60 };
            }
        }
        Case {
            frame: f,
            program: self.pick(&[CONTAINER_PROGRAM, UPLINK_PROGRAM, SLOW_PATH_PROGRAM]),
            valid: false,
        }
    }

    fn next(&mut self) -> Case {
        match self.rng.u8(..10) {
            0..=2 => self.container(),
            3..=5 => self.tunnel(),
            6..=8 => self.mutated(),
            _ => self.random(),
        }
    }
}

fn v4(b: &[u8]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
}

fn v6(b: &[u8]) -> IpAddr {
    let a: [u8; 16] = b.try_into().unwrap();
    IpAddr::from(a)
}

/// Where the inner packet of a tunnel datagram starts, when the receive
/// programs take the frame for one: to any of the node's addresses and our
/// tunnel port, outer IPv4 without options or fragments, or outer IPv6
/// without extension headers (the same test as `tunnel::tunnel_datagram`).
fn tunnel_inner_at(f: &[u8]) -> Option<usize> {
    let inner_at = match f.get(12..14)? {
        [0x08, 0x00] => {
            let ok = f.len() > 42
                && f[14] == 0x45
                && f[23] == 17
                && u16::from_be_bytes([f[20], f[21]]) & 0x3fff == 0
                && (f[30..34] == NODE.octets() || f[30..34] == NODE_2.octets())
                && f[36..38] == 50103u16.to_be_bytes();
            ok.then_some(42)?
        }
        [0x86, 0xdd] => {
            let ok = f.len() > 62
                && f[14] >> 4 == 6
                && f[20] == 17
                && f[38..54] == NODE_V6.octets()
                && f[56..58] == 50103u16.to_be_bytes();
            ok.then_some(62)?
        }
        _ => return None,
    };
    matches!(f[inner_at] >> 4, 4 | 6).then_some(inner_at)
}

fn is_tunnel(f: &[u8]) -> bool {
    tunnel_inner_at(f).is_some()
}

/// (outer source, inner source) of a tunnel datagram, when both are there.
fn tunnel_sources(f: &[u8]) -> Option<(IpAddr, IpAddr)> {
    let at = tunnel_inner_at(f)?;
    let sender = if at == 42 {
        v4(&f[26..30])
    } else {
        v6(&f[22..38])
    };
    let inner = match f[at] >> 4 {
        4 => v4(f.get(at + 12..at + 16)?),
        _ => v6(f.get(at + 8..at + 24)?),
    };
    Some((sender, inner))
}

/// Whether the tunnel datagram may be delivered: its sender runs the inner
/// source's instance, or is trusted (and the source is an instance address).
fn may_deliver(w: &World, f: &[u8]) -> bool {
    let Some((sender, inner)) = tunnel_sources(f) else {
        return false;
    };
    match w.instance_node.get(&inner) {
        Some(node) => *node == sender || w.trusted(sender),
        None => in_service_range(inner) && w.trusted(sender),
    }
}

/// Whether the dataplane may hold the tunnel datagram `f` and ask the
/// cluster about its inner source `addr`: an instance address, for a
/// container here, from an untrusted sender that the tables do not name
/// for it -- nobody, or another node (it may have moved), never this one.
fn may_hold(w: &World, f: &[u8], addr: IpAddr) -> bool {
    let (Some((sender, inner)), Some(at)) = (tunnel_sources(f), tunnel_inner_at(f)) else {
        return false;
    };
    let dst = match f[at] >> 4 {
        4 => f.get(at + 16..at + 20).map(v4),
        _ => f.get(at + 24..at + 40).map(v6),
    };
    let this_node =
        |a: &IpAddr| [IpAddr::V4(NODE), IpAddr::V4(NODE_2), IpAddr::V6(NODE_V6)].contains(a);
    inner == addr
        && in_service_range(inner)
        && !w.trusted(sender)
        && dst.is_some_and(|d| w.local_containers.contains(&d))
        && w.instance_node
            .get(&inner)
            .is_none_or(|node| *node != sender && !this_node(node))
}

/// The destination of a container's frame when it is a service address.
fn service_destination(f: &[u8]) -> Option<IpAddr> {
    let dst = match f.get(12..14)? {
        [0x08, 0x00] => v4(f.get(30..34)?),
        [0x86, 0xdd] => v6(f.get(38..54)?),
        _ => return None,
    };
    in_service_range(dst).then_some(dst)
}

/// The destination of an ICMP fragmentation-needed / packet-too-big.
fn too_big_to(ip: &[u8]) -> Option<IpAddr> {
    match ip.first()? >> 4 {
        4 if ip.get(9) == Some(&1) && ip.get(20..22) == Some(&[3, 4]) => Some(v4(ip.get(16..20)?)),
        6 if ip.get(6) == Some(&58) && ip.get(40) == Some(&2) => Some(v6(ip.get(24..40)?)),
        _ => None,
    }
}

fn source_of(ip: &[u8]) -> Option<IpAddr> {
    match ip.first()? >> 4 {
        4 => Some(v4(ip.get(12..16)?)),
        6 => Some(v6(ip.get(8..24)?)),
        _ => None,
    }
}

/// Every checksum of the IP packet at the start of `ip` (IPv4 header, and
/// TCP/UDP/ICMP/ICMPv6 over the length the header declares), from scratch.
fn checksums_ok(ip: &[u8]) -> Result<(), String> {
    let (src, dst, proto, l4, whole) = match ip.first().map(|b| b >> 4) {
        Some(4) => {
            let ihl = usize::from(ip[0] & 0xf) * 4;
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            if ip.len() < total || total < ihl {
                return Err(format!("IPv4 length {total} with {} bytes", ip.len()));
            }
            if checksum(&ip[..ihl]) != 0 {
                return Err("IPv4 header checksum".into());
            }
            let fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0;
            (
                v4(&ip[12..16]),
                v4(&ip[16..20]),
                ip[9],
                &ip[ihl..total],
                !fragment,
            )
        }
        Some(6) => {
            let total = 40 + usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            if ip.len() < total {
                return Err(format!("IPv6 length {total} with {} bytes", ip.len()));
            }
            (
                v6(&ip[8..24]),
                v6(&ip[24..40]),
                ip[6],
                &ip[40..total],
                ip[6] != 44,
            )
        }
        _ => return Err("not IP".into()),
    };
    if !whole {
        return Ok(());
    }
    let pseudo = |len: usize| {
        let mut p = Vec::new();
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                p.extend_from_slice(&s.octets());
                p.extend_from_slice(&d.octets());
                p.extend_from_slice(&[0, proto]);
                p.extend_from_slice(&(len as u16).to_be_bytes());
            }
            (s, d) => {
                let (IpAddr::V6(s), IpAddr::V6(d)) = (s, d) else {
                    unreachable!()
                };
                p.extend_from_slice(&s.octets());
                p.extend_from_slice(&d.octets());
                p.extend_from_slice(&(len as u32).to_be_bytes());
                p.extend_from_slice(&[0, 0, 0, proto]);
            }
        }
        p
    };
    let ok = match proto {
        6 if l4.len() >= 20 => {
            let mut s = pseudo(l4.len());
            s.extend_from_slice(l4);
            checksum(&s) == 0
        }
        17 if l4.len() >= 8 => {
            if src.is_ipv4() && l4[6..8] == [0, 0] {
                true
            } else {
                let mut s = pseudo(l4.len());
                s.extend_from_slice(l4);
                checksum(&s) == 0
            }
        }
        58 if l4.len() >= 4 => {
            let mut s = pseudo(l4.len());
            s.extend_from_slice(l4);
            checksum(&s) == 0
        }
        1 if l4.len() >= 4 => checksum(l4) == 0,
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("L4 checksum (protocol {proto})"))
    }
}

/// Checks one run; returns what is wrong.
fn check(w: &World, case: &Case, verdict: u32, out: &[u8], counted: u64) -> Result<(), String> {
    let f = &case.frame;
    if case.program == UPLINK_PROGRAM || case.program == SLOW_PATH_PROGRAM {
        let tunnel = is_tunnel(f);
        let slow = case.program == SLOW_PATH_PROGRAM;
        // The slow path counts everything (what is no tunnel datagram as
        // malformed) and passes nothing to the stack.
        let expected = u64::from(tunnel || slow);
        if counted != expected {
            return Err(format!("{counted} counters moved, expected {expected}"));
        }
        if slow && verdict == TC_ACT_OK {
            return Err("the slow path passed a frame to the stack".into());
        }
        if !tunnel && slow {
            return match verdict {
                TC_ACT_SHOT => Ok(()),
                v => Err(format!("not a tunnel datagram, yet verdict {v}")),
            };
        }
        if !tunnel {
            return match (verdict, out == &f[..]) {
                (TC_ACT_OK, true) => Ok(()),
                _ => Err(format!(
                    "not a tunnel datagram, yet verdict {verdict} or changed"
                )),
            };
        }
        match verdict {
            TC_ACT_SHOT => Ok(()),
            TC_ACT_REDIRECT => {
                if !may_deliver(w, f) {
                    return Err("delivered from a host that does not run its source".into());
                }
                if case.valid {
                    checksums_ok(out.get(14..).unwrap_or_default())?;
                }
                Ok(())
            }
            v => Err(format!("tunnel datagram with verdict {v}")),
        }
    } else {
        if counted != 1 {
            return Err(format!("{counted} counters moved, expected 1"));
        }
        if service_destination(f).is_none() {
            return match (verdict, out == &f[..]) {
                (TC_ACT_OK, true) => Ok(()),
                _ => Err(format!(
                    "not service traffic, yet verdict {verdict} or changed"
                )),
            };
        }
        match verdict {
            TC_ACT_SHOT => Ok(()),
            TC_ACT_REDIRECT => {
                let sent_by = f.get(14..).and_then(source_of);
                if !sent_by.is_some_and(|s| w.client_sources.contains(&s)) {
                    return Err(format!("sent by {sent_by:?}, not the veth's container"));
                }
                // Tunnelled (outer IPv4 or IPv6 and UDP from us), delivered
                // locally, or an ICMP too-big back to the sender.
                let ip = out.get(14..).unwrap_or_default();
                let tunnelled_v4 = out.get(12..14) == Some(&[0x08, 0x00])
                    && ip.len() > 28
                    && ip[9] == 17
                    && ip[12..16] == NODE.octets();
                let tunnelled_v6 = out.get(12..14) == Some(&[0x86, 0xdd])
                    && ip.len() > 48
                    && ip[6] == 17
                    && ip[8..24] == NODE_V6.octets();
                let tunnelled = tunnelled_v4 || tunnelled_v6;
                let inner = match (tunnelled_v4, tunnelled_v6) {
                    (true, _) => &ip[28..],
                    (_, true) => &ip[48..],
                    _ => ip,
                };
                if too_big_to(inner) != sent_by {
                    let src = source_of(inner);
                    if !src.is_some_and(|s| w.client_instances.contains(&s)) {
                        return Err(format!("left with source {src:?}"));
                    }
                }
                if case.valid {
                    if tunnelled {
                        checksums_ok(ip)?;
                    }
                    checksums_ok(inner)?;
                }
                Ok(())
            }
            v => Err(format!("service traffic with verdict {v}")),
        }
    }
}

fn total_packets(dp: &Dataplane) -> u64 {
    dp.counters().unwrap().iter().map(|c| c.1).sum()
}

fn peer_held(dp: &Dataplane) -> u64 {
    dp.counters()
        .unwrap()
        .iter()
        .find(|c| c.0 == netmanager_common::Counter::PeerHeld)
        .map_or(0, |c| c.1)
}

/// The XDP program on `frame`: (verdict, output, packets counted), or None
/// when the kernel refuses the frame.
fn run_xdp(dp: &Dataplane, frame: &[u8]) -> Option<(u32, Vec<u8>, u64)> {
    let before = total_packets(dp);
    let mut out = vec![0u8; 4096];
    let r = dp
        .test_run(
            UPLINK_XDP_PROGRAM,
            TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..Default::default()
            },
        )
        .ok()?;
    out.truncate(r.data_size_out as usize);
    Some((r.return_value, out, total_packets(dp) - before))
}

/// The XDP program's invariants, given what the TC program then did with
/// the same frame (`tc`, its output `tc_out`, and whether it held it).
fn check_xdp(
    frame: &[u8],
    (verdict, out, counted): (u32, &[u8], u64),
    (tc, tc_out): (u32, &[u8]),
    held: bool,
) -> Result<(), String> {
    match verdict {
        XDP_REDIRECT if counted != 1 => Err(format!("XDP delivered and counted {counted}")),
        XDP_REDIRECT if tc != TC_ACT_REDIRECT => {
            Err(format!("XDP delivered what TC does not (TC: {tc})"))
        }
        XDP_REDIRECT if out != tc_out => Err(format!(
            "XDP delivered other bytes than TC\n  tc:  {}",
            hex(tc_out)
        )),
        XDP_REDIRECT => Ok(()),
        XDP_PASS if out != frame => Err("XDP passed the frame changed".into()),
        XDP_PASS if counted != 0 => Err(format!("XDP passed and counted {counted}")),
        XDP_PASS => Ok(()),
        XDP_DROP if counted != 1 => Err(format!("XDP dropped and counted {counted}")),
        XDP_DROP if !to_tunnel_port(frame) => Err("XDP dropped no tunnel datagram".into()),
        // A datagram whose lengths lie TC may hold or even deliver: it
        // checks the sender before it parses the inner packet, and never
        // reads the outer lengths (the stack drops such a datagram, were it
        // to get there). XDP drops it outright.
        XDP_DROP if lengths_lie(frame) => Ok(()),
        XDP_DROP if held => Err("XDP dropped a datagram TC holds".into()),
        XDP_DROP if tc == TC_ACT_REDIRECT => Err("XDP dropped a datagram TC delivers".into()),
        XDP_DROP => Ok(()),
        v => Err(format!("XDP verdict {v}")),
    }
}

/// A UDP datagram to one of the node's addresses and the tunnel port, as
/// the programs recognise one (outer IPv4 without options or fragments,
/// outer IPv6 without extension headers), whatever it carries.
fn to_tunnel_port(f: &[u8]) -> bool {
    match f.get(12..14) {
        Some([0x08, 0x00]) => {
            f.len() >= 42
                && f[14] == 0x45
                && f[23] == 17
                && u16::from_be_bytes([f[20], f[21]]) & 0x3fff == 0
                && (f[30..34] == NODE.octets() || f[30..34] == NODE_2.octets())
                && f[36..38] == 50103u16.to_be_bytes()
        }
        Some([0x86, 0xdd]) => {
            f.len() >= 62
                && f[14] >> 4 == 6
                && f[20] == 17
                && f[38..54] == NODE_V6.octets()
                && f[56..58] == 50103u16.to_be_bytes()
        }
        _ => false,
    }
}

/// Whether a tunnel datagram's lengths contradict each other or the frame:
/// the outer IP length beyond the frame or short of the headers, the UDP
/// length beyond the IP packet or short of its own header, the inner
/// packet's length beyond the UDP payload or short of its header, or no
/// IPv4/IPv6 packet inside at all.
fn lengths_lie(f: &[u8]) -> bool {
    let be = |a: usize| u16::from_be_bytes([f[a], f[a + 1]]) as usize;
    let (inner_at, udp) = match f.get(12..14) {
        Some([0x08, 0x00]) if f.len() >= 42 => {
            let (ip, udp) = (be(16), be(38));
            if ip < 28 || 14 + ip > f.len() || udp < 8 || udp > ip - 20 {
                return true;
            }
            (42, udp)
        }
        Some([0x86, 0xdd]) if f.len() >= 62 => {
            let (payload, udp) = (be(18), be(58));
            if payload < 8 || 54 + payload > f.len() || udp < 8 || udp > payload {
                return true;
            }
            (62, udp)
        }
        _ => return false,
    };
    let len = udp - 8;
    match f.get(inner_at).map(|b| b >> 4) {
        Some(4) if len >= 20 => {
            let ihl = (f[inner_at] & 0x0f) as usize * 4;
            let total = be(inner_at + 2);
            ihl < 20 || total < ihl || total > len
        }
        Some(6) if len >= 40 => 40 + be(inner_at + 4) > len,
        _ => true,
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

fn generated_frames_keep_the_dataplane_invariants() {
    let frames = env_u64("OAK_FUZZ_FRAMES", DEFAULT_FRAMES);
    let seed = env_u64("OAK_FUZZ_SEED", DEFAULT_SEED);
    let pin_dir = PinDir::new("fuzz");
    // A namespace of its own with a known underlay: the FIB's answers
    // (routes, neighbours, sources) are the same on every machine.
    let netns = FibNetns::enter("fuzz");
    let (dp, world) = dataplane(&pin_dir, &netns);
    let dp = Arc::new(dp);
    let world = Arc::new(world);
    let held = Arc::new(Mutex::new((0u64, Vec::<String>::new())));
    let drain = drain_misses(dp.clone(), world.clone(), held.clone());

    let mut generator = Gen {
        rng: fastrand::Rng::with_seed(seed),
    };
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut before = total_packets(&dp);
    let mut out = vec![0u8; 4096];
    let mut verdicts: HashMap<(&str, u32), u64> = HashMap::new();
    let mut rejected = 0u64;
    let mut n = 0;
    while n < frames {
        n += 1;
        if n % 2000 == 1999 {
            // A fresh flow table now and then, so new flows keep being made.
            dp.expire_flows_after(2 * netmanager_common::FLOW_IDLE_NS)
                .unwrap();
        }
        let case = generator.next();
        // The XDP program first, as on the uplink with the XDP hook.
        let xdp = (case.program == UPLINK_PROGRAM)
            .then(|| run_xdp(&dp, &case.frame))
            .flatten();
        if let Some((_, _, counted)) = &xdp {
            before += counted;
        }
        let held_before = peer_held(&dp);
        let r = match dp.test_run(
            case.program,
            TestRunOptions {
                data_in: Some(&case.frame),
                data_out: Some(&mut out),
                ..Default::default()
            },
        ) {
            Ok(r) => r,
            // The kernel hands the program no IP frame shorter than its
            // IP header; draw another.
            Err(_) if shorter_than_its_ip_header(&case.frame) => {
                rejected += 1;
                continue;
            }
            Err(e) => panic!(
                "BPF_PROG_TEST_RUN of frame {n} (seed {seed}): {e:#}\n  {}",
                hex(&case.frame)
            ),
        };
        let output = &out[..(r.data_size_out as usize).min(out.len())];
        let after = total_packets(&dp);
        *verdicts.entry((case.program, r.return_value)).or_default() += 1;
        let held = peer_held(&dp) > held_before;
        let xdp_result = match &xdp {
            Some((verdict, xdp_out, counted)) => {
                *verdicts.entry((UPLINK_XDP_PROGRAM, *verdict)).or_default() += 1;
                check_xdp(
                    &case.frame,
                    (*verdict, xdp_out, *counted),
                    (r.return_value, output),
                    held,
                )
            }
            None => Ok(()),
        };
        if let Err(why) =
            xdp_result.and_then(|()| check(&world, &case, r.return_value, output, after - before))
        {
            failures.push(format!(
                "frame {n} ({}, seed {seed}): {why}\n  in:  {}\n  out: {}",
                case.program,
                hex(&case.frame),
                hex(output)
            ));
            if failures.len() >= 10 {
                break;
            }
        }
        before = after;
    }
    let elapsed = started.elapsed();
    drop(drain);
    let (held_tunnel, held_failures) = std::mem::take(&mut *held.lock().unwrap());
    failures.extend(held_failures);
    let mut v: Vec<_> = verdicts.into_iter().collect();
    v.sort();
    eprintln!(
        "fuzz: {frames} frames from seed {seed} in {:.1} s ({rejected} more too short for BPF_PROG_TEST_RUN); verdicts {v:?}; {held_tunnel} tunnel datagrams held; counters {:?}",
        elapsed.as_secs_f64(),
        dp.counters()
            .unwrap()
            .iter()
            .filter(|c| c.1 > 0)
            .map(|c| (c.0.name(), c.1))
            .collect::<Vec<_>>()
    );
    assert!(
        failures.is_empty(),
        "{} invariant violations (rerun with OAK_FUZZ_SEED={seed}):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Reads the miss ring while the fuzzer runs, clearing each pending mark
/// (as NetManager would) and checking every held tunnel datagram. Stops
/// when dropped.
struct Drain {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Drain {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn drain_misses(
    dp: Arc<Dataplane>,
    world: Arc<World>,
    held: Arc<Mutex<(u64, Vec<String>)>>,
) -> Drain {
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut misses = dp.misses().unwrap();
            loop {
                let m = tokio::select! {
                    m = misses.recv() => m,
                    _ = &mut stopped => return,
                };
                let Some(m) = m else { return };
                if m.reason == MissReason::Peer {
                    let mut h = held.lock().unwrap();
                    h.0 += 1;
                    let bad = match &m.frame {
                        Some(f) => !may_hold(&world, f, m.addr),
                        None => false,
                    };
                    if bad && h.1.len() < 10 {
                        h.1.push(format!("held a tunnel datagram it should not have: {m:?}"));
                    }
                }
                let _ = dp.resolved(m.addr);
            }
        });
    });
    Drain {
        stop: Some(stop),
        thread: Some(thread),
    }
}

fn shorter_than_its_ip_header(f: &[u8]) -> bool {
    match f[12..14] {
        [0x08, 0x00] => f.len() < 14 + 20,
        [0x86, 0xdd] => f.len() < 14 + 40,
        _ => false,
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
