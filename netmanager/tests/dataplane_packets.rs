//! Packet fixtures: the real programs, loaded into the kernel with prepared
//! maps, run on crafted frames through BPF_PROG_TEST_RUN. Each test asserts
//! the verdict, the exact output bytes (checksums recomputed from scratch)
//! and the map state afterwards. Each test runs in a namespace of its own
//! with a known underlay ([`FibNetns`]): the programs ask the FIB where a
//! peer is, and BPF_PROG_TEST_RUN answers from the caller's namespace.
//! Needs root and bpffs.

mod packet_support;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::programs::TestRunOptions;
use netmanager::dataplane::{
    CONTAINER_PROGRAM, Dataplane, DataplaneConfig, InstanceEntry, LocalPort, MapSizes,
    SLOW_PATH_PROGRAM, ServiceKind, UPLINK_PROGRAM, UPLINK_XDP_PROGRAM, UplinkHook,
};
use netmanager_common::{Addr, FlowKey};
use packet_support::*;
use testkit::PinDir;

testkit::main! {
    tcp_to_remote_backend_is_translated_and_tunnelled: [Root, Bpffs],
    udp_to_closest_prefers_the_local_backend_without_encapsulation: [Root, Bpffs],
    reply_through_tunnel_is_reverse_translated_for_an_owned_flow: [Root, Bpffs],
    tunnel_packet_of_a_flow_started_elsewhere_is_delivered_unchanged: [Root, Bpffs],
    ipv6_udp_to_remote_backend_rides_an_ipv4_tunnel: [Root, Bpffs],
    icmp_echo_v4_and_v6_are_translated: [Root, Bpffs],
    unknown_service_is_held_reported_and_bounded: [Root, Bpffs],
    sender_without_known_instance_address_is_held: [Root, Bpffs],
    malformed_fragmented_expiring_and_foreign_packets: [Root, Bpffs],
    ip_options_are_skipped_to_find_the_ports: [Root, Bpffs],
    oversize_packets_get_path_mtu_feedback: [Root, Bpffs],
    round_robin_rotates_and_flows_stick_until_their_backend_goes: [Root, Bpffs],
    a_cached_flow_sees_every_instance_change_on_its_next_packet: [Root, Bpffs],
    flow_expiry_removes_only_idle_flows: [Root, Bpffs],
    pinned_maps_dump_with_typed_fields_in_bpftool: [Root, Bpffs, Bpftool],
    ipv6_reply_through_tunnel_is_decapsulated_and_reverse_translated: [Root, Bpffs],
    the_fib_picks_interface_next_hop_and_mtu_per_peer: [Root, Bpffs],
    a_route_change_reaches_the_cached_route: [Root, Bpffs],
    behind_nat_the_route_gives_the_source_and_every_node_address_receives: [Root, Bpffs],
    an_ipv6_underlay_carries_every_inner_kind_with_a_real_udp_checksum: [Root, Bpffs],
    ipv6_outer_datagrams_are_received_for_both_inner_families: [Root, Bpffs],
    a_gso_packet_for_an_ipv6_peer_is_never_sent_whole: [Root, Bpffs],
    the_slow_path_program_delivers_rebuilt_datagrams_and_never_passes: [Root, Bpffs],
    a_container_sending_with_its_neighbours_address_is_dropped: [Root, Bpffs],
    tunnel_datagrams_are_accepted_only_from_the_node_that_runs_the_inner_source: [Root, Bpffs],
    trusted_underlay_prefixes_send_for_any_instance: [Root, Bpffs],
    each_container_gets_its_share_of_the_flow_table_and_keeps_its_flows: [Root, Bpffs],
    a_full_miss_ring_leaves_no_pending_mark_and_the_underlay_gets_half_of_it: [Root, Bpffs],
    the_xdp_program_passes_accepted_held_and_foreign_frames_unchanged: [Root, Bpffs],
    the_xdp_program_drops_malformed_and_rejected_datagrams_that_tc_never_delivers: [Root, Bpffs],
    the_xdp_program_lets_trusted_prefixes_through: [Root, Bpffs],
    the_xdp_redirect_hook_delivers_what_tc_would_byte_for_byte: [Root, Bpffs],
    the_xdp_redirect_hook_leaves_to_tc_what_it_cannot_decide: [Root, Bpffs],
}

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

const NODE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const PEER_NODE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// This node's second address, on `under1`.
const NODE_2: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 129);
/// A peer reachable only through `under1`.
const PEER_2: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 130);
const NODE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const PEER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
const BACKEND_MAC: [u8; 6] = [0x02, 0, 0x0a, 0x12, 0, 0x03];
/// The loopback device, where BPF_PROG_TEST_RUN delivers test frames.
const CLIENT_IFINDEX: u32 = 1;

/// A dataplane with its own pin directory and namespace, removed on drop.
struct Fixture {
    dp: Dataplane,
    pin_dir: PinDir,
    /// Removed last, after the dataplane and its pins.
    _netns: FibNetns,
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Node 198.51.100.1 with a client container 10.18.0.2 (instance 10.30.0.3),
/// a local backend 10.18.0.3 (instance 10.30.0.4) and a remote backend
/// 10.18.0.130 (instance 10.30.0.5) on 198.51.100.2. The client's veth is
/// the loopback device (ifindex 1): BPF_PROG_TEST_RUN runs the programs on
/// it, so that is where the client's frames arrive.
fn fixture(name: &str) -> Fixture {
    fixture_with(name, IpAddr::V4(NODE), |_| {})
}

/// The same node advertising `advertised` (behind NAT: an address it lacks).
fn fixture_advertising(name: &str, advertised: IpAddr) -> Fixture {
    fixture_with(name, advertised, |_| {})
}

/// [`fixture_advertising`] with the configuration adjusted by `tune` first.
fn fixture_with(
    name: &str,
    advertised: IpAddr,
    tune: impl FnOnce(&mut DataplaneConfig),
) -> Fixture {
    let netns = FibNetns::enter(name);
    let pin_dir = PinDir::new(&format!("test-{name}-"));
    let cfg = DataplaneConfig {
        pin_dir: pin_dir.to_path_buf(),
        uplink: String::new(),
        node_ip: advertised,
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
        attach_mode: netmanager::dataplane::AttachMode::Auto,
        uplink_hook: Default::default(),
        xdp_mode: Default::default(),
        container_bridge: String::new(),
        trusted_peers: Vec::new(),
        flows_per_container: 0,
    };
    let mut cfg = cfg;
    tune(&mut cfg);
    let dp = Dataplane::open(&cfg).expect("loading the dataplane");
    // What the address watch would find in this namespace.
    dp.set_node_addresses(&[
        (IpAddr::V4(NODE), netns.ifindex("under0")),
        (IpAddr::V4(NODE_2), netns.ifindex("under1")),
        (IpAddr::V6(NODE_V6), netns.ifindex("under0")),
    ])
    .unwrap();
    let local = |ifindex, mac| Some(LocalPort { ifindex, mac });
    let entries = [
        (
            "10.18.0.2",
            "10.30.0.3",
            NODE,
            local(CLIENT_IFINDEX, CLIENT_MAC),
        ),
        ("10.18.0.3", "10.30.0.4", NODE, local(8, BACKEND_MAC)),
        ("10.18.0.130", "10.30.0.5", PEER_NODE, None),
        (
            "fc00::2",
            "fdff::3",
            NODE,
            local(CLIENT_IFINDEX, CLIENT_MAC),
        ),
        ("fc00::82", "fdff::5", PEER_NODE, None),
    ];
    for (ns, inst, node, local) in entries {
        dp.upsert_instance(
            ip(ns),
            InstanceEntry {
                instance_ip: Some(ip(inst)),
                node_ip: IpAddr::V4(node),
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
    Fixture {
        dp,
        pin_dir,
        _netns: netns,
    }
}

/// More remote backends, one per way the FIB can answer: on an IPv6
/// underlay (2001:db8::2), only through `under1` (198.51.100.130), without
/// a known neighbour (198.51.100.3), blackholed (198.51.100.77), behind a
/// route with MTU 1400 (198.51.100.99). Service 10.30.56.N (and
/// fdff:2000::56:N for IPv6) reaches the backend 10.18.1.N (fc00::1:N).
fn add_peers(f: &Fixture) {
    let peers: [(u8, IpAddr); 5] = [
        (1, IpAddr::V6(PEER_V6)),
        (2, IpAddr::V4(PEER_2)),
        (3, ip("198.51.100.3")),
        (4, ip("198.51.100.77")),
        (5, ip("198.51.100.99")),
    ];
    for (n, node) in peers {
        for (ns, inst, svc) in [
            (
                format!("10.18.1.{n}"),
                format!("10.30.0.{}", 100 + n),
                format!("10.30.56.{n}"),
            ),
            (
                format!("fc00::1:{n}"),
                format!("fdff::1:{n}"),
                format!("fdff:2000::56:{n}"),
            ),
        ] {
            f.dp.upsert_instance(
                ip(&ns),
                InstanceEntry {
                    instance_ip: Some(ip(&inst)),
                    node_ip: node,
                    node_port: 50103,
                    local: None,
                },
            )
            .unwrap();
            f.dp.upsert_service(ip(&svc), ServiceKind::RoundRobin, &[ip(&ns)])
                .unwrap();
        }
    }
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

/// The frame a remote-backend packet must leave as: the MACs the FIB found
/// (the peer's, and `under0`'s), outer IPv4/UDP from our tunnel port to the
/// peer's, and the translated packet as the payload.
fn tunnelled(inner: &Ip) -> Vec<u8> {
    eth(
        PEER_MAC,
        UNDER0_MAC,
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

fn tcp_to_remote_backend_is_translated_and_tunnelled() {
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

fn udp_to_closest_prefers_the_local_backend_without_encapsulation() {
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

fn reply_through_tunnel_is_reverse_translated_for_an_owned_flow() {
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

fn tunnel_packet_of_a_flow_started_elsewhere_is_delivered_unchanged() {
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

fn ipv6_udp_to_remote_backend_rides_an_ipv4_tunnel() {
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

fn icmp_echo_v4_and_v6_are_translated() {
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

fn unknown_service_is_held_reported_and_bounded() {
    testkit::block_on(async {
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
    })
}

fn sender_without_known_instance_address_is_held() {
    testkit::block_on(async {
        let f = fixture("sender");
        f.dp.upsert_instance(
            ip("10.18.0.9"),
            InstanceEntry {
                instance_ip: None,
                node_ip: IpAddr::V4(NODE),
                node_port: 50103,
                local: Some(LocalPort {
                    ifindex: CLIENT_IFINDEX,
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
    })
}

fn malformed_fragmented_expiring_and_foreign_packets() {
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

fn ip_options_are_skipped_to_find_the_ports() {
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

fn oversize_packets_get_path_mtu_feedback() {
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

fn round_robin_rotates_and_flows_stick_until_their_backend_goes() {
    let f = fixture("rr");
    f.dp.upsert_instance(
        ip("10.18.0.131"),
        InstanceEntry {
            instance_ip: Some(ip("10.30.0.6")),
            node_ip: IpAddr::V4(PEER_NODE),
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

/// A flow's entry carries copies of its sender's and backend's INSTANCES
/// entries, so a packet of it looks neither up; every change NetManager
/// makes to INSTANCES must still reach the very next packet of the flow:
/// the backend moving to another node, the sender moving to another veth,
/// the backend and the sender vanishing.
fn a_cached_flow_sees_every_instance_change_on_its_next_packet() {
    let f = fixture("epoch");
    let client =
        |sport: u16| from_container(&Ip::new("10.18.0.2", "10.30.55.56", tcp_syn(sport, 80)));
    let inner = translated("10.30.0.3", "10.18.0.130", tcp_syn(40000, 80));
    let to_peer = tunnelled(&inner);
    let flow = || {
        f.dp.flow(&key("10.18.0.2", 40000, "10.30.55.56", 80, 6))
            .unwrap()
            .expect("flow cached")
    };
    // Opened, then one packet from the copies.
    for _ in 0..2 {
        assert_eq!(
            run(&f, CONTAINER_PROGRAM, &client(40000)),
            (TC_ACT_REDIRECT, to_peer.clone())
        );
    }
    let opened = flow();
    assert_ne!(opened.epoch, 0);
    assert_eq!(opened.sender_ifindex, CLIENT_IFINDEX);
    assert_eq!(
        opened.target.node_ip,
        Addr::from_v4_octets(PEER_NODE.octets())
    );

    // The backend's node changes address: the next packet goes there.
    let moved_to = ip4("198.51.100.3");
    let backend_on = |node: Ipv4Addr| {
        f.dp.upsert_instance(
            ip("10.18.0.130"),
            InstanceEntry {
                instance_ip: Some(ip("10.30.0.5")),
                node_ip: IpAddr::V4(node),
                node_port: 50103,
                local: None,
            },
        )
        .unwrap()
    };
    backend_on(moved_to);
    let datagram = tunnel_datagram(NODE, moved_to, 50103, 50103, &inner.bytes());
    assert_eq!(
        run(&f, CONTAINER_PROGRAM, &client(40000)),
        (TC_ACT_REDIRECT, via(GATEWAY_MAC, CLIENT_MAC, &datagram))
    );
    let moved = flow();
    assert_ne!(moved.epoch, opened.epoch);
    assert_eq!(
        moved.target.node_ip,
        Addr::from_v4_octets(moved_to.octets())
    );
    assert_eq!(moved.backend, opened.backend, "the same backend");
    // Rewriting an entry unchanged starts no epoch.
    backend_on(moved_to);
    assert_eq!(flow().epoch, moved.epoch);
    backend_on(PEER_NODE);
    assert_eq!(run(&f, CONTAINER_PROGRAM, &client(40000)).1, to_peer);

    // The client's address now belongs to another veth: its flow no longer
    // lets this one send as it.
    let client_on = |ifindex: u32| {
        f.dp.upsert_instance(
            ip("10.18.0.2"),
            InstanceEntry {
                instance_ip: Some(ip("10.30.0.3")),
                node_ip: IpAddr::V4(NODE),
                node_port: 50103,
                local: Some(LocalPort {
                    ifindex,
                    mac: CLIENT_MAC,
                }),
            },
        )
        .unwrap()
    };
    client_on(9);
    let sent = client(40000);
    assert_eq!(
        run(&f, CONTAINER_PROGRAM, &sent),
        (TC_ACT_SHOT, sent.clone())
    );
    assert_eq!(counter(&f, "drop_spoofed_source"), 1);
    client_on(CLIENT_IFINDEX);
    assert_eq!(
        run(&f, CONTAINER_PROGRAM, &client(40000)).0,
        TC_ACT_REDIRECT
    );

    // The backend vanishes: the next packet picks the service's other
    // backend (here, delivered locally).
    f.dp.upsert_service(
        ip("10.30.55.56"),
        ServiceKind::RoundRobin,
        &[ip("10.18.0.3")],
    )
    .unwrap();
    f.dp.remove_instance(ip("10.18.0.130")).unwrap();
    let local = translated("10.30.0.3", "10.18.0.3", tcp_syn(40000, 80));
    assert_eq!(
        run(&f, CONTAINER_PROGRAM, &client(40000)),
        (
            TC_ACT_REDIRECT,
            eth(BACKEND_MAC, CLIENT_MAC, 0x0800, &local.bytes())
        )
    );
    assert_eq!(flow().backend, Addr::from_v4_octets([10, 18, 0, 3]));
    assert_eq!(counter(&f, "local_delivered"), 1);

    // The sender vanishes: its cached flow sends nothing more.
    f.dp.remove_instance(ip("10.18.0.2")).unwrap();
    let sent = client(40000);
    assert_eq!(
        run(&f, CONTAINER_PROGRAM, &sent),
        (TC_ACT_SHOT, sent.clone())
    );
    assert_eq!(counter(&f, "drop_not_local"), 1);
}

fn flow_expiry_removes_only_idle_flows() {
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

fn pinned_maps_dump_with_typed_fields_in_bpftool() {
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

fn ipv6_reply_through_tunnel_is_decapsulated_and_reverse_translated() {
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

/// The outer frame the FIB leads to: its MACs, then the tunnel datagram.
fn via(dst_mac: [u8; 6], src_mac: [u8; 6], datagram: &[u8]) -> Vec<u8> {
    let et = if datagram[0] >> 4 == 6 {
        0x86dd
    } else {
        0x0800
    };
    eth(dst_mac, src_mac, et, datagram)
}

/// `sent` after the sending node's translation (TTL 63).
fn translated(src: &str, dst: &str, l4: L4) -> Ip {
    let mut p = Ip::new(src, dst, l4);
    p.ttl = 63;
    p
}

fn the_fib_picks_interface_next_hop_and_mtu_per_peer() {
    let f = fixture("fib");
    add_peers(&f);
    // Reachable only through under1: its MAC and the neighbour's there. The
    // source stays the advertised address, which this node owns.
    let sent = Ip::new("10.18.0.2", "10.30.56.2", tcp_syn(40000, 80));
    let (verdict, out) = run(&f, CONTAINER_PROGRAM, &from_container(&sent));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let inner = translated("10.30.0.3", "10.18.1.2", tcp_syn(40000, 80));
    let datagram = tunnel_datagram(NODE, PEER_2, 50103, 50103, &inner.bytes());
    assert_eq!(out, via(PEER2_MAC, UNDER1_MAC, &datagram));

    // No neighbour entry yet: the Ethernet header is left for the kernel's
    // neighbour resolution on the interface the FIB chose.
    let sent = Ip::new("10.18.0.2", "10.30.56.3", tcp_syn(40001, 80));
    let (verdict, out) = run(&f, CONTAINER_PROGRAM, &from_container(&sent));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let inner = translated("10.30.0.3", "10.18.1.3", tcp_syn(40001, 80));
    let datagram = tunnel_datagram(NODE, ip4("198.51.100.3"), 50103, 50103, &inner.bytes());
    assert_eq!(out, via(GATEWAY_MAC, CLIENT_MAC, &datagram));
    assert_eq!(counter(&f, "tunnelled"), 2);

    // No route at all: dropped and counted, the packet untouched.
    let sent = from_container(&Ip::new("10.18.0.2", "10.30.56.4", tcp_syn(40002, 80)));
    assert_eq!(
        run(&f, CONTAINER_PROGRAM, &sent),
        (TC_ACT_SHOT, sent.clone())
    );
    assert_eq!(counter(&f, "drop_no_route"), 1);

    // The route's MTU (1400) leaves 1372 for the inner packet: a 1420-byte
    // packet gets fragmentation-needed with that, not the tunnel's 1450.
    let big = L4::Udp {
        sport: 9000,
        dport: 9001,
        payload: vec![0x5a; 1420 - 28],
    };
    let sent = from_container(&Ip::new("10.18.0.2", "10.30.56.5", big));
    let (verdict, out) = run(&f, CONTAINER_PROGRAM, &sent);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let icmp = &out[14..];
    assert_eq!(&icmp[20..22], &[3, 4]);
    assert_eq!(u16::from_be_bytes([icmp[26], icmp[27]]), 1400 - 28);
    assert_eq!(&icmp[12..16], &[10, 30, 56, 5]);
    assert_checksums(icmp);
    assert_eq!(counter(&f, "pmtu_sent"), 1);
}

/// The programs cache the FIB's answer per peer (ROUTE_CACHE): a changed
/// route must still reach the packets -- at once when NetManager starts a
/// new ROUTE_EPOCH (on every CONFIG write and route, rule, neighbour or
/// link event), and within the cache's 20 ms bound without one.
fn a_route_change_reaches_the_cached_route() {
    let f = fixture("rcache");
    add_peers(&f);
    let epoch = || {
        let path = f.pin_dir.join(netmanager_common::maps::ROUTE_EPOCH);
        let map = aya::maps::MapData::from_pin(&path).expect("ROUTE_EPOCH pinned");
        let a: aya::maps::Array<_, u32> =
            aya::maps::Array::try_from(aya::maps::Map::Array(map)).expect("an array");
        a.get(&0, 0).expect("slot 0")
    };
    let send = |sport: u16| {
        let sent = Ip::new("10.18.0.2", "10.30.56.2", tcp_syn(sport, 80));
        run(&f, CONTAINER_PROGRAM, &from_container(&sent))
    };
    // Cached: through under1, to the peer's MAC there.
    let (verdict, out) = send(40000);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let inner = translated("10.30.0.3", "10.18.1.2", tcp_syn(40000, 80));
    let datagram = tunnel_datagram(NODE, PEER_2, 50103, 50103, &inner.bytes());
    assert_eq!(out, via(PEER2_MAC, UNDER1_MAC, &datagram));

    // The peer is blackholed: the cached route would still send to it.
    f._netns
        .ns
        .add_route(&testkit::Route::blackhole(&format!("{PEER_2}/32")).unwrap())
        .expect("blackhole route")
        .keep();
    // Without an event, within the cache's bound (20 ms).
    std::thread::sleep(std::time::Duration::from_millis(50));
    let (verdict, _) = send(40001);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(counter(&f, "drop_no_route"), 1);

    // A CONFIG write starts a new epoch (the route watch does the same on
    // every rtnetlink route, rule, neighbour and link event).
    let before = epoch();
    f.dp.set_node_addresses(&[
        (IpAddr::V4(NODE), f._netns.ifindex("under0")),
        (IpAddr::V4(NODE_2), f._netns.ifindex("under1")),
        (IpAddr::V6(NODE_V6), f._netns.ifindex("under0")),
    ])
    .unwrap();
    assert_ne!(epoch(), before);
}

fn ip4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn behind_nat_the_route_gives_the_source_and_every_node_address_receives() {
    // The node advertises its NAT router's public address, which it lacks.
    let f = fixture_advertising("nat", ip("198.51.100.250"));
    add_peers(&f);
    for (svc, backend, peer, macs, src) in [
        (
            "10.30.55.56",
            "10.18.0.130",
            PEER_NODE,
            (PEER_MAC, UNDER0_MAC),
            NODE,
        ),
        (
            "10.30.56.2",
            "10.18.1.2",
            PEER_2,
            (PEER2_MAC, UNDER1_MAC),
            NODE_2,
        ),
    ] {
        let sent = Ip::new("10.18.0.2", svc, tcp_syn(40000, 80));
        let (verdict, out) = run(&f, CONTAINER_PROGRAM, &from_container(&sent));
        assert_eq!(verdict, TC_ACT_REDIRECT, "to {svc}");
        let inner = translated("10.30.0.3", backend, tcp_syn(40000, 80));
        let datagram = tunnel_datagram(src, peer, 50103, 50103, &inner.bytes());
        assert_eq!(out, via(macs.0, macs.1, &datagram), "to {svc}");
    }

    // Received on the address DNAT leads to (not the advertised one), from
    // an ephemeral source port: ours.
    let pkt = Ip::new("10.30.0.5", "10.18.0.2", tcp_syn(5555, 80));
    for to in [NODE, NODE_2] {
        let frame = eth(
            [0xaa; 6],
            [0xbb; 6],
            0x0800,
            &tunnel_datagram(PEER_NODE, to, 41234, 50103, &pkt.bytes()),
        );
        let (verdict, out) = run(&f, UPLINK_PROGRAM, &frame);
        assert_eq!(verdict, TC_ACT_REDIRECT, "to {to}");
        assert_eq!(out, eth(CLIENT_MAC, [0xbb; 6], 0x0800, &pkt.bytes()));
    }
    // To an address that is not this node's: not ours, untouched.
    let frame = eth(
        [0xaa; 6],
        [0xbb; 6],
        0x0800,
        &tunnel_datagram(PEER_NODE, ip4("198.51.100.200"), 50103, 50103, &pkt.bytes()),
    );
    assert_eq!(run(&f, UPLINK_PROGRAM, &frame), (TC_ACT_OK, frame.clone()));
    assert_eq!(counter(&f, "decapsulated"), 2);
}

fn an_ipv6_underlay_carries_every_inner_kind_with_a_real_udp_checksum() {
    let f = fixture("v6-outer");
    add_peers(&f);
    // An inner IPv4 UDP datagram without checksum (allowed over IPv4): the
    // outer checksum has to cover its bytes; 601 of them, an odd count
    // over several chunks.
    let mut no_csum = vec![0x13, 0x88, 0x13, 0x89];
    no_csum.extend_from_slice(&((8 + 601) as u16).to_be_bytes());
    no_csum.extend_from_slice(&[0, 0]);
    no_csum.extend((0..601).map(|i| (i * 7) as u8));
    let no_csum = L4::Raw {
        proto: 17,
        bytes: no_csum,
    };
    let echo = |v6| L4::Echo {
        request: true,
        id: if v6 { 0x66 } else { 0x44 },
        seq: 1,
        payload: b"ping over v6".to_vec(),
    };
    let cases = [
        (
            "10.18.0.2",
            "10.30.56.1",
            "10.30.0.3",
            "10.18.1.1",
            tcp_syn(40000, 80),
        ),
        (
            "fc00::2",
            "fdff:2000::56:1",
            "fdff::3",
            "fc00::1:1",
            L4::Udp {
                sport: 6000,
                dport: 7000,
                payload: vec![0xab; 999],
            },
        ),
        (
            "10.18.0.2",
            "10.30.56.1",
            "10.30.0.3",
            "10.18.1.1",
            echo(false),
        ),
        (
            "fc00::2",
            "fdff:2000::56:1",
            "fdff::3",
            "fc00::1:1",
            echo(true),
        ),
        ("10.18.0.2", "10.30.56.1", "10.30.0.3", "10.18.1.1", no_csum),
    ];
    for (src, svc, inst, backend, l4) in cases {
        let sent = Ip::new(src, svc, l4.clone());
        let (verdict, out) = run(&f, CONTAINER_PROGRAM, &from_container(&sent));
        assert_eq!(verdict, TC_ACT_REDIRECT, "{src} -> {svc} {l4:?}");
        let inner = translated(inst, backend, l4);
        // The node advertises IPv4; towards an IPv6 peer it sends from the
        // address the route gives.
        let datagram = tunnel_datagram_v6(NODE_V6, PEER_V6, 50103, 50103, &inner.bytes());
        assert_eq!(out, via(PEER_MAC, UNDER0_MAC, &datagram), "{src} -> {svc}");
        let udp = &out[14 + 40..14 + 48];
        assert_ne!(&udp[6..8], &[0, 0], "a real checksum");
        assert_checksums(&out[14..]);
    }
    assert_eq!(counter(&f, "tunnelled"), 5);
}

fn ipv6_outer_datagrams_are_received_for_both_inner_families() {
    let f = fixture("v6-in");
    // The senders are instances of the node on the IPv6 underlay: only its
    // datagrams are accepted for them.
    add_peers(&f);
    let udp = |sport, dport| L4::Udp {
        sport,
        dport,
        payload: b"from a v6 underlay".to_vec(),
    };
    for (src, dst, et) in [
        ("10.30.0.101", "10.18.0.2", 0x0800u16),
        ("fdff::1:1", "fc00::2", 0x86dd),
    ] {
        let pkt = Ip::new(src, dst, udp(7000, 6000));
        let frame = eth(
            [0xaa; 6],
            [0xbb; 6],
            0x86dd,
            &tunnel_datagram_v6(PEER_V6, NODE_V6, 40000, 50103, &pkt.bytes()),
        );
        let (verdict, out) = run(&f, UPLINK_PROGRAM, &frame);
        assert_eq!(verdict, TC_ACT_REDIRECT, "{src} -> {dst}");
        assert_eq!(out, eth(CLIENT_MAC, [0xbb; 6], et, &pkt.bytes()));
        assert_checksums(&out[14..]);
    }
    // To an IPv6 address that is not this node's: untouched.
    let pkt = Ip::new("10.30.0.5", "10.18.0.2", udp(7000, 6000));
    let other: Ipv6Addr = "2001:db8::99".parse().unwrap();
    let frame = eth(
        [0xaa; 6],
        [0xbb; 6],
        0x86dd,
        &tunnel_datagram_v6(PEER_V6, other, 40000, 50103, &pkt.bytes()),
    );
    assert_eq!(run(&f, UPLINK_PROGRAM, &frame), (TC_ACT_OK, frame.clone()));
    assert_eq!(counter(&f, "decapsulated"), 2);
}

fn a_gso_packet_for_an_ipv6_peer_is_never_sent_whole() {
    let f = fixture("v6-gso");
    add_peers(&f);
    // As if the container's stack had handed over a TCP super-packet: the
    // context (struct __sk_buff of include/uapi/linux/bpf.h, 192 bytes)
    // with gso_segs (offset 164) and gso_size (offset 176) set, the fields
    // BPF_PROG_TEST_RUN takes from it.
    let mut ctx = [0u8; 192];
    ctx[164..168].copy_from_slice(&2u32.to_ne_bytes());
    ctx[176..180].copy_from_slice(&1400u32.to_ne_bytes());
    let ctx_bytes = &ctx[..];
    let sent = from_container(&Ip::new("10.18.0.2", "10.30.56.1", tcp_syn(40000, 80)));
    let mut out = vec![0u8; 4096];
    let r =
        f.dp.test_run(
            CONTAINER_PROGRAM,
            TestRunOptions {
                data_in: Some(&sent),
                data_out: Some(&mut out),
                ctx_in: Some(ctx_bytes),
                ..Default::default()
            },
        )
        .expect("BPF_PROG_TEST_RUN");
    // Without a device to segment through (no uplink here), it cannot leave
    // with correct checksums: dropped and counted, never sent whole.
    assert_eq!(r.return_value, TC_ACT_SHOT);
    assert_eq!(counter(&f, "drop_encap"), 1);
    assert_eq!(counter(&f, "tunnelled"), 0);
}

fn the_slow_path_program_delivers_rebuilt_datagrams_and_never_passes() {
    let f = fixture("slow");
    // What NetManager writes back for a reassembled datagram: a plain outer
    // header from the peer's (ephemeral) port to ours, checksum zero.
    let pkt = Ip::new("10.30.0.5", "10.18.0.2", tcp_syn(5555, 80));
    let frame = eth(
        [0xaa; 6],
        [0xbb; 6],
        0x0800,
        &tunnel_datagram(PEER_NODE, NODE, 38211, 50103, &pkt.bytes()),
    );
    let (verdict, out) = run(&f, SLOW_PATH_PROGRAM, &frame);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out, eth(CLIENT_MAC, [0xbb; 6], 0x0800, &pkt.bytes()));
    // Anything it cannot deliver is dropped: passed on, the stack would
    // hand it to the slow-path socket again.
    let plain = eth(
        [0xaa; 6],
        [0xbb; 6],
        0x0800,
        &Ip::new("198.51.100.2", "198.51.100.1", tcp_syn(1, 22)).bytes(),
    );
    assert_eq!(run(&f, SLOW_PATH_PROGRAM, &plain).0, TC_ACT_SHOT);
    let elsewhere = eth(
        [0xaa; 6],
        [0xbb; 6],
        0x0800,
        &tunnel_datagram(PEER_NODE, ip4("198.51.100.200"), 1, 50103, &pkt.bytes()),
    );
    assert_eq!(run(&f, SLOW_PATH_PROGRAM, &elsewhere).0, TC_ACT_SHOT);
    assert_eq!(counter(&f, "decapsulated"), 1);
    assert_eq!(counter(&f, "drop_malformed"), 2);
}

/// A tunnel datagram from `sender` carrying `inner`.
fn from_underlay(sender: &str, inner: &Ip) -> Vec<u8> {
    let sender: Ipv4Addr = sender.parse().unwrap();
    eth(
        [0xaa; 6],
        [0xbb; 6],
        0x0800,
        &tunnel_datagram(sender, NODE, 50103, 50103, &inner.bytes()),
    )
}

fn udp(sport: u16, dport: u16) -> L4 {
    L4::Udp {
        sport,
        dport,
        payload: b"x".to_vec(),
    }
}

fn a_container_sending_with_its_neighbours_address_is_dropped() {
    let f = fixture("spoof");
    // 10.18.0.3 is the local backend, whose veth is ifindex 8; this frame
    // arrives on the client's (1).
    let spoofed = Ip::new("10.18.0.3", "10.30.55.56", tcp_syn(40000, 80));
    assert_eq!(
        run(&f, CONTAINER_PROGRAM, &from_container(&spoofed)).0,
        TC_ACT_SHOT
    );
    assert_eq!(counter(&f, "drop_spoofed_source"), 1);
    assert!(
        f.dp.flow(&key("10.18.0.3", 40000, "10.30.55.56", 80, 6))
            .unwrap()
            .is_none(),
        "no flow for the spoofer"
    );
    // The client as itself still gets through.
    let own = Ip::new("10.18.0.2", "10.30.55.56", tcp_syn(40000, 80));
    assert_eq!(
        run(&f, CONTAINER_PROGRAM, &from_container(&own)).0,
        TC_ACT_REDIRECT
    );
}

fn tunnel_datagrams_are_accepted_only_from_the_node_that_runs_the_inner_source() {
    testkit::block_on(async {
        let f = fixture("peers");
        let mut misses = f.dp.misses().unwrap();
        // 10.30.0.5 runs on 198.51.100.2: accepted from there, v4 and v6.
        let good = Ip::new("10.30.0.5", "10.18.0.2", udp(7000, 9000));
        assert_eq!(
            run(&f, UPLINK_PROGRAM, &from_underlay("198.51.100.2", &good)).0,
            TC_ACT_REDIRECT
        );
        let good6 = Ip::new("fdff::5", "fc00::2", udp(7000, 9000));
        assert_eq!(
            run(&f, UPLINK_PROGRAM, &from_underlay("198.51.100.2", &good6)).0,
            TC_ACT_REDIRECT
        );
        assert_eq!(counter(&f, "decapsulated"), 2);
        // The same from a host the tables do not name, when it is not for a
        // container here, or an instance of this node arriving from outside
        // (even for a container here): forged.
        let elsewhere = Ip::new("10.30.0.5", "10.18.0.200", udp(7000, 9000));
        let elsewhere6 = Ip::new("fdff::5", "fc00::200", udp(7000, 9000));
        for (sender, inner) in [
            ("198.51.100.3", &elsewhere),
            ("198.51.100.3", &elsewhere6),
            (
                "198.51.100.2",
                &Ip::new("10.30.0.3", "10.18.0.2", udp(1, 2)),
            ),
        ] {
            assert_eq!(
                run(&f, UPLINK_PROGRAM, &from_underlay(sender, inner)),
                (TC_ACT_SHOT, from_underlay(sender, inner)),
                "{sender} -> {inner:?}"
            );
        }
        assert_eq!(counter(&f, "drop_forged_source"), 3);
        // The same check on every way in: to the node's second address, over
        // the IPv6 underlay, and through the slow path (a datagram the kernel
        // reassembled, written back from the socket's addresses).
        let to_second = eth(
            [0xaa; 6],
            [0xbb; 6],
            0x0800,
            &tunnel_datagram(
                ip4("198.51.100.3"),
                NODE_2,
                50103,
                50103,
                &elsewhere.bytes(),
            ),
        );
        let over_v6 = eth(
            [0xaa; 6],
            [0xbb; 6],
            0x86dd,
            &tunnel_datagram_v6(
                "2001:db8::3".parse().unwrap(),
                NODE_V6,
                50103,
                50103,
                &elsewhere.bytes(),
            ),
        );
        let slow = eth(
            [0xaa; 6],
            [0xbb; 6],
            0x0800,
            &tunnel_datagram(ip4("198.51.100.3"), NODE, 38211, 50103, &elsewhere.bytes()),
        );
        for (program, frame) in [
            (UPLINK_PROGRAM, &to_second),
            (UPLINK_PROGRAM, &over_v6),
            (SLOW_PATH_PROGRAM, &slow),
        ] {
            assert_eq!(run(&f, program, frame).0, TC_ACT_SHOT, "{program}");
        }
        assert_eq!(counter(&f, "drop_forged_source"), 6);
        let from_node_slow = eth(
            [0xaa; 6],
            [0xbb; 6],
            0x0800,
            &tunnel_datagram(PEER_NODE, NODE, 38211, 50103, &good.bytes()),
        );
        assert_eq!(
            run(&f, SLOW_PATH_PROGRAM, &from_node_slow).0,
            TC_ACT_REDIRECT
        );
        assert_eq!(counter(&f, "decapsulated"), 3);

        // An instance nobody here knows, for a local container: held whole
        // (outer headers included) and reported with its sender, at most
        // miss_hold times.
        let unknown = from_underlay(
            "198.51.100.3",
            &Ip::new("10.30.0.77", "10.18.0.2", udp(1, 2)),
        );
        for _ in 0..3 {
            assert_eq!(run(&f, UPLINK_PROGRAM, &unknown).0, TC_ACT_SHOT);
        }
        for _ in 0..2 {
            let m = tokio::time::timeout(std::time::Duration::from_secs(5), misses.recv())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(m.reason, netmanager::dataplane::MissReason::Peer);
            assert_eq!(m.addr, ip("10.30.0.77"));
            assert_eq!(m.peer, Some(ip("198.51.100.3")));
            assert_eq!(m.frame.as_deref(), Some(&unknown[..]));
        }
        assert_eq!(counter(&f, "peer_held"), 2);
        assert_eq!(counter(&f, "drop_miss_overflow"), 1);
        assert_eq!(f.dp.pending(ip("10.30.0.77")).unwrap(), Some(2));
        // Not for a container here: not worth a question to the cluster.
        let elsewhere = from_underlay(
            "198.51.100.3",
            &Ip::new("10.30.0.78", "10.18.0.200", udp(1, 2)),
        );
        assert_eq!(run(&f, UPLINK_PROGRAM, &elsewhere).0, TC_ACT_SHOT);
        assert_eq!(counter(&f, "drop_not_local"), 1);
        assert_eq!(f.dp.pending(ip("10.30.0.78")).unwrap(), None);

        // Once the tables say 198.51.100.3 runs 10.30.0.77, the held frame
        // goes through.
        f.dp.upsert_instance(
            ip("10.18.2.9"),
            InstanceEntry {
                instance_ip: Some(ip("10.30.0.77")),
                node_ip: "198.51.100.3".parse().unwrap(),
                node_port: 50103,
                local: None,
            },
        )
        .unwrap();
        assert_eq!(
            f.dp.instance_node(ip("10.30.0.77")).unwrap(),
            Some(ip("198.51.100.3"))
        );
        assert_eq!(run(&f, UPLINK_PROGRAM, &unknown).0, TC_ACT_REDIRECT);
        // And it goes when the instance does.
        f.dp.remove_instance(ip("10.18.2.9")).unwrap();
        assert_eq!(f.dp.instance_node(ip("10.30.0.77")).unwrap(), None);

        // A known instance from another node than the tables name, for a
        // container here: its node may have moved (uplink, DHCP), so it is
        // held whole and reported with its sender like an unknown one, and the
        // cluster's answer decides.
        let moved = from_underlay("198.51.100.3", &good);
        assert_eq!(
            run(&f, UPLINK_PROGRAM, &moved),
            (TC_ACT_SHOT, moved.clone())
        );
        let m = tokio::time::timeout(std::time::Duration::from_secs(5), misses.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(m.reason, netmanager::dataplane::MissReason::Peer);
        assert_eq!(m.addr, ip("10.30.0.5"));
        assert_eq!(m.peer, Some(ip("198.51.100.3")));
        assert_eq!(m.frame.as_deref(), Some(&moved[..]));
        assert_eq!(counter(&f, "peer_held"), 3);
        assert_eq!(counter(&f, "drop_forged_source"), 6);
        // The answer names 198.51.100.3 and rewrites INSTANCE_NODES: the
        // datagram goes through on both ways in, and the old address is now
        // the one asked about.
        f.dp.upsert_instance(
            ip("10.18.0.130"),
            InstanceEntry {
                instance_ip: Some(ip("10.30.0.5")),
                node_ip: "198.51.100.3".parse().unwrap(),
                node_port: 50103,
                local: None,
            },
        )
        .unwrap();
        f.dp.resolved(ip("10.30.0.5")).unwrap();
        assert_eq!(
            f.dp.instance_node(ip("10.30.0.5")).unwrap(),
            Some(ip("198.51.100.3"))
        );
        assert_eq!(run(&f, UPLINK_PROGRAM, &moved).0, TC_ACT_REDIRECT);
        let moved_slow = eth(
            [0xaa; 6],
            [0xbb; 6],
            0x0800,
            &tunnel_datagram(ip4("198.51.100.3"), NODE, 38211, 50103, &good.bytes()),
        );
        assert_eq!(run(&f, SLOW_PATH_PROGRAM, &moved_slow).0, TC_ACT_REDIRECT);
        assert_eq!(counter(&f, "decapsulated"), 6);
        let from_old = from_underlay("198.51.100.2", &good);
        assert_eq!(run(&f, UPLINK_PROGRAM, &from_old).0, TC_ACT_SHOT);
        assert_eq!(counter(&f, "peer_held"), 4);
    })
}

fn trusted_underlay_prefixes_send_for_any_instance() {
    let f = fixture_with("trusted", IpAddr::V4(NODE), |cfg| {
        cfg.trusted_peers = vec![(ip("198.51.100.64"), 26)];
    });
    for inner in [
        Ip::new("10.30.0.5", "10.18.0.2", udp(1, 2)),
        Ip::new("10.30.0.77", "10.18.0.2", udp(1, 2)),
    ] {
        assert_eq!(
            run(&f, UPLINK_PROGRAM, &from_underlay("198.51.100.70", &inner)).0,
            TC_ACT_REDIRECT
        );
        // Outside the prefix it is not.
        assert_eq!(
            run(&f, UPLINK_PROGRAM, &from_underlay("198.51.100.130", &inner)).0,
            TC_ACT_SHOT
        );
    }
    // The inner source must still be an instance address.
    let bogus = Ip::new("192.0.2.1", "10.18.0.2", udp(1, 2));
    assert_eq!(
        run(&f, UPLINK_PROGRAM, &from_underlay("198.51.100.70", &bogus)).0,
        TC_ACT_SHOT
    );
    assert_eq!(counter(&f, "drop_bad_inner_source"), 1);
}

fn each_container_gets_its_share_of_the_flow_table_and_keeps_its_flows() {
    let f = fixture_with("quota", IpAddr::V4(NODE), |cfg| cfg.flows_per_container = 3);
    let flow = |sport| from_container(&Ip::new("10.18.0.2", "10.30.55.56", tcp_syn(sport, 80)));
    for sport in 1..=3 {
        assert_eq!(run(&f, CONTAINER_PROGRAM, &flow(sport)).0, TC_ACT_REDIRECT);
    }
    assert_eq!(f.dp.flow_counts(CLIENT_IFINDEX).unwrap(), (3, 0));
    // A fourth flow is refused ...
    assert_eq!(run(&f, CONTAINER_PROGRAM, &flow(4)).0, TC_ACT_SHOT);
    assert_eq!(counter(&f, "drop_flow_quota"), 1);
    // ... while the three it has keep flowing.
    for sport in 1..=3 {
        assert_eq!(run(&f, CONTAINER_PROGRAM, &flow(sport)).0, TC_ACT_REDIRECT);
    }
    assert_eq!(f.dp.flow_counts(CLIENT_IFINDEX).unwrap(), (3, 0));
    // Idle flows expire and give their slots back.
    let later = netmanager_common::FLOW_IDLE_NS + 1_000_000_000;
    assert_eq!(f.dp.expire_flows_after(later).unwrap(), 6);
    assert_eq!(f.dp.flow_counts(CLIENT_IFINDEX).unwrap(), (3, 3));
    assert_eq!(run(&f, CONTAINER_PROGRAM, &flow(4)).0, TC_ACT_REDIRECT);
}

fn a_full_miss_ring_leaves_no_pending_mark_and_the_underlay_gets_half_of_it() {
    testkit::block_on(async {
        let f = fixture_with("ring", IpAddr::V4(NODE), |cfg| cfg.sizes.pending = 4096);
        // Nobody reads the ring. Tunnel datagrams from unknown instances may
        // fill half of it ...
        let mut held = 0;
        for n in 0..1000u32 {
            let inner = Ip::new(
                &format!("10.30.{}.{}", 100 + n / 250, n % 250 + 1),
                "10.18.0.2",
                udp(1, 2),
            );
            if run(&f, UPLINK_PROGRAM, &from_underlay("198.51.100.3", &inner)).0 == TC_ACT_SHOT
                && counter(&f, "peer_held") > held
            {
                held += 1;
            } else {
                // Refused: no pending mark left behind.
                assert_eq!(f.dp.pending(inner.src).unwrap(), None, "{}", inner.src);
                break;
            }
        }
        let ring = netmanager_common::DEFAULT_MISS_RING_BYTES as u64;
        let event = std::mem::size_of::<netmanager_common::MissEvent>() as u64 + 8;
        assert!(
            held >= ring / 2 / event && held <= ring / 2 / event + 1,
            "{held}"
        );
        // ... and the containers' misses still find room, until it is full.
        let mut container_held = 0;
        for n in 0..1000u32 {
            let svc = format!("10.30.{}.{}", 200 + n / 250, n % 250 + 1);
            let frame = from_container(&Ip::new("10.18.0.2", &svc, tcp_syn(1, 80)));
            assert_eq!(run(&f, CONTAINER_PROGRAM, &frame).0, TC_ACT_SHOT);
            let now = counter(&f, "miss_held");
            if now > container_held {
                container_held = now;
                assert_eq!(f.dp.pending(ip(&svc)).unwrap(), Some(1));
            } else {
                // The ring is full: dropped, and the mark was never taken.
                assert_eq!(f.dp.pending(ip(&svc)).unwrap(), None, "{svc}");
                break;
            }
        }
        assert!(container_held > ring / 2 / event - 2, "{container_held}");
        assert!(counter(&f, "drop_miss_overflow") >= 2);
    })
}

/// A UDP header (checksum zero) and `payload`.
fn udp_bytes(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

/// A frame from the underlay carrying the IPv4 packet `ip`.
fn underlay_v4(ip: &[u8]) -> Vec<u8> {
    eth([0xaa; 6], [0xbb; 6], 0x0800, ip)
}

/// The sum of the XDP program's drop counters.
fn xdp_drops(f: &Fixture) -> u64 {
    [
        "drop_xdp_malformed",
        "drop_xdp_forged_source",
        "drop_xdp_bad_inner_source",
        "drop_xdp_not_local",
    ]
    .iter()
    .map(|c| counter(f, c))
    .sum()
}

/// XDP passes, byte for byte and without a trace in the maps: datagrams the
/// TC program accepts, those it holds (an unknown sender, a node that may
/// have moved: XDP never drops them blindly), and everything that is no
/// tunnel datagram for this node (other ports, other addresses, IPv4
/// options and fragments, which take the slow path, ARP, a bare Ethernet
/// header).
fn the_xdp_program_passes_accepted_held_and_foreign_frames_unchanged() {
    let f = fixture("xdp-pass");
    let good = Ip::new("10.30.0.5", "10.18.0.2", udp(7000, 9000));
    let good6 = Ip::new("fdff::5", "fc00::2", udp(7000, 9000));
    let unknown = Ip::new("10.30.0.77", "10.18.0.2", udp(1, 2));
    let tunnel_udp = udp_bytes(50103, 50103, &good.bytes());
    let mut frames = vec![
        ("accepted", from_underlay("198.51.100.2", &good)),
        (
            "accepted, IPv6 inside",
            from_underlay("198.51.100.2", &good6),
        ),
        (
            "held: unknown sender",
            from_underlay("198.51.100.3", &unknown),
        ),
        ("held: moved node", from_underlay("198.51.100.3", &good)),
        (
            "held: over the IPv6 underlay",
            eth(
                [0xaa; 6],
                [0xbb; 6],
                0x86dd,
                &tunnel_datagram_v6(PEER_V6, NODE_V6, 50103, 50103, &good.bytes()),
            ),
        ),
        (
            "another port",
            underlay_v4(&ipv4(
                PEER_NODE,
                NODE,
                64,
                17,
                &[],
                0x4000,
                0,
                &udp_bytes(5353, 53, b"query"),
            )),
        ),
        (
            "another address",
            underlay_v4(&tunnel_datagram(
                PEER_NODE,
                ip4("198.51.100.200"),
                50103,
                50103,
                &good.bytes(),
            )),
        ),
        (
            "IPv4 options",
            underlay_v4(&ipv4(
                PEER_NODE,
                NODE,
                64,
                17,
                &[1, 1, 1, 1],
                0x4000,
                0,
                &tunnel_udp,
            )),
        ),
        (
            "first fragment",
            underlay_v4(&ipv4(PEER_NODE, NODE, 64, 17, &[], 0x2000, 7, &tunnel_udp)),
        ),
        ("ARP", eth([0xff; 6], [0xbb; 6], 0x0806, &[0u8; 28])),
        (
            "bare Ethernet header",
            eth([0xaa; 6], [0xbb; 6], 0x0800, &[]),
        ),
    ];
    // Garbage that is not ours to judge: not to our tunnel port.
    frames.push((
        "garbage to another port",
        underlay_v4(&ipv4(
            PEER_NODE,
            NODE,
            64,
            17,
            &[],
            0x4000,
            0,
            &udp_bytes(50103, 50104, b"x-no-packet"),
        )),
    ));
    for (what, frame) in &frames {
        assert_eq!(
            run(&f, UPLINK_XDP_PROGRAM, frame),
            (XDP_PASS, frame.clone()),
            "{what}"
        );
    }
    assert_eq!(xdp_drops(&f), 0);
    // Holding is TC's: XDP left no pending mark, no event.
    assert_eq!(f.dp.pending(ip("10.30.0.77")).unwrap(), None);
    assert_eq!(counter(&f, "peer_held"), 0);
    // And TC behind it does hold what XDP passed.
    assert_eq!(
        run(&f, UPLINK_PROGRAM, &frames[2].1).0,
        TC_ACT_SHOT,
        "held by TC"
    );
    assert_eq!(counter(&f, "peer_held"), 1);
}

/// XDP drops, each under its own counter: tunnel datagrams whose lengths
/// contradict each other or the frame, or that carry no IP packet, and
/// those the sender check rejects (forged, an inner source outside every
/// service range, an unknown sender for no container here). None of them
/// would the TC program have delivered.
fn the_xdp_program_drops_malformed_and_rejected_datagrams_that_tc_never_delivers() {
    let f = fixture("xdp-drop");
    let good = Ip::new("10.30.0.5", "10.18.0.2", udp(7000, 9000));
    let good6 = Ip::new("fdff::5", "fc00::2", udp(7000, 9000));
    let datagram =
        |inner: &[u8]| underlay_v4(&tunnel_datagram(PEER_NODE, NODE, 50103, 50103, inner));
    let mut longer_inner = good.bytes();
    longer_inner[3] += 10;
    let mut udp_too_long = tunnel_datagram(PEER_NODE, NODE, 50103, 50103, &good.bytes());
    udp_too_long[25] += 1;
    let mut cut = datagram(&good.bytes());
    cut.truncate(cut.len() - 4);
    let mut v6_cut = eth(
        [0xaa; 6],
        [0xbb; 6],
        0x86dd,
        &tunnel_datagram_v6(PEER_V6, NODE_V6, 50103, 50103, &good.bytes()),
    );
    v6_cut.truncate(v6_cut.len() - 4);
    let malformed = [
        ("no packet inside", datagram(b"x-no-packet")),
        ("empty", datagram(b"")),
        ("inner IPv4 header cut short", datagram(&good.bytes()[..12])),
        (
            "inner IPv6 header cut short",
            datagram(&good6.bytes()[..30]),
        ),
        ("inner length beyond the datagram", datagram(&longer_inner)),
        (
            "UDP length beyond the IP packet",
            underlay_v4(&udp_too_long),
        ),
        ("IPv4 length beyond the frame", cut),
        ("IPv6 length beyond the frame", v6_cut),
    ];
    let rejected = [
        (
            "drop_xdp_forged_source",
            from_underlay(
                "198.51.100.3",
                &Ip::new("10.30.0.5", "10.18.0.200", udp(7000, 9000)),
            ),
        ),
        (
            "drop_xdp_forged_source",
            from_underlay(
                "198.51.100.3",
                &Ip::new("fdff::5", "fc00::200", udp(7000, 9000)),
            ),
        ),
        (
            // This node's own instance, from outside.
            "drop_xdp_forged_source",
            from_underlay(
                "198.51.100.2",
                &Ip::new("10.30.0.3", "10.18.0.2", udp(1, 2)),
            ),
        ),
        (
            "drop_xdp_bad_inner_source",
            from_underlay(
                "198.51.100.2",
                &Ip::new("10.99.0.1", "10.18.0.2", udp(1, 2)),
            ),
        ),
        (
            "drop_xdp_not_local",
            from_underlay(
                "198.51.100.3",
                &Ip::new("10.30.0.78", "10.18.0.200", udp(1, 2)),
            ),
        ),
    ];
    let all = malformed
        .iter()
        .map(|(what, frame)| (*what, "drop_xdp_malformed", frame))
        .chain(rejected.iter().map(|(c, frame)| (*c, *c, frame)));
    for (what, _, frame) in all.clone() {
        assert_eq!(run(&f, UPLINK_XDP_PROGRAM, frame).0, XDP_DROP, "{what}");
    }
    assert_eq!(counter(&f, "drop_xdp_malformed"), malformed.len() as u64);
    assert_eq!(counter(&f, "drop_xdp_forged_source"), 3);
    assert_eq!(counter(&f, "drop_xdp_bad_inner_source"), 1);
    assert_eq!(counter(&f, "drop_xdp_not_local"), 1);
    // The TC program alone never delivers any of them either: XDP only
    // decides earlier. Except one: TC never reads the outer UDP length (the
    // stack drops such a datagram as a short packet, were it to get there).
    for (what, _, frame) in all.filter(|(what, _, _)| !what.starts_with("UDP length")) {
        assert_ne!(run(&f, UPLINK_PROGRAM, frame).0, TC_ACT_REDIRECT, "{what}");
    }
    assert_eq!(counter(&f, "decapsulated"), 0);
}

/// An underlay prefix the operator trusts sends for any instance, known or
/// not: XDP passes it, as TC accepts it.
fn the_xdp_program_lets_trusted_prefixes_through() {
    let f = fixture_with("xdp-trusted", IpAddr::V4(NODE), |cfg| {
        cfg.trusted_peers = vec![(ip("198.51.100.64"), 26)];
    });
    for inner in [
        Ip::new("10.30.0.5", "10.18.0.2", udp(1, 2)),
        Ip::new("10.30.0.77", "10.18.0.200", udp(1, 2)),
    ] {
        let frame = from_underlay("198.51.100.70", &inner);
        assert_eq!(
            run(&f, UPLINK_XDP_PROGRAM, &frame),
            (XDP_PASS, frame.clone())
        );
    }
    // Outside the prefix, the same unknown instance for no container here
    // is dropped.
    let outside = from_underlay(
        "198.51.100.130",
        &Ip::new("10.30.0.77", "10.18.0.200", udp(1, 2)),
    );
    assert_eq!(run(&f, UPLINK_XDP_PROGRAM, &outside).0, XDP_DROP);
    assert_eq!(counter(&f, "drop_xdp_not_local"), 1);
}

/// The fixture node with `--uplink-hook xdp-redirect`.
fn redirecting(name: &str) -> Fixture {
    fixture_with(name, IpAddr::V4(NODE), |cfg| {
        cfg.uplink_hook = UplinkHook::XdpRedirect
    })
}

/// With `xdp-redirect`, the XDP program delivers a tunnel datagram it can
/// decide whole itself: decapsulated, reverse-translated when this node
/// owns the flow (IPv4 and IPv6 inside), with the container's MAC, and
/// redirected -- the very bytes the TC program delivers for the same frame
/// (run on a copy, TC's counters aside). Flows started elsewhere arrive
/// unchanged.
fn the_xdp_redirect_hook_delivers_what_tc_would_byte_for_byte() {
    let f = redirecting("xdp-redirect");
    // Flows this node owns: the client dialled the services.
    let syn = Ip::new("10.18.0.2", "10.30.55.56", tcp_syn(40000, 80));
    assert_eq!(
        run(&f, CONTAINER_PROGRAM, &from_container(&syn)).0,
        TC_ACT_REDIRECT
    );
    let six = L4::Udp {
        sport: 6000,
        dport: 7000,
        payload: b"six".to_vec(),
    };
    let sent6 = Ip::new("fc00::2", "fdff:2000::55:56", six);
    assert_eq!(
        run(&f, CONTAINER_PROGRAM, &from_container(&sent6)).0,
        TC_ACT_REDIRECT
    );
    let synack = L4::Tcp {
        sport: 80,
        dport: 40000,
        flags: 0x12,
        payload: b"reply".to_vec(),
    };
    let back6 = L4::Udp {
        sport: 7000,
        dport: 6000,
        payload: b"xis".to_vec(),
    };
    let unowned = Ip::new("10.30.0.5", "10.18.0.2", tcp_syn(5555, 80));
    let cases = [
        (
            "IPv4 reply, reverse-translated",
            Ip::new("10.30.0.5", "10.18.0.2", synack.clone()),
            eth(
                CLIENT_MAC,
                [0xbb; 6],
                0x0800,
                &Ip::new("10.30.55.56", "10.18.0.2", synack).bytes(),
            ),
        ),
        (
            "IPv6 reply in IPv4, reverse-translated",
            Ip::new("fdff::5", "fc00::2", back6.clone()),
            eth(
                CLIENT_MAC,
                [0xbb; 6],
                0x86dd,
                &Ip::new("fdff:2000::55:56", "fc00::2", back6).bytes(),
            ),
        ),
        (
            "a flow started elsewhere, unchanged",
            unowned.clone(),
            eth(CLIENT_MAC, [0xbb; 6], 0x0800, &unowned.bytes()),
        ),
    ];
    for (what, inner, expected) in &cases {
        let frame = from_underlay("198.51.100.2", inner);
        let (verdict, out) = run(&f, UPLINK_XDP_PROGRAM, &frame);
        assert_eq!(verdict, XDP_REDIRECT, "{what}");
        assert_eq!(&out, expected, "{what}");
        assert_checksums(&out[14..]);
        let (tc_verdict, tc_out) = run(&f, UPLINK_PROGRAM, &frame);
        assert_eq!((tc_verdict, &tc_out), (TC_ACT_REDIRECT, &out), "{what}: TC");
    }
    assert_eq!(counter(&f, "xdp_redirected"), cases.len() as u64);
    assert_eq!(xdp_drops(&f), 0);
}

/// With `xdp-redirect`, everything the XDP program cannot decide whole
/// passes to TC byte for byte and uncounted: held senders, destinations
/// that are no container here, fragments, IPv4 options, protocols the
/// overlay does not translate, packets larger than the tunnel MTU (GSO
/// packets generic XDP linearised). TC then does what it always did.
fn the_xdp_redirect_hook_leaves_to_tc_what_it_cannot_decide() {
    let f = redirecting("xdp-redirect-pass");
    let accepted = |inner: &Ip| from_underlay("198.51.100.2", inner);
    let mut fragment = Ip::new("10.30.0.5", "10.18.0.2", udp(7000, 9000));
    fragment.frag = 0x2000;
    let mut options = Ip::new("10.30.0.5", "10.18.0.2", udp(7000, 9000));
    options.options = vec![1, 1, 1, 0];
    let gre = Ip::new(
        "10.30.0.5",
        "10.18.0.2",
        L4::Raw {
            proto: 47,
            bytes: vec![0; 8],
        },
    );
    let big = Ip::new(
        "10.30.0.5",
        "10.18.0.2",
        L4::Udp {
            sport: 7000,
            dport: 9000,
            payload: vec![7; 1500],
        },
    );
    let frames = [
        (
            "held: unknown sender",
            from_underlay(
                "198.51.100.3",
                &Ip::new("10.30.0.77", "10.18.0.2", udp(1, 2)),
            ),
        ),
        (
            "no container here",
            accepted(&Ip::new("10.30.0.5", "10.18.0.130", udp(7000, 9000))),
        ),
        ("inner fragment", accepted(&fragment)),
        ("inner IPv4 options", accepted(&options)),
        ("GRE between instances", accepted(&gre)),
        ("larger than the tunnel MTU", accepted(&big)),
    ];
    for (what, frame) in &frames {
        assert_eq!(
            run(&f, UPLINK_XDP_PROGRAM, frame),
            (XDP_PASS, frame.clone()),
            "{what}"
        );
    }
    assert_eq!(counter(&f, "xdp_redirected"), 0);
    assert_eq!(xdp_drops(&f), 0);
    // TC behind it: options and fragments are still delivered there.
    assert_eq!(run(&f, UPLINK_PROGRAM, &frames[3].1).0, TC_ACT_REDIRECT);
    assert_eq!(run(&f, UPLINK_PROGRAM, &frames[1].1).0, TC_ACT_SHOT);
}
