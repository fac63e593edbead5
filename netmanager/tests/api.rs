//! The socket API end to end: a NetManager process (without eBPF) in a node
//! namespace, a real mosquitto and the cluster double, "containers" that
//! are sleeping processes in their own namespaces.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tempfile::TempDir;
use testkit::netlink::{MacVtapMode, Route};
use testkit::runners::upstream_netcfg;
use testkit::{ClusterDouble, ContainerProcess, Mosquitto, NetManager, Netns, Node, NsPath};
use testkit::{temp_dir, wait_until};

testkit::main! {
    bad_requests_before_and_after_register: [Root, Mosquitto, Nft],
    deploy_two_containers_and_undeploy: [Root, Mosquitto, Nft, Python3],
    restart_keeps_deployments: [Root, Mosquitto, Nft],
    rejoin_under_a_new_id_replaces_the_saved_state: [Root, Mosquitto, Nft],
    forged_and_unsolicited_table_results_are_ignored: [Root, Mosquitto, Nft],
    api_socket_is_private_and_checks_peers: [Root, Mosquitto, Nft, Python3],
    register_cluster_address_overrides_cluster_url: [Root, Mosquitto, Nft],
    unikernel_namespace_with_tap: [Root, Mosquitto, Nft],
    node_address_change_is_announced: [Root, Mosquitto, Nft],
}

const JOB1: &str = "clientsrvr.test.curl.test";
const JOB2: &str = "clientsrvr.test.nginx.test";
const NODE_ID: &str = "6650aa00bb22cc33dd440002";

/// Fields drop in order: daemon first, the directory with its log last.
struct Env {
    nm: NetManager,
    csm: ClusterDouble,
    _broker: Mosquitto,
    node: Node,
    _dir: TempDir,
}

fn env() -> Env {
    env_with(json!({}))
}

/// A node with a broker and the cluster double inside, and NetManager with
/// `extra` netcfg.json fields on top of upstream's defaults.
fn env_with(extra: Value) -> Env {
    let dir = temp_dir();
    let node = Node::standalone(1).expect("node namespace");
    let broker = Mosquitto::in_netns(&node.ns, "127.0.0.1", 1883, dir.path()).expect("mosquitto");
    let csm = ClusterDouble::options(broker.endpoint())
        .start()
        .expect("cluster double");
    csm.pin_subnet(NODE_ID, "10.18.0.64", "fc00::40");
    let nm = daemon(dir.path(), &node.ns, broker.port(), extra);
    Env {
        nm,
        csm,
        _broker: broker,
        node,
        _dir: dir,
    }
}

fn daemon(dir: &Path, node: &NsPath, mqtt_port: u16, extra: Value) -> NetManager {
    let mut cfg = upstream_netcfg(mqtt_port);
    if let (Some(cfg), Some(extra)) = (cfg.as_object_mut(), extra.as_object()) {
        cfg.extend(extra.clone());
    }
    NetManager::builder(env!("CARGO_BIN_EXE_NetManager"), node, dir)
        .netcfg(cfg)
        .env("NETMANAGER_ADDRESS_CHECK_SECS", "1")
        .start()
        .expect("NetManager")
}

fn container() -> ContainerProcess {
    ContainerProcess::start().expect("a container process")
}

fn register(nm: &NetManager) {
    let (code, body) = nm.post(
        "/register",
        &json!({"client_id": NODE_ID, "cluster_address": "127.0.0.1"}).to_string(),
    );
    assert_eq!(code, 200, "{body}");
}

fn deploy(nm: &NetManager, pid: u32, job: &str, instance: u32, ports: &str) -> (u16, Value) {
    nm.post(
        "/container/deploy",
        &json!({"pid": pid, "serviceName": job, "instanceNumber": instance, "portMappings": ports})
            .to_string(),
    )
}

fn assert_error(code: u16, body: &Value, want: u16) {
    assert_eq!(code, want, "{body}");
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "no error text in {body}"
    );
}

/// TCP from `from` to `addr` (an address of `to`), with python3 as both
/// ends since ping/nc are not always installed.
fn assert_tcp_reaches(to: &ContainerProcess, from: &ContainerProcess, addr: &str) {
    let _server = to
        .ns()
        .spawn(&["python3", "-c", "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('0.0.0.0',7000))\ns.listen()\ns.settimeout(10)\nc,_=s.accept()\nc.sendall(b'hello')\nc.close()"])
        .unwrap();
    let script = format!(
        "import socket,time\nfor i in range(50):\n  try:\n    s=socket.create_connection(('{addr}',7000),timeout=3);break\n  except OSError:\n    time.sleep(0.1)\nprint(s.recv(5).decode())"
    );
    let out = from.ns().run(&["python3", "-c", &script]).ok();
    assert_eq!(
        out.as_deref().map(str::trim),
        Some("hello"),
        "no TCP connectivity to {addr}"
    );
}

/// The addresses (without prefix) of `dev` in `ns`.
fn addresses(ns: &NsPath, dev: &str) -> Vec<String> {
    ns.addresses(dev)
        .unwrap()
        .iter()
        .map(|c| c.addr.to_string())
        .collect()
}

fn nft_rules(node: &Node) -> String {
    node.ns
        .run(&["nft", "list", "table", "inet", "oakestra"])
        .unwrap()
}

fn bad_requests_before_and_after_register() {
    let e = env();
    let nm = &e.nm;
    let (code, body) = nm.get("/status");
    assert_eq!(code, 200);
    assert_eq!(body["registered"], json!(false));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&nm.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");

    let c = container();
    let (code, body) = deploy(nm, c.pid(), JOB1, 0, "");
    assert_error(code, &body, 400); // before register
    let (code, body) = nm.post("/register", "{not json");
    assert_error(code, &body, 400);
    let (code, body) = nm.post("/register", r#"{"cluster_address":"127.0.0.1"}"#);
    assert_error(code, &body, 400);
    let (code, body) = nm.post("/nope", "{}");
    assert_error(code, &body, 404);
    let (code, body) = nm.get("/container/deploy/x");
    assert_error(code, &body, 404);

    // Not ready before registration: for probes and for scripts.
    let (code, body) = nm.get("/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(
        body["reasons"][0]
            .as_str()
            .unwrap_or("")
            .contains("not registered"),
        "{body}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_NetManager"))
        .args(["status", "--socket"])
        .arg(&nm.socket)
        .output()
        .unwrap();
    assert!(!out.status.success(), "status exits 0 while not ready");
    register(nm);
    register(nm); // same id again
    wait_until("ready", Duration::from_secs(10), || {
        nm.get("/readyz").0 == 200
    });
    let (code, body) = nm.get("/healthz");
    assert_eq!((code, body), (200, json!({"status": "ok"})));
    let (code, body) = nm.post(
        "/register",
        r#"{"client_id":"ffffffffffffffffffffffff","cluster_address":"127.0.0.1"}"#,
    );
    assert_error(code, &body, 400);

    let (code, body) = nm.post("/container/deploy", r#"{"pid": "x"}"#);
    assert_error(code, &body, 400);
    let (code, body) = nm.post(
        "/container/deploy",
        r#"{"pid": 1, "serviceName": "a.b.c", "instanceNumber": 0}"#,
    );
    assert_error(code, &body, 400);
    let (code, body) = deploy(nm, c.pid(), "a.b.c.d.e", 0, "");
    assert_error(code, &body, 400);
    let (code, body) = deploy(nm, c.pid(), JOB1, 0, "80:x");
    assert_error(code, &body, 400);
    let (code, body) = deploy(nm, 4_000_000, JOB1, 0, "");
    assert_error(code, &body, 400); // no such pid
    let (code, body) = nm.post("/container/undeploy", r#"{"serviceName": 3}"#);
    assert_error(code, &body, 400);

    // Still serving, nothing half-created.
    let (code, body) = nm.get("/status");
    assert_eq!(code, 200);
    assert_eq!(body["registered"], json!(true));
    assert_eq!(body["deployments"].as_array().unwrap().len(), 0);
    assert!(e.node.ns.link("oakv2").unwrap().is_none());
    // Subnet request went out as the contract says.
    assert!(
        e.csm
            .seen_on("/net/subnet")
            .iter()
            .any(|v| v == &json!({"METHOD": "GET"}))
    );
    // A valid deploy still works afterwards.
    let (code, body) = deploy(nm, c.pid(), JOB1, 0, "");
    assert_eq!(code, 200, "{body}");
}

fn deploy_two_containers_and_undeploy() {
    let e = env();
    let nm = &e.nm;
    register(nm);
    let (c1, c2) = (container(), container());

    // The cluster's table for JOB1: our instance 0 and a remote one.
    e.csm.set_table(
        JOB1,
        json!({"instance_list": [
            {"instance_number": 0, "namespace_ip": "10.18.0.66", "namespace_ip_v6": "fc00::42",
             "host_ip": "198.51.100.1", "host_port": 50103, "service_ip": [
                {"IpType": "RR", "Address": "10.30.55.55", "Address_v6": "fdff:2000::55:55"},
                {"IpType": "instance_ip", "Address": "10.30.0.7", "Address_v6": "fdff::7"}]},
            {"instance_number": 1, "namespace_ip": "10.18.1.2", "namespace_ip_v6": "fc00::102",
             "host_ip": "198.51.100.2", "host_port": "50103", "service_ip": [
                {"IpType": "RR", "Address": "10.30.55.55", "Address_v6": "fdff:2000::55:55"},
                {"IpType": "instance_ip", "Address": "10.30.0.8", "Address_v6": "fdff::8"}]}
        ]}),
    );
    let (code, a1) = deploy(nm, c1.pid(), JOB1, 0, "9080:80/tcp;9081");
    assert_eq!(code, 200, "{a1}");
    assert_eq!(
        a1,
        json!({"serviceName": JOB1, "nsAddress": "10.18.0.66", "nsAddressv6": "fc00::42"})
    );
    let (code, a2) = deploy(nm, c2.pid(), JOB2, 3, "");
    assert_eq!(code, 200, "{a2}");
    assert_eq!(a2["nsAddress"], json!("10.18.0.67"));
    assert_eq!(a2["nsAddressv6"], json!("fc00::43"));
    // Same deployment again (a retry): same answer.
    let (code, again) = deploy(nm, c1.pid(), JOB1, 0, "9080:80/tcp;9081");
    assert_eq!((code, &again), (200, &a1));

    // Inside the first container: address, MTU, routes.
    let inside = c1.ns();
    let link = inside.link("eth0").unwrap().expect("eth0 in the container");
    assert_eq!(link.mtu, 1450);
    assert_eq!(link.mac, Some([0x02, 0x0a, 0x0a, 0x12, 0x00, 0x42]));
    let addrs: Vec<String> = inside
        .addresses("eth0")
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(addrs.contains(&"10.18.0.66/26".to_string()), "{addrs:?}");
    assert!(addrs.contains(&"fc00::42/120".to_string()), "{addrs:?}");
    let r4 = inside.default_gateway(false).unwrap();
    assert_eq!(r4, Some("10.18.0.65".parse().unwrap()), "{r4:?}");
    let r6 = inside.default_gateway(true).unwrap();
    assert_eq!(r6, Some("fc00::41".parse().unwrap()), "{r6:?}");

    // On the node: the bridge with the gateway, veths on it, forwarding, NAT.
    let br_addrs = addresses(&e.node.ns, "goProxyBridge");
    assert!(
        br_addrs.contains(&"10.18.0.65".to_string()) && br_addrs.contains(&"fc00::41".to_string()),
        "{br_addrs:?}"
    );
    assert_eq!(
        e.node.ns.master_of("oakv2").unwrap().as_deref(),
        Some("goProxyBridge")
    );
    // The bridge has an address of its own (the gateway's, in the
    // containers' scheme), not the lowest of its ports', which would move
    // under containers' ARP caches whenever a veth joins.
    let bridge = e
        .node
        .ns
        .link("goProxyBridge")
        .unwrap()
        .expect("the bridge");
    assert_eq!(bridge.mac, Some([0x02, 0x0a, 0x0a, 0x12, 0x00, 0x41]));
    assert_eq!(e.node.ns.link("oakv2").unwrap().map(|l| l.mtu), Some(1450));
    let fwd = e.node.ns.read_sysctl("net/ipv4/ip_forward").unwrap();
    assert_eq!(fwd, "1");
    let rules = nft_rules(&e.node);
    assert!(rules.contains("dnat ip to 10.18.0.66:80"), "{rules}");
    assert!(rules.contains("dnat ip to 10.18.0.66:9081"), "{rules}");
    assert!(rules.contains("masquerade"), "{rules}");

    // The two containers reach each other over the bridge.
    assert_tcp_reaches(&c2, &c1, "10.18.0.67");

    // The cluster heard about both, and the own job was queried at once.
    let deployed = e
        .csm
        .wait_for("/net/service/deployed", 2, Duration::from_secs(10));
    let d1 = deployed
        .iter()
        .find(|d| d["appname"] == json!(JOB1))
        .unwrap();
    assert_eq!(d1["status"], json!("DEPLOYED"));
    assert_eq!(d1["nsip"], json!("10.18.0.66"));
    assert_eq!(d1["nsipv6"], json!("fc00::42"));
    assert_eq!(d1["host_ip"], json!("198.51.100.1"));
    assert_eq!(d1["host_port"], json!("50103"));
    assert_eq!(d1["instance_number"], json!(0));
    let queries = e
        .csm
        .wait_for("/net/tablequery/request", 2, Duration::from_secs(10));
    assert!(
        queries
            .iter()
            .any(|q| q["sname"] == json!(JOB1) && q["sip"] == json!("")),
        "{queries:?}"
    );

    // The own job's table was applied and an interest registered; an update
    // from the cluster makes the daemon ask again.
    wait_until("JOB1 routes", Duration::from_secs(10), || {
        let (_, st) = nm.get("/status");
        st["routes"]["jobs"]
            .as_array()
            .is_some_and(|j| j.contains(&json!(JOB1)))
            && st["interests"]
                .as_array()
                .is_some_and(|j| j.contains(&json!(JOB1)))
    });
    let (_, st) = nm.get("/status");
    assert_eq!(st["routes"]["instances"], json!(4), "{st}");
    assert_eq!(st["routes"]["services"], json!(6), "{st}");
    let before = e.csm.seen_on("/net/tablequery/request").len();
    std::thread::sleep(Duration::from_millis(300));
    e.csm.publish_update(JOB1);
    e.csm.wait_for(
        "/net/tablequery/request",
        before + 1,
        Duration::from_secs(10),
    );
    // The operator's view.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_NetManager"))
        .args(["status", "--socket"])
        .arg(&nm.socket)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("deployments (2)") && text.contains("10.18.0.66") && text.contains("maps"),
        "{text}"
    );

    // Undeploy removes everything of that container.
    let (code, body) = nm.post(
        "/container/undeploy",
        &json!({"serviceName": JOB1, "instanceNumber": 0}).to_string(),
    );
    assert_eq!(code, 200, "{body}");
    assert!(
        e.node.ns.link("oakv2").unwrap().is_none(),
        "host veth left behind"
    );
    assert!(
        c1.ns().link("eth0").unwrap().is_none(),
        "eth0 left in the container"
    );
    let rules = nft_rules(&e.node);
    assert!(!rules.contains("10.18.0.66"), "{rules}");
    let undeployed = e
        .csm
        .wait_for("/net/service/undeployed", 1, Duration::from_secs(10));
    assert_eq!(
        undeployed[0],
        json!({"appname": JOB1, "instance_number": 0})
    );

    // The freed address is handed out again.
    let c3 = container();
    let (code, a3) = deploy(nm, c3.pid(), JOB1, 1, "");
    assert_eq!(code, 200, "{a3}");
    assert_eq!(a3["nsAddress"], json!("10.18.0.66"));

    for (job, inst) in [(JOB2, 3), (JOB1, 1)] {
        let (code, body) = nm.post(
            "/docker/undeploy",
            &json!({"serviceName": job, "instanceNumber": inst}).to_string(),
        );
        assert_eq!(code, 200, "{body}");
    }
    let (_, status) = nm.get("/status");
    assert_eq!(
        status["deployments"].as_array().unwrap().len(),
        0,
        "{status}"
    );
    assert!(e.node.ns.link("oakv3").unwrap().is_none());
}

fn restart_keeps_deployments() {
    let mut e = env();
    register(&e.nm);
    let c1 = container();
    let (code, a1) = deploy(&e.nm, c1.pid(), JOB1, 0, "8080:80");
    assert_eq!(code, 200, "{a1}");

    e.nm.kill9();
    e.nm.restart().unwrap();
    // Registered again from the state file, same node id, same deployment.
    let (code, status) = e.nm.get("/status");
    assert_eq!(code, 200);
    assert_eq!(status["registered"], json!(true), "{status}");
    assert_eq!(status["node_id"], json!("6650aa00bb22cc33dd440002"));
    let deps = status["deployments"].as_array().unwrap();
    assert_eq!(deps.len(), 1, "{status}");
    assert_eq!(deps[0]["nsAddress"], json!("10.18.0.66"));
    // The container kept its interface and address throughout.
    let addr: Vec<String> = c1
        .ns()
        .addresses("eth0")
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(addr.contains(&"10.18.0.66/26".to_string()), "{addr:?}");
    // Registering with the same id is still fine, a different one is not.
    register(&e.nm);
    // A new container does not get the adopted address.
    let c2 = container();
    let (code, a2) = deploy(&e.nm, c2.pid(), JOB2, 0, "");
    assert_eq!(code, 200, "{a2}");
    assert_eq!(a2["nsAddress"], json!("10.18.0.67"));
    // And the adopted one can be undeployed as before.
    let (code, body) = e.nm.post(
        "/container/undeploy",
        &json!({"serviceName": JOB1, "instanceNumber": 0}).to_string(),
    );
    assert_eq!(code, 200, "{body}");
    assert!(e.node.ns.link("oakv2").unwrap().is_none());
    assert!(e.nm.alive());
}

/// The cluster hands out a new id when the node joins another cluster or its
/// hostname changes (docs/contract.md §3): the first /register of a process
/// may replace the saved identity; a later different id is refused.
fn rejoin_under_a_new_id_replaces_the_saved_state() {
    let mut e = env();
    register(&e.nm);
    let c1 = container();
    let (code, a1) = deploy(&e.nm, c1.pid(), JOB1, 0, "8080:80");
    assert_eq!(code, 200, "{a1}");
    e.nm.kill9();
    e.nm.restart().unwrap();
    let (_, status) = e.nm.get("/status");
    assert_eq!(
        status["node_id"],
        json!("6650aa00bb22cc33dd440002"),
        "{status}"
    );

    let new_id = "6650aa00bb22cc33dd44ffff";
    let (code, body) = e.nm.post(
        "/register",
        &json!({"client_id": new_id, "cluster_address": "127.0.0.1"}).to_string(),
    );
    assert_eq!(code, 200, "{body}");
    let (_, status) = e.nm.get("/status");
    assert_eq!(status["node_id"], json!(new_id), "{status}");
    assert_eq!(status["deployments"], json!([]), "{status}");
    // The old identity's container lost its interface; the new identity
    // asked for its own subnet.
    assert!(c1.ns().link("eth0").unwrap().is_none());
    assert_eq!(
        e.csm.seen_on(&format!("nodes/{new_id}/net/subnet")).len(),
        1
    );
    let saved = std::fs::read_to_string(&e.nm.state).unwrap();
    assert!(saved.contains(new_id) && !saved.contains(JOB1), "{saved}");
    // Now registered in this process: another id is refused, as upstream.
    let (code, body) = e.nm.post(
        "/register",
        r#"{"client_id":"6650aa00bb22cc33dd440003","cluster_address":"127.0.0.1"}"#,
    );
    assert_error(code, &body, 400);
    assert!(e.nm.alive());
}

/// Any client of the broker can publish on `nodes/<id>/net/tablequery/result`.
/// A result nobody asked for must not change routes, even for a job the node
/// already routes, and a result naming a wildcard job must not subscribe.
fn forged_and_unsolicited_table_results_are_ignored() {
    let e = env();
    let nm = &e.nm;
    register(nm);
    e.csm.set_table(
        JOB1,
        json!({"instance_list": [
            {"instance_number": 0, "namespace_ip": "10.18.0.66", "namespace_ip_v6": "fc00::42",
             "host_ip": "198.51.100.1", "host_port": 50103, "service_ip": [
                {"IpType": "RR", "Address": "10.30.55.55", "Address_v6": "fdff:2000::55:55"},
                {"IpType": "instance_ip", "Address": "10.30.0.7", "Address_v6": "fdff::7"}]}]}),
    );
    let c1 = container();
    let (code, a1) = deploy(nm, c1.pid(), JOB1, 0, "");
    assert_eq!(code, 200, "{a1}");
    let routed = || {
        let (_, st) = nm.get("/status");
        (st["routes"].clone(), st["interests"].clone())
    };
    wait_until("JOB1 routes", Duration::from_secs(10), || {
        routed().0["jobs"]
            .as_array()
            .is_some_and(|j| j.contains(&json!(JOB1)))
    });
    let before = routed();
    // The attacker redirects JOB1's service address to its own host, and
    // tries to make the node subscribe to every job's updates.
    let topic = "nodes/6650aa00bb22cc33dd440002/net/tablequery/result";
    for forged in [
        json!({"app_name": JOB1, "query_key": "10.30.55.55", "instance_list": [
            {"instance_number": 9, "namespace_ip": "10.18.9.2", "host_ip": "198.51.100.66", "host_port": 50103,
             "service_ip": [{"IpType": "RR", "Address": "10.30.55.55"}, {"IpType": "instance_ip", "Address": "10.30.9.9"}]}]}),
        json!({"app_name": JOB1, "query_key": JOB1, "instance_list": []}),
        json!({"app_name": "a.+.c.d", "query_key": "a.+.c.d", "instance_list": []}),
        json!({"app_name": "#", "query_key": "", "instance_list": []}),
    ] {
        e.csm.publish(topic, forged.to_string()).unwrap();
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(routed(), before, "an unsolicited result changed the routes");
    let mut e = e;
    assert!(e.nm.alive());
}

/// The API socket is created private, and even when its mode is loosened
/// another user's connection is refused (peer credentials).
fn api_socket_is_private_and_checks_peers() {
    use std::os::unix::fs::PermissionsExt;
    let e = env();
    let mode = std::fs::metadata(&e.nm.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    std::fs::set_permissions(&e.nm.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    // The temp dir is root's; let nobody reach the socket path.
    std::fs::set_permissions(
        e.nm.socket.parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let script = format!(
        "import socket\ns=socket.socket(socket.AF_UNIX)\ns.connect('{}')\n\
         s.sendall(b'GET /status HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n')\ns.settimeout(5)\n\
         print(repr(s.recv(100)))",
        e.nm.socket.display()
    );
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "python3",
            "-c",
            &script,
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("HTTP/1.1"),
        "another user got an answer: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Root still gets one.
    let (code, _) = e.nm.get("/status");
    assert_eq!(code, 200);
}

/// A cluster address in /register wins over ClusterUrl, as upstream.
fn register_cluster_address_overrides_cluster_url() {
    let e = env_with(json!({"ClusterUrl": "192.0.2.1"}));
    register(&e.nm);
    let (_, status) = e.nm.get("/status");
    assert_eq!(status["cluster_address"], json!("127.0.0.1"), "{status}");
}

fn unikernel_namespace_with_tap() {
    let e = env();
    register(&e.nm);
    let job = format!("uni{}.test.vm.test", std::process::id());
    let job = job.as_str();
    // Removed even if an assertion fails (the daemon is killed first).
    let ns = format!("{job}.instance.0");
    let _guard = Netns::adopt(&ns);
    let (code, a) = e.nm.post(
        "/unikernel/deploy",
        &json!({"pid": 0, "serviceName": job, "instanceNumber": 0, "portMappings": ""}).to_string(),
    );
    assert_eq!(code, 200, "{a}");
    let ns = format!("{job}.instance.0");
    // Upstream's layout: a macvtap in bridge mode on eth0, whose MAC the
    // dataplane delivers to (the guest takes over the instance address).
    let uk = NsPath::named(&ns);
    let tap = uk
        .link("tap0")
        .expect("unikernel namespace missing")
        .expect("tap0 missing");
    let eth0 = uk.link("eth0").unwrap().expect("eth0 missing");
    assert_eq!(tap.kind.as_deref(), Some("macvtap"), "{tap:?}");
    assert_eq!(tap.macvtap_mode, Some(MacVtapMode::Bridge), "{tap:?}");
    assert_eq!(tap.parent, Some(eth0.index), "{tap:?} not on {eth0:?}");
    let addrs = uk.addresses("eth0").unwrap();
    let want: std::net::IpAddr = a["nsAddress"].as_str().unwrap().parse().unwrap();
    assert!(addrs.iter().any(|c| c.addr == want), "{addrs:?}");
    let (code, body) = e.nm.post(
        "/unikernel/undeploy",
        &json!({"serviceName": job, "instanceNumber": 0}).to_string(),
    );
    assert_eq!(code, 200, "{body}");
    assert!(!std::path::Path::new(&format!("/run/netns/{ns}")).exists());
}

fn node_address_change_is_announced() {
    let e = env();
    register(&e.nm);
    let c = container();
    let (code, a) = deploy(&e.nm, c.pid(), JOB1, 2, "");
    assert_eq!(code, 200, "{a}");
    // The uplink moves to another address (DHCP renumbering, say).
    // (Deleting the primary address also drops secondaries: delete first.)
    e.node.ns.del_address("eth0", "198.51.100.1/24").unwrap();
    e.node
        .ns
        .add_address("eth0", "198.51.100.9/24")
        .unwrap()
        .keep();
    e.node
        .ns
        .replace_route(&Route::default_via("198.51.100.254".parse().unwrap()))
        .unwrap();
    let changed = e
        .csm
        .wait_for("/net/service/address-changed", 1, Duration::from_secs(15));
    assert_eq!(
        changed[0],
        json!({"appname": JOB1, "instance_number": 2, "host_ip": "198.51.100.9", "host_port": "50103"})
    );
    let (_, st) = e.nm.get("/status");
    assert_eq!(st["node_ip"], json!("198.51.100.9"));
}
