//! Decapsulated tunnel packets reach a socket in the container's namespace
//! through the real stack, on every decapsulation path this kernel has.
//!
//! The packet fixtures check bytes only. After `bpf_redirect_peer` the
//! kernel also needs `skb->protocol` to name the inner family (it picks
//! ip_rcv or ipv6_rcv by it), which is what the pre-6.3 IPv6-in-IPv4 path
//! through `bpf_skb_change_proto` must get right. So: the uplink program on
//! a veth in a node namespace, a tunnel datagram (outer IPv4, and outer
//! IPv6 as between our own workers) written onto the wire behind it, and a
//! UDP socket in the container namespace that must receive the inner
//! datagram. Runs on this kernel and, through
//! `cargo xtask test --full`, on Debian 12's 6.1 (where aya attaches through
//! classic tc, as TCX arrived in 6.6).
//!
//! The same for delivery in XDP (`--uplink-hook xdp-redirect`): the XDP
//! program alone on the uplink, native and generic, the container's end of
//! its veth with GRO (as NetManager sets it), and the container's stack
//! checking the checksums XDP rewrote -- a natively redirected frame
//! becomes a new skb whose checksums are verified in software.

mod packet_support;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

use aya::EbpfLoader;
use aya::programs::{SchedClassifier, TcAttachType, Xdp, XdpMode, tc};
use netmanager::dataplane::{
    Dataplane, DataplaneConfig, EBPF_OBJECT, InstanceEntry, LocalPort, MAP_NAMES, MapSizes,
    UPLINK_PROGRAM, UPLINK_XDP_PROGRAM, UplinkHook,
};
use netmanager::kernel_support;
use netmanager_common::{Addr, DECAP_L3_FLAG_GLOBAL, FlowKey, ReverseFlow};
use packet_support::*;
use testkit::netlink::{LinkSettings, Route};
use testkit::{Netns, PinDir};

testkit::main! {
    decapsulated_v4_and_v6_packets_reach_the_containers_socket: [Root, Bpffs],
    xdp_delivered_packets_reach_the_containers_socket_natively_and_generically: [Root, Bpffs],
}

const NODE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const PEER_NODE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const NODE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const PEER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
const UPLINK_MAC: [u8; 6] = [0x02, 0, 0xc6, 0x33, 0x64, 0x01];
const CONTAINER_MAC: [u8; 6] = [0x02, 0, 0x0a, 0x12, 0, 0x02];
const PORT: u16 = 6000;

/// Runs `f` on a thread inside `ns`; sockets it creates stay in `ns`.
fn in_netns<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    ns.within(f).expect("a thread inside the namespace")
}

fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: a valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(i, 0, "no interface {name}");
    i
}

/// Writes `frame` onto the wire of `ifname` (in the calling thread's namespace).
fn send_frame(ifname: &str, frame: &[u8]) {
    // SAFETY: plain socket call; the descriptor is owned right away.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    assert!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the kernel just gave us this descriptor.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: zeroed is a valid sockaddr_ll; we fill what sendto needs.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = ifindex(ifname) as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&frame[..6]);
    // SAFETY: buffer and address are valid for the sizes given.
    let n = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            frame.as_ptr() as *const libc::c_void,
            frame.len(),
            0,
            &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(
        n,
        frame.len() as isize,
        "sendto: {}",
        std::io::Error::last_os_error()
    );
}

/// Node namespace with uplink veth `up0` (peer `up1`, our wire) and the
/// host end `c0` of a container veth whose other end `c1` lives in `ctr`.
fn topology(node: &Netns, ctr: &Netns) {
    node.add_veth("up0", "up1", None).unwrap().keep();
    node.set_link(
        "up0",
        &LinkSettings {
            mac: Some(UPLINK_MAC),
            ..Default::default()
        },
    )
    .unwrap();
    node.add_veth("c0", "c1", Some(ctr)).unwrap().keep();
    for dev in ["up0", "up1", "c0"] {
        node.set_up(dev).unwrap();
    }
    ctr.set_link(
        "c1",
        &LinkSettings {
            up: true,
            mac: Some(CONTAINER_MAC),
            ..Default::default()
        },
    )
    .unwrap();
    ctr.add_address("c1", "10.18.0.2/26").unwrap().keep();
    ctr.add_address("c1", "fc00::2/120").unwrap().keep();
    ctr.add_route(&Route::default_dev("c1", false))
        .unwrap()
        .keep();
    ctr.add_route(&Route::default_dev("c1", true))
        .unwrap()
        .keep();
}

fn dataplane(pin_dir: &PinDir, c0: u32, uplink_hook: UplinkHook) -> Dataplane {
    let cfg = DataplaneConfig {
        pin_dir: pin_dir.to_path_buf(),
        uplink: String::new(),
        node_ip: IpAddr::V4(NODE),
        tunnel_port: 50103,
        tunnel_mtu: 1450,
        service_ranges: vec![
            ("10.30.0.0".parse().unwrap(), 16),
            ("fdff::".parse().unwrap(), 16),
        ],
        sizes: MapSizes {
            flows: 1024,
            services: 256,
            backends: 1024,
            instances: 256,
            pending: 64,
        },
        miss_hold: 2,
        attach_mode: netmanager::dataplane::AttachMode::Auto,
        uplink_hook,
        xdp_mode: Default::default(),
        container_bridge: String::new(),
        trusted_peers: Vec::new(),
        flows_per_container: 0,
    };
    let dp = Dataplane::open(&cfg).expect("loading the dataplane");
    dp.set_node_addresses(&[(IpAddr::V4(NODE), 0), (IpAddr::V6(NODE_V6), 0)])
        .unwrap();
    let local = Some(LocalPort {
        ifindex: c0,
        mac: CONTAINER_MAC,
    });
    // The container here, and the sending instance on the peer node: only
    // that node's datagrams from its instance address are accepted.
    for (ns_ip, inst, node, local) in [
        ("10.18.0.2", "10.30.0.3", IpAddr::V4(NODE), local),
        ("fc00::2", "fdff::3", IpAddr::V4(NODE), local),
        ("10.18.0.130", "10.30.0.5", IpAddr::V4(PEER_NODE), None),
        ("fc00::82", "fdff::5", IpAddr::V4(PEER_NODE), None),
        // A node on the IPv6 underlay sends the outer-IPv6 datagrams.
        ("10.18.0.131", "10.30.0.6", IpAddr::V6(PEER_V6), None),
        ("fc00::83", "fdff::6", IpAddr::V6(PEER_V6), None),
    ] {
        dp.upsert_instance(
            ns_ip.parse().unwrap(),
            InstanceEntry {
                instance_ip: Some(inst.parse().unwrap()),
                node_ip: node,
                node_port: 50103,
                local,
            },
        )
        .unwrap();
    }
    dp
}

/// A second copy of the uplink program on the dataplane's pinned maps,
/// with the decapsulation global set to `decap_l3`, attached to `up0`.
fn attach_uplink(pin_dir: &PinDir, node: &Netns, decap_l3: u8) -> aya::Ebpf {
    let mut loader = EbpfLoader::new();
    let pins: Vec<(&str, PathBuf)> = MAP_NAMES.iter().map(|m| (*m, pin_dir.join(m))).collect();
    for (name, path) in &pins {
        loader.map_pin_path(name, path.as_path());
    }
    loader.override_global(DECAP_L3_FLAG_GLOBAL, &decap_l3, true);
    let mut ebpf = loader.load(EBPF_OBJECT).expect("loading the object");
    let prog: &mut SchedClassifier = ebpf
        .program_mut(UPLINK_PROGRAM)
        .unwrap()
        .try_into()
        .unwrap();
    prog.load().expect("loading uplink_ingress");
    in_netns(node, || {
        // aya attaches through TCX from 6.6 on, through a clsact filter before.
        let _ = tc::qdisc_add_clsact("up0");
        prog.attach("up0", TcAttachType::Ingress)
            .expect("attaching uplink_ingress");
    });
    ebpf
}

/// Sends `inner` through the tunnel (outer IPv6 when `v6_outer`) into `up0`
/// and returns what the container's socket bound to `bind` receives.
fn deliver(
    node: &Netns,
    ctr: &Netns,
    bind: SocketAddr,
    inner: &Ip,
    v6_outer: bool,
) -> Option<(Vec<u8>, SocketAddr)> {
    let sock = in_netns(ctr, || {
        UdpSocket::bind(bind).expect("binding in the container")
    });
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let peer_mac = [0x02, 0, 0xc6, 0x33, 0x64, 0x02];
    let frame = if v6_outer {
        let datagram = tunnel_datagram_v6(PEER_V6, NODE_V6, 40000, 50103, &inner.bytes());
        eth(UPLINK_MAC, peer_mac, 0x86dd, &datagram)
    } else {
        let datagram = tunnel_datagram(PEER_NODE, NODE, 50103, 50103, &inner.bytes());
        eth(UPLINK_MAC, peer_mac, 0x0800, &datagram)
    };
    in_netns(node, || send_frame("up1", &frame));
    let mut buf = [0u8; 2048];
    let (n, from) = sock.recv_from(&mut buf).ok()?;
    Some((buf[..n].to_vec(), from))
}

fn decapsulated_v4_and_v6_packets_reach_the_containers_socket() {
    let node = Netns::new("node").unwrap();
    let ctr = Netns::new("ctr").unwrap();
    topology(&node, &ctr);
    let pin_dir = PinDir::new("decap");
    let c0 = in_netns(&node, || ifindex("c0"));
    let dp = dataplane(&pin_dir, c0, UplinkHook::Tc);

    // The fallback works everywhere; the 6.3 flag only where the probe found it.
    let mut paths = vec![0u8];
    if kernel_support::probe().adjust_room_decap_l3 {
        paths.push(1);
    }
    for decap_l3 in paths {
        let ebpf = attach_uplink(&pin_dir, &node, decap_l3);
        let cases = [
            ("10.30.0.5", "10.18.0.2", "0.0.0.0", false),
            ("fdff::5", "fc00::2", "::", false),
            ("10.30.0.6", "10.18.0.2", "0.0.0.0", true),
            ("fdff::6", "fc00::2", "::", true),
        ];
        for (src, dst, any, v6_outer) in cases {
            let payload =
                format!("decap {src} -> {dst}, outer v6 {v6_outer}, flag {decap_l3}").into_bytes();
            let inner = Ip::new(
                src,
                dst,
                L4::Udp {
                    sport: 7000,
                    dport: PORT,
                    payload: payload.clone(),
                },
            );
            let bind = SocketAddr::new(any.parse::<IpAddr>().unwrap(), PORT);
            let got = deliver(&node, &ctr, bind, &inner, v6_outer);
            let from: IpAddr = src.parse().unwrap();
            assert_eq!(
                got,
                Some((payload, SocketAddr::new(from, 7000))),
                "{src} -> {dst} (outer IPv6: {v6_outer}) with the decap flag {decap_l3} did not arrive intact"
            );
        }
        // Detaches (filter or TCX link) before the next path attaches.
        drop(ebpf);
    }
    let decapsulated = dp
        .status()
        .unwrap()
        .counters
        .iter()
        .find(|c| c.0 == "decapsulated")
        .map(|c| c.1);
    assert!(
        decapsulated >= Some(4),
        "decapsulated counter: {decapsulated:?}"
    );
}

/// A copy of the XDP program on the dataplane's pinned maps, attached to
/// `up0` in `mode` (native or generic).
fn attach_uplink_xdp(pin_dir: &PinDir, node: &Netns, mode: XdpMode) -> aya::Ebpf {
    let mut loader = EbpfLoader::new();
    let pins: Vec<(&str, PathBuf)> = MAP_NAMES.iter().map(|m| (*m, pin_dir.join(m))).collect();
    for (name, path) in &pins {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(EBPF_OBJECT).expect("loading the object");
    let prog: &mut Xdp = ebpf
        .program_mut(UPLINK_XDP_PROGRAM)
        .unwrap()
        .try_into()
        .unwrap();
    prog.load().expect("loading uplink_xdp");
    in_netns(node, || {
        prog.attach("up0", mode)
            .unwrap_or_else(|e| panic!("attaching uplink_xdp ({mode:?}): {e}"))
    });
    ebpf
}

/// Makes this node the one that started the flow `from` -> `to` answers:
/// replies from `from` get `service` as their source (what the container
/// program records when the container dials `service`).
fn own_flow(pin_dir: &PinDir, from: SocketAddr, to: SocketAddr, service: IpAddr) {
    let addr = |ip: IpAddr| match ip {
        IpAddr::V4(v) => Addr::from_v4_octets(v.octets()),
        IpAddr::V6(v) => Addr { bytes: v.octets() },
    };
    let key = FlowKey {
        src: addr(from.ip()),
        dst: addr(to.ip()),
        src_port: from.port().to_be(),
        dst_port: to.port().to_be(),
        proto: 17,
        _pad: [0; 3],
    };
    // SAFETY: a plain clock read into a local.
    let mut now: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let value = ReverseFlow {
        service: addr(service),
        last_seen_ns: now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64,
    };
    let path = pin_dir.join(netmanager_common::maps::REVERSE_FLOWS);
    let map = aya::maps::MapData::from_pin(&path).expect("REVERSE_FLOWS pinned");
    let mut flows: aya::maps::HashMap<_, FlowKey, ReverseFlow> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(map)).expect("a hash map");
    flows
        .insert(key, value, 0)
        .expect("inserting the reverse flow");
}

fn xdp_delivered_packets_reach_the_containers_socket_natively_and_generically() {
    let node = Netns::new("node").unwrap();
    let ctr = Netns::new("ctr").unwrap();
    topology(&node, &ctr);
    // What NetManager does to every container end with xdp-redirect: NAPI
    // for natively redirected frames.
    in_netns(&ctr, || netmanager::ethtool::enable_gro("c1")).expect("GRO on c1");
    let pin_dir = PinDir::new("xdp-deliver");
    let c0 = in_netns(&node, || ifindex("c0"));
    let dp = dataplane(&pin_dir, c0, UplinkHook::XdpRedirect);
    // Replies to flows the container started by dialling a service: their
    // source must become the service, checksums rewritten by XDP.
    let reply_port = 7001;
    own_flow(
        &pin_dir,
        SocketAddr::new("10.30.0.5".parse().unwrap(), reply_port),
        SocketAddr::new("10.18.0.2".parse().unwrap(), PORT),
        "10.30.55.56".parse().unwrap(),
    );
    own_flow(
        &pin_dir,
        SocketAddr::new("fdff::5".parse().unwrap(), reply_port),
        SocketAddr::new("fc00::2".parse().unwrap(), PORT),
        "fdff:2000::55:56".parse().unwrap(),
    );
    let mut sent = 0;
    // No TC program on up0: only XDP can deliver these.
    for (mode, xdp_mode) in [("native", XdpMode::Driver), ("generic", XdpMode::Skb)] {
        let ebpf = attach_uplink_xdp(&pin_dir, &node, xdp_mode);
        let cases = [
            (
                "10.30.0.5",
                7000,
                "10.18.0.2",
                "0.0.0.0",
                false,
                "10.30.0.5",
            ),
            ("fdff::5", 7000, "fc00::2", "::", false, "fdff::5"),
            ("10.30.0.6", 7000, "10.18.0.2", "0.0.0.0", true, "10.30.0.6"),
            ("fdff::6", 7000, "fc00::2", "::", true, "fdff::6"),
            (
                "10.30.0.5",
                reply_port,
                "10.18.0.2",
                "0.0.0.0",
                false,
                "10.30.55.56",
            ),
            (
                "fdff::5",
                reply_port,
                "fc00::2",
                "::",
                false,
                "fdff:2000::55:56",
            ),
        ];
        for (src, sport, dst, any, v6_outer, seen_from) in cases {
            let payload =
                format!("xdp {mode} {src}:{sport} -> {dst}, outer v6 {v6_outer}").into_bytes();
            let inner = Ip::new(
                src,
                dst,
                L4::Udp {
                    sport,
                    dport: PORT,
                    payload: payload.clone(),
                },
            );
            let bind = SocketAddr::new(any.parse::<IpAddr>().unwrap(), PORT);
            let got = deliver(&node, &ctr, bind, &inner, v6_outer);
            let from: IpAddr = seen_from.parse().unwrap();
            assert_eq!(
                got,
                Some((payload, SocketAddr::new(from, sport))),
                "{src}:{sport} -> {dst} (outer IPv6: {v6_outer}) through {mode} XDP did not arrive intact"
            );
            sent += 1;
        }
        drop(ebpf);
    }
    let counter = |name: &str| {
        dp.status()
            .unwrap()
            .counters
            .iter()
            .find(|c| c.0 == name)
            .map_or(0, |c| c.1)
    };
    assert_eq!(counter("xdp_redirected"), sent);
    assert_eq!(counter("decapsulated") + counter("reverse_translated"), 0);
}
