//! CSI volumes end to end: a real CSI node plugin on a unix socket (the
//! tests' own, `csi_plugin`), a real containerd and mosquitto, the real
//! daemon. A job's volume is published through the plugin and seen by the
//! container at its mount_path; the node report lists only drivers that
//! answer; volumes that cannot be provided fail the deploy with a reason;
//! undeploy unpublishes and unstages.

mod common;
mod csi_plugin;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use csi_plugin::CsiPlugin;
use serde_json::{Value, json};

const BINS: &[&str] = &[
    "/usr/sbin/mosquitto",
    "containerd",
    "ctr",
    "runc",
    "/bin/busybox",
];

const DRIVER: &str = "csi.test.oakestra.io";
const DEAD_DRIVER: &str = "csi.dead.oakestra.io";

struct Setup {
    daemon: Daemon,
    cluster: ClusterDouble,
    plugin: CsiPlugin,
    _broker: Mosquitto,
    containerd: Containerd,
    state: PathBuf,
    dir: tempfile::TempDir,
}

/// Whether something is mounted at `path` (this process's mount namespace
/// is the daemon's and the plugin's).
fn is_mounted(path: &Path) -> bool {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let p = path.to_string_lossy();
    text.lines()
        .any(|l| l.split_whitespace().nth(4) == Some(p.as_ref()))
}

async fn setup(stage: bool) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let containerd = Containerd::start(dir.path());
    containerd.import_test_image(true);
    let broker = Mosquitto::start(dir.path());
    let cluster = ClusterDouble::start(broker.port).await;
    let plugin = CsiPlugin::start(
        DRIVER,
        &dir.path().join("csi.sock"),
        &dir.path().join("backing"),
        stage,
    );
    let conf = test_config(dir.path(), cluster.http_port, true);
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&conf).expect("conf")).expect("json");
    cfg["csi_drivers"] = json!([
        {"csi_driver_name": DRIVER, "csi_driver_endpoint": format!("unix://{}", plugin.socket.display())},
        {"csi_driver_name": DEAD_DRIVER, "csi_driver_endpoint": dir.path().join("nobody.sock").display().to_string()},
    ]);
    std::fs::write(&conf, cfg.to_string()).expect("write conf");
    let state = dir.path().join("state");
    let daemon = Daemon::start_with_env(
        dir.path(),
        &conf,
        Some(&containerd),
        &[("OAKESTRA_STATE_DIR", &state.display().to_string())],
    );
    let mut s = Setup {
        daemon,
        cluster,
        plugin,
        _broker: broker,
        containerd,
        state,
        dir,
    };
    s.cluster
        .wait_for("information", Duration::from_secs(30), |_| true)
        .await
        .unwrap_or_else(|| panic!("daemon not up:\n{}", s.daemon.log_text()));
    s
}

fn volume_job(name: &str, cmd: &str, volumes: Value) -> Value {
    let mut j = job(name, 0, &["sh", "-c", cmd], false);
    j["volumes"] = volumes;
    j
}

fn detail(v: &Value) -> String {
    v["status_detail"].as_str().unwrap_or_default().to_string()
}

async fn volume_mounted_seen_and_released(stage: bool) {
    let mut s = setup(stage).await;

    // Registration and every report advertise only the driver that answers.
    let advertised = |v: &Value| -> Vec<String> {
        v["csi_drivers"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|d| d["csi_driver_name"].as_str().unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    let registration = s.cluster.registrations.lock().expect("lock")[0].clone();
    assert_eq!(advertised(&registration), [DRIVER]);
    let info = s
        .cluster
        .wait_for("information", Duration::from_secs(10), |_| true)
        .await
        .expect("report");
    assert_eq!(advertised(&info), [DRIVER]);
    assert_eq!(
        info["csi_drivers"][0]["csi_driver_endpoint"],
        format!("unix://{}", s.plugin.socket.display())
    );

    // The container sees the plugin's file at mount_path and writes through it.
    let name = "app.ns.vol.ume";
    let id = format!("{name}.instance.0");
    s.cluster
        .publish(
            "control/deploy",
            volume_job(
                name,
                "cat /data/hello.txt; echo from-the-container > /data/written.txt; sleep 300",
                json!([{"volume_id": "vol1", "csi_driver": DRIVER, "mount_path": "/data"}]),
            )
            .to_string(),
        )
        .await;
    let created = s.cluster.wait_status(name, 0, "CREATED").await;
    assert_eq!(detail(&created), "");
    let applog = s.dir.path().join("applogs").join(&id);
    let written = s.plugin.backing.join("vol1").join("written.txt");
    let seen = wait_until(Duration::from_secs(20), || {
        std::fs::read_to_string(&applog)
            .unwrap_or_default()
            .contains("hello from csi volume vol1")
            && std::fs::read_to_string(&written).unwrap_or_default() == "from-the-container\n"
    })
    .await;
    assert!(
        seen,
        "the container did not see the volume; app log: {:?}",
        std::fs::read_to_string(&applog)
    );
    let published = s.plugin.paths("NodePublishVolume", "vol1");
    assert_eq!(published.len(), 1, "{:?}", s.plugin.calls());
    let target = published[0].clone();
    assert!(
        target.starts_with(s.state.join("csi").join("publish")),
        "{}",
        target.display()
    );
    assert!(is_mounted(&target));
    let staged = s.plugin.paths("NodeStageVolume", "vol1");
    assert_eq!(staged.len(), usize::from(stage));
    let record = s
        .state
        .join("csi")
        .join("mounts")
        .join(format!("{id}.json"));
    assert!(record.is_file());

    // Volumes we cannot provide: FAILED, naming the volume and the driver;
    // nothing left behind.
    s.cluster
        .publish(
            "control/deploy",
            volume_job(
                "app.ns.no.driver",
                "sleep 300",
                json!([{"volume_id": "vol2", "csi_driver": "csi.absent.example", "mount_path": "/data"}]),
            )
            .to_string(),
        )
        .await;
    let failed = s.cluster.wait_status("app.ns.no.driver", 0, "FAILED").await;
    let why = detail(&failed);
    assert!(
        why.contains("vol2")
            && why.contains("csi.absent.example")
            && why.contains("not configured"),
        "{why}"
    );
    s.cluster
        .publish(
            "control/deploy",
            volume_job(
                "app.ns.dead.driver",
                "sleep 300",
                json!([
                    {"volume_id": "ok1", "csi_driver": DRIVER, "mount_path": "/ok"},
                    {"volume_id": "vol3", "csi_driver": DEAD_DRIVER, "mount_path": "/data"}
                ]),
            )
            .to_string(),
        )
        .await;
    let failed = s
        .cluster
        .wait_status("app.ns.dead.driver", 0, "FAILED")
        .await;
    let why = detail(&failed);
    assert!(
        why.contains("vol3") && why.contains(DEAD_DRIVER) && why.contains("does not answer"),
        "{why}"
    );
    // The first volume of that job was published, then released again.
    let ok1 = s.plugin.paths("NodePublishVolume", "ok1");
    assert_eq!(ok1.len(), 1);
    assert_eq!(s.plugin.paths("NodeUnpublishVolume", "ok1"), ok1);
    assert!(!is_mounted(&ok1[0]));
    let ids = s.containerd.container_ids();
    assert!(
        !ids.iter()
            .any(|c| c.contains("no.driver") || c.contains("dead.driver")),
        "{ids:?}"
    );

    // Undeploy: the container goes, then the volume is unpublished (and unstaged).
    s.cluster
        .publish(
            "control/delete",
            json!({"job_name": name, "instance_number": 0}).to_string(),
        )
        .await;
    s.cluster.wait_status(name, 0, "UNDEPLOYED").await;
    assert_eq!(
        s.plugin.paths("NodeUnpublishVolume", "vol1"),
        vec![target.clone()]
    );
    assert!(!is_mounted(&target));
    assert!(!target.exists(), "target dir left: {}", target.display());
    if stage {
        assert_eq!(s.plugin.paths("NodeUnstageVolume", "vol1"), staged);
        assert!(!is_mounted(&staged[0]));
    }
    assert!(!record.exists(), "mount record left: {}", record.display());
    // The data stays in the volume.
    assert_eq!(
        std::fs::read_to_string(&written).unwrap_or_default(),
        "from-the-container\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_is_published_seen_and_unpublished() {
    if !can_run("volume_is_published_seen_and_unpublished", BINS) {
        return;
    }
    volume_mounted_seen_and_released(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staged_volume_is_staged_published_and_released() {
    if !can_run("staged_volume_is_staged_published_and_released", BINS) {
        return;
    }
    volume_mounted_seen_and_released(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_of_an_exited_container_is_released() {
    if !can_run("volume_of_an_exited_container_is_released", BINS) {
        return;
    }
    let mut s = setup(false).await;
    let name = "app.ns.vol.batch";
    let mut j = volume_job(
        name,
        "cat /v/hello.txt",
        json!([{"volume_id": "batch", "csi_driver": DRIVER, "mount_path": "/v"}]),
    );
    j["one_shot"] = true.into();
    s.cluster.publish("control/deploy", j.to_string()).await;
    s.cluster.wait_status(name, 0, "COMPLETED").await;
    let published = s.plugin.paths("NodePublishVolume", "batch");
    assert_eq!(published.len(), 1);
    let released = wait_until(Duration::from_secs(10), || {
        s.plugin.paths("NodeUnpublishVolume", "batch") == published
    })
    .await;
    assert!(released, "{:?}", s.plugin.calls());
    assert!(!is_mounted(&published[0]));
}
