//! Two namespace "nodes" on a shared underlay, containers behind each, the
//! real programs attached by the dataplane with a fixed table. Ping, a TCP
//! byte stream and UDP datagrams to a service address cross the nodes and
//! arrive intact; a capture of the underlay shows upstream's wire format.
//! Once with TCX links, once with classic tc filters.

use std::path::Path;

use anyhow::Result;
use oakestra_worker_tests::binary;
use testkit::topology::{Container, bare_node, container, link};
use testkit::{LinkSettings, Netns, NsPath, PinDir, Proc, Route, Underlay, sh, temp_dir, wait_for};

testkit::main! {
    crosses_nodes("tcx") as service_traffic_crosses_nodes_in_upstream_wire_format_tcx:
        [Root, Bpffs, Busybox, Python3, Tcpdump, Bpftool, Tcx],
    crosses_nodes("netlink") as service_traffic_crosses_nodes_in_upstream_wire_format_netlink:
        [Root, Bpffs, Busybox, Python3, Tcpdump, Bpftool],
    a_node_behind_nat_carries_service_traffic_both_ways("tcx") as tcx_a_node_behind_nat_carries_service_traffic_both_ways:
        [Root, Bpffs, Busybox, Python3, Tcpdump, Nft, Tcx],
    a_node_behind_nat_carries_service_traffic_both_ways("netlink") as netlink_a_node_behind_nat_carries_service_traffic_both_ways:
        [Root, Bpffs, Busybox, Python3, Tcpdump, Nft],
    fragmented_and_optioned_outer_datagrams_take_the_slow_path("tcx") as tcx_fragmented_and_optioned_outer_datagrams_take_the_slow_path:
        [Root, Bpffs, Python3, Tcpdump, Tcx],
    fragmented_and_optioned_outer_datagrams_take_the_slow_path("netlink") as netlink_fragmented_and_optioned_outer_datagrams_take_the_slow_path:
        [Root, Bpffs, Python3, Tcpdump],
    a_second_interface_receives_and_reaches_peers_only_behind_it("tcx") as tcx_a_second_interface_receives_and_reaches_peers_only_behind_it:
        [Root, Bpffs, Busybox, Python3, Tcpdump, Tcx],
    a_second_interface_receives_and_reaches_peers_only_behind_it("netlink") as netlink_a_second_interface_receives_and_reaches_peers_only_behind_it:
        [Root, Bpffs, Busybox, Python3, Tcpdump],
    an_ipv6_only_underlay_carries_v4_and_v6_service_traffic("tcx") as tcx_an_ipv6_only_underlay_carries_v4_and_v6_service_traffic:
        [Root, Bpffs, Busybox, Python3, Tcpdump, Tcx],
    an_ipv6_only_underlay_carries_v4_and_v6_service_traffic("netlink") as netlink_an_ipv6_only_underlay_carries_v4_and_v6_service_traffic:
        [Root, Bpffs, Busybox, Python3, Tcpdump],
}

/// The static dataplane's table for node `node`, written to `dir`; its
/// dataplane pins in `pin`.
fn table(
    dir: &Path,
    pin: &PinDir,
    mode: &str,
    node: u8,
    uplink_node_ip: &str,
    local: &[(&str, &str, &str, [u8; 6])],
    remote: &[(&str, &str, &str)],
) -> Result<String> {
    let mut instances = Vec::new();
    for (ns_ip, inst, veth, mac) in local {
        instances.push(serde_json::json!({"ns_ip": ns_ip, "instance_ip": inst, "node_ip": uplink_node_ip, "veth": veth, "mac": mac}));
    }
    for (ns_ip, inst, node_ip) in remote {
        instances
            .push(serde_json::json!({"ns_ip": ns_ip, "instance_ip": inst, "node_ip": node_ip}));
    }
    let t = serde_json::json!({
        "pin_dir": pin.path(),
        "uplink": "eth0",
        "attach_mode": mode,
        "node_ip": uplink_node_ip,
        "service_ranges": [["10.30.0.0", 16], ["fdff::", 16]],
        "instances": instances,
        "services": [
            {"ip": "10.30.55.56", "kind": "RR", "backends": ["10.18.0.66"]},
            {"ip": "fdff:2000::55:56", "kind": "RR", "backends": ["fc00::42"]},
            {"ip": "10.30.0.3", "kind": "instance_ip", "backends": ["10.18.0.2"]},
            {"ip": "10.30.0.5", "kind": "instance_ip", "backends": ["10.18.0.66"]},
            {"ip": "fdff::3", "kind": "instance_ip", "backends": ["fc00::2"]},
            {"ip": "fdff::5", "kind": "instance_ip", "backends": ["fc00::42"]},
        ],
        // Unknown to the maps until a packet misses: exercises hold + reinject.
        "deferred_services": [
            {"ip": "10.30.77.77", "kind": "RR", "backends": ["10.18.0.66"]},
        ],
    });
    let path = dir.join(format!("n{node}.json"));
    std::fs::write(&path, t.to_string())?;
    Ok(path.to_string_lossy().into_owned())
}

fn crosses_nodes(mode: &str) -> Result<()> {
    let dir = temp_dir();
    let under = Underlay::new()?;
    let (n1, n2) = (under.node(1)?, under.node(2)?);
    n1.container_bridge("10.18.0.1/26", "fc00::1/120")?;
    n2.container_bridge("10.18.0.65/26", "fc00::41/120")?;
    let c1 = n1.container(
        "c1",
        ["10.18.0.2/26", "fc00::2/120", "10.18.0.1", "fc00::1"],
    )?;
    let c2 = n2.container(
        "c2",
        ["10.18.0.66/26", "fc00::42/120", "10.18.0.65", "fc00::41"],
    )?;
    let (pin1, pin2) = (PinDir::new("ov1"), PinDir::new("ov2"));

    let t1 = table(
        dir.path(),
        &pin1,
        mode,
        1,
        "198.51.100.1",
        &[
            ("10.18.0.2", "10.30.0.3", &c1.veth, c1.mac),
            ("fc00::2", "fdff::3", &c1.veth, c1.mac),
        ],
        &[
            ("10.18.0.66", "10.30.0.5", "198.51.100.2"),
            ("fc00::42", "fdff::5", "198.51.100.2"),
        ],
    )?;
    let t2 = table(
        dir.path(),
        &pin2,
        mode,
        2,
        "198.51.100.2",
        &[
            ("10.18.0.66", "10.30.0.5", &c2.veth, c2.mac),
            ("fc00::42", "fdff::5", &c2.veth, c2.mac),
        ],
        &[
            ("10.18.0.2", "10.30.0.3", "198.51.100.1"),
            ("fc00::2", "fdff::3", "198.51.100.1"),
        ],
    )?;
    let runner = binary("oak-static-dataplane");
    let runner = runner.to_string_lossy();
    // Stopped (and so detached, once their pins go) before the namespaces.
    let _dataplanes = [
        n1.ns.spawn_ready(&[runner.as_ref(), t1.as_str()])?,
        n2.ns.spawn_ready(&[runner.as_ref(), t2.as_str()])?,
    ];

    // Attached in the mode asked for: a clsact filter bpftool lists, or a
    // pinned TCX link (which Debian 12's bpftool 7.1 does not list there).
    let filters = n1
        .ns
        .run(&["bpftool", "-j", "net", "show", "dev", "eth0"])?;
    let listed: serde_json::Value = serde_json::from_str(&filters)?;
    let tc_filter = listed[0]["tc"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|f| f["kind"] == "clsact/ingress" && f["name"] == "uplink_ingress");
    let tcx_link = pin1.join("links/uplink_ingress@eth0").exists();
    assert_eq!(
        (tc_filter, tcx_link),
        (mode == "netlink", mode == "tcx"),
        "{mode}: {filters}"
    );

    // Capture the underlay while the traffic runs.
    let pcap = dir.path().join("underlay.pcap");
    let pcap_s = pcap.to_string_lossy().into_owned();
    let _capture = under.ns.spawn_quiet(&[
        "tcpdump", "-i", &n1.peer, "-U", "-w", &pcap_s, "udp", "port", "50103",
    ])?;
    std::thread::sleep(std::time::Duration::from_millis(800));

    // Ping by service IP, v4 and v6; replies come from the service address.
    let ping = c1.ns.sh("busybox ping -c 3 -W 2 10.30.55.56")?;
    assert!(ping.contains("3 packets received"), "{ping}");
    assert!(ping.contains("bytes from 10.30.55.56"), "{ping}");
    let ping6 = c1.ns.sh("busybox ping -6 -c 3 -W 2 fdff:2000::55:56")?;
    assert!(ping6.contains("3 packets received"), "{ping6}");

    // TCP byte streams, v4 and v6, hashed at the server: the client checks
    // length and SHA-256 of what arrived.
    let scripts = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts");
    let _stream_server = c2.ns.spawn_ready(&[
        "python3",
        &format!("{scripts}/stream_server.py"),
        "::",
        "8080",
    ])?;
    for target in ["10.30.55.56", "fdff:2000::55:56"] {
        let out = c1.ns.sh(&format!(
            "python3 {scripts}/stream_client.py {target} 8080 20000000"
        ))?;
        assert!(out.starts_with("ok"), "TCP stream to {target}: {out}");
    }

    // First packet to a never-seen service address: the SYN is held,
    // reinjected once the service is written, and accepted by the server --
    // so the client never retransmits it (upstream loses it and waits ~1 s).
    let before = syn_retransmits(&c1.ns)?;
    let out = c1.ns.sh(&format!(
        "python3 {scripts}/stream_client.py 10.30.77.77 8080 1000"
    ))?;
    assert!(out.starts_with("ok"), "first connection: {out}");
    assert_eq!(
        syn_retransmits(&c1.ns)?,
        before,
        "the held SYN was reinjected intact"
    );

    // UDP request/response through a connected socket: the reply must come
    // back from the service address or the socket would not accept it.
    let _udp_server = c2.ns.spawn_quiet(&["python3", "-c", "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('0.0.0.0',9999))\nwhile True:\n d,a=s.recvfrom(65535)\n s.sendto(d[::-1],a)"])?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    let udp = c1.ns.sh(
        "python3 -c \"import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(3)\ns.connect(('10.30.55.56',9999))\nfor i in range(5):\n  s.send(b'datagram-%d' % i)\n  print(s.recv(100).decode())\"",
    )?;
    assert_eq!(
        udp.lines().collect::<Vec<_>>(),
        (0..5).map(|i| format!("{i}-margatad")).collect::<Vec<_>>()
    );

    // The wire: UDP 50103 -> 50103 between the nodes, payload = the IP
    // packet with the client's instance IP as source and the backend's
    // namespace IP as destination.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let dump = sh(&format!(
        "tcpdump -nn -r {pcap_s} 2>/dev/null | head -5; tcpdump -nn -x -r {pcap_s} 2>/dev/null | head -12"
    ))?;
    assert!(
        dump.contains("198.51.100.1.50103 > 198.51.100.2.50103: UDP"),
        "{dump}"
    );
    let first = first_tunnel_payload(&pcap)?;
    assert_eq!(first[0] >> 4, 4, "inner IPv4");
    assert_eq!(
        &first[12..16],
        &[10, 30, 0, 3],
        "inner source = client's instance IP"
    );
    assert_eq!(
        &first[16..20],
        &[10, 18, 0, 66],
        "inner destination = backend namespace IP"
    );
    Ok(())
}

/// The client namespace's count of retransmitted SYNs.
fn syn_retransmits(ns: &NsPath) -> Result<u64> {
    let out = ns.run(&["nstat", "-az", "TcpExtTCPSynRetrans"])?;
    out.lines()
        .find_map(|l| l.strip_prefix("TcpExtTCPSynRetrans"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no TcpExtTCPSynRetrans in {out:?}"))
}

/// The UDP payload of the first packet in a pcap file (Ethernet link type),
/// read without a pcap library: 24-byte file header, 16-byte record header.
fn first_tunnel_payload(pcap: &std::path::Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(pcap)?;
    anyhow::ensure!(raw.len() > 24 + 16 + 42, "capture is empty");
    let incl = u32::from_le_bytes(raw[24 + 8..24 + 12].try_into()?) as usize;
    let frame = &raw[40..40 + incl];
    anyhow::ensure!(frame[12..14] == [0x08, 0x00], "outer IPv4");
    anyhow::ensure!(frame[23] == 17, "outer UDP");
    let ihl = ((frame[14] & 0xf) * 4) as usize;
    let udp = 14 + ihl;
    anyhow::ensure!(
        frame[udp + 2..udp + 4] == 50103u16.to_be_bytes(),
        "to the tunnel port"
    );
    Ok(frame[udp + 8..].to_vec())
}

// ---------------------------------------------------------------------------
// The field: nodes behind NAT, datagrams the receive program cannot take,
// second interfaces, an IPv6 underlay (docs/dataplane.md).

#[path = "../../netmanager/tests/packet_support/mod.rs"]
mod packet_support;

use std::net::IpAddr;
use std::time::Duration;

/// The two sites of these tests: container `c1` (10.18.0.2, fc00::2;
/// instance 10.30.0.3, fdff::3) on node 1 and `c2` (10.18.0.66, fc00::42;
/// instance 10.30.0.5, fdff::5) on node 2. Services 10.30.55.56 and
/// fdff:2000::55:56 lead to c2, 10.30.55.57 and fdff:2000::55:57 to c1.
const SITES: [(&str, &str, &str, &str); 2] = [
    ("10.18.0.2", "fc00::2", "10.30.0.3", "fdff::3"),
    ("10.18.0.66", "fc00::42", "10.30.0.5", "fdff::5"),
];

/// The static table of node `me` (1 or 2): its container local, the other
/// site's at `peer_ip`, every service.
fn site_table(
    pin: &PinDir,
    mode: &str,
    me: usize,
    uplink: &str,
    node_ip: &str,
    local: &Container,
    peer_ip: &str,
) -> serde_json::Value {
    let pin = pin.path();
    let (mine, theirs) = (SITES[me - 1], SITES[2 - me]);
    let instances = serde_json::json!([
        {"ns_ip": mine.0, "instance_ip": mine.2, "node_ip": node_ip, "veth": local.veth, "mac": local.mac},
        {"ns_ip": mine.1, "instance_ip": mine.3, "node_ip": node_ip, "veth": local.veth, "mac": local.mac},
        {"ns_ip": theirs.0, "instance_ip": theirs.2, "node_ip": peer_ip},
        {"ns_ip": theirs.1, "instance_ip": theirs.3, "node_ip": peer_ip},
    ]);
    let [s1, s2] = SITES;
    let t = serde_json::json!({
        "pin_dir": pin,
        "uplink": uplink,
        "attach_mode": mode,
        "node_ip": node_ip,
        "service_ranges": [["10.30.0.0", 16], ["fdff::", 16]],
        "instances": instances,
        "services": [
            {"ip": "10.30.55.56", "kind": "RR", "backends": [s2.0]},
            {"ip": "fdff:2000::55:56", "kind": "RR", "backends": [s2.1]},
            {"ip": "10.30.55.57", "kind": "RR", "backends": [s1.0]},
            {"ip": "fdff:2000::55:57", "kind": "RR", "backends": [s1.1]},
            {"ip": s1.2, "kind": "instance_ip", "backends": [s1.0]},
            {"ip": s1.3, "kind": "instance_ip", "backends": [s1.1]},
            {"ip": s2.2, "kind": "instance_ip", "backends": [s2.0]},
            {"ip": s2.3, "kind": "instance_ip", "backends": [s2.1]},
        ],
    });
    t
}

/// Writes `name` in `dir`; its path.
fn file(dir: &Path, name: &str, text: &str) -> Result<String> {
    let path = dir.join(name);
    std::fs::write(&path, text)?;
    Ok(path.to_string_lossy().into_owned())
}

/// The static dataplane of table `t` in `node`, once it said it is ready.
fn static_dataplane(node: &NsPath, t: &str) -> Result<Proc> {
    let runner = binary("oak-static-dataplane");
    node.spawn_ready(&[runner.to_string_lossy().as_ref(), t])
}

/// Containers c1 on `n1` and c2 on `n2`, as [`SITES`] says.
fn site_containers(n1: &NsPath, n2: &NsPath) -> Result<(Container, Container)> {
    let c1 = container(
        n1,
        "c1",
        ["10.18.0.2/26", "fc00::2/120", "10.18.0.1", "fc00::1"],
    )?;
    let c2 = container(
        n2,
        "c2",
        ["10.18.0.66/26", "fc00::42/120", "10.18.0.65", "fc00::41"],
    )?;
    Ok((c1, c2))
}

/// Service traffic both ways between the sites, v4 and v6: ping (replies
/// from the service address), a hashed TCP stream, UDP through a connected
/// socket.
fn traffic_both_ways(c1: &Container, c2: &Container) -> Result<()> {
    let scripts = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts");
    let echo = "import socket\ns=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\n\
                s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,0)\ns.bind(('::',9999))\n\
                while True:\n d,a=s.recvfrom(65535)\n s.sendto(d[::-1],a)";
    // Stopped when this returns, before the containers go.
    let mut servers = Vec::new();
    for c in [c1, c2] {
        servers.push(c.ns.spawn_ready(&[
            "python3",
            &format!("{scripts}/stream_server.py"),
            "::",
            "8080",
        ])?);
        servers.push(c.ns.spawn_quiet(&["python3", "-c", echo])?);
    }
    std::thread::sleep(Duration::from_millis(300));
    for (from, v4, v6) in [
        (c1, "10.30.55.56", "fdff:2000::55:56"),
        (c2, "10.30.55.57", "fdff:2000::55:57"),
    ] {
        let ping = from.ns.sh(&format!("busybox ping -c 3 -W 2 {v4}"))?;
        assert!(ping.contains("3 packets received"), "{v4}: {ping}");
        assert!(ping.contains(&format!("bytes from {v4}")), "{ping}");
        let ping6 = from.ns.sh(&format!("busybox ping -6 -c 3 -W 2 {v6}"))?;
        assert!(ping6.contains("3 packets received"), "{v6}: {ping6}");
        for target in [v4, v6] {
            let out = from.ns.sh(&format!(
                "python3 {scripts}/stream_client.py {target} 8080 5000000"
            ))?;
            assert!(out.starts_with("ok"), "TCP stream to {target}: {out}");
            let udp = from.ns.sh(&format!(
                "python3 -c \"import socket\nf=socket.AF_INET6 if ':' in '{target}' else socket.AF_INET\n\
                     s=socket.socket(f,socket.SOCK_DGRAM)\ns.settimeout(3)\ns.connect(('{target}',9999))\n\
                     for i in range(3):\n  s.send(b'datagram-%d' % i)\n  print(s.recv(100).decode())\""
            ))?;
            assert_eq!(
                udp.lines().collect::<Vec<_>>(),
                (0..3).map(|i| format!("{i}-margatad")).collect::<Vec<_>>(),
                "UDP to {target}"
            );
        }
    }
    Ok(())
}

/// One tunnel datagram of a capture.
struct Captured {
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    /// The whole UDP datagram.
    udp: Vec<u8>,
}

/// The UDP datagrams to or from port 50103 in a pcap file (Ethernet link
/// type, outer IPv4 without options or IPv6 without extension headers).
fn tunnel_datagrams(pcap: &std::path::Path) -> Result<Vec<Captured>> {
    let raw = std::fs::read(pcap)?;
    anyhow::ensure!(raw.len() >= 24, "not a capture");
    let mut at = 24;
    let mut out = Vec::new();
    while at + 16 <= raw.len() {
        let incl = u32::from_le_bytes(raw[at + 8..at + 12].try_into()?) as usize;
        let frame = &raw[at + 16..(at + 16 + incl).min(raw.len())];
        at += 16 + incl;
        if frame.len() < 14 + 40 + 8 {
            continue;
        }
        let (src, dst, udp) = match [frame[12], frame[13]] {
            [0x08, 0x00] if frame[14] == 0x45 && frame[23] == 17 => {
                let s: [u8; 4] = frame[26..30].try_into()?;
                let d: [u8; 4] = frame[30..34].try_into()?;
                (IpAddr::from(s), IpAddr::from(d), &frame[34..])
            }
            [0x86, 0xdd] if frame[20] == 17 => {
                let s: [u8; 16] = frame[22..38].try_into()?;
                let d: [u8; 16] = frame[38..54].try_into()?;
                (IpAddr::from(s), IpAddr::from(d), &frame[54..])
            }
            _ => continue,
        };
        let sport = u16::from_be_bytes([udp[0], udp[1]]);
        let dport = u16::from_be_bytes([udp[2], udp[3]]);
        if sport != 50103 && dport != 50103 {
            continue;
        }
        out.push(Captured {
            src,
            dst,
            sport,
            dport,
            udp: udp.to_vec(),
        });
    }
    Ok(out)
}

/// Starts tcpdump on `ifname` in `ns` for tunnel traffic, into a file in
/// `dir`; the capture and its path.
fn capture(dir: &Path, ns: &NsPath, ifname: &str, tag: &str) -> Result<(Proc, std::path::PathBuf)> {
    let path = file(dir, &format!("{tag}.pcap"), "")?;
    let p = ns.spawn_quiet(&[
        "tcpdump",
        "-i",
        ifname,
        "--immediate-mode",
        "-U",
        "-w",
        &path,
        "udp",
        "port",
        "50103",
    ])?;
    std::thread::sleep(Duration::from_millis(800));
    Ok((p, path.into()))
}

fn a_node_behind_nat_carries_service_traffic_both_ways(mode: &str) -> Result<()> {
    // n1 --- underlay 198.51.100.0/25 --- (wan .3) NAT (lan .129) --- n2 (.130)
    let dir = temp_dir();
    let under = Underlay::new()?;
    let n1 = bare_node("n1", "10.18.0.1/26", "fc00::1/120")?;
    under.plug_in(&n1, "eth0", &["198.51.100.1/25"])?;
    let nat = Netns::new("nat")?;
    under.plug_in(&nat, "wan", &["198.51.100.3/25"])?;
    let n2 = bare_node("n2", "10.18.0.65/26", "fc00::41/120")?;
    link(&n2, "eth0", &nat, "lan")?;
    n2.add_address("eth0", "198.51.100.130/25")?.keep();
    n2.add_route(&Route::default_via("198.51.100.129".parse()?))?
        .keep();
    // The router: masquerade outbound, forward the tunnel port to n2.
    let rules = file(
        dir.path(),
        "nat.nft",
        "table ip oaknat {\n\
         \tchain pre { type nat hook prerouting priority dstnat; iifname \"wan\" udp dport 50103 dnat to 198.51.100.130; }\n\
         \tchain post { type nat hook postrouting priority srcnat; oifname \"wan\" masquerade; }\n\
         }\n",
    )?;
    nat.add_address("lan", "198.51.100.129/25")?.keep();
    nat.sysctl("net/ipv4/ip_forward", "1")?;
    nat.run(&["nft", "-f", &rules])?;
    let (c1, c2) = site_containers(&n1, &n2)?;
    // Each node knows the other by its advertised address: n2 advertises
    // the router's, which it does not own.
    let (pin1, pin2) = (PinDir::new("nat1"), PinDir::new("nat2"));
    let t1 = file(
        dir.path(),
        "s1.json",
        &site_table(&pin1, mode, 1, "eth0", "198.51.100.1", &c1, "198.51.100.3").to_string(),
    )?;
    let t2 = file(
        dir.path(),
        "s2.json",
        &site_table(&pin2, mode, 2, "eth0", "198.51.100.3", &c2, "198.51.100.1").to_string(),
    )?;
    let _dataplanes = [static_dataplane(&n1, &t1)?, static_dataplane(&n2, &t2)?];
    let (_capture, pcap) = capture(dir.path(), &nat, "wan", "nat-wan")?;

    traffic_both_ways(&c1, &c2)?;

    // On the public side n2 is only ever the router's address; n2 sent from
    // the address its route gave (masqueraded), never from one it lacks.
    std::thread::sleep(Duration::from_millis(300));
    let seen = tunnel_datagrams(&pcap)?;
    let n1_ip: IpAddr = "198.51.100.1".parse()?;
    let public: IpAddr = "198.51.100.3".parse()?;
    assert!(seen.iter().any(|d| d.src == n1_ip && d.dst == public));
    assert!(seen.iter().any(|d| d.src == public && d.dst == n1_ip));
    for d in &seen {
        assert!(
            [d.src, d.dst].contains(&public) && [d.src, d.dst].contains(&n1_ip),
            "only n1 and the router's address on the public side: {} -> {}",
            d.src,
            d.dst
        );
    }
    Ok(())
}

fn fragmented_and_optioned_outer_datagrams_take_the_slow_path(mode: &str) -> Result<()> {
    // n2 plays an upstream worker: a plain UDP socket sends tunnel
    // datagrams, through a 1280-byte MTU, so its kernel fragments them.
    let dir = temp_dir();
    let under = Underlay::new()?;
    let n1 = bare_node("n1", "10.18.0.1/26", "fc00::1/120")?;
    under.plug_in(&n1, "eth0", &["198.51.100.1/24", "2001:db8::1/64"])?;
    let n2 = Netns::new("n2")?;
    let n2_peer = under.plug_in(&n2, "eth0", &["198.51.100.2/24", "2001:db8::2/64"])?;
    n2.set_link(
        "eth0",
        &LinkSettings {
            up: true,
            mtu: Some(1280),
            ..Default::default()
        },
    )?;
    let c1 = container(
        &n1,
        "c1",
        ["10.18.0.2/26", "fc00::2/120", "10.18.0.1", "fc00::1"],
    )?;
    let pin1 = PinDir::new("frag1");
    let t1 = file(
        dir.path(),
        "s1.json",
        &site_table(&pin1, mode, 1, "eth0", "198.51.100.1", &c1, "198.51.100.2").to_string(),
    )?;
    // n2 also sends from 2001:db8::2, an address its table entry does not
    // name (a multi-homed node): n1's operator trusts it (`TunnelPeers`),
    // else the sender check drops those datagrams as forged.
    let mut table: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&t1)?)?;
    table["tunnel_peers"] = serde_json::json!([["2001:db8::2", 128]]);
    std::fs::write(&t1, table.to_string())?;
    let _dataplane = static_dataplane(&n1, &t1)?;
    let scripts = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts");
    let received = file(dir.path(), "frag-received", "")?;
    let _sink = c1.ns.spawn_ready(&[
        "python3",
        &format!("{scripts}/udp_sink.py"),
        "9999",
        "3",
        &received,
    ])?;
    // Everything from n2: later fragments carry no UDP header to filter on.
    let pcap_path = file(dir.path(), "frag.pcap", "")?;
    let _capture = under.ns.spawn_quiet(&[
        "tcpdump",
        "-i",
        &n2_peer,
        "--immediate-mode",
        "-U",
        "-w",
        &pcap_path,
        "src",
        "host",
        "198.51.100.2",
        "or",
        "src",
        "host",
        "2001:db8::2",
    ])?;
    std::thread::sleep(Duration::from_millis(800));

    // From n2's instance address to c1: fragmented over IPv4 and over IPv6
    // (to n1's IPv6 address: the slow-path socket listens on every
    // address), and one small datagram whose outer header carries options.
    let mut expected = Vec::new();
    for (to, size, flags) in [
        ("198.51.100.1", 1400, ""),
        ("2001:db8::1", 1400, ""),
        ("198.51.100.1", 200, "--options"),
    ] {
        let sha = n2.sh(&format!(
            "python3 {scripts}/tunnel_send.py {to} 50103 10.30.0.5 10.18.0.2 9999 {size} {flags}"
        ))?;
        expected.push(format!("{size} {}", sha.trim()));
    }
    wait_for("the datagrams in c1", Duration::from_secs(10), || {
        std::fs::read_to_string(&received)
            .map(|s| s.lines().count() >= 3)
            .unwrap_or(false)
    })?;
    let got = std::fs::read_to_string(&received)?;
    let mut got: Vec<&str> = got.lines().collect();
    got.sort();
    expected.sort();
    assert_eq!(got, expected);

    // They did travel as IPv4 and IPv6 fragments, and with IPv4 options.
    // The capture may lag the delivery: wait until the last datagram sent
    // (the optioned one) is in the file, then judge the whole file; if it
    // never comes, the assertions below show what the capture holds.
    let read_wire = || sh(&format!("tcpdump -nn -v -r {pcap_path} 2>/dev/null"));
    let _ = wait_for(
        "the optioned datagram in the capture",
        Duration::from_secs(10),
        || read_wire().is_ok_and(|w| w.contains("options (")),
    );
    let wire = read_wire()?;
    assert!(wire.contains("flags [+]"), "IPv4 fragments: {wire}");
    assert!(
        wire.contains("next-header Fragment (44)"),
        "IPv6 fragments: {wire}"
    );
    assert!(
        wire.contains("options (NOP,NOP,NOP,EOL)"),
        "IPv4 options: {wire}"
    );
    Ok(())
}

fn a_second_interface_receives_and_reaches_peers_only_behind_it(mode: &str) -> Result<()> {
    // n1: eth0 on underlay A (its uplink, .1/25), eth1 on underlay B
    // (.129/25). n2 only on B (.130/25), reaching n1's advertised .1 via .129.
    let dir = temp_dir();
    let a = Underlay::new()?;
    let b = Underlay::segment("ub")?;
    let n1 = bare_node("n1", "10.18.0.1/26", "fc00::1/120")?;
    a.plug_in(&n1, "eth0", &["198.51.100.1/25"])?;
    let n1_eth1 = b.plug_in(&n1, "eth1", &["198.51.100.129/25"])?;
    let n2 = bare_node("n2", "10.18.0.65/26", "fc00::41/120")?;
    b.plug_in(&n2, "eth0", &["198.51.100.130/25"])?;
    n2.add_route(&Route::to("198.51.100.0/25")?.via("198.51.100.129".parse()?))?
        .keep();
    let (c1, c2) = site_containers(&n1, &n2)?;
    let (pin1, pin2) = (PinDir::new("twoif1"), PinDir::new("twoif2"));
    let t1 = file(
        dir.path(),
        "s1.json",
        &site_table(
            &pin1,
            mode,
            1,
            "eth0",
            "198.51.100.1",
            &c1,
            "198.51.100.130",
        )
        .to_string(),
    )?;
    let t2 = file(
        dir.path(),
        "s2.json",
        &site_table(
            &pin2,
            mode,
            2,
            "eth0",
            "198.51.100.130",
            &c2,
            "198.51.100.1",
        )
        .to_string(),
    )?;
    let _dataplanes = [static_dataplane(&n1, &t1)?, static_dataplane(&n2, &t2)?];
    let (_capture, pcap) = capture(dir.path(), &b.ns, &n1_eth1, "twoif")?;

    traffic_both_ways(&c1, &c2)?;

    // The receive program went onto eth1 by itself (it carries a node
    // address), next to the uplink's; recorded where the mode records
    // (a TCX link's pin, a tc filter's program pin).
    let records = if mode == "netlink" { "tc" } else { "links" };
    let pins = pin1.join(records);
    for ifname in ["eth0", "eth1"] {
        let pin = pins.join(format!("uplink_ingress@{ifname}"));
        assert!(pin.exists(), "{} pinned", pin.display());
    }
    // n1's datagrams to n2 left through eth1, from its advertised address.
    std::thread::sleep(Duration::from_millis(300));
    let seen = tunnel_datagrams(&pcap)?;
    let (n1_ip, n2_ip): (IpAddr, IpAddr) = ("198.51.100.1".parse()?, "198.51.100.130".parse()?);
    assert!(
        seen.iter().any(|d| d.src == n1_ip && d.dst == n2_ip),
        "n1 -> n2 on eth1"
    );
    assert!(
        seen.iter().any(|d| d.src == n2_ip && d.dst == n1_ip),
        "n2 -> n1 on eth1"
    );
    Ok(())
}

fn an_ipv6_only_underlay_carries_v4_and_v6_service_traffic(mode: &str) -> Result<()> {
    let dir = temp_dir();
    let under = Underlay::new()?;
    let n1 = bare_node("n1", "10.18.0.1/26", "fc00::1/120")?;
    let n1_peer = under.plug_in(&n1, "eth0", &["2001:db8::1/64"])?;
    let n2 = bare_node("n2", "10.18.0.65/26", "fc00::41/120")?;
    under.plug_in(&n2, "eth0", &["2001:db8::2/64"])?;
    let (c1, c2) = site_containers(&n1, &n2)?;
    let (pin1, pin2) = (PinDir::new("v6u1"), PinDir::new("v6u2"));
    let t1 = file(
        dir.path(),
        "s1.json",
        &site_table(&pin1, mode, 1, "eth0", "2001:db8::1", &c1, "2001:db8::2").to_string(),
    )?;
    let t2 = file(
        dir.path(),
        "s2.json",
        &site_table(&pin2, mode, 2, "eth0", "2001:db8::2", &c2, "2001:db8::1").to_string(),
    )?;
    let _dataplanes = [static_dataplane(&n1, &t1)?, static_dataplane(&n2, &t2)?];
    let (_capture, pcap) = capture(dir.path(), &under.ns, &n1_peer, "v6u")?;

    traffic_both_ways(&c1, &c2)?;

    // Every tunnel datagram is IPv6 with a correct, non-zero UDP checksum:
    // verified over the packet as it leaves a real NIC, i.e. with the inner
    // checksum completed (veths pass the kernel's partial one along).
    std::thread::sleep(Duration::from_millis(300));
    let seen = tunnel_datagrams(&pcap)?;
    assert!(seen.len() > 100, "{} datagrams captured", seen.len());
    let mut inner_v4 = 0;
    for d in &seen {
        assert!(d.src.is_ipv6() && d.dst.is_ipv6(), "{} -> {}", d.src, d.dst);
        assert_eq!((d.sport, d.dport), (50103, 50103));
        assert_ne!(&d.udp[6..8], &[0, 0], "zero UDP checksum over IPv6");
        let mut udp = d.udp.clone();
        complete_inner_checksum(&mut udp[8..]);
        let mut sum = pseudo_v6(d.src, d.dst, udp.len());
        sum.extend_from_slice(&udp);
        assert_eq!(
            packet_support::checksum(&sum),
            0,
            "UDP checksum of {} bytes",
            udp.len()
        );
        if udp[8] >> 4 == 4 {
            inner_v4 += 1;
        }
    }
    assert!(inner_v4 > 0, "IPv4 service traffic rode the IPv6 underlay");
    Ok(())
}

fn pseudo_v6(src: IpAddr, dst: IpAddr, len: usize) -> Vec<u8> {
    let (IpAddr::V6(s), IpAddr::V6(d)) = (src, dst) else {
        panic!("IPv6 addresses");
    };
    let mut p = Vec::new();
    p.extend_from_slice(&s.octets());
    p.extend_from_slice(&d.octets());
    p.extend_from_slice(&(len as u32).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 17]);
    p
}

/// Recomputes the L4 checksum of an IP packet from scratch, as a NIC
/// completes a partial one.
fn complete_inner_checksum(ip: &mut [u8]) {
    let v6 = ip[0] >> 4 == 6;
    let (proto, l4_at, mut pseudo) = if v6 {
        let len = ip.len() - 40;
        let mut p = ip[8..40].to_vec();
        p.extend_from_slice(&(len as u32).to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, ip[6]]);
        (ip[6], 40, p)
    } else {
        let ihl = ((ip[0] & 0xf) * 4) as usize;
        let len = ip.len() - ihl;
        let mut p = ip[12..20].to_vec();
        p.extend_from_slice(&[0, ip[9]]);
        p.extend_from_slice(&(len as u16).to_be_bytes());
        (ip[9], ihl, p)
    };
    let at = match proto {
        6 => 16,
        17 => 6,
        58 => 2,
        _ => return,
    };
    let l4 = &mut ip[l4_at..];
    if proto == 17 && !v6 && l4[at..at + 2] == [0, 0] {
        return;
    }
    l4[at] = 0;
    l4[at + 1] = 0;
    pseudo.extend_from_slice(l4);
    let mut c = packet_support::checksum(&pseudo);
    if proto == 17 && c == 0 {
        c = 0xffff;
    }
    l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
}
