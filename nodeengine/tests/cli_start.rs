//! Starting the worker as upstream's `NodeEngine` does: bare, with `-d`, with
//! `-p` alone, with upstream's long flags; Ctrl-C stops it. Without systemd
//! (CI) the daemon runs in the foreground or detached.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

fn has_systemd() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// `NodeEngine args...` with this test's daemon environment.
fn nodeengine(dir: &Path, conf: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_NodeEngine"));
    c.env("OAKESTRA_CONF", conf)
        .env("OAKESTRA_STATE_DIR", dir.join("state"))
        .env("CONTAINERD_ADDRESS", dir.join("no-containerd.sock"))
        .env("CONTAINERD_CONFIG", dir.join("no-containerd.toml"))
        .env("RUST_LOG", "info")
        .args(args);
    c
}

fn signal(pid: u32, sig: i32) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: kill(2) on a process this test started.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

struct Stopper(Child);

impl Drop for Stopper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_nodeengine_starts_the_worker_and_ctrl_c_stops_it() {
    if !can_run("bare_nodeengine", &["/usr/sbin/mosquitto"]) {
        return;
    }
    if has_systemd() {
        eprintln!("SKIPPED bare_nodeengine: systemd runs here, the service would be started");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Mosquitto::start(dir.path());
    let mut cluster = ClusterDouble::start(broker.port).await;
    let conf = test_config(dir.path(), cluster.http_port, false);
    let child = nodeengine(dir.path(), &conf, &[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start NodeEngine");
    let mut child = Stopper(child);
    cluster
        .wait_for("information", Duration::from_secs(30), |_| true)
        .await
        .expect("bare NodeEngine registered with the configured cluster");
    // Ctrl-C.
    signal(child.0.id(), libc::SIGINT);
    let stopped = wait_until(Duration::from_secs(20), || {
        matches!(child.0.try_wait(), Ok(Some(_)))
    })
    .await;
    assert!(stopped, "Ctrl-C did not stop the worker");
    let status = child.0.wait().expect("wait");
    assert!(status.success(), "{status:?}");
}

/// `-p` alone and `-d`: the port is saved, the worker runs in the
/// background; then upstream's long flags do the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_start_with_port_alone_and_upstream_long_flags() {
    if !can_run("detached_start", &["/usr/sbin/mosquitto"]) {
        return;
    }
    if has_systemd() {
        eprintln!("SKIPPED detached_start: systemd runs here, the service would be started");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Mosquitto::start(dir.path());
    let mut cluster = ClusterDouble::start(broker.port).await;
    // The configured port is wrong; -p fixes it.
    let conf = test_config(dir.path(), free_port(), false);
    for args in [
        vec![
            "-p".to_string(),
            cluster.http_port.to_string(),
            "-d".to_string(),
        ],
        vec![
            "--clusterAddr".to_string(),
            "127.0.0.1".to_string(),
            "--clusterPort".to_string(),
            cluster.http_port.to_string(),
            "--detatch".to_string(),
        ],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
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
        assert_eq!(saved["cluster_port"], cluster.http_port);
        cluster.clear();
        let up = cluster
            .wait_for("information", Duration::from_secs(30), |_| true)
            .await;
        signal(pid, libc::SIGTERM);
        let gone = wait_until(Duration::from_secs(20), || !alive(pid)).await;
        assert!(up.is_some(), "{args:?}: the detached worker never reported");
        assert!(gone, "the detached worker did not stop");
    }
}
