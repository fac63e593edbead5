//! Starting the worker as upstream's `NodeEngine` does: bare, with `-d`, with
//! `-p` alone, with upstream's long flags; Ctrl-C stops it. Without systemd
//! (CI) the daemon runs in the foreground or detached; with systemd the
//! service would be started, so these tests need a machine without it.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use testkit::cluster::LoopbackCluster;
use testkit::fixtures::node_conf;
use testkit::process::{Signal, signal};
use testkit::{temp_dir, wait_for};

testkit::main! {
    bare_nodeengine_starts_the_worker_and_ctrl_c_stops_it: [Mosquitto, NoSystemd],
    detached_start_with_port_alone_and_upstream_long_flags: [Mosquitto, NoSystemd],
}

/// `NodeEngine args...` with this test's daemon environment.
fn nodeengine(dir: &Path, conf: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_NodeEngine"));
    c.env("OAKESTRA_CONF", conf)
        .env("OAKESTRA_STATE_DIR", dir.join("state"))
        .env("CONTAINERD_ADDRESS", dir.join("no-containerd.sock"))
        .env("CONTAINERD_CONFIG", dir.join("no-containerd.toml"))
        .env("RUST_LOG", "info")
        .env_remove("INVOCATION_ID")
        .args(args);
    c
}

/// The fixture configuration pointed at a cluster on `port`, containerd off.
fn write_conf(dir: &Path, port: u16) -> std::path::PathBuf {
    let path = dir.join("conf.json");
    std::fs::write(
        &path,
        node_conf(port, &dir.join("applogs"), false).to_string(),
    )
    .expect("write conf");
    path
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

/// Kills the child if the test ends early.
struct Stopper(Child);

impl Drop for Stopper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bare_nodeengine_starts_the_worker_and_ctrl_c_stops_it() {
    let dir = temp_dir();
    let LoopbackCluster {
        cluster,
        broker: _broker,
    } = LoopbackCluster::start(dir.path()).expect("broker and cluster double");
    let id = cluster.id_for_host(&testkit::hostname());
    let conf = write_conf(dir.path(), cluster.http_port());
    let child = nodeengine(dir.path(), &conf, &[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start NodeEngine");
    let mut child = Stopper(child);
    cluster
        .node_view(&id)
        .wait_for("information", Duration::from_secs(30), |_| true)
        .expect("bare NodeEngine registered with the configured cluster");
    // Ctrl-C.
    signal(child.0.id(), Signal::SIGINT);
    let stopped = wait_for("NodeEngine to stop", Duration::from_secs(20), || {
        matches!(child.0.try_wait(), Ok(Some(_)))
    });
    assert!(stopped.is_ok(), "Ctrl-C did not stop the worker");
    let status = child.0.wait().expect("wait");
    assert!(status.success(), "{status:?}");
}

/// `-p` alone and `-d`: the port is saved, the worker runs in the
/// background; then upstream's long flags do the same.
fn detached_start_with_port_alone_and_upstream_long_flags() {
    let dir = temp_dir();
    let LoopbackCluster {
        cluster,
        broker: _broker,
    } = LoopbackCluster::start(dir.path()).expect("broker and cluster double");
    let id = cluster.id_for_host(&testkit::hostname());
    let node = cluster.node_view(&id);
    // The configured port is wrong; -p fixes it.
    let conf = write_conf(dir.path(), testkit::broker::free_port());
    let port = cluster.http_port().to_string();
    for args in [
        vec!["-p", &port, "-d"],
        vec![
            "--clusterAddr",
            "127.0.0.1",
            "--clusterPort",
            &port,
            "--detatch",
        ],
    ] {
        let out = nodeengine(dir.path(), &conf, &args)
            .output()
            .expect("run NodeEngine");
        assert!(out.status.success(), "{args:?}: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let pid: u32 = text
            .split("pid ")
            .nth(1)
            .and_then(|r| r.split(')').next())
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("no pid in {text:?}"));
        let saved: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&conf).expect("conf")).expect("json");
        assert_eq!(saved["cluster_port"], cluster.http_port());
        cluster.clear_seen();
        let up = node.wait_for("information", Duration::from_secs(30), |_| true);
        signal(pid, Signal::SIGTERM);
        let gone = wait_for(
            "the detached worker to stop",
            Duration::from_secs(20),
            || !alive(pid),
        );
        assert!(up.is_some(), "{args:?}: the detached worker never reported");
        assert!(gone.is_ok(), "the detached worker did not stop");
    }
}
