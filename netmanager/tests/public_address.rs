//! PublicIPNetworking: with no NodePublicAddress, the node advertises the
//! address a discovery service sees it coming from (a NAT router's), as
//! upstream does with ifconfig.co. Here the service is a small HTTP server
//! in the node's namespace, at the URL netcfg.json names; NodePublicAddress
//! still wins, and a broken service leaves the uplink's own address. Needs
//! root, mosquitto and python3.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const JOB: &str = "pubaddr.test.web.test";
const NODE_ID: &str = "6650aa00bb22cc33dd440b01";

/// Answers every GET with the contents of `answer` (read per request) and
/// appends a line per request to `log`.
fn discovery_server(node: &Netns, port: u16, answer: &Path, log: &Path) -> Proc {
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
    let mut cmd = Command::new("python3");
    cmd.args(["-c", &script])
        .arg(log)
        .arg(answer)
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    node.enter(&mut cmd);
    let mut p = Proc(cmd.spawn().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(p.0.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "ready");
    p
}

struct Env {
    nm: Daemon,
    csm: ClusterDouble,
    _broker: Broker,
    _server: Proc,
    requests: std::path::PathBuf,
    /// What the discovery server answers.
    answer: std::path::PathBuf,
    node: Netns,
    _dir: TempDir,
}

/// A registered node with `netcfg` on top of the defaults, `env` on top of
/// the harness's, and a discovery server answering `answer`.
fn env_with(netcfg: Value, env: &[(&str, &str)], answer: &str) -> Option<Env> {
    if !require_root("public_address") {
        return None;
    }
    if try_run(&["python3", "-c", "pass"]).is_none() {
        eprintln!("SKIP public_address: needs python3");
        return None;
    }
    let dir = TempDir::new();
    let node = Netns::node(1);
    let requests = dir.path("requests.log");
    let answer_file = dir.path("answer");
    std::fs::write(&answer_file, answer).unwrap();
    let server = discovery_server(&node, 18080, &answer_file, &requests);
    let broker = Broker::start(&dir, Some(&node));
    let csm = ClusterDouble::start(broker.port, Some(&node), ("10.18.0.64", "fc00::40"));
    let mut nm = Daemon::start_with(&dir, &node, broker.port, netcfg);
    if !env.is_empty() {
        nm.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        nm.restart();
    }
    let (code, body) = nm.post(
        "/register",
        &json!({"client_id": NODE_ID, "cluster_address": "127.0.0.1"}).to_string(),
    );
    assert_eq!(code, 200, "{body}\n{}", nm.log_text());
    Some(Env {
        nm,
        csm,
        _broker: broker,
        _server: server,
        requests,
        answer: answer_file,
        node,
        _dir: dir,
    })
}

fn env(netcfg: Value, answer: &str) -> Option<Env> {
    env_with(netcfg, &[], answer)
}

fn requests(e: &Env) -> usize {
    std::fs::read_to_string(&e.requests)
        .unwrap_or_default()
        .lines()
        .count()
}

#[test]
fn public_ip_networking_advertises_the_discovered_address() {
    let Some(e) = env(
        json!({"PublicIPNetworking": true,
               "PublicIPDiscoveryUrl": "http://127.0.0.1:18080/ip"}),
        "203.0.113.7\n",
    ) else {
        return;
    };
    let (_, st) = e.nm.get("/status");
    assert_eq!(st["node_ip"], json!("203.0.113.7"), "{st}");
    assert!(requests(&e) >= 1);
    // Instances are announced with it.
    let c = container();
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

#[test]
fn node_public_address_overrides_public_ip_networking() {
    let Some(e) = env(
        json!({"PublicIPNetworking": true, "NodePublicAddress": "198.51.100.77",
               "PublicIPDiscoveryUrl": "http://127.0.0.1:18080/ip"}),
        "203.0.113.7\n",
    ) else {
        return;
    };
    let (_, st) = e.nm.get("/status");
    assert_eq!(st["node_ip"], json!("198.51.100.77"), "{st}");
    assert_eq!(requests(&e), 0, "the discovery service was asked");
}

#[test]
fn a_useless_answer_leaves_the_uplink_address() {
    let Some(e) = env(
        json!({"PublicIPNetworking": true,
               "PublicIPDiscoveryUrl": "http://127.0.0.1:18080/"}),
        "<html>not an address</html>",
    ) else {
        return;
    };
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
#[test]
fn the_public_address_is_asked_again_when_the_uplink_changes() {
    let Some(e) = env_with(
        json!({"PublicIPNetworking": true,
               "PublicIPDiscoveryUrl": "http://127.0.0.1:18080/ip"}),
        &[("NETMANAGER_ADDRESS_CHECK_SECS", "3600")],
        "203.0.113.7\n",
    ) else {
        return;
    };
    let asked = requests(&e);
    assert!(asked >= 1);
    let mut containers = Vec::new();
    for n in 0..3 {
        let c = container();
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
    e.node
        .ip(&["addr", "del", "198.51.100.1/24", "dev", "uplink0"])
        .unwrap();
    e.node
        .ip(&["addr", "add", "198.51.100.9/24", "dev", "uplink0"])
        .unwrap();
    e.node
        .ip(&["route", "replace", "default", "via", "198.51.100.254"])
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
