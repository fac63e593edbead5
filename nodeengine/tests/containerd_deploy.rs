//! Deployments on a real containerd (own instance per test), driven over a real
//! mosquitto by the cluster double. Network mode is `off`.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

/// Fields drop in this order: daemon first, temp dir last.
struct Setup {
    daemon: Daemon,
    cluster: ClusterDouble,
    broker: Mosquitto,
    containerd: Containerd,
    dir: tempfile::TempDir,
}

async fn setup(unpack: bool) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let containerd = Containerd::start(dir.path());
    containerd.import_test_image(unpack);
    let broker = Mosquitto::start(dir.path());
    let cluster = ClusterDouble::start(broker.port).await;
    let conf = test_config(dir.path(), cluster.http_port, true);
    let daemon = Daemon::start(dir.path(), &conf, Some(&containerd));
    let mut s = Setup {
        dir,
        broker,
        cluster,
        containerd,
        daemon,
    };
    s.cluster
        .wait_for("information", Duration::from_secs(30), |_| true)
        .await
        .unwrap_or_else(|| panic!("daemon not up:\n{}", s.daemon.log_text()));
    s
}

const BINS: &[&str] = &[
    "/usr/sbin/mosquitto",
    "containerd",
    "ctr",
    "runc",
    "/bin/busybox",
];

fn resources_entry<'a>(v: &'a Value, job: &str, instance: u64) -> Option<&'a Value> {
    v["services"]
        .as_array()?
        .iter()
        .find(|s| s["job_name"] == job && s["instance"] == instance)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_report_and_delete() {
    if !can_run("deploy_report_and_delete", BINS) {
        return;
    }
    let mut s = setup(true).await;
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
    s.cluster.publish("control/deploy", j.to_string()).await;
    let created = s.cluster.wait_status(name, 0, "CREATED").await;
    assert_eq!(created["status_detail"], "");

    // containerd has it, with our limits.
    assert!(s.containerd.container_ids().contains(&id));
    let info = s.containerd.ctr(&["containers", "info", &id]);
    let info: Value = serde_json::from_slice(&info.stdout).expect("ctr info json");
    assert_eq!(info["Spec"]["hostname"], "instance-0");
    assert_eq!(
        info["Spec"]["linux"]["resources"]["memory"]["limit"],
        64 << 20
    );
    assert_eq!(info["Spec"]["linux"]["resources"]["cpu"]["quota"], 100_000);

    // Resources show it, with its log tail.
    let res = s
        .cluster
        .wait_for("jobs/resources", Duration::from_secs(20), |v| {
            resources_entry(v, name, 0).is_some_and(|e| {
                e["logs"]
                    .as_str()
                    .is_some_and(|l| l.contains("hello-hello-from-image-instance-0"))
            })
        })
        .await
        .unwrap_or_else(|| {
            panic!(
                "instance not in resources with its log: {:?}",
                s.cluster.messages("jobs/resources").last()
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

    // A second deploy of the same instance is ignored, not FAILED.
    s.cluster.publish("control/deploy", j.to_string()).await;

    // Delete: exactly one UNDEPLOYED, container gone.
    let del =
        serde_json::json!({"job_name": name, "virtualization": "docker", "instance_number": 0});
    s.cluster.publish("control/delete", del.to_string()).await;
    s.cluster.publish("control/delete", del.to_string()).await;
    s.cluster.wait_status(name, 0, "UNDEPLOYED").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let statuses: Vec<String> = s
        .cluster
        .messages("job")
        .iter()
        .filter(|m| m["sname"] == name)
        .map(|m| m["status"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(statuses, ["CREATED", "UNDEPLOYED"]);
    assert!(!s.containerd.container_ids().contains(&id));
    let gone = s
        .cluster
        .wait_for("jobs/resources", Duration::from_secs(10), |v| {
            resources_entry(v, name, 0).is_none()
        })
        .await;
    assert!(gone.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exits_are_reported_and_cleaned_up() {
    if !can_run("exits_are_reported", BINS) {
        return;
    }
    // Imported without unpacking: the daemon unpacks the layers itself.
    let mut s = setup(false).await;
    s.cluster
        .publish(
            "control/deploy",
            job("app.ns.batch.ok", 0, &["true"], true).to_string(),
        )
        .await;
    s.cluster
        .publish(
            "control/deploy",
            job("app.ns.batch.bad", 1, &["sh", "-c", "exit 3"], false).to_string(),
        )
        .await;
    let mut missing = job("app.ns.no.image", 0, &["true"], false);
    missing["image"] = "localhost:1/does/not-exist:v0".into();
    s.cluster
        .publish("control/deploy", missing.to_string())
        .await;

    s.cluster.wait_status("app.ns.batch.ok", 0, "CREATED").await;
    let done = s
        .cluster
        .wait_status("app.ns.batch.ok", 0, "COMPLETED")
        .await;
    assert!(
        done["status_detail"]
            .as_str()
            .unwrap_or_default()
            .contains('0')
    );
    s.cluster
        .wait_status("app.ns.batch.bad", 1, "CREATED")
        .await;
    let dead = s.cluster.wait_status("app.ns.batch.bad", 1, "DEAD").await;
    assert!(
        dead["status_detail"]
            .as_str()
            .unwrap_or_default()
            .contains('3')
    );
    let failed = s.cluster.wait_status("app.ns.no.image", 0, "FAILED").await;
    assert!(
        failed["status_detail"]
            .as_str()
            .unwrap_or_default()
            .contains("does/not-exist"),
        "{failed}"
    );
    let clean = wait_until(Duration::from_secs(20), || {
        s.containerd.container_ids().is_empty()
    })
    .await;
    assert!(clean, "left: {:?}", s.containerd.container_ids());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_adopts_running_instances_and_broker_restart_keeps_deploying() {
    if !can_run("restart_adopts", BINS) {
        return;
    }
    let mut s = setup(true).await;
    let name = "app.ns.keep.alive";
    s.cluster
        .publish(
            "control/deploy",
            job(name, 4, &["sleep", "300"], false).to_string(),
        )
        .await;
    s.cluster.wait_status(name, 4, "CREATED").await;

    // Daemon restart: the running container is adopted, not killed.
    s.daemon.restart();
    s.cluster.clear();
    let adopted = s
        .cluster
        .wait_for("jobs/resources", Duration::from_secs(30), |v| {
            resources_entry(v, name, 4).is_some()
        })
        .await;
    assert!(adopted.is_some(), "not adopted:\n{}", s.daemon.log_text());

    // Broker restart: deploys still work afterwards.
    s.broker.restart();
    s.cluster.clear();
    s.cluster
        .wait_for("information", Duration::from_secs(40), |_| true)
        .await
        .expect("reports resume");
    let second = "app.ns.after.broker";
    let payload = job(second, 0, &["sleep", "300"], false).to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        s.cluster.publish("control/deploy", payload.clone()).await;
        if s.cluster
            .wait_for("job", Duration::from_secs(5), |v| {
                v["sname"] == second && v["status"] == "CREATED"
            })
            .await
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
    s.cluster.publish("control/delete", del.to_string()).await;
    s.cluster.wait_status(name, 4, "UNDEPLOYED").await;
}
