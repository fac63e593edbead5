//! The daemon against a real mosquitto and a double of the cluster manager:
//! registration, periodic reports, hostile payloads, broker restart.
//! containerd is not running in these tests (container deploys are covered in
//! `containerd_deploy.rs`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use testkit::cluster::{LoopbackCluster, NodeView};
use testkit::fixtures::{deploy_document as job, node_conf};
use testkit::{BrokerSecurity, ClusterDouble, Mosquitto, MqttLogin, NodeEngine, Pki};
use testkit::{path_with, temp_dir, wait_for, write_script};

testkit::main! {
    registers_and_reports: [Mosquitto],
    hostile_deploys_fail_cleanly_and_the_daemon_keeps_serving: [Mosquitto],
    reconnects_and_resubscribes_after_broker_restart: [Mosquitto],
    registration_is_retried_until_the_cluster_answers: [Mosquitto],
    the_local_policy_refuses_what_the_cluster_cannot_override: [Mosquitto],
    public_ip_is_discovered_refreshed_and_reported_as_publicip: [Mosquitto],
    mqtt_with_server_verified_tls_and_credentials: [Mosquitto],
    gpu_figures_and_addons_as_upstream: [Mosquitto],
}

/// Fields drop in this order: daemon first, temp dir last.
struct Setup {
    daemon: NodeEngine,
    cluster: ClusterDouble,
    broker: Mosquitto,
    /// The id the cluster gives this machine's hostname.
    id: String,
    _dir: tempfile::TempDir,
}

impl Setup {
    /// The cluster as the daemon's node sees it.
    fn node(&self) -> NodeView<'_> {
        self.cluster.node_view(&self.id)
    }
}

/// The fixture configuration pointed at a cluster on `port`, in `dir`.
fn write_conf(dir: &Path, port: u16) -> PathBuf {
    write_conf_with(dir, port, |_| {})
}

fn daemon(dir: &Path, conf: &Path) -> NodeEngine {
    daemon_with(dir, conf, &[])
}

/// With more environment (`NODEENGINE_*` settings, `PATH`, ...).
fn daemon_with(dir: &Path, conf: &Path, env: &[(&str, &str)]) -> NodeEngine {
    let mut b = NodeEngine::builder(
        env!("CARGO_BIN_EXE_nodeengined"),
        conf,
        &dir.join("nodeengined.log"),
    );
    for (k, v) in env {
        b = b.env(k, v);
    }
    b.start().expect("nodeengined")
}

/// The fixture configuration pointed at a cluster on `port`, changed by
/// `edit`, in `dir`.
fn write_conf_with(dir: &Path, port: u16, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let mut doc = node_conf(port, &dir.join("applogs"), true);
    edit(&mut doc);
    let path = dir.join("conf.json");
    std::fs::write(&path, doc.to_string()).expect("write conf");
    path
}

fn setup() -> Setup {
    let dir = temp_dir();
    let LoopbackCluster { cluster, broker } =
        LoopbackCluster::start(dir.path()).expect("broker and cluster double");
    let id = cluster.id_for_host(&testkit::hostname());
    let conf = write_conf(dir.path(), cluster.http_port());
    let daemon = daemon(dir.path(), &conf);
    Setup {
        _dir: dir,
        broker,
        cluster,
        id,
        daemon,
    }
}

fn assert_node_document(v: &Value, id: &str) {
    for key in [
        "id",
        "host",
        "ip",
        "port",
        "system_info",
        "cpu_percent",
        "vcpus",
        "architecture",
        "memory_percent",
        "memory",
        "disk_info",
        "network_info",
        "gpu_driver",
        "gpu_usage",
        "vgpus",
        "gpu_temp",
        "vram_percent",
        "vram",
        "virtualization",
        "supported_addons",
        "csi_drivers",
    ] {
        assert!(v.get(key).is_some(), "node document lacks {key}: {v}");
    }
    assert_eq!(v["id"], id);
    assert!(
        v["memory"].is_u64(),
        "memory must be an integer: {}",
        v["memory"]
    );
    assert!(v["vcpus"].is_u64() && v["vcpus"].as_u64() > Some(0));
    assert!(v["vgpus"].is_u64());
    assert!(v["cpu_percent"].is_f64(), "cpu_percent must be a float");
    assert!(v["port"].is_string(), "port must be a string");
    assert!(
        !v["host"].as_str().unwrap_or_default().is_empty(),
        "host is set"
    );
    assert!(!v["architecture"].as_str().unwrap_or_default().is_empty());
    assert!(v["system_info"]["kernel_version"].is_string());
    assert!(v["csi_drivers"].is_array());
    assert!(v["gpu_driver"].is_string());
    // From the fixture: containerd active, unikernel active, FLOps on.
    assert_eq!(
        v["virtualization"],
        serde_json::json!(["docker", "unikernel"])
    );
    // FLOps-learner is advertised only while its ML data server runs, which
    // needs containerd (absent here; see containerd_deploy.rs).
    assert_eq!(v["supported_addons"], serde_json::json!([]));
    // Upstream's values without a GPU.
    assert_eq!(v["gpu_driver"], "-");
    assert_eq!(v["vgpus"], 0);
    assert_eq!(v["vram"], 0.0);
}

fn registers_and_reports() {
    let mut s = setup();
    let id = s.id.clone();

    let info = s
        .node()
        .wait_for("information", Duration::from_secs(30), |_| true)
        .unwrap_or_else(|| panic!("no information report; log:\n{}", s.daemon.log_text()));
    assert_node_document(&info, &id);

    let regs = s.cluster.registrations();
    assert_eq!(regs.len(), 1, "registered once");
    assert_node_document(&regs[0], "");

    let res = s
        .node()
        .wait_for("jobs/resources", Duration::from_secs(10), |_| true)
        .expect("resources report");
    assert_eq!(res, serde_json::json!({"services": []}));

    // Reports keep coming every 2 s.
    std::thread::sleep(Duration::from_secs(5));
    let n = s.node().messages("information").len();
    assert!(n >= 3, "only {n} information reports in ~5 s");

    // The cluster's error topic is logged.
    s.node()
        .publish("control/error", r#"{"message":"test-error-marker"}"#);
    let logged = wait_for(
        "the error marker in the log",
        Duration::from_secs(10),
        || s.daemon.log_text().contains("test-error-marker"),
    );
    assert!(logged.is_ok(), "control/error not logged");
    // A plaintext link to the cluster is called out at start.
    assert!(
        s.daemon.log_text().contains("is PLAINTEXT"),
        "{}",
        s.daemon.log_text()
    );

    let st = s.daemon.stop();
    assert!(
        st.is_some_and(|st| st.success()),
        "clean exit on SIGTERM: {st:?}"
    );
}

fn hostile_deploys_fail_cleanly_and_the_daemon_keeps_serving() {
    let mut s = setup();
    s.node()
        .wait_for("information", Duration::from_secs(30), |_| true)
        .expect("daemon is up");

    // Unaddressable garbage: only a log line.
    for p in [
        &b"not json"[..],
        b"null",
        b"[1,2]",
        b"{}",
        br#"{"job_name":"../../etc/passwd","instance_number":0}"#,
        &[0xff, 0xfe, 0x00],
    ] {
        s.node().publish("control/deploy", p.to_vec());
        s.node().publish("control/delete", p.to_vec());
    }
    // Addressable but wrong: FAILED with the reason.
    let mut bad_vcpu = job("app.ns.bad.vcpu", 1, &[], false);
    bad_vcpu["vcpus"] = "lots".into();
    s.node().publish("control/deploy", bad_vcpu.to_string());
    let mut unknown = job("app.ns.svc.unknown", 2, &[], false);
    unknown["virtualization"] = "wasm-magic".into();
    s.node().publish("control/deploy", unknown.to_string());
    // containerd is not reachable here: a FAILED, not a hang or a crash.
    let plain = job("app.ns.svc.plain", 3, &["true"], false);
    s.node().publish("control/deploy", plain.to_string());

    let f = s.node().wait_status("app.ns.bad.vcpu", 1, "FAILED");
    assert!(
        f["status_detail"]
            .as_str()
            .unwrap_or_default()
            .contains("vcpus"),
        "{f}"
    );
    let f = s.node().wait_status("app.ns.svc.unknown", 2, "FAILED");
    assert!(
        f["status_detail"]
            .as_str()
            .unwrap_or_default()
            .contains("unknown virtualization"),
        "{f}"
    );
    assert!(
        f["status_detail"]
            .as_str()
            .unwrap_or_default()
            .contains("local_policy.allow_unknown_runtimes"),
        "{f}"
    );
    let f = s.node().wait_status("app.ns.svc.plain", 3, "FAILED");
    assert!(!f["status_detail"].as_str().unwrap_or_default().is_empty());

    // Every job message is a known status with all fields; nothing else was sent.
    for m in s.node().messages("job") {
        assert!(
            ["CREATED", "FAILED", "DEAD", "COMPLETED", "UNDEPLOYED"]
                .contains(&m["status"].as_str().unwrap_or_default()),
            "{m}"
        );
        for k in ["sname", "status_detail", "instance", "publicip"] {
            assert!(m.get(k).is_some(), "{m}");
        }
    }
    assert_eq!(s.node().messages("job").len(), 3);

    // Still alive and reporting.
    s.cluster.clear_seen();
    assert!(
        s.node()
            .wait_for("information", Duration::from_secs(10), |_| true)
            .is_some()
    );
    assert!(s.daemon.is_running());
}

fn reconnects_and_resubscribes_after_broker_restart() {
    let mut s = setup();
    s.node()
        .wait_for("information", Duration::from_secs(30), |_| true)
        .expect("daemon is up");

    s.broker.restart().expect("mosquitto restarted");
    s.cluster.clear_seen();
    // Reports resume...
    s.node()
        .wait_for("information", Duration::from_secs(40), |_| true)
        .unwrap_or_else(|| panic!("no reports after restart:\n{}", s.daemon.log_text()));
    // ...and subscriptions were renewed: a deploy is answered.
    let mut unknown = job("app.ns.after.restart", 0, &[], false);
    unknown["virtualization"] = "nope".into();
    let payload = unknown.to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        s.node().publish("control/deploy", payload.clone());
        if s.node()
            .wait_for("job", Duration::from_secs(3), |v| {
                v["sname"] == "app.ns.after.restart"
            })
            .is_some()
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "deploy not handled after broker restart:\n{}",
            s.daemon.log_text()
        );
    }
}

fn registration_is_retried_until_the_cluster_answers() {
    let dir = temp_dir();
    let broker = Mosquitto::loopback(dir.path()).expect("mosquitto");
    // Point the daemon at a port where nothing listens yet, then start the cluster
    // double there... ports cannot be reserved, so instead start with a closed port
    // and check the daemon logs the retry and keeps running.
    let closed = testkit::broker::free_port();
    let conf = write_conf(dir.path(), closed);
    let mut daemon = daemon(dir.path(), &conf);
    let retried = wait_for("two retries", Duration::from_secs(10), || {
        daemon.log_text().matches("registration failed").count() >= 2
    });
    assert!(retried.is_ok(), "no retries logged:\n{}", daemon.log_text());
    assert!(daemon.is_running(), "upstream exits here; we must not");
    drop(broker);
}

/// A loopback broker and cluster, and the id this machine's hostname gets.
fn loopback(dir: &Path) -> (LoopbackCluster, String) {
    let lc = LoopbackCluster::start(dir).expect("broker and cluster double");
    let id = lc.cluster.id_for_host(&testkit::hostname());
    (lc, id)
}

/// The node's local policy, not the job document, decides: privileged jobs
/// and shims the node does not offer are refused by default, with a reason
/// naming the policy; crosvm jobs fail with a reason where crosvm is absent.
fn the_local_policy_refuses_what_the_cluster_cannot_override() {
    let dir = temp_dir();
    let (
        LoopbackCluster {
            cluster,
            broker: _broker,
        },
        id,
    ) = loopback(dir.path());
    let conf = write_conf_with(dir.path(), cluster.http_port(), |cfg| {
        cfg["virtualizations"].as_array_mut().expect("list").push(
            serde_json::json!({"virutalizaiton_name": "crosvm",
                "virutalizaiton_runtime": "crosvm", "virutalizaiton_active": true,
                "virutalizaiton_config": []}),
        );
    });
    let daemon = daemon(dir.path(), &conf);
    let node = cluster.node_view(&id);
    let info = node
        .wait_for("information", Duration::from_secs(30), |_| true)
        .unwrap_or_else(|| panic!("daemon not up:\n{}", daemon.log_text()));
    // crosvm cannot run here, so the scheduler is not told it can.
    assert_eq!(
        info["virtualization"],
        serde_json::json!(["docker", "unikernel"])
    );

    let mut privileged = job("app.ns.policy.priv", 0, &["true"], false);
    // However the document spells it.
    privileged
        .as_object_mut()
        .expect("object")
        .remove("privileged");
    privileged["Privileged"] = "true".into();
    node.publish("control/deploy", privileged.to_string());
    let mut shim = job("app.ns.policy.shim", 0, &["true"], false);
    shim["virtualization"] = "io.containerd.runc.v1".into();
    node.publish("control/deploy", shim.to_string());
    let mut crosvm = job("app.ns.policy.crosvm", 0, &["true"], false);
    crosvm["virtualization"] = "crosvm".into();
    node.publish("control/deploy", crosvm.to_string());

    let detail = |v: &Value| v["status_detail"].as_str().unwrap_or_default().to_string();
    let f = node.wait_status("app.ns.policy.priv", 0, "FAILED");
    assert!(detail(&f).contains("local_policy.allow_privileged"), "{f}");
    let f = node.wait_status("app.ns.policy.shim", 0, "FAILED");
    assert!(
        detail(&f).contains("local_policy.allow_unknown_runtimes"),
        "{f}"
    );
    let f = node.wait_status("app.ns.policy.crosvm", 0, "FAILED");
    assert!(detail(&f).contains("crosvm"), "{f}");
    assert!(
        detail(&f).contains("not installed") || detail(&f).contains("does not run crosvm"),
        "{f}"
    );
}

/// `ip` is the discovered public address when `public_ip` is on, and the
/// `publicip` of job reports is the same, as upstream.
fn public_ip_is_discovered_refreshed_and_reported_as_publicip() {
    use axum::routing::get;
    let answer = std::sync::Arc::new(std::sync::Mutex::new("203.0.113.5\n".to_string()));
    let served = answer.clone();
    let rt = testkit::runtime();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let url = format!("http://{}/", listener.local_addr().expect("addr"));
    let app = axum::Router::new().route(
        "/",
        get(move || {
            let a = served.clone();
            async move { a.lock().expect("lock").clone() }
        }),
    );
    rt.spawn(async move { axum::serve(listener, app).await });

    let dir = temp_dir();
    let (
        LoopbackCluster {
            cluster,
            broker: _broker,
        },
        id,
    ) = loopback(dir.path());
    let conf = write_conf_with(dir.path(), cluster.http_port(), |cfg| {
        cfg["public_ip"] = true.into();
    });
    let daemon = daemon_with(
        dir.path(),
        &conf,
        &[
            ("NODEENGINE_PUBLIC_IP_URL", &url),
            ("NODEENGINE_PUBLIC_IP_REFRESH", "1"),
        ],
    );
    let node = cluster.node_view(&id);
    let info = node
        .wait_for("information", Duration::from_secs(30), |v| {
            v["ip"] == "203.0.113.5"
        })
        .unwrap_or_else(|| panic!("no public ip reported:\n{}", daemon.log_text()));
    assert_eq!(info["ip"], "203.0.113.5");
    let regs = cluster.registrations();
    assert_eq!(regs[0]["ip"], "203.0.113.5", "registration carries it too");

    // A job report's publicip is the node's ip.
    let mut unknown = job("app.ns.pub.ip", 0, &[], false);
    unknown["virtualization"] = "nope".into();
    node.publish("control/deploy", unknown.to_string());
    let f = node.wait_status("app.ns.pub.ip", 0, "FAILED");
    assert_eq!(f["publicip"], "203.0.113.5");

    // Refreshed: a new answer becomes the new ip; garbage never does.
    *answer.lock().expect("lock") = "<html>rate limited</html>".into();
    std::thread::sleep(Duration::from_secs(3));
    *answer.lock().expect("lock") = "198.51.100.77".into();
    cluster.clear_seen();
    let info = node.wait_for("information", Duration::from_secs(30), |v| {
        v["ip"] == "198.51.100.77"
    });
    assert!(info.is_some(), "not refreshed:\n{}", daemon.log_text());
    assert!(
        node.messages("information")
            .iter()
            .all(|v| v["ip"] == "203.0.113.5" || v["ip"] == "198.51.100.77"),
        "a bad answer became the address"
    );
}

/// MQTT over TLS that verifies the broker, without a client certificate,
/// with a broker user and password.
fn mqtt_with_server_verified_tls_and_credentials() {
    let dir = temp_dir();
    let pki = Pki::new(dir.path()).expect("certificates");
    let security = BrokerSecurity {
        pki: pki.clone(),
        user: "node-user".into(),
        password: "s3cret-pw".into(),
    };
    let broker = Mosquitto::loopback_secured(dir.path(), &security).expect("mosquitto");
    let cluster = ClusterDouble::options(broker.endpoint())
        .login(MqttLogin {
            tls: pki.client_config().expect("tls"),
            user: "node-user".into(),
            password: "s3cret-pw".into(),
        })
        .start()
        .expect("cluster double");
    let id = cluster.id_for_host(&testkit::hostname());
    let node = cluster.node_view(&id);
    let pw = dir.path().join("mqtt.pw");
    std::fs::write(&pw, "s3cret-pw\n").expect("w");
    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    let conf = write_conf_with(dir.path(), cluster.http_port(), |cfg| {
        cfg["mqtt_tls"] = true.into();
        cfg["mqtt_ca_file"] = pki.ca.display().to_string().into();
        cfg["mqtt_username"] = "node-user".into();
        cfg["mqtt_password_file"] = pw.display().to_string().into();
    });
    let d = daemon(dir.path(), &conf);
    node.wait_for("information", Duration::from_secs(30), |_| true)
        .unwrap_or_else(|| panic!("no reports over TLS:\n{}", d.log_text()));
    // Subscriptions work too: a deploy is answered.
    let mut unknown = job("app.ns.tls.job", 0, &[], false);
    unknown["virtualization"] = "nope".into();
    node.publish("control/deploy", unknown.to_string());
    node.wait_status("app.ns.tls.job", 0, "FAILED");
    assert!(!d.log_text().contains("PLAINTEXT"));
    drop(d);

    // A wrong password is refused by the broker; the daemon says so and retries.
    std::fs::write(&pw, "wrong\n").expect("w");
    cluster.clear_seen();
    let d = daemon(dir.path(), &conf);
    let refused = wait_for("the refusal in the log", Duration::from_secs(30), || {
        d.log_text().contains("MQTT connection")
    });
    assert!(refused.is_ok(), "{}", d.log_text());
    std::thread::sleep(Duration::from_secs(3));
    assert!(node.messages("information").is_empty());
}

/// GPU figures as upstream computes them, and addons advertised only when
/// they can work (imageBuilder needs qemu-user-static).
fn gpu_figures_and_addons_as_upstream() {
    for qemu_installed in [true, false] {
        let dir = temp_dir();
        let bin = dir.path().join("bin");
        write_script(
            &bin.join("nvidia-smi"),
            "printf '535.1, 10, 40, 1000, 16000\\n535.1, 30, 50, 3000, 8000\\n'\n",
        )
        .expect("script");
        write_script(
            &bin.join("dpkg"),
            if qemu_installed {
                "echo 'Status: install ok installed'\n"
            } else {
                "echo 'dpkg-query: package is not installed' >&2; exit 1\n"
            },
        )
        .expect("script");
        let (
            LoopbackCluster {
                cluster,
                broker: _broker,
            },
            id,
        ) = loopback(dir.path());
        let conf = write_conf_with(dir.path(), cluster.http_port(), |cfg| {
            cfg["addons"] = serde_json::json!([
                {"addon_name": "image-builder", "addon_active": true, "addon_config": []}
            ]);
        });
        let daemon = daemon_with(dir.path(), &conf, &[("PATH", &path_with(&bin))]);
        let info = cluster
            .node_view(&id)
            .wait_for("information", Duration::from_secs(30), |_| true)
            .unwrap_or_else(|| panic!("daemon not up:\n{}", daemon.log_text()));
        assert_eq!(info["gpu_driver"], "535.1");
        assert_eq!(info["vgpus"], 2);
        assert_eq!(info["vram"], 24000.0, "total MiB, as upstream");
        assert_eq!(info["gpu_usage"], 20.0);
        let expected = if qemu_installed {
            serde_json::json!(["image-builder"])
        } else {
            serde_json::json!([])
        };
        assert_eq!(
            info["supported_addons"], expected,
            "qemu-user-static: {qemu_installed}"
        );
        let mem = info["memory_percent"].as_f64().expect("float");
        assert!((0.0..=100.0).contains(&mem));
    }
}
