//! Operations (docs/operations.md): nodeengined's readiness and watchdog
//! notifications on a `NOTIFY_SOCKET` this test owns (the cluster away, so
//! readiness must not wait for it), JSON logs, and `NodeEngine config check`
//! against a real containerd and broker.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;
use worker_common::systemd::NotifyListener;

#[test]
fn ready_without_the_cluster_then_watchdog_keepalives_and_json_logs() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Nothing listens on the cluster's port: registration keeps retrying.
    let conf = test_config(dir.path(), free_port(), false);
    let listener = NotifyListener::bind(&dir.path().join("notify")).expect("notify socket");
    let log = dir.path().join("nodeengined.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_nodeengined"))
        .args(["--log-format", "json"])
        .env("OAKESTRA_CONF", &conf)
        .env("NOTIFY_SOCKET", listener.path())
        .env("WATCHDOG_USEC", "2000000")
        .env_remove("JOURNAL_STREAM")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start nodeengined");
    let result = std::panic::catch_unwind(|| {
        let seen = listener
            .wait_for("READY=1", Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{e}; log: {}", read(&log)));
        let ready = seen.last().unwrap();
        assert!(
            ready
                .iter()
                .any(|l| l.starts_with("STATUS=registering with the cluster at 127.0.0.1")),
            "{ready:?}"
        );
        for n in 1..=3 {
            listener
                .wait_for("WATCHDOG=1", Duration::from_secs(60))
                .unwrap_or_else(|e| panic!("keep-alive {n}: {e}"));
        }
    });
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let stopping = listener.wait_for("STOPPING=1", Duration::from_secs(30));
    let exit = child.wait().expect("wait");
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
    stopping.expect("STOPPING=1");
    assert!(exit.success(), "{exit}: {}", read(&log));
    // Every line one JSON event; the failed registration attempts among them.
    let text = read(&log);
    let events: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        events.iter().any(|e| e["level"] == "WARN"),
        "no warning about the unreachable cluster: {text}"
    );
}

/// `NodeEngine config check`: its exit code and its report (stdout).
fn check(conf: &Path, containerd: &str, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_NodeEngine"))
        .env("OAKESTRA_CONF", conf)
        .env("CONTAINERD_ADDRESS", containerd)
        .args(["config", "check"])
        .args(args)
        .output()
        .expect("run NodeEngine");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn config_check_finds_containerd_and_the_cluster() {
    if !can_run(
        "config_check_finds_containerd_and_the_cluster",
        &["containerd", "mosquitto"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let containerd = Containerd::start(dir.path());
    let broker = Mosquitto::start(dir.path());
    let registration = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let http_port = registration.local_addr().expect("addr").port();
    let conf = test_config(dir.path(), http_port, true);
    let socket = containerd.socket.display().to_string();
    let mqtt_port = broker.port.to_string();
    let all = ["--broker", "--mqtt-port", mqtt_port.as_str()];

    // The containerd nodeengined would use: the same variable and default.
    let (code, text) = check(&conf, &socket, &all);
    assert_eq!(code, Some(0), "{text}");
    for line in [
        "ok    configuration",
        &format!("ok    cluster address: http://127.0.0.1:{http_port}"),
        &format!("ok    containerd {socket}: answers"),
        "ok    overlay network: off",
        &format!("ok    cluster registration 127.0.0.1:{http_port}"),
        &format!("ok    cluster MQTT broker 127.0.0.1:{mqtt_port}"),
        "0 failed",
    ] {
        assert!(text.contains(line), "{line:?} missing:\n{text}");
    }

    // containerd and the cluster gone: each is named with its fix; exit 1.
    drop(containerd);
    drop(registration);
    let (code, text) = check(&conf, &socket, &all);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains(&format!("FAIL  containerd {socket}")),
        "{text}"
    );
    assert!(text.contains("fix: start containerd"), "{text}");
    assert!(
        text.contains(&format!("FAIL  cluster registration 127.0.0.1:{http_port}")),
        "{text}"
    );
    assert!(text.contains("2 failed"), "{text}");

    // A broken file: its position, and the way out.
    std::fs::write(&conf, r#"{"cluster_port": "x"#).expect("write");
    let (code, text) = check(&conf, &socket, &[]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("FAIL  configuration"), "{text}");
    assert!(text.contains("line 1"), "{text}");
    assert!(text.contains("NodeEngine config default"), "{text}");
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}
