//! Packet fixtures: the real programs, loaded into the kernel with prepared
//! maps, run on crafted frames through BPF_PROG_TEST_RUN. Each test asserts
//! the verdict, the exact output bytes (checksums recomputed from scratch)
//! and the map state afterwards. Needs root and bpffs.

mod packet_support;

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use aya::programs::TestRunOptions;
use netmanager::dataplane::{
    CONTAINER_PROGRAM, Dataplane, DataplaneConfig, InstanceEntry, LocalPort, MapSizes, ServiceKind,
    UPLINK_PROGRAM,
};
use netmanager_common::{Addr, FlowKey};
use packet_support::*;

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const NODE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const PEER_NODE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const BACKEND_MAC: [u8; 6] = [0x02, 0, 0x0a, 0x12, 0, 0x03];

/// A dataplane with its own pin directory, removed on drop.
struct Fixture {
    dp: Dataplane,
    pin_dir: PinDir,
}

/// Removes the pin directory on drop -- also when loading fails half-way.
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl std::ops::Deref for PinDir {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if !worker_common::privileges::is_root() {
        eprintln!("skipped: BPF_PROG_TEST_RUN needs root");
        return false;
    }
    true
}

/// Node 198.51.100.1 with a client container 10.18.0.2 (instance 10.30.0.3),
/// a local backend 10.18.0.3 (instance 10.30.0.4) and a remote backend
/// 10.18.0.130 (instance 10.30.0.5) on 198.51.100.2.
fn fixture(name: &str) -> Fixture {
    let pin_dir = PinDir(PathBuf::from(format!(
        "/sys/fs/bpf/oak-test-{}-{name}",
        std::process::id()
    )));
    let _ = std::fs::remove_dir_all(&*pin_dir);
    let cfg = DataplaneConfig {
        pin_dir: pin_dir.to_path_buf(),
        uplink: String::new(),
        node_ip: NODE,
        tunnel_port: 50103,
        tunnel_mtu: 1450,
        service_ranges: vec![(ip("10.30.0.0"), 16), (ip("fdff::"), 16)],
        sizes: MapSizes {
            flows: 1024,
            services: 256,
            backends: 1024,
            instances: 256,
            pending: 64,
        },
        miss_hold: 2,
    };
    let dp = Dataplane::open(&cfg).expect("loading the dataplane");
    let local = |ifindex, mac| Some(LocalPort { ifindex, mac });
    let entries = [
        ("10.18.0.2", "10.30.0.3", NODE, local(7, CLIENT_MAC)),
        ("10.18.0.3", "10.30.0.4", NODE, local(8, BACKEND_MAC)),
        ("10.18.0.130", "10.30.0.5", PEER_NODE, None),
        ("fc00::2", "fdff::3", NODE, local(7, CLIENT_MAC)),
        ("fc00::82", "fdff::5", PEER_NODE, None),
    ];
    for (ns, inst, node, local) in entries {
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
    }
    let services = [
        ("10.30.55.56", ServiceKind::RoundRobin, vec!["10.18.0.130"]),
        (
            "10.30.55.57",
            ServiceKind::Closest,
            vec!["10.18.0.3", "10.18.0.130"],
        ),
        ("10.30.0.4", ServiceKind::Instance, vec!["10.18.0.3"]),
        ("10.30.0.5", ServiceKind::Instance, vec!["10.18.0.130"]),
        (
            "fdff:2000::55:56",
            ServiceKind::RoundRobin,
            vec!["fc00::82"],
        ),
    ];
    for (svc, kind, backends) in services {
        let b: Vec<IpAddr> = backends.iter().map(|s| ip(s)).collect();
        dp.upsert_service(ip(svc), kind, &b).unwrap();
    }
    Fixture { dp, pin_dir }
}

/// Runs `program` on `frame`; returns the verdict and the output frame.
fn run(f: &Fixture, program: &str, frame: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; 4096];
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ..Default::default()
    };
    let r = f.dp.test_run(program, opts).expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

fn counter(f: &Fixture, name: &str) -> u64 {
    f.dp.status()
        .unwrap()
        .counters
        .iter()
        .find(|(n, _, _)| n == name)
        .map(|c| c.1)
        .unwrap()
}

fn key(src: &str, sport: u16, dst: &str, dport: u16, proto: u8) -> FlowKey {
    let a = |s: &str| match ip(s) {
        IpAddr::V4(v) => Addr::from_v4_octets(v.octets()),
        IpAddr::V6(v) => Addr { bytes: v.octets() },
    };
    FlowKey {
        src: a(src),
        dst: a(dst),
        src_port: sport.to_be(),
        dst_port: dport.to_be(),
        proto,
        _pad: [0; 3],
    }
}

/// The frame a remote-backend packet must leave as: the original Ethernet
/// header (the kernel fills MACs when it redirects), outer IPv4/UDP from our
/// tunnel port to the peer's, and the translated packet as the payload.
fn tunnelled(inner: &Ip) -> Vec<u8> {
    eth(
        GATEWAY_MAC,
        CLIENT_MAC,
        0x0800,
        &tunnel_datagram(NODE, PEER_NODE, 50103, 50103, &inner.bytes()),
    )
}

fn tcp_syn(sport: u16, dport: u16) -> L4 {
    L4::Tcp {
        sport,
        dport,
        flags: 0x02,
        payload: b"hello".to_vec(),
    }
}

#[test]
fn tcp_to_remote_backend_is_translated_and_tunnelled() {
    if !is_root() {
        return;
    }
    let f = fixture("remote-tcp");
    let sent = Ip::new("10.18.0.2", "10.30.55.56", tcp_syn(40000, 80));
    let (verdict, out) = run(&f, CONTAINER_PROGRAM, &from_container(&sent));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let mut inner = Ip::new("10.30.0.3", "10.18.0.130", tcp_syn(40000, 80));
    inner.ttl = 63;
    assert_eq!(out, tunnelled(&inner));
    assert_checksums(&out[14..]);
    assert_checksums(&out[14 + 28..]);

    let flow =
        f.dp.flow(&key("10.18.0.2", 40000, "10.30.55.56", 80, 6))
            .unwrap()
            .expect("flow cached");
    assert_eq!(flow.backend, Addr::from_v4_octets([10, 18, 0, 130]));
    assert_eq!(flow.src_instance, Addr::from_v4_octets([10, 30, 0, 3]));
    let rev =
        f.dp.reverse_flow(&key("10.30.0.5", 80, "10.18.0.2", 40000, 6))
            .unwrap()
            .expect("reverse flow");
    assert_eq!(rev.service, Addr::from_v4_octets([10, 30, 55, 56]));
    assert_eq!(counter(&f, "tunnelled"), 1);
}

#[test]
fn udp_to_closest_prefers_the_local_backend_without_encapsulation() {
    if !is_root() {
        return;
    }
    let f = fixture("local-udp");
    let l4 = L4::Udp {
        sport: 5353,
        dport: 53,
        payload: b"query".to_vec(),
    };
    let sent = Ip::new("10.18.0.2", "10.30.55.57", l4.clone());
    let (verdict, out) = run(&f, CONTAINER_PROGRAM, &from_container(&sent));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let mut inner = Ip::new("10.30.0.3", "10.18.0.3", l4);
    inner.ttl = 63;
    assert_eq!(out, eth(BACKEND_MAC, CLIENT_MAC, 0x0800, &inner.bytes()));
    assert_checksums(&out[14..]);
    assert_eq!(counter(&f, "local_delivered"), 1);
    assert_eq!(counter(&f, "tunnelled"), 0);
}

#[test]
fn reply_through_tunnel_is_reverse_translated_for_an_owned_flow() {
    if !is_root() {
        return;
    }
    let f = fixture("reverse");
    let sent = Ip::new("10.18.0.2", "10.30.55.56", tcp_syn(40000, 80));
    assert_eq!(
        run(&f, CONTAINER_PROGRAM, &from_container(&sent)).0,
        TC_ACT_REDIRECT
    );

    // The backend's node sends the SYN-ACK from the backend's instance address.
    let synack = L4::Tcp {
        sport: 80,
        dport: 40000,
        flags: 0x12,
        payload: vec![],
    };
    let reply = Ip::new("10.30.0.5", "10.18.0.2", synack.clone());
    let frame = eth(
        [0xaa; 6],
        [0xbb; 6],
        0x0800,
        &tunnel_datagram(PEER_NODE, NODE, 50103, 50103, &reply.bytes()),
    );
    let (verdict, out) = run(&f, UPLINK_PROGRAM, &frame);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let restored = Ip::new("10.30.55.56", "10.18.0.2", synack);
    assert_eq!(out, eth(CLIENT_MAC, [0xbb; 6], 0x0800, &restored.bytes()));
    assert_checksums(&out[14..]);
    assert_eq!(counter(&f, "reverse_translated"), 1);
}

#[test]
fn tunnel_packet_of_a_flow_started_elsewhere_is_delivered_unchanged() {
    if !is_root() {
        return;
    }
    let f = fixture("unowned");
    let pkt = Ip::new("10.30.0.5", "10.18.0.2", tcp_syn(5555, 80));
    let frame = eth(
        [0xaa; 6],
        [0xbb; 6],
        0x0800,
        &tunnel_datagram(PEER_NODE, NODE, 50103, 50103, &pkt.bytes()),
    );
    let (verdict, out) = run(&f, UPLINK_PROGRAM, &frame);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out, eth(CLIENT_MAC, [0xbb; 6], 0x0800, &pkt.bytes()));
    assert_eq!(counter(&f, "decapsulated"), 1);
}

#[test]
fn ipv6_udp_to_remote_backend_rides_an_ipv4_tunnel() {
    if !is_root() {
        return;
    }
    let f = fixture("v6-udp");
    let l4 = L4::Udp {
        sport: 6000,
        dport: 7000,
        payload: b"six".to_vec(),
    };
    let sent = Ip::new("fc00::2", "fdff:2000::55:56", l4.clone());
    let (verdict, out) = run(&f, CONTAINER_PROGRAM, &from_container(&sent));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let mut inner = Ip::new("fdff::3", "fc00::82", l4);
    inner.ttl = 63;
    assert_eq!(out, tunnelled(&inner));
    assert_checksums(&out[14 + 28..]);
}

#[test]
fn icmp_echo_v4_and_v6_are_translated() {
    if !is_root() {
        return;
    }
    let f = fixture("echo");
    let echo = L4::Echo {
        request: true,
        id: 0x77,
        seq: 1,
        payload: b"ping".to_vec(),
    };
    let sent = Ip::new("10.18.0.2", "10.30.55.56", echo.clone());
    let (verdict, out) = run(&f, CONTAINER_PROGRAM, &from_container(&sent));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let mut inner = Ip::new("10.30.0.3", "10.18.0.130", echo.clone());
    inner.ttl = 63;
    assert_eq!(out, tunnelled(&inner));

    let sent6 = Ip::new("fc00::2", "fdff:2000::55:56", echo.clone());
    let (verdict, out) = run(&f, CONTAINER_PROGRAM, &from_container(&sent6));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let mut inner6 = Ip::new("fdff::3", "fc00::82", echo);
    inner6.ttl = 63;
    assert_eq!(out, tunnelled(&inner6));
    assert_checksums(&out[14 + 28..]);

    // The echo reply comes back and is restored to the service address.
    let reply = L4::Echo {
        request: false,
        id: 0x77,
        seq: 1,
        payload: b"ping".to_vec(),
    };
    let back = Ip::new("10.30.0.5", "10.18.0.2", reply.clone());
    let frame = eth(
        [0xaa; 6],
        [0xbb; 6],
        0x0800,
        &tunnel_datagram(PEER_NODE, NODE, 50103, 50103, &back.bytes()),
    );
    let (verdict, out) = run(&f, UPLINK_PROGRAM, &frame);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(
        out,
        eth(
            CLIENT_MAC,
            [0xbb; 6],
            0x0800,
            &Ip::new("10.30.55.56", "10.18.0.2", reply).bytes()
        )
    );
}

#[tokio::test]
async fn unknown_service_is_held_reported_and_bounded() {
    if !is_root() {
        return;
    }
    let f = fixture("miss");
    let mut misses = f.dp.misses().unwrap();
    let frame = from_container(&Ip::new("10.18.0.2", "10.30.99.99", tcp_syn(40001, 80)));
    for _ in 0..3 {
        assert_eq!(run(&f, CONTAINER_PROGRAM, &frame).0, TC_ACT_SHOT);
    }
    // miss_hold is 2: two held and reported, the third dropped and counted.
    for _ in 0..2 {
        let m = tokio::time::timeout(std::time::Duration::from_secs(5), misses.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(m.reason, netmanager::dataplane::MissReason::Service);
        assert_eq!(m.addr, ip("10.30.99.99"));
        assert_eq!(m.frame.as_deref(), Some(&frame[..]));
    }
    assert_eq!(f.dp.pending(ip("10.30.99.99")).unwrap(), Some(2));
    assert_eq!(counter(&f, "miss_held"), 2);
    assert_eq!(counter(&f, "drop_miss_overflow"), 1);
    f.dp.resolved(ip("10.30.99.99")).unwrap();
    assert_eq!(f.dp.pending(ip("10.30.99.99")).unwrap(), None);
}

#[tokio::test]
async fn sender_without_known_instance_address_is_held() {
    if !is_root() {
        return;
    }
    let f = fixture("sender");
    f.dp.upsert_instance(
        ip("10.18.0.9"),
        InstanceEntry {
            instance_ip: None,
            node_ip: NODE,
            node_port: 50103,
            local: Some(LocalPort {
                ifindex: 9,
                mac: [2; 6],
            }),
        },
    )
    .unwrap();
    let mut misses = f.dp.misses().unwrap();
    let frame = from_container(&Ip::new("10.18.0.9", "10.30.55.56", tcp_syn(1, 80)));
    assert_eq!(run(&f, CONTAINER_PROGRAM, &frame).0, TC_ACT_SHOT);
    let m = tokio::time::timeout(std::time::Duration::from_secs(5), misses.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.reason, netmanager::dataplane::MissReason::Sender);
    assert_eq!(m.addr, ip("10.18.0.9"));
}

#[test]
fn malformed_fragmented_expiring_and_foreign_packets() {
    if !is_root() {
        return;
    }
    let f = fixture("hostile");
    // Not service traffic: passed untouched.
    let other = from_container(&Ip::new("10.18.0.2", "192.0.2.7", tcp_syn(1, 80)));
    assert_eq!(
        run(&f, CONTAINER_PROGRAM, &other),
        (TC_ACT_OK, other.clone())
    );
    // Truncated: the IP header claims more than the frame holds.
    let mut cut = from_container(&Ip::new("10.18.0.2", "10.30.55.56", tcp_syn(1, 80)));
    cut.truncate(14 + 20 + 4);
    assert_eq!(run(&f, CONTAINER_PROGRAM, &cut).0, TC_ACT_SHOT);
    assert_eq!(counter(&f, "drop_malformed"), 1);
    // Fragment (more-fragments set).
    let mut frag = Ip::new("10.18.0.2", "10.30.55.56", tcp_syn(1, 80));
    frag.frag = 0x2000;
    assert_eq!(
        run(&f, CONTAINER_PROGRAM, &from_container(&frag)).0,
        TC_ACT_SHOT
    );
    assert_eq!(counter(&f, "drop_fragment"), 1);
    // TTL 1 cannot be forwarded.
    let mut ttl = Ip::new("10.18.0.2", "10.30.55.56", tcp_syn(1, 80));
    ttl.ttl = 1;
    assert_eq!(
        run(&f, CONTAINER_PROGRAM, &from_container(&ttl)).0,
        TC_ACT_SHOT
    );
    assert_eq!(counter(&f, "drop_ttl"), 1);
    // Protocols other than TCP/UDP/ICMP echo to a service address (GRE).
    let gre = Ip::new(
        "10.18.0.2",
        "10.30.55.56",
        L4::Raw {
            proto: 47,
            bytes: vec![0; 8],
        },
    );
    assert_eq!(
        run(&f, CONTAINER_PROGRAM, &from_container(&gre)).0,
        TC_ACT_SHOT
    );
    assert_eq!(counter(&f, "drop_unsupported_proto"), 1);
    // A source that is no local container.
    let stranger = from_container(&Ip::new("10.18.0.50", "10.30.55.56", tcp_syn(1, 80)));
    assert_eq!(run(&f, CONTAINER_PROGRAM, &stranger).0, TC_ACT_SHOT);
    assert_eq!(counter(&f, "drop_not_local"), 1);
    // Uplink: ordinary traffic is untouched; a tunnel packet with a
    // non-instance inner source is dropped.
    let plain = eth(
        [0xaa; 6],
        [0xbb; 6],
        0x0800,
        &Ip::new("198.51.100.2", "198.51.100.1", tcp_syn(1, 22)).bytes(),
    );
    assert_eq!(run(&f, UPLINK_PROGRAM, &plain), (TC_ACT_OK, plain.clone()));
    let spoof = Ip::new("10.18.0.77", "10.18.0.2", tcp_syn(1, 80));
    let frame = eth(
        [0xaa; 6],
        [0xbb; 6],
        0x0800,
        &tunnel_datagram(PEER_NODE, NODE, 50103, 50103, &spoof.bytes()),
    );
    assert_eq!(run(&f, UPLINK_PROGRAM, &frame).0, TC_ACT_SHOT);
    assert_eq!(counter(&f, "drop_bad_inner_source"), 1);
    // A tunnel datagram too short to hold an IP packet.
    let runt = eth(
        [0xaa; 6],
        [0xbb; 6],
        0x0800,
        &tunnel_datagram(PEER_NODE, NODE, 50103, 50103, &[0x45, 0, 0]),
    );
    assert_ne!(run(&f, UPLINK_PROGRAM, &runt).0, TC_ACT_REDIRECT);
}

#[test]
fn ip_options_are_skipped_to_find_the_ports() {
    if !is_root() {
        return;
    }
    let f = fixture("options");
    let mut sent = Ip::new("10.18.0.2", "10.30.55.56", tcp_syn(40002, 80));
    sent.options = vec![1, 1, 1, 0]; // NOP NOP NOP EOL
    let (verdict, out) = run(&f, CONTAINER_PROGRAM, &from_container(&sent));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let mut inner = Ip::new("10.30.0.3", "10.18.0.130", tcp_syn(40002, 80));
    inner.options = vec![1, 1, 1, 0];
    inner.ttl = 63;
    assert_eq!(out, tunnelled(&inner));
}

#[test]
fn oversize_packets_get_path_mtu_feedback() {
    if !is_root() {
        return;
    }
    let f = fixture("pmtu");
    let big = L4::Udp {
        sport: 9000,
        dport: 9001,
        payload: vec![0x5a; 1500],
    };
    let sent = Ip::new("10.18.0.2", "10.30.55.56", big.clone());
    let frame = from_container(&sent);
    let (verdict, out) = run(&f, CONTAINER_PROGRAM, &frame);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    // ICMP fragmentation-needed from the dialled service address back to
    // the sender, quoting the start of the original packet, MTU 1450.
    assert_eq!(&out[..6], &CLIENT_MAC);
    let icmp = &out[14..];
    assert_eq!(icmp[9], 1);
    assert_eq!(&icmp[12..16], &[10, 30, 55, 56]);
    assert_eq!(&icmp[16..20], &[10, 18, 0, 2]);
    assert_eq!(&icmp[20..22], &[3, 4]);
    assert_eq!(u16::from_be_bytes([icmp[26], icmp[27]]), 1450);
    assert_eq!(&icmp[28..28 + 68], &frame[14..14 + 68]);
    assert_checksums(icmp);
    assert_eq!(counter(&f, "pmtu_sent"), 1);

    let sent6 = Ip::new("fc00::2", "fdff:2000::55:56", big);
    let frame6 = from_container(&sent6);
    let (verdict, out) = run(&f, CONTAINER_PROGRAM, &frame6);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let p = &out[14..];
    assert_eq!(p[6], 58);
    assert_eq!(p[40], 2);
    assert_eq!(u32::from_be_bytes([p[44], p[45], p[46], p[47]]), 1450);
    assert_eq!(&p[48..48 + 88], &frame6[14..14 + 88]);
    assert_checksums(p);

    // Without DF an IPv4 packet is dropped (and counted), not answered.
    let mut nodf = Ip::new(
        "10.18.0.2",
        "10.30.55.56",
        L4::Udp {
            sport: 1,
            dport: 2,
            payload: vec![0; 1500],
        },
    );
    nodf.frag = 0;
    assert_eq!(
        run(&f, CONTAINER_PROGRAM, &from_container(&nodf)).0,
        TC_ACT_SHOT
    );
    assert_eq!(counter(&f, "drop_too_big"), 1);
}

#[test]
fn round_robin_rotates_and_flows_stick_until_their_backend_goes() {
    if !is_root() {
        return;
    }
    let f = fixture("rr");
    f.dp.upsert_instance(
        ip("10.18.0.131"),
        InstanceEntry {
            instance_ip: Some(ip("10.30.0.6")),
            node_ip: PEER_NODE,
            node_port: 50103,
            local: None,
        },
    )
    .unwrap();
    let backends = [ip("10.18.0.130"), ip("10.18.0.131")];
    f.dp.upsert_service(ip("10.30.55.56"), ServiceKind::RoundRobin, &backends)
        .unwrap();
    let chosen = |sport: u16| {
        let out = run(
            &f,
            CONTAINER_PROGRAM,
            &from_container(&Ip::new("10.18.0.2", "10.30.55.56", tcp_syn(sport, 80))),
        )
        .1;
        let inner = &out[14 + 28..];
        [inner[16], inner[17], inner[18], inner[19]]
    };
    let a = chosen(1000);
    let b = chosen(1001);
    assert_ne!(a, b, "two new flows go to two backends");
    // The first flow sticks to its backend across a service update ...
    f.dp.upsert_service(
        ip("10.30.55.56"),
        ServiceKind::RoundRobin,
        &[ip("10.18.0.131"), ip("10.18.0.130")],
    )
    .unwrap();
    assert_eq!(chosen(1000), a);
    // ... until that backend disappears.
    let gone = IpAddr::from(a);
    let other = IpAddr::from(b);
    f.dp.upsert_service(ip("10.30.55.56"), ServiceKind::RoundRobin, &[other])
        .unwrap();
    f.dp.remove_instance(gone).unwrap();
    assert_eq!(chosen(1000), b);
}

#[test]
fn flow_expiry_removes_only_idle_flows() {
    if !is_root() {
        return;
    }
    let f = fixture("expiry");
    let sent = Ip::new("10.18.0.2", "10.30.55.56", tcp_syn(40000, 80));
    run(&f, CONTAINER_PROGRAM, &from_container(&sent));
    assert_eq!(f.dp.expire_flows().unwrap(), 0, "a fresh flow stays");
    assert!(
        f.dp.flow(&key("10.18.0.2", 40000, "10.30.55.56", 80, 6))
            .unwrap()
            .is_some()
    );
}

#[test]
fn pinned_maps_dump_with_typed_fields_in_bpftool() {
    if !is_root() {
        return;
    }
    let f = fixture("bpftool");
    let path = f.pin_dir.join(netmanager_common::maps::INSTANCES);
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&path)
        .output()
        .expect("bpftool is installed by `cargo xtask setup`");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // With BTF, bpftool adds a "formatted" view with the struct's field names.
    let entries = dump.as_array().unwrap();
    assert_eq!(entries.len(), 5);
    let formatted = &entries[0]["formatted"]["value"];
    for field in [
        "instance_ip",
        "node_ip",
        "node_port",
        "flags",
        "ifindex",
        "mac",
    ] {
        assert!(
            formatted.get(field).is_some(),
            "field {field} in {formatted}"
        );
    }
}

#[test]
fn ipv6_reply_through_tunnel_is_decapsulated_and_reverse_translated() {
    if !is_root() {
        return;
    }
    let f = fixture("v6-reverse");
    let out_l4 = L4::Udp {
        sport: 6000,
        dport: 7000,
        payload: b"six".to_vec(),
    };
    let sent = Ip::new("fc00::2", "fdff:2000::55:56", out_l4);
    assert_eq!(
        run(&f, CONTAINER_PROGRAM, &from_container(&sent)).0,
        TC_ACT_REDIRECT
    );
    // The reply: IPv6 inside the IPv4 tunnel, from the backend's instance address.
    let back_l4 = L4::Udp {
        sport: 7000,
        dport: 6000,
        payload: b"xis".to_vec(),
    };
    let reply = Ip::new("fdff::5", "fc00::2", back_l4.clone());
    let frame = eth(
        [0xaa; 6],
        [0xbb; 6],
        0x0800,
        &tunnel_datagram(PEER_NODE, NODE, 50103, 50103, &reply.bytes()),
    );
    let (verdict, out) = run(&f, UPLINK_PROGRAM, &frame);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let restored = Ip::new("fdff:2000::55:56", "fc00::2", back_l4);
    assert_eq!(out, eth(CLIENT_MAC, [0xbb; 6], 0x86dd, &restored.bytes()));
    assert_checksums(&out[14..]);
    assert_eq!(counter(&f, "reverse_translated"), 1);
}
