//! Two (or three) nodes with real NetManagers and the eBPF dataplane, through
//! events a running cluster goes through: an instance moving to another
//! node, the MQTT broker restarting, and a NetManager killed with -9 in the
//! middle of a long TCP transfer. Needs root, bpffs, mosquitto and python3.
//!
//! Every test builds its own underlay namespace (bridge, broker, cluster
//! double) and node namespaces with unique names, and its daemons pin their
//! dataplane under unique directories, so the tests run in parallel. Each
//! runs in both attach modes (TCX links, classic tc filters), and with the
//! XDP program in front of the uplink program.

mod attach_support;

use std::time::{Duration, Instant};

use attach_support::{
    assert_attach_mode, assert_uplink_xdp, hook_of, ingress_programs, with_variant,
};
use serde_json::{Value, json};
use tempfile::TempDir;
use testkit::runners::upstream_netcfg;
use testkit::topology::UPLINK;
use testkit::{
    ClusterDouble, ContainerProcess, Mosquitto, NetManager, Node, PinDir, Proc, Underlay, temp_dir,
    wait_until,
};

testkit::main! {
    instance_moves_between_nodes("tcx") as tcx_instance_moves_between_nodes:
        [Root, Bpffs, Mosquitto, Nft, Python3, Tcx],
    instance_moves_between_nodes("netlink") as netlink_instance_moves_between_nodes:
        [Root, Bpffs, Mosquitto, Nft, Python3],
    instance_moves_between_nodes("xdp") as xdp_instance_moves_between_nodes:
        [Root, Bpffs, Mosquitto, Nft, Python3, Tcx],
    survives_broker_restart("tcx") as tcx_survives_broker_restart:
        [Root, Bpffs, Mosquitto, Nft, Python3, Tcx],
    survives_broker_restart("netlink") as netlink_survives_broker_restart:
        [Root, Bpffs, Mosquitto, Nft, Python3],
    survives_broker_restart("xdp") as xdp_survives_broker_restart:
        [Root, Bpffs, Mosquitto, Nft, Python3, Tcx],
    long_transfer_survives_kill9("tcx") as tcx_long_transfer_survives_kill9:
        [Root, Bpffs, Mosquitto, Nft, Python3, Bpftool, Tcx],
    long_transfer_survives_kill9("netlink") as netlink_long_transfer_survives_kill9:
        [Root, Bpffs, Mosquitto, Nft, Python3, Bpftool],
    long_transfer_survives_kill9("xdp") as xdp_long_transfer_survives_kill9:
        [Root, Bpffs, Mosquitto, Nft, Python3, Bpftool, Tcx],
    // TCP's GSO datagrams through generic XDP, then TC's decapsulation.
    long_transfer_survives_kill9("xdp-generic") as xdp_generic_long_transfer_survives_kill9:
        [Root, Bpffs, Mosquitto, Nft, Python3, Bpftool, Tcx],
    stream_survives_the_uplink_moving("tcx") as tcx_stream_survives_the_uplink_moving:
        [Root, Bpffs, Mosquitto, Nft, Python3, Bpftool, Tcx],
    stream_survives_the_uplink_moving("netlink") as netlink_stream_survives_the_uplink_moving:
        [Root, Bpffs, Mosquitto, Nft, Python3, Bpftool],
    stream_survives_the_uplink_moving("xdp") as xdp_stream_survives_the_uplink_moving:
        [Root, Bpffs, Mosquitto, Nft, Python3, Bpftool, Tcx],
    a_recreated_uplink_gets_its_program_back("tcx") as tcx_a_recreated_uplink_gets_its_program_back:
        [Root, Bpffs, Mosquitto, Nft, Python3, Bpftool, Tcx],
    a_recreated_uplink_gets_its_program_back("netlink") as netlink_a_recreated_uplink_gets_its_program_back:
        [Root, Bpffs, Mosquitto, Nft, Python3, Bpftool],
    a_recreated_uplink_gets_its_program_back("xdp") as xdp_a_recreated_uplink_gets_its_program_back:
        [Root, Bpffs, Mosquitto, Nft, Python3, Bpftool, Tcx],
}

const CLIENT: &str = "lfc.test.client.test";
const SERVER: &str = "lfc.test.server.test";
const SERVER2: &str = "lfc.test.second.test";
const SCRATCH: &str = "lfc.test.scratch.test";
const NODE_IDS: [&str; 3] = [
    "6650aa00bb22cc33dd441001",
    "6650aa00bb22cc33dd441002",
    "6650aa00bb22cc33dd441003",
];
/// Service addresses: the client's instance_ip, the server's RR address and
/// instance_ip, and the second server job's RR address and instance_ip.
const CLIENT_IIP: &str = "10.30.0.1";
const SERVER_RR: &str = "10.30.1.1";
const SERVER_IIP: &str = "10.30.0.2";
const SERVER2_RR: &str = "10.30.2.1";
const SERVER2_IIP: &str = "10.30.0.3";

/// One table instance (instance number 0) with an RR and an instance_ip address.
fn instance(nsip: &str, nsip6: &str, host: &str, rr: &str, iip: &str) -> Value {
    json!({"instance_number": 0, "namespace_ip": nsip, "namespace_ip_v6": nsip6,
           "host_ip": host, "host_port": 50103,
           "service_ip": [
               {"IpType": "RR", "Address": rr, "Address_v6": ""},
               {"IpType": "instance_ip", "Address": iip, "Address_v6": ""}]})
}

fn table(instances: Vec<Value>) -> Value {
    json!({ "instance_list": instances })
}

/// Nodes 1..=n on one underlay with a broker and a cluster double; node i
/// gets the subnet 10.18.(i-1).0/26. Fields drop in order: daemons first,
/// the directory with the logs last.
struct Cluster {
    nm: Vec<NetManager>,
    csm: ClusterDouble,
    broker: Mosquitto,
    nodes: Vec<Node>,
    underlay: Underlay,
    _dir: TempDir,
}

impl Cluster {
    fn new(n: usize, mode: &str) -> Cluster {
        Self::with_env(n, mode, &[])
    }

    /// `env` goes to every daemon.
    fn with_env(n: usize, mode: &str, env: &[(&str, &str)]) -> Cluster {
        let dir = temp_dir();
        let underlay = Underlay::new().expect("underlay");
        let nodes: Vec<Node> = (1..=n as u8)
            .map(|h| underlay.node(h).expect("node namespace"))
            .collect();
        let broker = Mosquitto::in_netns(&underlay.ns, "198.51.100.254", 1883, dir.path())
            .expect("mosquitto");
        let csm = ClusterDouble::options(broker.endpoint())
            .start()
            .expect("cluster double");
        for (i, id) in NODE_IDS.iter().enumerate().take(n) {
            csm.pin_subnet(
                id,
                &format!("10.18.{i}.0"),
                &format!("fc00::{:x}", i * 0x100),
            );
        }
        // The client's own table, so every node can route replies to it.
        csm.set_table(
            CLIENT,
            table(vec![instance(
                "10.18.0.2",
                "fc00::2",
                "198.51.100.1",
                "10.30.1.2",
                CLIENT_IIP,
            )]),
        );
        let nm: Vec<NetManager> = nodes
            .iter()
            .enumerate()
            .map(|(i, node)| {
                let mut b =
                    NetManager::builder(env!("CARGO_BIN_EXE_NetManager"), &node.ns, dir.path())
                        .tag(&format!("n{}", i + 1))
                        .netcfg(upstream_netcfg(broker.port()))
                        .dataplane(PinDir::new("nmt"))
                        .env("NETMANAGER_ADDRESS_CHECK_SECS", "1");
                b = with_variant(b, mode);
                for (k, v) in env {
                    b = b.env(k, v);
                }
                b.start().expect("NetManager")
            })
            .collect();
        for (d, id) in nm.iter().zip(NODE_IDS) {
            let (code, body) = d.post(
                "/register",
                &json!({"client_id": id, "cluster_address": "198.51.100.254"}).to_string(),
            );
            assert_eq!(code, 200, "{body}");
            assert_attach_mode(d, mode);
        }
        Cluster {
            nm,
            csm,
            broker,
            nodes,
            underlay,
            _dir: dir,
        }
    }

    /// Deploy `c` as instance 0 of `job` on node `node` (1-based); its nsAddress.
    fn deploy(&self, node: usize, c: &ContainerProcess, job: &str) -> String {
        let (code, a) = self.nm[node - 1].post(
            "/container/deploy",
            &json!({"pid": c.pid(), "serviceName": job, "instanceNumber": 0, "portMappings": ""})
                .to_string(),
        );
        assert_eq!(code, 200, "deploy {job} on node {node}: {a}");
        a["nsAddress"].as_str().unwrap().to_string()
    }

    fn undeploy(&self, node: usize, job: &str) {
        let (code, a) = self.nm[node - 1].post(
            "/container/undeploy",
            &json!({"serviceName": job, "instanceNumber": 0}).to_string(),
        );
        assert_eq!((code, a["undeployed"].clone()), (200, json!(true)), "{a}");
    }

    /// Messages node `node` published on `suffix` (e.g. "service/deployed").
    fn sent_by(&self, node: usize, suffix: &str) -> Vec<Value> {
        self.csm
            .seen_on(&format!("nodes/{}/net/{suffix}", NODE_IDS[node - 1]))
    }

    /// Table queries node `node` sent with `field` ("sname"/"sip") = `value`.
    fn queries(&self, node: usize, field: &str, value: &str) -> usize {
        self.sent_by(node, "tablequery/request")
            .iter()
            .filter(|q| q[field] == value)
            .count()
    }

    fn logs(&self) -> String {
        let nodes: String = self
            .nm
            .iter()
            .enumerate()
            .map(|(i, d)| format!("---- node {} ----\n{}", i + 1, d.log_text()))
            .collect();
        format!(
            "{nodes}---- the cluster double saw ----\n{}---- mosquitto ----\n{}",
            self.csm.transcript(),
            self.broker.log_text()
        )
    }
}

/// A python3 program in the network namespace of `c`, stdout piped.
fn python_in(c: &ContainerProcess, script: &str, args: &[&str]) -> Proc {
    let mut cmd = vec!["python3", "-c", script];
    cmd.extend_from_slice(args);
    c.ns().spawn(&cmd).expect("python3")
}

fn container() -> ContainerProcess {
    ContainerProcess::start().expect("a container process")
}

/// A TCP server answering every connection with "<tag> <peer address>".
fn tagged_server(c: &ContainerProcess, port: u16, tag: &str) -> Proc {
    let script = format!(
        "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
         s.bind(('0.0.0.0',{port}))\ns.listen(16)\nprint('ready',flush=True)\n\
         while True:\n  c,a=s.accept()\n  c.sendall(('{tag} '+a[0]).encode())\n  c.close()"
    );
    let mut p = python_in(c, &script, &[]);
    p.wait_ready().expect("the server");
    p
}

/// One connection from `c` to addr:port; what the server said.
fn tcp_get(c: &ContainerProcess, addr: &str, port: u16) -> Option<String> {
    let script = format!(
        "import socket\ns=socket.create_connection(('{addr}',{port}),timeout=3)\nprint(s.recv(100).decode())"
    );
    c.ns()
        .run(&["python3", "-c", &script])
        .ok()
        .map(|s| s.trim().to_string())
}

/// Connect until the answer is `want` or `timeout` passes; the last answer.
fn tcp_get_until(
    c: &ContainerProcess,
    addr: &str,
    port: u16,
    want: &str,
    timeout: Duration,
) -> Option<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let got = tcp_get(c, addr, port);
        if got.as_deref() == Some(want) || Instant::now() >= deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// An instance of SERVER moves node 2 -> node 3 -> node 1. Each move: deploy
/// at the new place, the cluster updates the table and publishes
/// updates_available, the old instance is undeployed. Node 1's client must
/// reach the service at its new place with every new connection.
fn instance_moves_between_nodes(mode: &str) {
    let cl = Cluster::new(3, mode);
    let client = container();
    assert_eq!(cl.deploy(1, &client, CLIENT), "10.18.0.2");

    // Start on node 2.
    let mut place = 2;
    let mut box_ = container();
    let nsip = cl.deploy(2, &box_, SERVER);
    cl.csm.set_table(
        SERVER,
        table(vec![instance(
            &nsip,
            "",
            "198.51.100.2",
            SERVER_RR,
            SERVER_IIP,
        )]),
    );
    let mut srv = tagged_server(&box_, 7000, "at2");
    let want = format!("at2 {CLIENT_IIP}");
    assert_eq!(
        tcp_get_until(&client, SERVER_RR, 7000, &want, Duration::from_secs(15)).as_deref(),
        Some(want.as_str()),
        "{}",
        cl.logs()
    );
    // Node 1 now follows the server's job (the client holds the interest).
    wait_until(
        "node 1 interest in the server job",
        Duration::from_secs(5),
        || {
            cl.nm[0].get("/status").1["interests"]
                .as_array()
                .is_some_and(|a| a.contains(&json!(SERVER)))
        },
    );

    for (to, host) in [(3usize, "198.51.100.3"), (1, "198.51.100.1")] {
        let new_box = container();
        let nsip = cl.deploy(to, &new_box, SERVER);
        let new_srv = tagged_server(&new_box, 7000, &format!("at{to}"));
        // The cluster learns the new place, then tells the interested nodes.
        cl.csm.set_table(
            SERVER,
            table(vec![instance(&nsip, "", host, SERVER_RR, SERVER_IIP)]),
        );
        let asked = cl.queries(1, "sname", SERVER);
        cl.csm.publish_update(SERVER);
        // The old instance goes away.
        cl.undeploy(place, SERVER);
        drop(srv);
        drop(box_);

        let want = format!("at{to} {CLIENT_IIP}");
        let got = tcp_get_until(&client, SERVER_RR, 7000, &want, Duration::from_secs(20));
        assert_eq!(
            got.as_deref(),
            Some(want.as_str()),
            "move {place} -> {to}\n{}",
            cl.logs()
        );
        assert!(
            cl.queries(1, "sname", SERVER) > asked,
            "node 1 did not query the job again after updates_available"
        );
        // Every new connection lands at the new place, by RR and by instance_ip.
        for i in 0..6 {
            let addr = if i % 2 == 0 { SERVER_RR } else { SERVER_IIP };
            assert_eq!(
                tcp_get(&client, addr, 7000).as_deref(),
                Some(want.as_str()),
                "connection {i} to {addr} after move {place} -> {to}"
            );
        }
        place = to;
        box_ = new_box;
        srv = new_srv;
    }
    drop(srv);
}

/// Kill the broker and start it again on the same port: afterwards a service
/// address node 1 never asked about resolves and carries traffic, the known
/// one still works, and deploy/undeploy on both nodes are published.
fn survives_broker_restart(mode: &str) {
    let mut cl = Cluster::new(2, mode);
    let client = container();
    assert_eq!(cl.deploy(1, &client, CLIENT), "10.18.0.2");
    let server = container();
    let nsip = cl.deploy(2, &server, SERVER);
    cl.csm.set_table(
        SERVER,
        table(vec![instance(
            &nsip,
            "",
            "198.51.100.2",
            SERVER_RR,
            SERVER_IIP,
        )]),
    );
    let _srv = tagged_server(&server, 7000, "one");
    let want1 = format!("one {CLIENT_IIP}");
    assert_eq!(
        tcp_get_until(&client, SERVER_RR, 7000, &want1, Duration::from_secs(15)).as_deref(),
        Some(want1.as_str()),
        "{}",
        cl.logs()
    );

    const CONNECTED: &str = "connected to the cluster MQTT broker";
    let connects: Vec<usize> = cl
        .nm
        .iter()
        .map(|d| d.log_text().matches(CONNECTED).count())
        .collect();
    assert!(connects.iter().all(|&n| n >= 1), "{}", cl.logs());
    cl.broker.stop();
    std::thread::sleep(Duration::from_secs(2));
    cl.broker.resume().expect("mosquitto back");
    cl.csm.wait_subscribed(Duration::from_secs(20));
    for (d, before) in cl.nm.iter().zip(&connects) {
        wait_until("NetManager reconnect", Duration::from_secs(20), || {
            d.log_text().matches(CONNECTED).count() > *before
        });
    }
    // Let the daemons' resubscriptions reach the broker.
    std::thread::sleep(Duration::from_secs(1));

    // Deploy after the restart is published.
    let server2 = container();
    let nsip2 = cl.deploy(2, &server2, SERVER2);
    wait_until(
        "service/deployed of the new job from node 2",
        Duration::from_secs(10),
        || {
            cl.sent_by(2, "service/deployed")
                .iter()
                .any(|m| m["appname"] == SERVER2 && m["nsip"] == nsip2.as_str())
        },
    );
    cl.csm.set_table(
        SERVER2,
        table(vec![instance(
            &nsip2,
            "",
            "198.51.100.2",
            SERVER2_RR,
            SERVER2_IIP,
        )]),
    );
    let _srv2 = tagged_server(&server2, 7000, "two");

    // A service address node 1 never asked about: miss -> table query -> traffic.
    assert_eq!(cl.queries(1, "sip", SERVER2_RR), 0);
    let want2 = format!("two {CLIENT_IIP}");
    assert_eq!(
        tcp_get_until(&client, SERVER2_RR, 7000, &want2, Duration::from_secs(20)).as_deref(),
        Some(want2.as_str()),
        "{}",
        cl.logs()
    );
    assert!(
        cl.queries(1, "sip", SERVER2_RR) >= 1,
        "node 1 resolved {SERVER2_RR} without a table query"
    );
    // The address known from before the restart still works.
    assert_eq!(
        tcp_get(&client, SERVER_RR, 7000).as_deref(),
        Some(want1.as_str())
    );

    // Undeploy after the restart is published too.
    cl.undeploy(2, SERVER2);
    wait_until(
        "service/undeployed of the new job from node 2",
        Duration::from_secs(10),
        || {
            cl.sent_by(2, "service/undeployed")
                .iter()
                .any(|m| m["appname"] == SERVER2 && m["instance_number"] == 0)
        },
    );
    // And from node 1.
    let scratch = container();
    let nsip3 = cl.deploy(1, &scratch, SCRATCH);
    wait_until(
        "service/deployed from node 1",
        Duration::from_secs(10),
        || {
            cl.sent_by(1, "service/deployed")
                .iter()
                .any(|m| m["appname"] == SCRATCH && m["nsip"] == nsip3.as_str())
        },
    );
    cl.undeploy(1, SCRATCH);
    wait_until(
        "service/undeployed from node 1",
        Duration::from_secs(10),
        || {
            cl.sent_by(1, "service/undeployed")
                .iter()
                .any(|m| m["appname"] == SCRATCH)
        },
    );
}

/// ~100 MB, paced to last about 10 s, client on node 1 to the server's RR
/// address on node 2; prints "started" once data flows, then "ok" or
/// "MISMATCH" after comparing with stream_server.py's "<bytes> <sha256>".
const PACED_CLIENT: &str = r#"
import hashlib, os, socket, sys, time
addr, port, size, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
data = os.urandom(size)
view = memoryview(data)
chunk = 256 * 1024
rate = size / secs
c = socket.create_connection((addr, port), timeout=30)
start = time.time()
sent = 0
while sent < size:
    part = view[sent:sent + chunk]
    c.sendall(part)
    sent += len(part)
    if sent == 4 * chunk:
        print("started", flush=True)
    ahead = start + sent / rate - time.time()
    if ahead > 0:
        time.sleep(ahead)
c.shutdown(socket.SHUT_WR)
answer = b""
while True:
    d = c.recv(1000)
    if not d:
        break
    answer += d
expected = f"{size} {hashlib.sha256(data).hexdigest()}"
if answer.decode() != expected:
    print("MISMATCH", answer.decode(), "expected", expected, flush=True)
    sys.exit(1)
print("ok", f"{time.time() - start:.1f}s", flush=True)
"#;

/// kill -9 both NetManagers while a long TCP stream crosses the overlay and
/// restart them before it ends: the stream completes without a reset and
/// arrives intact.
fn long_transfer_survives_kill9(mode: &str) {
    let server_py = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/scripts/stream_server.py"
    );
    assert!(std::path::Path::new(server_py).exists(), "{server_py}");
    let mut cl = Cluster::new(2, mode);
    let client = container();
    assert_eq!(cl.deploy(1, &client, CLIENT), "10.18.0.2");
    let server = container();
    let nsip = cl.deploy(2, &server, SERVER);
    cl.csm.set_table(
        SERVER,
        table(vec![instance(
            &nsip,
            "",
            "198.51.100.2",
            SERVER_RR,
            SERVER_IIP,
        )]),
    );
    let mut sink = server
        .ns()
        .spawn(&["python3", server_py, "0.0.0.0", "7100"])
        .expect("stream server");
    sink.wait_ready().expect("stream server");

    const SIZE: usize = 100 * 1024 * 1024;
    let started = Instant::now();
    let mut stream = python_in(
        &client,
        PACED_CLIENT,
        &[SERVER_RR, "7100", &SIZE.to_string(), "10"],
    );
    assert_eq!(stream.read_line().unwrap(), "started", "{}", cl.logs());

    cl.nm[0].kill9();
    cl.nm[1].kill9();
    // The pinned dataplane carries on alone for a moment.
    std::thread::sleep(Duration::from_millis(500));
    cl.nm[0].restart().unwrap();
    cl.nm[1].restart().unwrap();
    for d in &cl.nm {
        let (_, st) = d.get("/status");
        assert_eq!(st["registered"], json!(true), "{st}");
        assert_eq!(st["deployments"].as_array().unwrap().len(), 1, "{st}");
    }
    // Otherwise the test proves nothing: the restart must fall inside the stream.
    assert!(
        stream.alive(),
        "the transfer ended before the daemons were back ({:?}); pace it slower",
        started.elapsed()
    );
    // Taken over in place: one uplink program per node, in this mode.
    for node in &cl.nodes {
        let progs = ingress_programs(&node.ns, UPLINK);
        assert_eq!(progs.len(), 1, "{progs:?}");
        assert_eq!(
            (progs[0].0.as_str(), progs[0].1.as_str()),
            (hook_of(mode), "uplink_ingress")
        );
        assert_uplink_xdp(&node.ns, UPLINK, mode);
    }

    wait_until("the transfer to end", Duration::from_secs(120), || {
        !stream.alive()
    });
    let status = stream.wait().unwrap();
    let rest = stream.read_rest().unwrap();
    assert!(
        status.success() && rest.starts_with("ok"),
        "stream failed ({status}): {rest}\n{}",
        cl.logs()
    );
    eprintln!("stream: {}", rest.trim());
}

/// Wi-Fi gives way to LTE: mid-stream, node 1's uplink goes down and its
/// default route falls to a second interface with another address. The
/// address poll is set to an hour, so only the kernel's route events can
/// tell NetManager. The uplink program, the tunnel's source and the
/// cluster's record of node 1 (`service/address-changed`, which the
/// cluster passes on as `updates_available`) follow, and the stream
/// arrives intact.
fn stream_survives_the_uplink_moving(mode: &str) {
    let server_py = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/scripts/stream_server.py"
    );
    let cl = Cluster::with_env(2, mode, &[("NETMANAGER_ADDRESS_CHECK_SECS", "3600")]);
    // Node 1's second way out, less preferred while the first is up.
    cl.underlay
        .add_uplink(&cl.nodes[0], "uplink1", 11, 200)
        .expect("a second uplink");
    let client = container();
    assert_eq!(cl.deploy(1, &client, CLIENT), "10.18.0.2");
    let server = container();
    let nsip = cl.deploy(2, &server, SERVER);
    cl.csm.set_table(
        SERVER,
        table(vec![instance(
            &nsip,
            "",
            "198.51.100.2",
            SERVER_RR,
            SERVER_IIP,
        )]),
    );
    let (_, st) = cl.nm[0].get("/status");
    assert_eq!(
        (st["uplink"].clone(), st["node_ip"].clone()),
        (json!(UPLINK), json!("198.51.100.1")),
        "{st}"
    );
    let mut sink = server
        .ns()
        .spawn(&["python3", server_py, "0.0.0.0", "7100"])
        .expect("stream server");
    sink.wait_ready().expect("stream server");

    const SIZE: usize = 60 * 1024 * 1024;
    let mut stream = python_in(
        &client,
        PACED_CLIENT,
        &[SERVER_RR, "7100", &SIZE.to_string(), "10"],
    );
    assert_eq!(stream.read_line().unwrap(), "started", "{}", cl.logs());

    // The first uplink goes away; the kernel moves the default route.
    cl.nodes[0].ns.set_down(UPLINK).expect("uplink down");
    wait_until(
        "node 1 to follow its uplink",
        Duration::from_secs(20),
        || {
            let (_, st) = cl.nm[0].get("/status");
            st["uplink"] == "uplink1" && st["node_ip"] == "198.51.100.11"
        },
    );
    // Otherwise the test proves nothing: the move must fall inside the stream.
    assert!(
        stream.alive(),
        "the transfer ended before the uplink moved; pace it slower"
    );
    let progs = ingress_programs(&cl.nodes[0].ns, "uplink1");
    assert_eq!(progs.len(), 1, "{progs:?}");
    assert_eq!(
        (progs[0].0.as_str(), progs[0].1.as_str()),
        (hook_of(mode), "uplink_ingress")
    );
    // The XDP program follows the uplink program.
    assert_uplink_xdp(&cl.nodes[0].ns, "uplink1", mode);
    // A link that is down keeps its addresses, and the receive program
    // stays on every interface that carries one (at most once).
    let old = ingress_programs(&cl.nodes[0].ns, UPLINK);
    assert!(old.len() <= 1, "programs on the old uplink: {old:?}");
    let announced = cl.sent_by(1, "service/address-changed");
    assert!(
        announced
            .iter()
            .any(|m| m["appname"] == CLIENT && m["host_ip"] == "198.51.100.11"),
        "{announced:?}"
    );

    wait_until("the transfer to end", Duration::from_secs(120), || {
        !stream.alive()
    });
    let status = stream.wait().unwrap();
    let rest = stream.read_rest().unwrap();
    assert!(
        status.success() && rest.starts_with("ok"),
        "stream failed ({status}): {rest}\n{}",
        cl.logs()
    );
    // With the sender check on: node 2 held node 1's first datagrams and
    // asked the cluster (which knows the client on node 1 and follows its
    // `address-changed`), and after the move held and asked again instead
    // of dropping them as forged.
    let (_, st) = cl.nm[1].get("/status");
    let count = |name: &str| attach_support::dataplane_counter(&st, name).unwrap_or(0);
    assert!(count("peer_held") >= 1, "{st}");
    assert_eq!(count("drop_forged_source"), 0, "{st}");
    eprintln!("stream across the uplink move: {}", rest.trim());
}

/// The uplink interface disappears and comes back under the same name and
/// address (a USB modem replugged, a VM's NIC re-added): its programs went
/// with the old interface, so NetManager attaches again -- told by the
/// kernel's link events, the poll being an hour -- and traffic flows.
fn a_recreated_uplink_gets_its_program_back(mode: &str) {
    let cl = Cluster::with_env(2, mode, &[("NETMANAGER_ADDRESS_CHECK_SECS", "3600")]);
    let client = container();
    assert_eq!(cl.deploy(1, &client, CLIENT), "10.18.0.2");
    let server = container();
    let nsip = cl.deploy(2, &server, SERVER);
    cl.csm.set_table(
        SERVER,
        table(vec![instance(
            &nsip,
            "",
            "198.51.100.2",
            SERVER_RR,
            SERVER_IIP,
        )]),
    );
    let _srv = tagged_server(&server, 7000, "up");
    let want = format!("up {CLIENT_IIP}");
    assert_eq!(
        tcp_get_until(&client, SERVER_RR, 7000, &want, Duration::from_secs(15)).as_deref(),
        Some(want.as_str()),
        "{}",
        cl.logs()
    );
    let node = &cl.nodes[0];
    node.ns.del_link(UPLINK).expect("the uplink removed");
    cl.underlay
        .add_uplink(node, UPLINK, 1, 0)
        .expect("the uplink back");
    wait_until(
        "the uplink program on the new uplink",
        Duration::from_secs(20),
        || ingress_programs(&node.ns, UPLINK).len() == 1,
    );
    let progs = ingress_programs(&node.ns, UPLINK);
    assert_eq!(
        (progs[0].0.as_str(), progs[0].1.as_str()),
        (hook_of(mode), "uplink_ingress")
    );
    assert_uplink_xdp(&node.ns, UPLINK, mode);
    assert_eq!(
        tcp_get_until(&client, SERVER_RR, 7000, &want, Duration::from_secs(15)).as_deref(),
        Some(want.as_str()),
        "{}",
        cl.logs()
    );
}
