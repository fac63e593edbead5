//! Operations (docs/operations.md): nodeengined's readiness and watchdog
//! notifications on a `NOTIFY_SOCKET` this test owns (the cluster away, so
//! readiness must not wait for it), JSON logs, `NodeEngine config check`
//! against a real containerd and broker, and the metrics and health
//! listener with `NodeEngine status` against a real broker.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use testkit::broker::free_port;
use testkit::cluster::LoopbackCluster;
use testkit::fixtures::{deploy_document as job, node_conf};
use testkit::metrics::scrape;
use testkit::process::{Signal, signal};
use testkit::{Containerd, Mosquitto, NodeEngine, temp_dir};
use worker_common::systemd::NotifyListener;

testkit::main! {
    ready_without_the_cluster_then_watchdog_keepalives_and_json_logs: [],
    config_check_finds_containerd_and_the_cluster: [Root, Containerd, Mosquitto],
    metrics_readiness_and_status_follow_the_cluster_link: [Mosquitto, Python3, PrometheusClient],
}

/// The fixture configuration pointed at a cluster on `port`, in `dir`.
fn test_config(dir: &Path, port: u16, containerd: bool) -> std::path::PathBuf {
    let path = dir.join("conf.json");
    std::fs::write(
        &path,
        node_conf(port, &dir.join("applogs"), containerd).to_string(),
    )
    .expect("write conf");
    path
}

fn ready_without_the_cluster_then_watchdog_keepalives_and_json_logs() {
    let dir = temp_dir();
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
    signal(child.id(), Signal::SIGTERM);
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

fn config_check_finds_containerd_and_the_cluster() {
    let dir = temp_dir();
    let containerd = Containerd::start(dir.path()).expect("containerd");
    let broker = Mosquitto::loopback(dir.path()).expect("mosquitto");
    let registration = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let http_port = registration.local_addr().expect("addr").port();
    let conf = test_config(dir.path(), http_port, true);
    let socket = containerd.socket.display().to_string();
    let mqtt_port = broker.port().to_string();
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

/// `NodeEngine status` asking the daemon at `metrics`: exit code, stdout, stderr.
fn status(conf: &Path, metrics: &str) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_NodeEngine"))
        .env("OAKESTRA_CONF", conf)
        .env("NODEENGINE_METRICS_ADDRESS", metrics)
        .arg("status")
        .output()
        .expect("run NodeEngine");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `/readyz` at `address`: status code and body.
fn readyz(address: &str) -> Option<(u16, Value)> {
    let tls = worker_common::tls::ClientTls::system_roots().build().ok()?;
    let client = worker_common::http::blocking::Client::new(
        worker_common::http::Client::tcp(tls).timeout(Duration::from_secs(5)),
    )
    .ok()?;
    let r = client.get(&format!("http://{address}/readyz")).ok()?;
    Some((r.status.as_u16(), r.json().ok()?))
}

/// Polls `/readyz` until its code is `code`; the last answer.
fn wait_readyz(address: &str, code: u16) -> Option<(u16, Value)> {
    let mut last = None;
    for _ in 0..300 {
        last = readyz(address);
        if last.as_ref().is_some_and(|(c, _)| *c == code) {
            return last;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    last
}

fn metrics_readiness_and_status_follow_the_cluster_link() {
    let dir = temp_dir();
    let LoopbackCluster {
        cluster,
        mut broker,
    } = LoopbackCluster::start(dir.path()).expect("broker and cluster double");
    let node = cluster.node_view(&cluster.id_for_host(&testkit::hostname()));
    let conf = test_config(dir.path(), cluster.http_port(), false);
    let address = format!("127.0.0.1:{}", free_port());
    let daemon = NodeEngine::builder(
        env!("CARGO_BIN_EXE_nodeengined"),
        &conf,
        &dir.path().join("nodeengined.log"),
    )
    .metrics(&address)
    .start()
    .expect("nodeengined");
    let scrape = |address: &str| scrape(None, address).unwrap_or_else(|e| panic!("{e:#}"));
    let info = node
        .wait_for("information", Duration::from_secs(60), |_| true)
        .unwrap_or_else(|| panic!("no node report; log: {}", daemon.log_text()));

    // Registered and connected: ready, and `status` says so with exit 0.
    let (code, body) = wait_readyz(&address, 200).expect("readyz answers");
    assert_eq!(code, 200, "{body}");
    let (code, out, err) = status(&conf, &address);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("readiness: ready"), "{out}");

    // Two deploys that fail (an unknown runtime; containerd inactive) and
    // one invalid: three failed outcomes, two of them timed.
    let mut unknown = job("app.ns.svc.unknown", 1, &[], false);
    unknown["virtualization"] = "wasm-magic".into();
    node.publish("control/deploy", unknown.to_string());
    let plain = job("app.ns.svc.plain", 2, &["true"], false);
    node.publish("control/deploy", plain.to_string());
    let mut bad = job("app.ns.bad.vcpu", 3, &[], false);
    bad["vcpus"] = "lots".into();
    node.publish("control/deploy", bad.to_string());
    for (name, n) in [
        ("app.ns.svc.unknown", 1),
        ("app.ns.svc.plain", 2),
        ("app.ns.bad.vcpu", 3),
    ] {
        node.wait_status(name, n, "FAILED");
    }
    let m = scrape(&address);
    assert_eq!(m["nodeengine_deploys_total{outcome=failed}"], 3.0, "{m}");
    assert_eq!(m["nodeengine_deploy_duration_seconds_count"], 2.0, "{m}");
    assert_eq!(m["nodeengine_cluster_registered"], 1.0, "{m}");
    assert_eq!(m["nodeengine_cluster_broker_connected"], 1.0, "{m}");
    assert_eq!(m["nodeengine_cluster_broker_connects_total"], 1.0, "{m}");
    // The node's resources as the cluster was told.
    assert_eq!(m["nodeengine_node_vcpus"], info["vcpus"], "{m}");
    assert!(
        m.get("nodeengine_running_instances").is_none()
            && !m.as_object().is_some_and(|o| o
                .keys()
                .any(|k| k.starts_with("nodeengine_running_instances{"))),
        "nothing runs: {m}"
    );

    // Broker gone: not ready (503 with the reason), `status` exits 1.
    broker.stop();
    let (code, body) = wait_readyz(&address, 503).expect("readyz answers");
    assert_eq!(code, 503, "{body}");
    assert!(
        body["reasons"].as_array().is_some_and(|r| r
            .iter()
            .any(|r| r.as_str().unwrap_or_default().contains("MQTT broker"))),
        "{body}"
    );
    let (code, out, err) = status(&conf, &address);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        err.contains("not healthy") && err.contains("MQTT broker"),
        "{err}"
    );
    assert_eq!(scrape(&address)["nodeengine_cluster_broker_connected"], 0.0);

    // Back: ready again, and the second session is counted.
    broker.resume().expect("mosquitto back");
    let (code, body) = wait_readyz(&address, 200).expect("readyz answers");
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        scrape(&address)["nodeengine_cluster_broker_connects_total"],
        2.0
    );

    // Not listening (daemon gone): `status` fails rather than guess.
    drop(daemon);
    let (code, _, err) = status(&conf, &address);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not healthy"), "{err}");
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}
