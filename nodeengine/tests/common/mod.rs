//! Test harness: a real mosquitto, a real containerd, the real daemon binary, and a
//! small double of the cluster manager (HTTP register endpoint + MQTT subscriber).
//!
//! Every helper works in its own temp dir, on its own free port and containerd
//! namespace, so tests run in parallel.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::routing::post;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio::sync::mpsc;

pub const FIXTURE_CONF: &str = include_str!("../fixtures/conf.json");
pub const FIXTURE_JOB: &str = include_str!("../fixtures/deploy-job.json");
pub const TEST_IMAGE: &str = "docker.io/library/nodeengine-test:latest";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A name unique to this test process and call.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

pub use worker_common::privileges::is_root;

fn have(bin: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).any(|d| d.join(bin).is_file()) || Path::new(bin).is_file()
    })
}

/// True when the test can run; prints why it is skipped otherwise. Outside root the
/// test is skipped; as root (CI) missing binaries are a failure, not a skip.
pub fn can_run(test: &str, bins: &[&str]) -> bool {
    if !is_root() {
        eprintln!("SKIPPED {test}: needs root (containerd/mosquitto); CI runs it as root");
        return false;
    }
    for b in bins {
        assert!(have(b), "{test}: required binary {b} is not installed");
    }
    true
}

/// `/metrics` at `address`, parsed with the Prometheus project's
/// OpenMetrics parser (python3-prometheus-client, installed by `cargo xtask
/// setup`): `{"name{label=value,...}": value}`.
pub fn scrape(address: &str) -> Value {
    let script = format!(
        "import json,urllib.request\n\
        from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse\n\
        text=urllib.request.urlopen('http://{address}/metrics',timeout=5).read().decode()\n\
        out={{}}\n\
        for fam in parse(text):\n\
        \x20 for s in fam.samples:\n\
        \x20   key=s.name+('{{'+','.join('%s=%s'%kv for kv in sorted(s.labels.items()))+'}}' if s.labels else '')\n\
        \x20   out[key]=s.value\n\
        print(json.dumps(out))"
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "scrape: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("scrape output")
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub async fn wait_until<F: FnMut() -> bool>(timeout: Duration, mut f: F) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    f()
}

fn kill_and_wait(child: &mut Child, sig: i32) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) on our own, not yet reaped child.
        unsafe {
            libc::kill(pid, sig);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

// ------------------------------------------------------------------ mosquitto

pub struct Mosquitto {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    security: Option<BrokerSecurity>,
}

/// A broker that speaks TLS (server certificate only) and wants a password.
#[derive(Clone)]
pub struct BrokerSecurity {
    pub pki: Pki,
    pub user: String,
    pub password: String,
}

impl Mosquitto {
    pub fn start(dir: &Path) -> Mosquitto {
        Mosquitto::start_with(dir, None)
    }

    pub fn start_with(dir: &Path, security: Option<BrokerSecurity>) -> Mosquitto {
        let mut m = Mosquitto {
            port: free_port(),
            dir: dir.to_path_buf(),
            child: None,
            security,
        };
        m.spawn();
        m
    }

    fn config_text(&self) -> String {
        let mut conf = format!("listener {} 127.0.0.1\npersistence false\n", self.port);
        match &self.security {
            None => conf.push_str("allow_anonymous true\n"),
            Some(sec) => {
                let passwd = self.dir.join("mosquitto.passwd");
                let out = Command::new("mosquitto_passwd")
                    .args(["-b", "-c"])
                    .arg(&passwd)
                    .arg(&sec.user)
                    .arg(&sec.password)
                    .output()
                    .expect("run mosquitto_passwd");
                assert!(out.status.success(), "mosquitto_passwd: {out:?}");
                conf.push_str(&format!(
                    "allow_anonymous false\npassword_file {}\ncafile {}\ncertfile {}\nkeyfile {}\n\
                     require_certificate false\n",
                    passwd.display(),
                    sec.pki.ca.display(),
                    sec.pki.server_cert.display(),
                    sec.pki.server_key.display()
                ));
            }
        }
        conf
    }

    fn spawn(&mut self) {
        let conf = self.dir.join("mosquitto.conf");
        std::fs::write(&conf, self.config_text()).expect("write mosquitto conf");
        let log = std::fs::File::create(self.dir.join("mosquitto.log")).expect("log");
        let child = Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not start: {}",
                std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_and_wait(&mut c, libc::SIGTERM);
        }
    }

    /// Stops and starts the broker on the same port.
    pub fn restart(&mut self) {
        self.stop();
        std::thread::sleep(Duration::from_millis(500));
        self.spawn();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

// ------------------------------------------------------------------------ PKI

/// A throwaway CA and a server certificate for 127.0.0.1, as PEM files.
#[derive(Clone)]
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca =
            CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("ca");
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()])
            .expect("params")
            .signed_by(&key, &ca)
            .expect("sign");
        let write = |name: &str, pem: String| {
            let p = dir.join(name);
            std::fs::write(&p, pem).expect("write pem");
            p
        };
        Pki {
            ca: write("ca.crt", ca.pem()),
            server_cert: write("server.crt", cert.pem()),
            server_key: write("server.key", key.serialize_pem()),
        }
    }

    /// A rustls client config trusting only this CA.
    pub fn client_config(&self) -> std::sync::Arc<rustls::ClientConfig> {
        worker_common::tls::ClientTls::default()
            .with_extra_ca(&self.ca)
            .build()
            .expect("client tls")
    }
}

// ------------------------------------------------------------ cluster double

/// A message the worker published.
#[derive(Debug, Clone)]
pub struct Published {
    pub topic: String,
    pub payload: Vec<u8>,
}

impl Published {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.payload).unwrap_or_else(|e| {
            panic!(
                "worker published non-JSON on {}: {e}: {:?}",
                self.topic,
                String::from_utf8_lossy(&self.payload)
            )
        })
    }
}

/// The cluster manager as the worker sees it.
pub struct ClusterDouble {
    pub node_id: String,
    pub http_port: u16,
    pub registrations: Arc<Mutex<Vec<Value>>>,
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Published>,
    pub seen: Vec<Published>,
    /// When the last `jobs/resources` report arrived, and what it listed.
    last_resources: LastResources,
    /// Instances this double marked FAILED after the node went quiet.
    pub failed: Arc<Mutex<Vec<(String, u64)>>>,
    http_task: tokio::task::JoinHandle<()>,
    mqtt_task: tokio::task::JoinHandle<()>,
    watch_task: Option<tokio::task::JoinHandle<()>>,
}

/// How the double's own MQTT client reaches a secured broker.
#[derive(Clone)]
pub struct DoubleLogin {
    pub tls: std::sync::Arc<rustls::ClientConfig>,
    pub user: String,
    pub password: String,
}

impl ClusterDouble {
    pub async fn start(mqtt_port: u16) -> ClusterDouble {
        ClusterDouble::start_with(mqtt_port, None).await
    }

    pub async fn start_with(mqtt_port: u16, login: Option<DoubleLogin>) -> ClusterDouble {
        let node_id = format!("{:024x}", rand_u128() & ((1u128 << 96) - 1));
        let registrations = Arc::new(Mutex::new(Vec::new()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let http_port = listener.local_addr().expect("addr").port();
        let http_task = tokio::spawn(serve_register(
            listener,
            registrations.clone(),
            node_id.clone(),
            mqtt_port,
        ));
        let last_resources = Arc::new(Mutex::new(None));
        let (client, rx, mqtt_task) =
            subscriber(mqtt_port, &node_id, login, last_resources.clone()).await;
        ClusterDouble {
            node_id,
            http_port,
            registrations,
            client,
            rx,
            seen: Vec::new(),
            last_resources,
            failed: Arc::new(Mutex::new(Vec::new())),
            http_task,
            mqtt_task,
            watch_task: None,
        }
    }

    /// Behaves as the real cluster after an outage: once no `jobs/resources`
    /// report has come for `window`, the instances of the last report are
    /// marked FAILED (and would be placed elsewhere).
    pub fn mark_failed_after(&mut self, window: Duration) {
        let last = self.last_resources.clone();
        let failed = self.failed.clone();
        self.watch_task = Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let mut last = last.lock().expect("lock");
                if let Some((at, instances)) = last.as_mut()
                    && at.elapsed() > window
                    && !instances.is_empty()
                {
                    failed.lock().expect("lock").append(instances);
                }
            }
        }));
    }

    pub fn failed_instances(&self) -> Vec<(String, u64)> {
        self.failed.lock().expect("lock").clone()
    }

    pub fn topic(&self, suffix: &str) -> String {
        format!("nodes/{}/{suffix}", self.node_id)
    }

    pub async fn publish(&self, suffix: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(self.topic(suffix), QoS::AtLeastOnce, false, payload.into())
            .await
            .expect("publish");
    }

    fn drain(&mut self) {
        while let Ok(m) = self.rx.try_recv() {
            self.seen.push(m);
        }
    }

    /// Waits for a message on `suffix` matching `pred` (among all seen so far).
    pub async fn wait_for(
        &mut self,
        suffix: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        let topic = self.topic(suffix);
        let deadline = Instant::now() + timeout;
        loop {
            self.drain();
            if let Some(m) = self
                .seen
                .iter()
                .filter(|m| m.topic == topic)
                .map(Published::json)
                .find(|v| pred(v))
            {
                return Some(m);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for a job status for this instance; returns the whole message.
    pub async fn wait_status(&mut self, job: &str, instance: u64, status: &str) -> Value {
        let found = self
            .wait_for("job", Duration::from_secs(60), |v| {
                v["sname"] == job && v["instance"] == instance && v["status"] == status
            })
            .await;
        found.unwrap_or_else(|| {
            panic!(
                "no {status} for {job}/{instance}; job messages: {:?}",
                self.messages("job")
            )
        })
    }

    pub fn messages(&mut self, suffix: &str) -> Vec<Value> {
        self.drain();
        let topic = self.topic(suffix);
        self.seen
            .iter()
            .filter(|m| m.topic == topic)
            .map(Published::json)
            .collect()
    }

    /// Forgets what was seen so far (e.g. before a broker restart).
    pub fn clear(&mut self) {
        self.drain();
        self.seen.clear();
    }
}

impl Drop for ClusterDouble {
    fn drop(&mut self) {
        self.http_task.abort();
        self.mqtt_task.abort();
        if let Some(t) = &self.watch_task {
            t.abort();
        }
    }
}

fn rand_u128() -> u128 {
    let mut buf = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut buf);
    }
    u128::from_le_bytes(buf)
}

/// The cluster manager's registration endpoint: records each node document
/// and hands out this double's node id and broker port.
async fn serve_register(
    listener: tokio::net::TcpListener,
    registrations: Arc<Mutex<Vec<Value>>>,
    node_id: String,
    mqtt_port: u16,
) {
    let answer = serde_json::json!({"id": node_id, "MQTT_BROKER_PORT": mqtt_port.to_string()});
    let app = axum::Router::new()
        .route(
            "/api/node/register",
            post(
                |State((regs, answer)): State<(Arc<Mutex<Vec<Value>>>, Value)>,
                 body: axum::body::Bytes| async move {
                    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    regs.lock().expect("lock").push(v);
                    Json(answer)
                },
            ),
        )
        .with_state((registrations, answer));
    let _ = axum::serve(listener, app).await;
}

/// The cluster side's subscriber to everything the worker publishes. It survives
/// broker restarts (resubscribing on each ConnAck).
type LastResources = Arc<Mutex<Option<(Instant, Vec<(String, u64)>)>>>;

async fn subscriber(
    port: u16,
    node_id: &str,
    login: Option<DoubleLogin>,
    last_resources: LastResources,
) -> (
    AsyncClient,
    mpsc::UnboundedReceiver<Published>,
    tokio::task::JoinHandle<()>,
) {
    let mut o = MqttOptions::new(unique("cluster-double-"), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5));
    o.set_clean_session(true);
    o.set_max_packet_size(4 << 20, 4 << 20);
    if let Some(l) = login {
        o.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(l.tls),
        ));
        o.set_credentials(l.user, l.password);
    }
    let resources_topic = format!("nodes/{node_id}/jobs/resources");
    let (client, mut ev) = AsyncClient::new(o, 100);
    let (tx, rx) = mpsc::unbounded_channel();
    let filter = format!("nodes/{node_id}/#");
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
    let c2 = client.clone();
    let task = tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let c = c2.clone();
                    let f = filter.clone();
                    tokio::spawn(async move {
                        let _ = c.subscribe(f, QoS::AtLeastOnce).await;
                    });
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if p.topic == resources_topic {
                        let listed: Vec<(String, u64)> =
                            serde_json::from_slice::<Value>(&p.payload)
                                .ok()
                                .and_then(|v| {
                                    v["services"].as_array().map(|a| {
                                        a.iter()
                                            .filter_map(|s| {
                                                Some((
                                                    s["job_name"].as_str()?.to_string(),
                                                    s["instance"].as_u64()?,
                                                ))
                                            })
                                            .collect()
                                    })
                                })
                                .unwrap_or_default();
                        *last_resources.lock().expect("lock") = Some((Instant::now(), listed));
                    }
                    let _ = tx.send(Published {
                        topic: p.topic.clone(),
                        payload: p.payload.to_vec(),
                    });
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    let _ = tokio::time::timeout(Duration::from_secs(10), ready_rx).await;
    (client, rx, task)
}

// ----------------------------------------------------------------- containerd

pub struct Containerd {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub namespace: String,
    child: Option<Child>,
}

impl Containerd {
    pub fn start(dir: &Path) -> Containerd {
        let root = dir.join("containerd");
        std::fs::create_dir_all(&root).expect("mkdir");
        let config = root.join("config.toml");
        // The CRI plugin is not needed and would try to set up CNI.
        std::fs::write(
            &config,
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  disable = true\n",
        )
        .expect("config");
        let socket = root.join("c.sock");
        let log = std::fs::File::create(root.join("containerd.log")).expect("log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .arg("--address")
            .arg(&socket)
            .arg("--root")
            .arg(root.join("root"))
            .arg("--state")
            .arg(root.join("state"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let c = Containerd {
            dir: root,
            socket,
            namespace: unique("oaktest"),
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !c.ctr(&["version"]).status.success() {
            assert!(Instant::now() < deadline, "containerd did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    pub fn ctr(&self, args: &[&str]) -> std::process::Output {
        Command::new("ctr")
            .arg("-a")
            .arg(&self.socket)
            .arg("-n")
            .arg(&self.namespace)
            .args(args)
            .output()
            .expect("run ctr")
    }

    /// Builds a one-layer busybox image offline and imports it.
    pub fn import_test_image(&self, unpack: bool) {
        self.import_image(&TestImage::named(TEST_IMAGE), unpack);
    }

    pub fn import_image(&self, image: &TestImage, unpack: bool) {
        let tarball = self.dir.join(format!("{}.tar", unique("image")));
        write_image(&tarball, image);
        let path = tarball.to_string_lossy().to_string();
        let mut args = vec!["images", "import"];
        if !unpack {
            args.push("--no-unpack");
        }
        args.push(&path);
        let out = self.ctr(&args);
        assert!(
            out.status.success(),
            "ctr import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn container_ids(&self) -> Vec<String> {
        let out = self.ctr(&["containers", "ls", "-q"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// Kills whatever still runs in this test's container cgroups (a container
    /// process outlives a killed shim) and removes the cgroups.
    fn kill_cgroups(&self) {
        xtask::sandbox::workers::kill_cgroup(&self.namespace);
    }

    /// Kills shims that serve this containerd (they outlive containerd itself).
    fn kill_shims(&self) {
        let needle = self.socket.to_string_lossy().to_string();
        xtask::sandbox::procs::kill_matching(|cmdline| {
            cmdline.contains("containerd-shim") && cmdline.contains(&needle)
        });
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        for id in self.container_ids() {
            let _ = self.ctr(&["tasks", "kill", "-s", "SIGKILL", &id]);
            std::thread::sleep(Duration::from_millis(200));
            let _ = self.ctr(&["tasks", "rm", "-f", &id]);
            let _ = self.ctr(&["containers", "rm", &id]);
        }
        if let Some(mut c) = self.child.take() {
            kill_and_wait(&mut c, libc::SIGTERM);
        }
        self.kill_shims();
        self.kill_cgroups();
        xtask::sandbox::workers::remove_runc_state(&self.namespace);
        // Overlay mounts under the root would make the temp dir undeletable.
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "grep -o ' {}[^ ]*' /proc/mounts | sort -r | xargs -r -n1 umount -l",
                self.dir.display()
            ))
            .status();
    }
}

/// An OCI layout tarball: one layer with busybox and its applets as symlinks
/// (the sandbox's image builder, with this suite's environment and command).
pub fn write_busybox_oci_tar(dest: &Path, name: &str) {
    write_image(dest, &TestImage::named(name));
}

/// Busybox applets the tests call.
pub const TEST_APPLETS: &[&str] = &[
    "sh", "sleep", "echo", "cat", "env", "hostname", "ls", "true", "false", "id", "unshare",
    "head", "tail", "wc", "seq", "dd",
];

/// A test image: busybox plus what a test needs.
pub struct TestImage<'a> {
    pub name: &'a str,
    pub cmd: &'a [&'a str],
    pub entrypoint: &'a [&'a str],
    pub files: &'a [(&'a str, &'a [u8])],
    pub user: &'a str,
}

impl<'a> TestImage<'a> {
    pub fn named(name: &'a str) -> TestImage<'a> {
        TestImage {
            name,
            cmd: &["sh"],
            entrypoint: &[],
            files: &[],
            user: "",
        }
    }
}

pub fn write_image(dest: &Path, image: &TestImage) {
    let spec = xtask::sandbox::image::ImageSpec {
        name: image.name,
        applets: TEST_APPLETS,
        env: &["PATH=/bin", "IMAGE_VAR=from-image"],
        cmd: image.cmd,
        entrypoint: image.entrypoint,
        files: image.files,
        user: image.user,
    };
    xtask::sandbox::image::write_busybox_oci_tar(dest, &spec).expect("write oci tar");
}

// --------------------------------------------------------------------- daemon

/// The real `nodeengined`, configured for this test.
pub struct Daemon {
    child: Option<Child>,
    pub log: PathBuf,
    conf: PathBuf,
    env: HashMap<String, String>,
}

/// A configuration for the daemon under test: cluster on localhost, overlay off.
pub fn test_config(dir: &Path, http_port: u16, containerd: bool) -> PathBuf {
    test_config_with(dir, http_port, containerd, |_| {})
}

/// [`test_config`], then `edit`.
pub fn test_config_with(
    dir: &Path,
    http_port: u16,
    containerd: bool,
    edit: impl FnOnce(&mut Value),
) -> PathBuf {
    let mut cfg: Value = serde_json::from_str(FIXTURE_CONF).expect("fixture");
    cfg["cluster_address"] = "127.0.0.1".into();
    cfg["cluster_port"] = http_port.into();
    cfg["overlay_network"] = "disabled".into();
    let logs = dir.join("applogs");
    cfg["app_logs"] = logs.display().to_string().into();
    cfg["virtualizations"][0]["virutalizaiton_active"] = containerd.into();
    edit(&mut cfg);
    let path = dir.join("conf.json");
    std::fs::write(&path, cfg.to_string()).expect("write conf");
    path
}

impl Daemon {
    pub fn start(dir: &Path, conf: &Path, containerd: Option<&Containerd>) -> Daemon {
        Daemon::start_with(dir, conf, containerd, &[])
    }

    /// As [`Daemon::start`], with more environment (e.g. `OAKESTRA_STATE_DIR`).
    pub fn start_with_env(
        dir: &Path,
        conf: &Path,
        containerd: Option<&Containerd>,
        extra: &[(&str, &str)],
    ) -> Daemon {
        let extra: Vec<(&str, String)> = extra.iter().map(|(k, v)| (*k, v.to_string())).collect();
        Daemon::start_with(dir, conf, containerd, &extra)
    }

    /// With extra environment (`NODEENGINE_*` settings, `PATH`, ...).
    pub fn start_with(
        dir: &Path,
        conf: &Path,
        containerd: Option<&Containerd>,
        extra: &[(&str, String)],
    ) -> Daemon {
        let mut env = HashMap::new();
        // Each test's daemon keeps its own state (last report time, ...).
        env.insert(
            "OAKESTRA_STATE_DIR".into(),
            dir.join("state").display().to_string(),
        );
        // No metrics listener unless a test asks for one: parallel daemons
        // would race for the default port.
        env.insert("NODEENGINE_METRICS_ADDRESS".into(), "off".into());
        // containerd's runtimes come from the test's config, not the host's.
        env.insert(
            "CONTAINERD_CONFIG".into(),
            dir.join("containerd-runtimes.toml").display().to_string(),
        );
        match containerd {
            Some(c) => {
                env.insert("CONTAINERD_ADDRESS".into(), c.socket.display().to_string());
                env.insert("CONTAINERD_NAMESPACE".into(), c.namespace.clone());
            }
            None => {
                env.insert(
                    "CONTAINERD_ADDRESS".into(),
                    dir.join("no-containerd.sock").display().to_string(),
                );
                env.insert("CONTAINERD_NAMESPACE".into(), unique("none"));
            }
        }
        for (k, v) in extra {
            env.insert((*k).to_string(), v.clone());
        }
        let mut d = Daemon {
            child: None,
            log: dir.join(unique("nodeengined-")).with_extension("log"),
            conf: conf.to_path_buf(),
            env,
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(&self.log).expect("daemon log");
        let child = Command::new(env!("CARGO_BIN_EXE_nodeengined"))
            .env("OAKESTRA_CONF", &self.conf)
            .env("RUST_LOG", "info,nodeengine=debug")
            .envs(&self.env)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nodeengined");
        self.child = Some(child);
    }

    /// SIGTERM; returns whether it exited by itself within the grace period.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        if let Ok(pid) = i32::try_from(c.id()) {
            // SAFETY: kill(2) on our own child.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(12);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        if std::thread::panicking() {
            eprintln!("---- nodeengined log ----\n{}", self.log_text());
        }
    }
}

/// A deploy document based on the upstream fixture.
pub fn job(job_name: &str, instance: u64, cmd: &[&str], one_shot: bool) -> Value {
    let mut v: Value = serde_json::from_str(FIXTURE_JOB).expect("fixture");
    v["job_name"] = job_name.into();
    v["instance_number"] = instance.into();
    v["image"] = TEST_IMAGE.into();
    v["cmd"] = cmd.iter().map(|s| Value::from(*s)).collect();
    v["one_shot"] = one_shot.into();
    v["memory"] = 64.into();
    v["vcpus"] = 1.into();
    v
}

/// An executable shell script at `path`.
pub fn write_script(path: &Path, body: &str) {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    std::fs::write(path, format!("#!/bin/sh\n{body}")).expect("write script");
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
}

/// `PATH` with `dir` first.
pub fn path_with(dir: &Path) -> String {
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}
