//! The node's `ip` as upstream takes it: the first non-loopback IPv4 address
//! in interface-index order (not name order), read anew for every report.
//! Checked in a network namespace of the test's own.

mod common;

use std::process::Command;

use common::*;

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {args:?}: {out:?}");
}

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// Runs `f` on a thread that entered the namespace.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("netns file");
        use std::os::fd::AsRawFd;
        // SAFETY: setns(2) on this thread only, with a namespace fd we opened.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("thread")
}

#[test]
fn first_ipv4_in_interface_index_order_read_for_every_report() {
    if !can_run("node_ip", &["ip"]) {
        return;
    }
    let ns = Netns(unique("neip"));
    ip(&["netns", "add", &ns.0]);
    // Created first, so it has the lower index, though its name sorts last.
    ip(&[
        "-n", &ns.0, "link", "add", "zz0", "type", "veth", "peer", "name", "zz1",
    ]);
    ip(&[
        "-n", &ns.0, "link", "add", "aa0", "type", "veth", "peer", "name", "aa1",
    ]);
    ip(&["-n", &ns.0, "addr", "add", "198.51.100.9/24", "dev", "zz0"]);
    ip(&["-n", &ns.0, "addr", "add", "198.51.100.7/24", "dev", "aa0"]);
    for dev in ["lo", "zz0", "zz1", "aa0", "aa1"] {
        ip(&["-n", &ns.0, "link", "set", dev, "up"]);
    }
    let first = in_netns(&ns.0, nodeengine::node_report::primary_ipv4);
    assert_eq!(first, "198.51.100.9");

    // The address changes; the next report has the new one.
    ip(&["-n", &ns.0, "addr", "del", "198.51.100.9/24", "dev", "zz0"]);
    ip(&["-n", &ns.0, "addr", "add", "198.51.100.11/24", "dev", "zz0"]);
    let doc = in_netns(&ns.0, || {
        let mut sampler =
            nodeengine::node_report::NodeSampler::new(nodeengine::node_report::StaticFacts {
                virtualization: vec![],
                supported_addons: vec![],
                csi_drivers: vec![],
                port: "3000".into(),
            });
        sampler.sample("n")
    });
    assert_eq!(doc.ip, "198.51.100.11");
}
