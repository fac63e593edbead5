//! Operations (docs/operations.md): readiness and watchdog notifications on a
//! `NOTIFY_SOCKET` this test owns, JSON logs, `config check` against a real
//! broker and kernel, and `teardown` of a real eBPF dataplane.

mod attach_support;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use tempfile::TempDir;
use testkit::process::{Signal, run, signal};
use testkit::runners::upstream_netcfg;
use testkit::{ClusterDouble, ContainerProcess, Mosquitto, NetManager, Node, PinDir, temp_dir};
use worker_common::systemd::NotifyListener;

testkit::main! {
    ready_after_the_api_answers_then_watchdog_keepalives_and_json_logs: [Root],
    config_check_reports_each_problem_and_its_exit_code: [Root, Bpffs, Mosquitto, Nft],
    // In both attach modes: TCX links go with their pins, classic tc filters
    // must be deleted one by one.
    teardown_removes_pins_links_nft_table_and_bridge("tcx")
        as tcx_teardown_removes_pins_links_nft_table_and_bridge:
        [Root, Bpffs, Mosquitto, Nft, Bpftool, Tcx],
    teardown_removes_pins_links_nft_table_and_bridge("netlink")
        as netlink_teardown_removes_pins_links_nft_table_and_bridge:
        [Root, Bpffs, Mosquitto, Nft, Bpftool],
    // With the XDP program on the uplink: its link goes with its pin too.
    teardown_removes_pins_links_nft_table_and_bridge("xdp")
        as xdp_teardown_removes_pins_links_nft_table_and_bridge:
        [Root, Bpffs, Mosquitto, Nft, Bpftool, Tcx],
}

const NODE_ID: &str = "6650aa00bb22cc33dd440077";

fn netmanager(node: &Node, dir: &TempDir) -> Command {
    let mut cmd = node
        .ns
        .command(env!("CARGO_BIN_EXE_NetManager"))
        .expect("a command in the node namespace");
    cmd.env("NETMANAGER_CONFIG", dir.path().join("netcfg.json"))
        .env("NETMANAGER_SOCKET", dir.path().join("nm.sock"))
        .env("NETMANAGER_STATE", dir.path().join("state.json"))
        .env("NETMANAGER_BPF_DIR", dir.path().join("no-bpf"))
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("JOURNAL_STREAM")
        .env_remove("OAKESTRA_LOG_FORMAT");
    cmd
}

/// Kills the child if the test ends early.
struct Stopper(Child);

impl Drop for Stopper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `GET path` on the API socket: status and JSON body.
fn get(socket: &Path, path: &str) -> (u16, Value) {
    let client = worker_common::http::blocking::Client::unix(socket).expect("an HTTP client");
    let answer = client.get(path).expect("an answer");
    (answer.status.as_u16(), answer.json().unwrap_or(Value::Null))
}

fn output(cmd: &mut Command) -> (Output, String) {
    let out = cmd.output().expect("run NetManager");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

fn ready_after_the_api_answers_then_watchdog_keepalives_and_json_logs() {
    let dir = temp_dir();
    let node = Node::standalone(21).expect("node namespace");
    std::fs::write(dir.path().join("netcfg.json"), "{}").unwrap();
    let listener = NotifyListener::bind(&dir.path().join("notify")).expect("notify socket");
    let stderr = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
    let child = netmanager(&node, &dir)
        .args(["--no-dataplane", "--log-format", "json"])
        .env("NOTIFY_SOCKET", listener.path())
        // 2 s: a keep-alive every second.
        .env("WATCHDOG_USEC", "2000000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .process_group(0)
        .spawn()
        .expect("start NetManager");
    // Killed if an assertion fails before the clean stop below.
    let mut child = Stopper(child);
    let child = &mut child.0;

    let before = listener
        .wait_for("READY=1", Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}; log: {}", read(&dir, "stderr.log")));
    // Nothing said ready before; the API answers the moment READY=1 is in.
    assert!(
        before[..before.len() - 1]
            .iter()
            .all(|m| !m.contains(&"READY=1".to_string())),
        "{before:?}"
    );
    let (code, status) = get(&dir.path().join("nm.sock"), "/status");
    assert_eq!(code, 200, "{status}");
    assert_eq!(status["registered"], json!(false));
    let ready = before.last().unwrap();
    assert!(
        ready.iter().any(|l| l.starts_with("STATUS=serving")),
        "{ready:?}"
    );

    // Keep-alives keep coming while the API answers.
    for n in 1..=3 {
        let seen = listener
            .wait_for("WATCHDOG=1", Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("keep-alive {n}: {e}"));
        assert!(seen.last().unwrap().contains(&"WATCHDOG=1".to_string()));
    }

    // SIGTERM: STOPPING=1, a clean exit.
    signal(child.id(), Signal::SIGTERM);
    listener
        .wait_for("STOPPING=1", Duration::from_secs(30))
        .expect("STOPPING=1");
    let exit = child.wait().expect("wait");
    assert!(exit.success(), "{exit}");

    // --log-format json: every line is one JSON event.
    let log = read(&dir, "stderr.log");
    let events: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e["fields"]["message"] == json!("listening")),
        "{log}"
    );
}

fn config_check_reports_each_problem_and_its_exit_code() {
    let dir = temp_dir();
    let node = Node::standalone(22).expect("node namespace");
    let broker = Mosquitto::in_netns(&node.ns, "127.0.0.1", 1883, dir.path()).expect("mosquitto");

    // A bad field: named, with its fix; exit code 1.
    std::fs::write(
        dir.path().join("netcfg.json"),
        r#"{"NodePublicPort": "port"}"#,
    )
    .unwrap();
    let (out, text) = output(netmanager(&node, &dir).args(["config", "check"]));
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("FAIL  configuration"), "{text}");
    assert!(text.contains("NodePublicPort"), "{text}");
    assert!(text.contains("fix: correct the field"), "{text}");

    // A pin directory that is not on bpffs fails (the test's default).
    assert!(text.contains("FAIL  bpffs for"), "{text}");

    // A good file on this machine, with the broker up: all ok, exit 0.
    let pins = format!("/sys/fs/bpf/{}", testkit::unique("nmt-check"));
    std::fs::write(
        dir.path().join("netcfg.json"),
        json!({"ClusterUrl": "127.0.0.1", "ClusterMqttPort": broker.port().to_string()})
            .to_string(),
    )
    .unwrap();
    let (out, text) = output(
        netmanager(&node, &dir)
            .env("NETMANAGER_BPF_DIR", &pins)
            .args(["config", "check", "--broker"]),
    );
    assert_eq!(out.status.code(), Some(0), "{text}");
    for line in [
        "ok    configuration",
        "ok    kernel",
        &format!("ok    bpffs for {pins}: mounted"),
        "ok    nft",
        "ok    uplink: eth0 with 198.51.100.22",
        &format!("ok    MQTT broker 127.0.0.1:{}", broker.port()),
        "0 failed",
    ] {
        assert!(text.contains(line), "{line:?} missing:\n{text}");
    }
    assert!(
        !std::path::Path::new(&pins).exists(),
        "the check created nothing"
    );

    // The broker gone: that finding fails, and so does the exit code.
    drop(broker);
    let (out, text) = output(netmanager(&node, &dir).args(["config", "check", "--broker"]));
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("FAIL  MQTT broker 127.0.0.1"), "{text}");
}

fn teardown_removes_pins_links_nft_table_and_bridge(mode: &str) {
    let dir = temp_dir();
    let node = Node::standalone(23).expect("node namespace");
    let broker = Mosquitto::in_netns(&node.ns, "127.0.0.1", 1883, dir.path()).expect("mosquitto");
    let csm = ClusterDouble::options(broker.endpoint())
        .start()
        .expect("cluster double");
    csm.pin_subnet(NODE_ID, "10.18.0.64", "fc00::40");
    let builder = NetManager::builder(env!("CARGO_BIN_EXE_NetManager"), &node.ns, dir.path())
        .tag("td")
        .netcfg(upstream_netcfg(broker.port()))
        .dataplane(PinDir::new("nmt"))
        .env("NETMANAGER_ADDRESS_CHECK_SECS", "1");
    let mut nm = attach_support::with_variant(builder, mode)
        .start()
        .expect("NetManager");
    let (code, body) = nm.post(
        "/register",
        &json!({"client_id": NODE_ID, "cluster_address": "127.0.0.1"}).to_string(),
    );
    assert_eq!(code, 200, "{body}");
    // A container, so NAT rules and a container link exist too.
    let sleeper = ContainerProcess::start().expect("a container");
    let (code, body) = nm.post(
        "/container/deploy",
        &json!({"pid": sleeper.pid(), "serviceName": "app.ns.svc.ns", "instanceNumber": 0,
                "portMappings": "9080:80"})
        .to_string(),
    );
    assert_eq!(code, 200, "{body}");
    let bpf_dir = nm.pin_dir().expect("a dataplane").to_path_buf();
    let (socket, state) = (nm.socket.clone(), nm.state.clone());
    let teardown = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_NetManager"));
        cmd.arg("teardown")
            .args(args)
            .env("NETMANAGER_SOCKET", &socket)
            .env("NETMANAGER_STATE", &state)
            .env("NETMANAGER_BPF_DIR", &bpf_dir);
        node.ns.enter(&mut cmd).expect("into the node namespace");
        output(&mut cmd)
    };
    let bridge = || node.ns.link("goProxyBridge").ok().flatten().is_some();
    let nft_table = || {
        node.ns
            .run(&["nft", "list", "table", "inet", "oakestra"])
            .is_ok()
    };
    // The TCX links (uplink and container veth) by their kernel ids, or the
    // classic tc filters in netlink mode.
    let link_ids = pinned_link_ids(&bpf_dir);
    let attached = if attach_support::attach_mode_of(mode) == "tcx" {
        link_ids.len()
    } else {
        our_tc_filters(&node)
    };
    assert!(
        attached >= 2,
        "uplink and container attached ({mode}): {attached}"
    );
    let links_alive = || {
        link_ids
            .iter()
            .filter(|id| run("bpftool", &["link", "show", "id", id.as_str()]).is_ok())
            .count()
    };
    assert!(bridge() && nft_table() && bpf_dir.exists());

    // While NetManager runs it refuses: it would keep the programs attached.
    let (out, text) = teardown(&[]);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("stop it first"), "{text}");

    nm.kill9();
    // Pins keep the programs attached without NetManager (restarts and
    // upgrades keep flows); a dry run lists and changes nothing.
    assert_eq!(links_alive(), link_ids.len());
    let (out, text) = teardown(&["--dry-run"]);
    assert!(out.status.success(), "{text}");
    for item in [
        format!(
            "would remove pinned maps and links in {}",
            bpf_dir.display()
        ),
        "would remove nft table inet oakestra".to_string(),
        "would remove interface goProxyBridge".to_string(),
        format!("would remove state file {}", state.display()),
    ] {
        assert!(text.contains(&item), "{item:?} missing:\n{text}");
    }
    if mode == "netlink" {
        assert!(
            text.contains("would remove tc filter of uplink_ingress on"),
            "{text}"
        );
    }
    assert!(bridge() && nft_table() && bpf_dir.exists() && state.exists());
    attach_support::assert_uplink_xdp(&node.ns, testkit::topology::UPLINK, mode);

    let (out, text) = teardown(&[]);
    assert!(out.status.success(), "{text}");
    assert!(!bpf_dir.exists(), "{text}");
    assert!(!bridge(), "{text}");
    assert!(!nft_table(), "{text}");
    assert!(!state.exists(), "{text}");
    assert_eq!(links_alive(), 0, "programs detached with their pins");
    assert_eq!(our_tc_filters(&node), 0, "tc filters removed: {text}");
    assert_eq!(
        attach_support::xdp_program(&node.ns, testkit::topology::UPLINK),
        None,
        "the XDP program detached with its pin: {text}"
    );

    // Again: nothing left, still success (package scripts may run it twice).
    let (out, text) = teardown(&[]);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("nothing to remove"), "{text}");
}

/// NetManager's classic tc filters (its fixed priority) on the ingress of
/// every interface in `node`.
fn our_tc_filters(node: &Node) -> usize {
    let pref = format!("pref {} ", netmanager::dataplane::TC_PRIORITY);
    node.ns
        .links()
        .expect("the node's links")
        .iter()
        .map(|link| {
            node.ns
                .run(&["tc", "filter", "show", "dev", &link.name, "ingress"])
                .unwrap_or_default()
                .matches(&pref)
                .count()
        })
        .sum()
}

/// Ids of the links pinned under `dir` (`<program>@<interface>` files).
fn pinned_link_ids(dir: &std::path::Path) -> Vec<String> {
    let mut ids = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                // tc/ holds program pins (netlink mode's records), not links.
                if e.file_name() != "tc" {
                    todo.push(p);
                }
            } else if e.file_name().to_string_lossy().contains('@') {
                let out = run(
                    "bpftool",
                    &["-j", "link", "show", "pinned", p.to_str().unwrap()],
                )
                .expect("bpftool link show pinned");
                let v: Value = serde_json::from_str(&out).expect("bpftool JSON");
                ids.push(v["id"].to_string());
            }
        }
    }
    ids
}

fn read(dir: &TempDir, name: &str) -> String {
    std::fs::read_to_string(dir.path().join(name)).unwrap_or_default()
}
