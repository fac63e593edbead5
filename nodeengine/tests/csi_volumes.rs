//! CSI volumes end to end: a real CSI node plugin on a unix socket (the
//! tests' own, `csi_plugin`), a real containerd and mosquitto, the real
//! daemon. A job's volume is published through the plugin and seen by the
//! container at its mount_path; the node report lists only drivers that
//! answer; volumes that cannot be provided fail the deploy with a reason;
//! undeploy unpublishes and unstages.

mod csi_plugin;

use std::path::{Path, PathBuf};
use std::time::Duration;

use csi_plugin::CsiPlugin;
use serde_json::{Value, json};
use testkit::cluster::{LoopbackCluster, NodeView};
use testkit::fixtures::{deploy_document as job, node_conf, test_image};
use testkit::{ClusterDouble, Containerd, Mosquitto, NodeEngine, temp_dir, wait_for};

testkit::main! {
    volume_is_published_seen_and_unpublished: [Root, Mosquitto, Containerd, Busybox],
    staged_volume_is_staged_published_and_released: [Root, Mosquitto, Containerd, Busybox],
    volume_of_an_exited_container_is_released: [Root, Mosquitto, Containerd, Busybox],
}

const DRIVER: &str = "csi.test.oakestra.io";
const DEAD_DRIVER: &str = "csi.dead.oakestra.io";

/// Fields drop in this order: daemon first, temp dir last.
struct Setup {
    daemon: NodeEngine,
    cluster: ClusterDouble,
    plugin: CsiPlugin,
    /// The plugin's server runs on it.
    _rt: tokio::runtime::Runtime,
    _broker: Mosquitto,
    containerd: Containerd,
    state: PathBuf,
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

/// Whether something is mounted at `path` (this process's mount namespace
/// is the daemon's and the plugin's).
fn is_mounted(path: &Path) -> bool {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let p = path.to_string_lossy();
    text.lines()
        .any(|l| l.split_whitespace().nth(4) == Some(p.as_ref()))
}

fn setup(stage: bool) -> Setup {
    let dir = temp_dir();
    let containerd = Containerd::start(dir.path()).expect("containerd");
    containerd
        .import(&test_image(), true)
        .expect("the test image");
    let LoopbackCluster { cluster, broker } =
        LoopbackCluster::start(dir.path()).expect("broker and cluster double");
    let id = cluster.id_for_host(&testkit::hostname());
    let rt = testkit::runtime();
    let plugin = {
        let _in_runtime = rt.enter();
        CsiPlugin::start(
            DRIVER,
            &dir.path().join("csi.sock"),
            &dir.path().join("backing"),
            stage,
        )
    };
    let mut cfg = node_conf(cluster.http_port(), &dir.path().join("applogs"), true);
    cfg["csi_drivers"] = json!([
        {"csi_driver_name": DRIVER, "csi_driver_endpoint": format!("unix://{}", plugin.socket.display())},
        {"csi_driver_name": DEAD_DRIVER, "csi_driver_endpoint": dir.path().join("nobody.sock").display().to_string()},
    ]);
    let conf = dir.path().join("conf.json");
    std::fs::write(&conf, cfg.to_string()).expect("write conf");
    let state = dir.path().join("state");
    let daemon = NodeEngine::builder(
        env!("CARGO_BIN_EXE_nodeengined"),
        &conf,
        &dir.path().join("nodeengined.log"),
    )
    .containerd(&containerd.socket, &containerd.namespace)
    .state_dir(&state)
    .start()
    .expect("nodeengined");
    let s = Setup {
        daemon,
        cluster,
        plugin,
        _rt: rt,
        _broker: broker,
        containerd,
        state,
        id,
        dir,
    };
    s.node()
        .wait_for("information", Duration::from_secs(30), |_| true)
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

fn volume_mounted_seen_and_released(stage: bool) {
    let s = setup(stage);

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
    let registration = s.cluster.registrations()[0].clone();
    assert_eq!(advertised(&registration), [DRIVER]);
    let info = s
        .node()
        .wait_for("information", Duration::from_secs(10), |_| true)
        .expect("report");
    assert_eq!(advertised(&info), [DRIVER]);
    assert_eq!(
        info["csi_drivers"][0]["csi_driver_endpoint"],
        format!("unix://{}", s.plugin.socket.display())
    );

    // The container sees the plugin's file at mount_path and writes through it.
    let name = "app.ns.vol.ume";
    let id = format!("{name}.instance.0");
    s.node().publish(
        "control/deploy",
        volume_job(
            name,
            "cat /data/hello.txt; echo from-the-container > /data/written.txt; sleep 300",
            json!([{"volume_id": "vol1", "csi_driver": DRIVER, "mount_path": "/data"}]),
        )
        .to_string(),
    );
    let created = s.node().wait_status(name, 0, "CREATED");
    assert_eq!(detail(&created), "");
    let applog = s.dir.path().join("applogs").join(&id);
    let written = s.plugin.backing.join("vol1").join("written.txt");
    let seen = wait_for(
        "the volume's file and the write",
        Duration::from_secs(20),
        || {
            std::fs::read_to_string(&applog)
                .unwrap_or_default()
                .contains("hello from csi volume vol1")
                && std::fs::read_to_string(&written).unwrap_or_default() == "from-the-container\n"
        },
    );
    assert!(
        seen.is_ok(),
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
    s.node().publish(
            "control/deploy",
            volume_job(
                "app.ns.no.driver",
                "sleep 300",
                json!([{"volume_id": "vol2", "csi_driver": "csi.absent.example", "mount_path": "/data"}]),
            )
            .to_string(),
        );
    let failed = s.node().wait_status("app.ns.no.driver", 0, "FAILED");
    let why = detail(&failed);
    assert!(
        why.contains("vol2")
            && why.contains("csi.absent.example")
            && why.contains("not configured"),
        "{why}"
    );
    s.node().publish(
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
    );
    let failed = s.node().wait_status("app.ns.dead.driver", 0, "FAILED");
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
    s.node().publish(
        "control/delete",
        json!({"job_name": name, "instance_number": 0}).to_string(),
    );
    s.node().wait_status(name, 0, "UNDEPLOYED");
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

fn volume_is_published_seen_and_unpublished() {
    volume_mounted_seen_and_released(false);
}

fn staged_volume_is_staged_published_and_released() {
    volume_mounted_seen_and_released(true);
}

fn volume_of_an_exited_container_is_released() {
    let s = setup(false);
    let name = "app.ns.vol.batch";
    let mut j = volume_job(
        name,
        "cat /v/hello.txt",
        json!([{"volume_id": "batch", "csi_driver": DRIVER, "mount_path": "/v"}]),
    );
    j["one_shot"] = true.into();
    s.node().publish("control/deploy", j.to_string());
    s.node().wait_status(name, 0, "COMPLETED");
    let published = s.plugin.paths("NodePublishVolume", "batch");
    assert_eq!(published.len(), 1);
    let released = wait_for("the unpublish", Duration::from_secs(10), || {
        s.plugin.paths("NodeUnpublishVolume", "batch") == published
    });
    assert!(released.is_ok(), "{:?}", s.plugin.calls());
    assert!(!is_mounted(&published[0]));
}
