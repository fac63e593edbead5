//! PublicIPNetworking: with no NodePublicAddress, the node advertises the
//! address a discovery service sees it coming from (a NAT router's), as
//! upstream does with ifconfig.co. Here the service is a small HTTP server
//! in the node's namespace, at the URL netcfg.json names; NodePublicAddress
//! still wins, and a broken service leaves the uplink's own address. Needs
//! root, mosquitto and python3.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use testkit::netlink::Route;
use testkit::runners::upstream_netcfg;
use testkit::topology::UPLINK;
use testkit::{ClusterDouble, ContainerProcess, Mosquitto, NetManager, Node, Proc};

testkit::main! {
    public_ip_networking_advertises_the_discovered_address: [Root, Mosquitto, Nft, Python3],
    node_public_address_overrides_public_ip_networking: [Root, Mosquitto, Nft, Python3],
    a_useless_answer_leaves_the_uplink_address: [Root, Mosquitto, Nft, Python3],
    the_public_address_is_asked_again_when_the_uplink_changes: [Root, Mosquitto, Nft, Python3],
}

const JOB: &str = "pubaddr.test.web.test";
const NODE_ID: &str = "6650aa00bb22cc33dd440b01";

/// Answers every GET with the contents of `answer` (read per request) and
/// appends a line per request to `log`.
fn discovery_server(node: &Node, port: u16, answer: &Path, log: &Path) -> Proc {
    let script = format!(
        "import http.server,sys\n\
         class H(http.server.BaseHTTPRequestHandler):\n\
         \x20 def do_GET(self):\n\
         \x20   open(sys.argv[1],'a').write(self.path+'\\n')\n\
         \x20   body=open(sys.argv[2],'rb').read()\n\
         \x20   self.send_response(200)\n\
         \x20   self.send_header('Content-Type','text/plain')\n\
         \x20   self.send_header('Content-Length',str(len(body)))\n\
         \x20   self.end_headers()\n\
         \x20   self.wfile.write(body)\n\
         \x20 def log_message(self,*a): pass\n\
         s=http.server.HTTPServer(('127.0.0.1',{port}),H)\n\
         print('ready',flush=True)\n\
         s.serve_forever()"
    );
    let (log, answer) = (log.display().to_string(), answer.display().to_string());
    node.ns
        .spawn_ready(&["python3", "-c", &script, &log, &answer])
        .expect("the discovery server")
}

struct Env {
    nm: NetManager,
    csm: ClusterDouble,
    _broker: Mosquitto,
    _server: Proc,
    requests: std::path::PathBuf,
    /// What the discovery server answers.
    answer: std::path::PathBuf,
    node: Node,
    _dir: tempfile::TempDir,
}

/// A registered node with `netcfg` on top of the defaults, `env` on top of
/// the harness's, and a discovery server answering `answer`.
fn env_with(netcfg: Value, env: &[(&str, &str)], answer: &str) -> Env {
    let dir = testkit::temp_dir();
    let node = Node::standalone(1).expect("node namespace");
    let requests = dir.path().join("requests.log");
    let answer_file = dir.path().join("answer");
    std::fs::write(&answer_file, answer).unwrap();
    let server = discovery_server(&node, 18080, &answer_file, &requests);
    let broker = Mosquitto::in_netns(&node.ns, "127.0.0.1", 1883, dir.path()).expect("mosquitto");
    let csm = ClusterDouble::options(broker.endpoint())
        .start()
        .expect("cluster double");
    csm.pin_subnet(NODE_ID, "10.18.0.64", "fc00::40");
    let mut builder = NetManager::builder(env!("CARGO_BIN_EXE_NetManager"), &node.ns, dir.path())
        .netcfg(upstream_netcfg(broker.port()))
        .netcfg_with(netcfg)
        .env("NETMANAGER_ADDRESS_CHECK_SECS", "1");
    for (k, v) in env {
        builder = builder.env(k, v);
    }
    let nm = builder.start().expect("NetManager");
    let (code, body) = nm.post(
        "/register",
        &json!({"client_id": NODE_ID, "cluster_address": "127.0.0.1"}).to_string(),
    );
    assert_eq!(code, 200, "{body}\n{}", nm.log_text());
    Env {
        nm,
        csm,
        _broker: broker,
        _server: server,
        requests,
        answer: answer_file,
        node,
        _dir: dir,
    }
}

fn env(netcfg: Value, answer: &str) -> Env {
    env_with(netcfg, &[], answer)
}

fn requests(e: &Env) -> usize {
    std::fs::read_to_string(&e.requests)
        .unwrap_or_default()
        .lines()
        .count()
}

fn public_ip_networking_advertises_the_discovered_address() {
    let e = env(
        json!({"PublicIPNetworking": true,
               "PublicIPDiscoveryUrl": "http://127.0.0.1:18080/ip"}),
        "203.0.113.7\n",
    );
    let (_, st) = e.nm.get("/status");
    assert_eq!(st["node_ip"], json!("203.0.113.7"), "{st}");
    assert!(requests(&e) >= 1);
    // Instances are announced with it.
    let c = ContainerProcess::start().expect("a container");
    let (code, a) = e.nm.post(
        "/container/deploy",
        &json!({"pid": c.pid(), "serviceName": JOB, "instanceNumber": 0, "portMappings": ""})
            .to_string(),
    );
    assert_eq!(code, 200, "{a}");
    let deployed = e
        .csm
        .wait_for("/net/service/deployed", 1, Duration::from_secs(10));
    assert_eq!(deployed[0]["host_ip"], json!("203.0.113.7"), "{deployed:?}");
}

fn node_public_address_overrides_public_ip_networking() {
    let e = env(
        json!({"PublicIPNetworking": true, "NodePublicAddress": "198.51.100.77",
               "PublicIPDiscoveryUrl": "http://127.0.0.1:18080/ip"}),
        "203.0.113.7\n",
    );
    let (_, st) = e.nm.get("/status");
    assert_eq!(st["node_ip"], json!("198.51.100.77"), "{st}");
    assert_eq!(requests(&e), 0, "the discovery service was asked");
}

fn a_useless_answer_leaves_the_uplink_address() {
    let e = env(
        json!({"PublicIPNetworking": true,
               "PublicIPDiscoveryUrl": "http://127.0.0.1:18080/"}),
        "<html>not an address</html>",
    );
    let (_, st) = e.nm.get("/status");
    assert_eq!(st["node_ip"], json!("198.51.100.1"), "{st}");
    assert!(requests(&e) >= 1);
    assert!(
        e.nm.log_text().contains("is not an IP address"),
        "{}",
        e.nm.log_text()
    );
}

/// Deployments (new veths, so link events) do not bother the discovery
/// service; the uplink being renumbered does, and a new public address is
/// announced to the cluster. The poll is an hour: only events act here.
fn the_public_address_is_asked_again_when_the_uplink_changes() {
    let e = env_with(
        json!({"PublicIPNetworking": true,
               "PublicIPDiscoveryUrl": "http://127.0.0.1:18080/ip"}),
        &[("NETMANAGER_ADDRESS_CHECK_SECS", "3600")],
        "203.0.113.7\n",
    );
    let asked = requests(&e);
    assert!(asked >= 1);
    let mut containers = Vec::new();
    for n in 0..3 {
        let c = ContainerProcess::start().expect("a container");
        let (code, a) = e.nm.post(
            "/container/deploy",
            &json!({"pid": c.pid(), "serviceName": JOB, "instanceNumber": n, "portMappings": ""})
                .to_string(),
        );
        assert_eq!(code, 200, "{a}");
        containers.push(c);
    }
    e.csm
        .wait_for("/net/service/deployed", 3, Duration::from_secs(10));
    // Let the deployments' link events settle and be looked at.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(requests(&e), asked, "asked again for deployments");

    // DHCP renumbers the uplink; the router got a new public address too.
    std::fs::write(&e.answer, "203.0.113.8\n").unwrap();
    // (Deleting the primary address also drops secondaries: delete first.)
    e.node.ns.del_address(UPLINK, "198.51.100.1/24").unwrap();
    e.node
        .ns
        .add_address(UPLINK, "198.51.100.9/24")
        .unwrap()
        .keep();
    let gateway: IpAddr = "198.51.100.254".parse().unwrap();
    e.node
        .ns
        .replace_route(&Route::default_via(gateway))
        .unwrap();
    let changed = e
        .csm
        .wait_for("/net/service/address-changed", 3, Duration::from_secs(15));
    assert!(
        changed.iter().all(|m| m["host_ip"] == "203.0.113.8"),
        "{changed:?}"
    );
    let (_, st) = e.nm.get("/status");
    assert_eq!(st["node_ip"], json!("203.0.113.8"), "{st}");
    assert!(requests(&e) > asked);
}
