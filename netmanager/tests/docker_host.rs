//! A node whose host also runs Docker: Docker sets the iptables FORWARD
//! policy to DROP, which our own nft table cannot overrule. Container
//! egress and a host-port mapping must still work, with the drop set
//! through iptables-nft (nftables' `ip filter` table) and through
//! iptables-legacy (x_tables), and the accepts NetManager adds must be
//! idempotent and go away with the bridge. Needs root, mosquitto, python3
//! and iptables.

use serde_json::json;
use testkit::runners::upstream_netcfg;
use testkit::{
    ClusterDouble, ContainerProcess, Mosquitto, NetManager, Netns, NsPath, Proc, Underlay,
};

testkit::main! {
    forward_drop_of_iptables_nft: [Root, Mosquitto, Nft, Python3, Iptables],
    forward_drop_of_iptables_legacy: [Root, Mosquitto, Nft, Python3, Iptables],
    forward_accepts_are_idempotent_and_removed: [Root, Nft, Iptables],
}

const JOB: &str = "dockerhost.test.web.test";
const NODE_ID: &str = "6650aa00bb22cc33dd440a01";

/// `cmd` inside `ns`; its output, None if it failed.
fn in_ns(ns: &NsPath, cmd: &[&str]) -> Option<String> {
    ns.run(cmd).ok()
}

/// A TCP server in `ns` answering every connection with its peer's address.
fn who_am_i_server(ns: &NsPath, port: u16) -> Proc {
    let script = format!(
        "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
         s.bind(('0.0.0.0',{port}))\ns.listen(8)\nprint('ready',flush=True)\n\
         while True:\n  c,a=s.accept()\n  c.sendall(('from '+a[0]).encode())\n  c.close()"
    );
    ns.spawn_ready(&["python3", "-c", &script])
        .expect("the who-am-I server")
}

/// One connection to addr:port from `ns`; what came back.
fn connect(ns: &NsPath, addr: &str, port: u16) -> Option<String> {
    let script = format!(
        "import socket\ns=socket.create_connection(('{addr}',{port}),timeout=3)\nprint(s.recv(100).decode())"
    );
    ns.run(&["python3", "-c", &script])
        .ok()
        .map(|s| s.trim().to_string())
}

/// Egress and DNAT through a node whose FORWARD policy `iptables` set to DROP.
fn egress_and_port_mapping_survive_forward_drop(iptables: &str, ip6tables: &str) {
    let dir = testkit::temp_dir();
    let underlay = Underlay::new().expect("underlay");
    let node = underlay.node(1).expect("node");
    // What Docker does when it starts on the host.
    for bin in [iptables, ip6tables] {
        in_ns(&node.ns, &[bin, "-P", "FORWARD", "DROP"]).expect("setting the FORWARD policy");
    }
    let broker =
        Mosquitto::in_netns(&underlay.ns, "198.51.100.254", 1883, dir.path()).expect("mosquitto");
    let csm = ClusterDouble::options(broker.endpoint())
        .start()
        .expect("cluster double");
    csm.pin_subnet(NODE_ID, "10.18.0.64", "fc00::40");
    let nm = NetManager::builder(env!("CARGO_BIN_EXE_NetManager"), &node.ns, dir.path())
        .netcfg(upstream_netcfg(broker.port()))
        .env("NETMANAGER_ADDRESS_CHECK_SECS", "1")
        .start()
        .expect("NetManager");
    let (code, body) = nm.post(
        "/register",
        &json!({"client_id": NODE_ID, "cluster_address": "198.51.100.254"}).to_string(),
    );
    assert_eq!(code, 200, "{body}");
    let c = ContainerProcess::start().expect("a container");
    let (code, a) = nm.post(
        "/container/deploy",
        &json!({"pid": c.pid(), "serviceName": JOB, "instanceNumber": 0, "portMappings": "8080:7000"})
            .to_string(),
    );
    assert_eq!(code, 200, "{a}");

    // Egress: the container reaches a server outside the node, masqueraded.
    let _outside = who_am_i_server(&underlay.ns, 7500);
    assert_eq!(
        connect(&c.ns(), "198.51.100.254", 7500).as_deref(),
        Some("from 198.51.100.1"),
        "container egress through FORWARD DROP ({iptables})\n{}",
        nm.log_text()
    );

    // DNAT: the host port reaches the container.
    let _inside = who_am_i_server(&c.ns(), 7000);
    assert_eq!(
        connect(&underlay.ns, "198.51.100.1", 8080).as_deref(),
        Some("from 198.51.100.254"),
        "host port 8080 through FORWARD DROP ({iptables})"
    );

    // Deploying again rewrites NAT and re-checks FORWARD: still two accepts.
    let c2 = ContainerProcess::start().expect("a container");
    let (code, a) = nm.post(
        "/container/deploy",
        &json!({"pid": c2.pid(), "serviceName": JOB, "instanceNumber": 1, "portMappings": ""})
            .to_string(),
    );
    assert_eq!(code, 200, "{a}");
    let rules = in_ns(&node.ns, &[iptables, "-S", "FORWARD"]).unwrap();
    assert_eq!(
        rules.matches("oakestra-netmanager").count(),
        2,
        "{iptables} -S FORWARD:\n{rules}"
    );
}

fn forward_drop_of_iptables_nft() {
    egress_and_port_mapping_survive_forward_drop("iptables-nft", "ip6tables-nft");
}

fn forward_drop_of_iptables_legacy() {
    egress_and_port_mapping_survive_forward_drop("iptables-legacy", "ip6tables-legacy");
}

/// The accepts are added once however often NetManager asks, in every
/// backend holding a FORWARD chain, and removed with the bridge.
fn forward_accepts_are_idempotent_and_removed() {
    let node = Netns::new("fwd").expect("namespace");
    for bin in [
        "iptables-nft",
        "ip6tables-nft",
        "iptables-legacy",
        "ip6tables-legacy",
    ] {
        in_ns(&node, &[bin, "-P", "FORWARD", "DROP"]).unwrap();
    }
    let count = |bin: &str| {
        in_ns(&node, &[bin, "-S", "FORWARD"])
            .unwrap()
            .matches("oakestra-netmanager")
            .count()
    };
    node.within(|| {
        for _ in 0..3 {
            netmanager::plumbing::forward::ensure("goProxyBridge").unwrap();
        }
    })
    .expect("inside the namespace");
    for bin in [
        "iptables-nft",
        "ip6tables-nft",
        "iptables-legacy",
        "ip6tables-legacy",
    ] {
        assert_eq!(count(bin), 2, "{bin}");
        let rules = in_ns(&node, &[bin, "-S", "FORWARD"]).unwrap();
        assert!(
            rules.contains("-i goProxyBridge") && rules.contains("-o goProxyBridge"),
            "{bin}: {rules}"
        );
    }
    node.within(|| netmanager::plumbing::forward::remove("goProxyBridge").unwrap())
        .expect("inside the namespace");
    for bin in [
        "iptables-nft",
        "ip6tables-nft",
        "iptables-legacy",
        "ip6tables-legacy",
    ] {
        assert_eq!(count(bin), 0, "{bin}");
    }
    // A host without any FORWARD chain is left alone.
    let bare = Netns::new("fwdbare").expect("namespace");
    bare.within(|| netmanager::plumbing::forward::ensure("goProxyBridge").unwrap())
        .expect("inside the namespace");
    assert!(
        in_ns(&bare, &["nft", "list", "tables"])
            .unwrap()
            .trim()
            .is_empty()
    );
}
