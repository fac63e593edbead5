//! A node whose host also runs Docker: Docker sets the iptables FORWARD
//! policy to DROP, which our own nft table cannot overrule. Container
//! egress and a host-port mapping must still work, with the drop set
//! through iptables-nft (nftables' `ip filter` table) and through
//! iptables-legacy (x_tables), and the accepts NetManager adds must be
//! idempotent and go away with the bridge. Needs root, mosquitto, python3
//! and iptables.

mod common;

use std::process::{Command, Stdio};

use common::*;
use serde_json::json;

const JOB: &str = "dockerhost.test.web.test";
const NODE_ID: &str = "6650aa00bb22cc33dd440a01";

fn ready(test: &str) -> bool {
    if !require_root(test) {
        return false;
    }
    let ok = try_run(&["python3", "-c", "pass"]).is_some()
        && try_run(&["iptables-nft", "--version"]).is_some()
        && try_run(&["iptables-legacy", "--version"]).is_some();
    if !ok {
        eprintln!("SKIP {test}: needs python3 and iptables (cargo xtask setup installs it)");
    }
    ok
}

/// `cmd` inside `ns`.
fn in_ns(ns: &Netns, cmd: &[&str]) -> Option<String> {
    let mut c = Command::new(cmd[0]);
    c.args(&cmd[1..]);
    ns.enter(&mut c);
    let out = c.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A TCP server (in the namespace `enter` puts it) answering every
/// connection with its peer's address.
fn who_am_i_server(enter: impl FnOnce(&mut Command), port: u16) -> Proc {
    let script = format!(
        "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
         s.bind(('0.0.0.0',{port}))\ns.listen(8)\nprint('ready',flush=True)\n\
         while True:\n  c,a=s.accept()\n  c.sendall(('from '+a[0]).encode())\n  c.close()"
    );
    let mut cmd = Command::new("python3");
    cmd.args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    enter(&mut cmd);
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

/// One connection to addr:port from `enter`'s namespace; what came back.
fn connect(enter: impl FnOnce(&mut Command), addr: &str, port: u16) -> Option<String> {
    let script = format!(
        "import socket\ns=socket.create_connection(('{addr}',{port}),timeout=3)\nprint(s.recv(100).decode())"
    );
    let mut cmd = Command::new("python3");
    cmd.args(["-c", &script]);
    enter(&mut cmd);
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Starts a command in the network namespace of process `pid`.
fn enter_pid(pid: u32) -> impl FnOnce(&mut Command) {
    move |cmd: &mut Command| {
        let f = std::fs::File::open(format!("/proc/{pid}/ns/net")).unwrap();
        // SAFETY: setns is async-signal-safe; the fd stays open in the closure.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(cmd, move || {
                if libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

/// Egress and DNAT through a node whose FORWARD policy `iptables` set to DROP.
fn egress_and_port_mapping_survive_forward_drop(iptables: &str, ip6tables: &str) {
    let dir = TempDir::new();
    let underlay = Underlay::new();
    let node = underlay.node(1);
    // What Docker does when it starts on the host.
    for bin in [iptables, ip6tables] {
        in_ns(&node, &[bin, "-P", "FORWARD", "DROP"]).expect("setting the FORWARD policy");
    }
    let broker = Broker::start_at(&dir, Some(&underlay.ns), "198.51.100.254");
    let _csm = ClusterDouble::start_at(
        "198.51.100.254",
        broker.port,
        Some(&underlay.ns),
        ("10.18.0.64", "fc00::40"),
    );
    let nm = Daemon::start(&dir, &node, broker.port);
    let (code, body) = nm.post(
        "/register",
        &json!({"client_id": NODE_ID, "cluster_address": "198.51.100.254"}).to_string(),
    );
    assert_eq!(code, 200, "{body}");
    let c = container();
    let (code, a) = nm.post(
        "/container/deploy",
        &json!({"pid": c.pid(), "serviceName": JOB, "instanceNumber": 0, "portMappings": "8080:7000"})
            .to_string(),
    );
    assert_eq!(code, 200, "{a}");

    // Egress: the container reaches a server outside the node, masqueraded.
    let _outside = who_am_i_server(|cmd| underlay.ns.enter(cmd), 7500);
    assert_eq!(
        connect(enter_pid(c.pid()), "198.51.100.254", 7500).as_deref(),
        Some("from 198.51.100.1"),
        "container egress through FORWARD DROP ({iptables})\n{}",
        nm.log_text()
    );

    // DNAT: the host port reaches the container.
    let _inside = who_am_i_server(enter_pid(c.pid()), 7000);
    assert_eq!(
        connect(|cmd| underlay.ns.enter(cmd), "198.51.100.1", 8080).as_deref(),
        Some("from 198.51.100.254"),
        "host port 8080 through FORWARD DROP ({iptables})"
    );

    // Deploying again rewrites NAT and re-checks FORWARD: still two accepts.
    let c2 = container();
    let (code, a) = nm.post(
        "/container/deploy",
        &json!({"pid": c2.pid(), "serviceName": JOB, "instanceNumber": 1, "portMappings": ""})
            .to_string(),
    );
    assert_eq!(code, 200, "{a}");
    let rules = in_ns(&node, &[iptables, "-S", "FORWARD"]).unwrap();
    assert_eq!(
        rules.matches("oakestra-netmanager").count(),
        2,
        "{iptables} -S FORWARD:\n{rules}"
    );
}

#[test]
fn forward_drop_of_iptables_nft() {
    if ready("forward_drop_of_iptables_nft") {
        egress_and_port_mapping_survive_forward_drop("iptables-nft", "ip6tables-nft");
    }
}

#[test]
fn forward_drop_of_iptables_legacy() {
    if ready("forward_drop_of_iptables_legacy") {
        egress_and_port_mapping_survive_forward_drop("iptables-legacy", "ip6tables-legacy");
    }
}

/// The accepts are added once however often NetManager asks, in every
/// backend holding a FORWARD chain, and removed with the bridge.
#[test]
fn forward_accepts_are_idempotent_and_removed() {
    if !ready("forward_accepts_are_idempotent_and_removed") {
        return;
    }
    let node = Netns::new();
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
    in_netns(&node, || {
        for _ in 0..3 {
            netmanager::plumbing::forward::ensure("goProxyBridge").unwrap();
        }
    });
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
    in_netns(&node, || {
        netmanager::plumbing::forward::remove("goProxyBridge").unwrap()
    });
    for bin in [
        "iptables-nft",
        "ip6tables-nft",
        "iptables-legacy",
        "ip6tables-legacy",
    ] {
        assert_eq!(count(bin), 0, "{bin}");
    }
    // A host without any FORWARD chain is left alone.
    let bare = Netns::new();
    in_netns(&bare, || {
        netmanager::plumbing::forward::ensure("goProxyBridge").unwrap()
    });
    assert!(
        in_ns(&bare, &["nft", "list", "tables"])
            .unwrap()
            .trim()
            .is_empty()
    );
}
