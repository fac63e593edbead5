//! Deployments on a real containerd (own instance per test), driven over a real
//! mosquitto by the cluster double. Network mode is `off`.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use testkit::cluster::{LoopbackCluster, NodeView};
use testkit::fixtures::{deploy_document as job, node_conf, test_image, test_image_named};
use testkit::image::{ImageSpec, write_busybox_oci_tar};
use testkit::{ClusterDouble, Containerd, Mosquitto, NodeEngine, path_with, temp_dir};
use testkit::{wait_for, write_script};

testkit::main! {
    deploy_report_and_delete: [Root, Mosquitto, Containerd, Busybox, Python3, PrometheusClient],
    exits_are_reported_and_cleaned_up: [Root, Mosquitto, Containerd, Busybox],
    restart_adopts_running_instances_and_broker_restart_keeps_deploying: [Root, Mosquitto, Containerd, Busybox],
    after_an_outage_longer_than_the_window_instances_are_removed: [Root, Mosquitto, Containerd, Busybox],
    containers_get_upstreams_spec_and_are_confined: [Root, Mosquitto, Containerd, Busybox],
    privileged_gpus_and_configured_runtimes_as_upstream: [Root, Mosquitto, Containerd, Busybox],
    flops_starts_its_ml_data_server: [Root, Mosquitto, Containerd, Busybox],
    images_from_plain_http_registries_are_pulled: [Root, Mosquitto, Containerd, Busybox],
    duplicate_and_zero_host_ports_do_not_fail_a_deploy: [Root, Mosquitto, Containerd, Busybox],
}

/// Fields drop in this order: daemon first, temp dir last.
struct Setup {
    daemon: NodeEngine,
    cluster: ClusterDouble,
    broker: Mosquitto,
    containerd: Containerd,
    /// The id the cluster gives this machine's hostname.
    id: String,
    dir: tempfile::TempDir,
}

impl Setup {
    /// The cluster as the daemon's node sees it.
    fn node(&self) -> NodeView<'_> {
        self.cluster.node_view(&self.id)
    }
}

fn setup(unpack: bool) -> Setup {
    setup_with(unpack, |_, _, _| Vec::new())
}

/// The cluster's silence window, shorter than upstream's in some tests.
fn setup_with(
    unpack: bool,
    prepare: impl FnOnce(&Path, &Containerd, &mut Value) -> Vec<(&'static str, String)>,
) -> Setup {
    setup_with_window(unpack, testkit::cluster::FAILURE_WINDOW, prepare)
}

/// `prepare` gets the test directory, containerd and the configuration to
/// edit before the daemon starts, and returns extra daemon environment;
/// the cluster marks an instance FAILED after `window` without reports.
fn setup_with_window(
    unpack: bool,
    window: Duration,
    prepare: impl FnOnce(&Path, &Containerd, &mut Value) -> Vec<(&'static str, String)>,
) -> Setup {
    let dir = temp_dir();
    let containerd = Containerd::start(dir.path()).expect("containerd");
    containerd
        .import(&test_image(), unpack)
        .expect("the test image");
    let LoopbackCluster { cluster, broker } =
        LoopbackCluster::start_with(dir.path(), |o| o.failure_window(window))
            .expect("broker and cluster double");
    let id = cluster.id_for_host(&testkit::hostname());
    let mut doc = node_conf(cluster.http_port(), &dir.path().join("applogs"), true);
    let env = prepare(dir.path(), &containerd, &mut doc);
    let conf = dir.path().join("conf.json");
    std::fs::write(&conf, doc.to_string()).expect("write conf");
    let mut daemon = NodeEngine::builder(
        env!("CARGO_BIN_EXE_nodeengined"),
        &conf,
        &dir.path().join("nodeengined.log"),
    )
    .containerd(&containerd.socket, &containerd.namespace)
    // containerd's runtimes come from the test's config, not the host's.
    .env(
        "CONTAINERD_CONFIG",
        &dir.path()
            .join("containerd-runtimes.toml")
            .display()
            .to_string(),
    );
    for (k, v) in &env {
        daemon = daemon.env(k, v);
    }
    let daemon = daemon.start().expect("nodeengined");
    let s = Setup {
        dir,
        broker,
        cluster,
        containerd,
        id,
        daemon,
    };
    s.node()
        .wait_for("information", Duration::from_secs(30), |_| true)
        .unwrap_or_else(|| panic!("daemon not up:\n{}", s.daemon.log_text()));
    s
}

/// `ctr containers info`'s Spec of container `id`.
fn spec_of(containerd: &Containerd, id: &str) -> Value {
    let info = containerd
        .ctr_ok(&["containers", "info", id])
        .expect("ctr containers info");
    let info: Value = serde_json::from_str(&info).expect("ctr info json");
    info["Spec"].clone()
}

fn resources_entry<'a>(v: &'a Value, job: &str, instance: u64) -> Option<&'a Value> {
    v["services"]
        .as_array()?
        .iter()
        .find(|s| s["job_name"] == job && s["instance"] == instance)
}

fn deploy_report_and_delete() {
    let metrics = format!("127.0.0.1:{}", testkit::broker::free_port());
    let listen = metrics.clone();
    let s = setup_with(true, move |_, _, _| {
        vec![("NODEENGINE_METRICS_ADDRESS", listen)]
    });
    let scrape =
        |address: &str| testkit::metrics::scrape(None, address).unwrap_or_else(|e| panic!("{e:#}"));
    let name = "app.ns.web.main";
    let id = format!("{name}.instance.0");
    let j = job(
        name,
        0,
        &[
            "sh",
            "-c",
            "echo hello-$GREETING-$IMAGE_VAR-$(hostname); sleep 300",
        ],
        false,
    );
    s.node().publish("control/deploy", j.to_string());
    let created = s.node().wait_status(name, 0, "CREATED");
    assert_eq!(created["status_detail"], "");

    // containerd has it, with our limits.
    assert!(s.containerd.container_ids().contains(&id));
    let spec = spec_of(&s.containerd, &id);
    assert_eq!(spec["hostname"], "instance-0");
    assert_eq!(spec["linux"]["resources"]["memory"]["limit"], 64 << 20);
    assert_eq!(spec["linux"]["resources"]["cpu"]["quota"], 100_000);

    // Resources show it, with its log tail.
    let res = s
        .node()
        .wait_for("jobs/resources", Duration::from_secs(20), |v| {
            resources_entry(v, name, 0).is_some_and(|e| {
                e["logs"]
                    .as_str()
                    .is_some_and(|l| l.contains("hello-hello-from-image-instance-0"))
            })
        })
        .unwrap_or_else(|| {
            panic!(
                "instance not in resources with its log: {:?}; log: {:?}",
                s.node().messages("jobs/resources").last(),
                std::fs::read_to_string(s.dir.path().join("applogs").join(&id))
            )
        });
    let e = resources_entry(&res, name, 0).expect("entry");
    for k in ["cpu_percent", "memory_percent", "disk", "logs"] {
        assert!(e[k].is_string(), "{k} must be a string: {e}");
    }
    assert_eq!(e["virtualization"], "docker");
    let applog = s.dir.path().join("applogs").join(&id);
    assert!(
        std::fs::read_to_string(&applog)
            .unwrap_or_default()
            .contains("hello-hello-from-image-instance-0")
    );

    // A second deploy of the same instance (MQTT QoS 1 may deliver twice) is
    // a logged no-op, not FAILED.
    s.node().publish("control/deploy", j.to_string());
    let logged = wait_for(
        "the duplicate deploy to be logged",
        Duration::from_secs(20),
        || {
            s.daemon
                .log_text()
                .contains("deploy for an instance that already runs here; ignored")
        },
    )
    .is_ok();
    assert!(logged, "{}", s.daemon.log_text());

    // The metrics count it: one created (timed), one duplicate, running
    // under the virtualization the job asked for.
    let m = scrape(&metrics);
    assert_eq!(m["nodeengine_deploys_total{outcome=created}"], 1.0, "{m}");
    assert_eq!(m["nodeengine_deploys_total{outcome=duplicate}"], 1.0, "{m}");
    assert_eq!(m["nodeengine_deploy_duration_seconds_count"], 1.0, "{m}");
    assert_eq!(
        m["nodeengine_running_instances{virtualization=docker}"], 1.0,
        "{m}"
    );

    // Delete: exactly one UNDEPLOYED, container gone.
    let del =
        serde_json::json!({"job_name": name, "virtualization": "docker", "instance_number": 0});
    s.node().publish("control/delete", del.to_string());
    s.node().publish("control/delete", del.to_string());
    s.node().wait_status(name, 0, "UNDEPLOYED");
    std::thread::sleep(Duration::from_secs(3));
    let statuses: Vec<String> = s
        .node()
        .messages("job")
        .iter()
        .filter(|m| m["sname"] == name)
        .map(|m| m["status"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(statuses, ["CREATED", "UNDEPLOYED"]);
    assert!(!s.containerd.container_ids().contains(&id));
    let gone = s
        .node()
        .wait_for("jobs/resources", Duration::from_secs(10), |v| {
            resources_entry(v, name, 0).is_none()
        });
    assert!(gone.is_some());
    let m = scrape(&metrics);
    assert!(
        m.get("nodeengine_running_instances{virtualization=docker}")
            .is_none(),
        "{m}"
    );
}

fn exits_are_reported_and_cleaned_up() {
    // Imported without unpacking: the daemon unpacks the layers itself.
    let s = setup(false);
    s.node().publish(
        "control/deploy",
        job("app.ns.batch.ok", 0, &["true"], true).to_string(),
    );
    s.node().publish(
        "control/deploy",
        job("app.ns.batch.bad", 1, &["sh", "-c", "exit 3"], false).to_string(),
    );
    let mut missing = job("app.ns.no.image", 0, &["true"], false);
    missing["image"] = "localhost:1/does/not-exist:v0".into();
    s.node().publish("control/deploy", missing.to_string());

    s.node().wait_status("app.ns.batch.ok", 0, "CREATED");
    let done = s.node().wait_status("app.ns.batch.ok", 0, "COMPLETED");
    assert!(
        done["status_detail"]
            .as_str()
            .unwrap_or_default()
            .contains('0')
    );
    s.node().wait_status("app.ns.batch.bad", 1, "CREATED");
    let dead = s.node().wait_status("app.ns.batch.bad", 1, "DEAD");
    assert!(
        dead["status_detail"]
            .as_str()
            .unwrap_or_default()
            .contains('3')
    );
    let failed = s.node().wait_status("app.ns.no.image", 0, "FAILED");
    assert!(
        failed["status_detail"]
            .as_str()
            .unwrap_or_default()
            .contains("does/not-exist"),
        "{failed}"
    );
    let clean = wait_for("no containers", Duration::from_secs(20), || {
        s.containerd.container_ids().is_empty()
    })
    .is_ok();
    assert!(clean, "left: {:?}", s.containerd.container_ids());
}

fn restart_adopts_running_instances_and_broker_restart_keeps_deploying() {
    // The node's window and the cluster's match (60 s); the restart is far shorter.
    let window = Duration::from_secs(60);
    let mut s = setup_with_window(true, window, |_, _, _| {
        vec![("NODEENGINE_ADOPT_WINDOW", window.as_secs().to_string())]
    });
    let name = "app.ns.keep.alive";
    // Placed by the cluster, so it counts the instance's silence.
    s.node().deploy(&job(name, 4, &["sleep", "300"], false));
    s.node().wait_status(name, 4, "CREATED");
    // Reported to the cluster (so the node recorded a report, which is what
    // lets it adopt after a restart), not merely created.
    s.node()
        .wait_for("jobs/resources", Duration::from_secs(20), |v| {
            resources_entry(v, name, 4).is_some()
        })
        .expect("the instance reported");

    // Daemon restart: the running container is adopted, not killed.
    s.daemon.restart().expect("nodeengined restarted");
    s.cluster.clear_seen();
    let adopted = s
        .node()
        .wait_for("jobs/resources", Duration::from_secs(30), |v| {
            resources_entry(v, name, 4).is_some()
        });
    assert!(adopted.is_some(), "not adopted:\n{}", s.daemon.log_text());
    let state = s.cluster.instance_state(name, 4).expect("placed");
    assert_ne!(state.status, "FAILED", "{state:?}");
    assert!(
        s.containerd
            .container_ids()
            .contains(&format!("{name}.instance.4"))
    );

    // Broker restart: deploys still work afterwards.
    s.broker.restart().expect("mosquitto restarted");
    s.cluster.clear_seen();
    s.node()
        .wait_for("information", Duration::from_secs(40), |_| true)
        .expect("reports resume");
    let second = "app.ns.after.broker";
    let payload = job(second, 0, &["sleep", "300"], false).to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        s.node().publish("control/deploy", payload.clone());
        if s.node()
            .wait_for("job", Duration::from_secs(5), |v| {
                v["sname"] == second && v["status"] == "CREATED"
            })
            .is_some()
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            s.daemon.log_text()
        );
    }
    // Delete the adopted one: exactly one UNDEPLOYED.
    let del = serde_json::json!({"job_name": name, "instance_number": 4});
    s.node().publish("control/delete", del.to_string());
    s.node().wait_status(name, 4, "UNDEPLOYED");
}

fn after_an_outage_longer_than_the_window_instances_are_removed() {
    // A short window on both sides keeps the test quick.
    let window = Duration::from_secs(3);
    let mut s = setup_with_window(true, window, |_, _, _| {
        vec![("NODEENGINE_ADOPT_WINDOW", window.as_secs().to_string())]
    });
    let name = "app.ns.long.outage";
    let id = format!("{name}.instance.1");
    s.node().deploy(&job(name, 1, &["sleep", "300"], false));
    s.node().wait_status(name, 1, "CREATED");
    s.node()
        .wait_for("jobs/resources", Duration::from_secs(20), |v| {
            resources_entry(v, name, 1).is_some()
        })
        .expect("reported");

    // The node goes away; the cluster marks its instance FAILED (and would
    // place a replacement elsewhere).
    s.daemon.stop();
    let failed = wait_for(
        "the cluster to mark the instance FAILED",
        Duration::from_secs(30),
        || {
            s.cluster
                .instance_state(name, 1)
                .is_some_and(|i| i.status == "FAILED")
        },
    )
    .is_ok();
    assert!(
        failed,
        "the cluster double never marked the instance FAILED"
    );

    // Back after the window: the container is a duplicate now and goes.
    s.cluster.clear_seen();
    s.daemon.restart().expect("nodeengined restarted");
    let removed = wait_for(
        "the duplicate to be removed",
        Duration::from_secs(30),
        || !s.containerd.container_ids().contains(&id),
    )
    .is_ok();
    assert!(removed, "duplicate left running:\n{}", s.daemon.log_text());
    for _ in 0..3 {
        let report = s
            .node()
            .wait_for("jobs/resources", Duration::from_secs(20), |_| true)
            .expect("reports resume");
        assert!(
            resources_entry(&report, name, 1).is_none(),
            "reported a replaced instance: {report}"
        );
        s.cluster.clear_seen();
    }
}

const PASSWD: &[u8] =
    b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
const GROUP: &[u8] = b"root:x:0:\nnogroup:x:65534:\nfuse:x:107:nobody\n";

fn wait_for_log(s: &Setup, id: &str, text: &str) -> String {
    let path = s.dir.path().join("applogs").join(id);
    let found = wait_for(
        &format!("{text:?} in the log of {id}"),
        Duration::from_secs(30),
        || std::fs::read_to_string(&path).is_ok_and(|l| l.contains(text)),
    )
    .is_ok();
    let log = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        found,
        "{id}: no {text:?} in its log: {log:?}\n{}",
        s.daemon.log_text()
    );
    log
}

/// Points 1, 6 and 7 of the parity issue and the confinement of the security
/// issue, on real containers.
fn containers_get_upstreams_spec_and_are_confined() {
    let entry_image = "docker.io/library/nodeengine-entry:latest";
    let user_image = "docker.io/library/nodeengine-nobody:latest";
    let s = setup_with(true, |_, containerd, _| {
        containerd
            .import(
                &ImageSpec {
                    entrypoint: &["/bin/false"],
                    ..test_image_named(entry_image)
                },
                true,
            )
            .expect("import");
        containerd
            .import(
                &ImageSpec {
                    files: &[("etc/passwd", PASSWD), ("etc/group", GROUP)],
                    user: "nobody",
                    ..test_image_named(user_image)
                },
                true,
            )
            .expect("import");
        vec![("NODEENGINE_APP_LOG_MAX_BYTES", "8192".to_string())]
    });

    // cmd replaces the ENTRYPOINT (which would exit 1); an env entry
    // without `=` removes the variable; own network namespace with only
    // loopback (overlay off); upstream's resolver; seccomp denies user
    // namespaces; lenient ports.
    let checks = "echo cmd-ran; echo \"[$IMAGE_VAR]\"; echo \"ifaces=$(grep -c : /proc/net/dev)\"; \
        cat /etc/resolv.conf; if unshare -U true 2>/dev/null; then echo userns-allowed; \
        else echo userns-denied; fi; echo checks-done; sleep 600";
    let mut j = job("app.ns.spec.checks", 0, &["sh", "-c", checks], false);
    j["image"] = entry_image.into();
    j["environment"] = serde_json::json!(["GREETING=hello", "IMAGE_VAR"]);
    j["port"] = "8080:80;8080:81;0:90".into();
    s.node().publish("control/deploy", j.to_string());
    // The image's USER is resolved in its own /etc/passwd.
    let mut u = job(
        "app.ns.spec.user",
        0,
        &[
            "sh",
            "-c",
            "echo \"ids=$(id -u):$(id -g):$(id -G)\"; sleep 600",
        ],
        false,
    );
    u["image"] = user_image.into();
    s.node().publish("control/deploy", u.to_string());
    // A chatty one: its log is capped.
    let chatty = job(
        "app.ns.spec.chatty",
        0,
        &["sh", "-c", "seq 1 20000; echo chatty-done; sleep 600"],
        false,
    );
    s.node().publish("control/deploy", chatty.to_string());
    // GPUs without the NVIDIA tools: FAILED with the reason, not a silent run.
    let mut gpu = job("app.ns.spec.gpu", 0, &["true"], false);
    gpu["vgpus"] = 1.into();
    s.node().publish("control/deploy", gpu.to_string());
    // Privileged: refused by the node's local policy (the default).
    let mut privileged = job("app.ns.spec.priv", 0, &["true"], false);
    privileged["privileged"] = true.into();
    s.node().publish("control/deploy", privileged.to_string());

    s.node().wait_status("app.ns.spec.checks", 0, "CREATED");
    s.node().wait_status("app.ns.spec.user", 0, "CREATED");
    s.node().wait_status("app.ns.spec.chatty", 0, "CREATED");
    let f = s.node().wait_status("app.ns.spec.gpu", 0, "FAILED");
    assert!(
        f["status_detail"]
            .as_str()
            .is_some_and(|d| d.contains("nvidia-container-cli")),
        "{f}"
    );
    let f = s.node().wait_status("app.ns.spec.priv", 0, "FAILED");
    assert!(
        f["status_detail"]
            .as_str()
            .is_some_and(|d| d.contains("local_policy.allow_privileged")),
        "{f}"
    );

    let log = wait_for_log(&s, "app.ns.spec.checks.instance.0", "checks-done");
    assert!(log.contains("cmd-ran\n"), "{log}");
    assert!(log.contains("[]\n"), "IMAGE_VAR was not removed: {log}");
    assert!(log.contains("ifaces=1\n"), "not only loopback: {log}");
    assert!(log.contains("nameserver "), "{log}");
    assert!(
        !log.contains("nameserver 127."),
        "a loopback resolver: {log}"
    );
    assert!(
        log.contains("userns-denied\n"),
        "seccomp let unshare through: {log}"
    );
    let log = wait_for_log(&s, "app.ns.spec.user.instance.0", "ids=");
    assert!(log.contains("ids=65534:65534:65534 107\n"), "{log}");

    // The spec as containerd stores it.
    let spec = spec_of(&s.containerd, "app.ns.spec.checks.instance.0");
    assert_eq!(spec["process"]["args"][0], "sh");
    assert_eq!(spec["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ERRNO");
    assert_eq!(spec["linux"]["resources"]["pids"]["limit"], 4096);
    let resolv = spec["mounts"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["destination"] == "/etc/resolv.conf"))
        .expect("resolv.conf mount")["source"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_ne!(resolv, "/etc/resolv.conf", "the host's resolver file");
    if resolv != "/run/systemd/resolve/resolv.conf" {
        assert_eq!(
            std::fs::read_to_string(&resolv).expect("resolv"),
            "nameserver 8.8.8.8\n"
        );
    }
    // cgroup v2, or v1's pids hierarchy.
    let v2 = std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let pids_max = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/{}{}/app.ns.spec.checks.instance.0/pids.max",
        if v2 { "" } else { "pids/" },
        s.containerd.namespace
    ))
    .expect("pids.max of the container's cgroup");
    assert_eq!(pids_max.trim(), "4096");

    // The log is capped to its newest part, a private file.
    let chatty_log = s.dir.path().join("applogs/app.ns.spec.chatty.instance.0");
    let capped = wait_for("the log to be capped", Duration::from_secs(30), || {
        std::fs::read_to_string(&chatty_log)
            .is_ok_and(|l| l.len() <= 8192 && l.contains("20000\nchatty-done\n"))
    })
    .is_ok();
    assert!(
        capped,
        "log not capped: {} bytes",
        std::fs::metadata(&chatty_log).map(|m| m.len()).unwrap_or(0)
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&chatty_log)
        .expect("log")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // Resources as upstream computes them: six decimals, memory a fraction.
    let res = s
        .node()
        .wait_for("jobs/resources", Duration::from_secs(20), |v| {
            resources_entry(v, "app.ns.spec.user", 0).is_some()
        })
        .expect("resources");
    let e = resources_entry(&res, "app.ns.spec.user", 0).expect("entry");
    for k in ["cpu_percent", "memory_percent"] {
        let v = e[k].as_str().expect("string");
        assert_eq!(v.split('.').nth(1).map(str::len), Some(6), "{k}={v}");
    }
    let mem: f64 = e["memory_percent"]
        .as_str()
        .unwrap_or("x")
        .parse()
        .expect("number");
    assert!(
        (0.0..1.0).contains(&mem),
        "memory_percent is a fraction upstream: {mem}"
    );
}

/// With the local policy allowing privileged jobs they get what upstream
/// grants (`/dev/fuse`, no more capabilities); GPUs are handed over by the
/// NVIDIA hook; runtimes come from containerd's configuration.
fn privileged_gpus_and_configured_runtimes_as_upstream() {
    let s = setup_with(true, |dir, _, cfg| {
        cfg["local_policy"] = serde_json::json!({"allow_privileged": true});
        let bin = dir.join("bin");
        // Two GPUs, the second with more free memory.
        write_script(
            &bin.join("nvidia-smi"),
            "case \"$1\" in --query-gpu=index,memory.free) printf '0, 1000\\n1, 8000\\n';;\n\
             *) printf '535.1, 10, 40, 100, 16000\\n535.1, 30, 50, 300, 16000\\n';; esac\n",
        )
        .expect("script");
        write_script(
            &bin.join("nvidia-container-cli"),
            &format!("echo \"$@\" >> {}\n", dir.join("nvidia-calls").display()),
        )
        .expect("script");
        // A runc-compatible runtime configured in containerd, as upstream finds them.
        let runc = testkit::harness::which("runc").expect("runc");
        let runc = runc.display();
        write_script(
            &bin.join("oak-runc"),
            &format!(
                "echo \"$@\" >> {}\nexec {runc} \"$@\"\n",
                dir.join("oak-runc-calls").display()
            ),
        )
        .expect("script");
        std::fs::write(
            dir.join("containerd-runtimes.toml"),
            format!(
                "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.oakrunc]\n\
                 runtime_type = \"io.containerd.runc.v2\"\n\
                 [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.oakrunc.options]\n\
                 BinaryName = \"{}\"\n",
                bin.join("oak-runc").display()
            ),
        )
        .expect("containerd runtimes");
        vec![("PATH", path_with(&bin))]
    });

    let info = s
        .node()
        .wait_for("information", Duration::from_secs(20), |_| true)
        .expect("report");
    assert_eq!(
        info["virtualization"],
        serde_json::json!(["docker", "unikernel", "oakrunc"])
    );

    let mut privileged = job("app.ns.priv.fuse", 0, &["sleep", "600"], false);
    privileged["privileged"] = true.into();
    s.node().publish("control/deploy", privileged.to_string());
    let mut gpu = job("app.ns.gpu.two", 0, &["sleep", "600"], false);
    gpu["vgpus"] = 2.into();
    s.node().publish("control/deploy", gpu.to_string());
    let mut custom = job("app.ns.rt.custom", 0, &["sleep", "600"], false);
    custom["virtualization"] = "oakrunc".into();
    s.node().publish("control/deploy", custom.to_string());
    let plain = job("app.ns.plain.one", 0, &["sleep", "600"], false);
    s.node().publish("control/deploy", plain.to_string());

    for name in [
        "app.ns.priv.fuse",
        "app.ns.gpu.two",
        "app.ns.rt.custom",
        "app.ns.plain.one",
    ] {
        s.node().wait_status(name, 0, "CREATED");
    }
    let p = spec_of(&s.containerd, "app.ns.priv.fuse.instance.0");
    let plain = spec_of(&s.containerd, "app.ns.plain.one.instance.0");
    assert_eq!(
        p["process"]["capabilities"],
        plain["process"]["capabilities"]
    );
    assert_eq!(p["linux"]["seccomp"], plain["linux"]["seccomp"]);
    let devices = p["linux"]["devices"].as_array().expect("devices");
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0]["path"], "/dev/fuse");
    assert_eq!(
        p["linux"]["resources"]["devices"][1],
        serde_json::json!({"allow": true, "type": "c", "major": 10, "minor": 229, "access": "rwm"})
    );

    // The NVIDIA hook ran (through containerd oci-hook) for the two GPUs
    // with the most free memory.
    let calls = std::fs::read_to_string(s.dir.path().join("nvidia-calls")).unwrap_or_default();
    assert!(
        calls.contains("--load-kmods configure --device=1,0 --compute"),
        "{calls}"
    );
    assert!(calls.contains("--pid="), "{calls}");
    assert!(
        !calls.contains("{{pid}}"),
        "placeholders not filled: {calls}"
    );

    // The configured runtime's binary ran the container.
    let calls = std::fs::read_to_string(s.dir.path().join("oak-runc-calls")).unwrap_or_default();
    assert!(calls.contains("app.ns.rt.custom.instance.0"), "{calls}");
}

/// An ML data server sidecar for the FLOps-learner addon, as upstream starts
/// it (image, name, host port 11027, its volume).
fn flops_starts_its_ml_data_server() {
    let mut s = setup_with(true, |_, containerd, _| {
        containerd
            .import(
                &ImageSpec {
                    cmd: &["sleep", "3600"],
                    ..test_image_named(nodeengine::addons::FLOPS_DATA_SERVER_IMAGE)
                },
                true,
            )
            .expect("import");
        Vec::new()
    });
    let info = s
        .node()
        .wait_for("information", Duration::from_secs(20), |_| true)
        .expect("report");
    assert_eq!(
        info["supported_addons"],
        serde_json::json!(["FLOps-learner"])
    );
    let tasks = s.containerd.ctr_ok(&["tasks", "ls"]).expect("ctr tasks ls");
    assert!(
        tasks
            .lines()
            .any(|l| l.starts_with("ml_data_server") && l.contains("RUNNING")),
        "{tasks}"
    );
    let spec = spec_of(&s.containerd, "ml_data_server");
    assert!(
        spec["linux"]["namespaces"]
            .as_array()
            .is_some_and(|n| n.iter().all(|n| n["type"] != "network")),
        "upstream publishes port 11027 on the host: {spec}"
    );
    assert!(
        spec["mounts"].as_array().is_some_and(|m| m
            .iter()
            .any(|m| m["destination"] == "/ml_data_server_volume")),
        "{spec}"
    );
    // It is the node's, not a job's: never reported, never reconciled away.
    s.daemon.restart().expect("nodeengined restarted");
    s.cluster.clear_seen();
    let res = s
        .node()
        .wait_for("jobs/resources", Duration::from_secs(30), |_| true)
        .expect("resources");
    assert_eq!(res, serde_json::json!({"services": []}));
    assert!(
        s.containerd
            .container_ids()
            .contains(&"ml_data_server".to_string())
    );
    assert!(s.daemon.log_text().contains("already runs"));
}

// ------------------------------------------------------------ registry double

/// What the registry double serves: blobs by digest, manifests by tag.
struct Repository {
    name: String,
    tag: String,
    manifest_digest: String,
    blobs: std::collections::HashMap<String, Vec<u8>>,
}

/// The blobs of an OCI layout tarball (as the image tests import).
fn repository_from_layout(
    dir: &std::path::Path,
    tarball: &std::path::Path,
    name: &str,
    tag: &str,
) -> Repository {
    let layout = dir.join("layout");
    std::fs::create_dir_all(&layout).expect("mkdir");
    let out = std::process::Command::new("tar")
        .arg("-xf")
        .arg(tarball)
        .arg("-C")
        .arg(&layout)
        .output()
        .expect("tar");
    assert!(out.status.success(), "{out:?}");
    let index: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("index"))
            .expect("index json");
    let manifest_digest = index["manifests"][0]["digest"]
        .as_str()
        .expect("digest")
        .to_string();
    let mut blobs = std::collections::HashMap::new();
    for e in std::fs::read_dir(layout.join("blobs/sha256"))
        .expect("blobs")
        .flatten()
    {
        let digest = format!("sha256:{}", e.file_name().to_string_lossy());
        blobs.insert(digest, std::fs::read(e.path()).expect("blob"));
    }
    Repository {
        name: name.into(),
        tag: tag.into(),
        manifest_digest,
        blobs,
    }
}

/// A registry that speaks only plain HTTP (as local registries often do): a
/// TLS client gets the plain-HTTP answer Go's servers give it.
async fn serve_plain_registry(listener: tokio::net::TcpListener, repo: std::sync::Arc<Repository>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let repo = repo.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 65536 {
                match conn.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                if buf.first() == Some(&0x16) {
                    // A TLS ClientHello.
                    let _ = conn
                        .write_all(b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n")
                        .await;
                    return;
                }
            }
            let head = String::from_utf8_lossy(&buf);
            let mut words = head.split_whitespace();
            let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            let prefix = format!("/v2/{}/", repo.name);
            let (status, ctype, body, digest): (&str, &str, Vec<u8>, String) = if path == "/v2/" {
                ("200 OK", "application/json", b"{}".to_vec(), String::new())
            } else if let Some(reference) = path
                .strip_prefix(&prefix)
                .and_then(|p| p.strip_prefix("manifests/"))
            {
                let digest = if reference == repo.tag {
                    repo.manifest_digest.clone()
                } else {
                    reference.to_string()
                };
                match repo.blobs.get(&digest) {
                    Some(b) => (
                        "200 OK",
                        "application/vnd.oci.image.manifest.v1+json",
                        b.clone(),
                        digest,
                    ),
                    None => ("404 Not Found", "text/plain", Vec::new(), String::new()),
                }
            } else if let Some(digest) = path
                .strip_prefix(&prefix)
                .and_then(|p| p.strip_prefix("blobs/"))
            {
                match repo.blobs.get(digest) {
                    Some(b) => (
                        "200 OK",
                        "application/octet-stream",
                        b.clone(),
                        digest.to_string(),
                    ),
                    None => ("404 Not Found", "text/plain", Vec::new(), String::new()),
                }
            } else {
                ("404 Not Found", "text/plain", Vec::new(), String::new())
            };
            let mut answer = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n",
                body.len()
            );
            if !digest.is_empty() {
                answer.push_str(&format!("Docker-Content-Digest: {digest}\r\n"));
            }
            answer.push_str("\r\n");
            let _ = conn.write_all(answer.as_bytes()).await;
            if method != "HEAD" {
                let _ = conn.write_all(&body).await;
            }
            let _ = conn.shutdown().await;
        });
    }
}

/// A name for this machine that is not "localhost" or an IP literal (which
/// containerd would reach over plain HTTP anyway) but resolves to loopback.
fn loopback_host_name() -> (String, std::net::IpAddr) {
    use std::net::ToSocketAddrs;
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("hostname")
        .trim()
        .to_string();
    let addr = (name.as_str(), 0)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.find(|a| a.ip().is_loopback()))
        .unwrap_or_else(|| {
            panic!("this test needs the host name {name:?} to resolve to a loopback address (/etc/hosts)")
        });
    (name, addr.ip())
}

/// Images on a registry that only speaks plain HTTP are pulled over HTTP,
/// with a warning, as upstream does.
fn images_from_plain_http_registries_are_pulled() {
    let s = setup(true);
    let (host, ip) = loopback_host_name();
    let tarball = s.dir.path().join("registry-image.tar");
    write_busybox_oci_tar(&tarball, &test_image_named("oak/plain:v1")).expect("image");
    let repo = repository_from_layout(s.dir.path(), &tarball, "oak/plain", "v1");
    let rt = testkit::runtime();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind((ip, 0)))
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let registry = rt.spawn(serve_plain_registry(listener, std::sync::Arc::new(repo)));

    let mut j = job("app.ns.plain.http", 0, &["sleep", "600"], false);
    j["image"] = format!("{host}:{port}/oak/plain:v1").into();
    s.node().publish("control/deploy", j.to_string());
    s.node().wait_status("app.ns.plain.http", 0, "CREATED");
    assert!(
        s.daemon.log_text().contains("speaks only plain HTTP"),
        "{}",
        s.daemon.log_text()
    );
    registry.abort();
}

// ------------------------------------------------------ NetManager stand-in

type SeenPorts = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// NetManager's local API as far as a deploy needs it; it refuses port
/// mappings as NetManager's reader does (a host port 0 or twice).
fn netmanager_stand_in(rt: &tokio::runtime::Runtime, sock: std::path::PathBuf) -> SeenPorts {
    use axum::Json;
    use axum::extract::State;
    use axum::http::StatusCode;
    use axum::routing::post;
    async fn deploy(
        State(seen): State<SeenPorts>,
        Json(v): Json<Value>,
    ) -> (StatusCode, Json<Value>) {
        let ports = v["portMappings"].as_str().unwrap_or_default().to_string();
        seen.lock().expect("lock").push(ports.clone());
        let mut hosts = Vec::new();
        for item in ports.split(';').filter(|i| !i.is_empty()) {
            let host = item
                .split([':', '/'])
                .next()
                .unwrap_or_default()
                .to_string();
            if host == "0" || hosts.contains(&host) {
                return (
                    StatusCode::BAD_REQUEST,
                    Json(serde_json::json!({"error": format!("port mapping {item:?} refused")})),
                );
            }
            hosts.push(host);
        }
        (
            StatusCode::OK,
            Json(
                serde_json::json!({"serviceName": v["serviceName"], "nsAddress": "10.18.0.2", "nsAddressv6": "fc00::2"}),
            ),
        )
    }
    let seen: SeenPorts = Default::default();
    let _in_runtime = rt.enter();
    let listener = tokio::net::UnixListener::bind(sock).expect("bind");
    let app = axum::Router::new()
        .route("/container/deploy", post(deploy))
        .route("/register", post(|| async { Json(serde_json::json!({})) }))
        .route(
            "/container/undeploy",
            post(|| async { Json(serde_json::json!({})) }),
        )
        .with_state(seen.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    seen
}

/// Duplicate or zero host ports do not fail a deploy that upstream runs.
fn duplicate_and_zero_host_ports_do_not_fail_a_deploy() {
    let sock = std::sync::Arc::new(std::sync::Mutex::new(None));
    let sock2 = sock.clone();
    let s = setup_with(true, move |dir, _, cfg| {
        let path = dir.join("nm.sock");
        cfg["overlay_network"] = format!("custom:{}", path.display()).into();
        *sock2.lock().expect("lock") = Some(path);
        Vec::new()
    });
    let path = sock.lock().expect("lock").clone().expect("socket path");
    let rt = testkit::runtime();
    let seen = netmanager_stand_in(&rt, path);
    let mut j = job("app.ns.ports.dup", 0, &["sleep", "600"], false);
    j["port"] = "8080:80;8080:81/tcp;0:90;53:53/udp".into();
    s.node().publish("control/deploy", j.to_string());
    s.node().wait_status("app.ns.ports.dup", 0, "CREATED");
    assert_eq!(
        seen.lock().expect("lock").as_slice(),
        ["8080:80;53:53/udp".to_string()]
    );
    assert!(s.daemon.log_text().contains("host port given twice"));
}
