//! The one double of an Oakestra cluster, for the tests of both daemons,
//! the sandbox and the benchmark: the cluster manager (registration on
//! `POST /api/node/register`, deploy/delete to nodes, the job, information
//! and resources reports) and the cluster service manager (subnets, table
//! queries, interests, `updates_available`, service bookkeeping), on one
//! MQTT connection to a real broker. It is a test fixture: state in
//! memory, every peer trusted, and exactly as much of upstream's behaviour
//! as a worker can observe (see `manager` and `services`).
//!
//! It runs on a thread of its own (inside a namespace if the broker is in
//! one); every method here is blocking and may be called from any thread
//! that is not inside an async runtime.

mod job;
mod manager;
mod services;

pub use job::{JOB_TEMPLATE, JobSpec, job_document};
pub use manager::{FAILURE_WINDOW, InstanceState, NodeRecord, Report};
pub use services::{Instance, Pair};

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use axum::Json;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::routing::post;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};

use crate::broker::{Endpoint, Mosquitto};
use crate::netns::unique;
use crate::process::{wait_for, wait_until};
use manager::Manager;
use services::Services;

/// The cluster's registration port upstream.
pub const REGISTRATION_PORT: u16 = 10100;

/// One MQTT message under `nodes/#`, from a worker or from the double.
#[derive(Clone, Debug)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
    pub at: Instant,
}

impl Message {
    /// The payload as JSON; a test failure naming the topic when it is none
    /// (a worker must never publish anything else, docs/contract.md §1.4).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.payload).unwrap_or_else(|e| {
            panic!(
                "non-JSON on {}: {e}: {:?}",
                self.topic,
                String::from_utf8_lossy(&self.payload)
            )
        })
    }
}

/// How to start the double.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// The broker to connect to (and the namespace to run in).
    pub broker: Endpoint,
    /// Where the registration endpoint listens (port 0: any free port).
    pub http: SocketAddr,
    /// Silence after which an instance counts as FAILED.
    pub failure_window: Duration,
    /// `MQTT_BROKER_PORT` in the registration answer (default: the broker's).
    pub advertised_mqtt_port: Option<u16>,
    /// How the double's own client logs in to a secured broker.
    pub login: Option<MqttLogin>,
}

/// TLS and credentials of the double's MQTT client (a broker started with
/// [`crate::broker::BrokerSecurity`]).
#[derive(Clone)]
pub struct MqttLogin {
    pub tls: Arc<rustls::ClientConfig>,
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for MqttLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttLogin")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl ClusterOptions {
    pub fn new(broker: Endpoint) -> ClusterOptions {
        ClusterOptions {
            broker,
            http: SocketAddr::from(([127, 0, 0, 1], 0)),
            failure_window: FAILURE_WINDOW,
            advertised_mqtt_port: None,
            login: None,
        }
    }

    pub fn login(mut self, login: MqttLogin) -> ClusterOptions {
        self.login = Some(login);
        self
    }

    pub fn http(mut self, addr: SocketAddr) -> ClusterOptions {
        self.http = addr;
        self
    }

    pub fn failure_window(mut self, window: Duration) -> ClusterOptions {
        self.failure_window = window;
        self
    }

    pub fn start(self) -> Result<ClusterDouble> {
        ClusterDouble::start(self)
    }
}

/// A mosquitto on loopback and the double connected to it, registration on
/// 127.0.0.1 as well: what the tests of one daemon need. Fields drop in
/// order, the double first.
pub struct LoopbackCluster {
    pub cluster: ClusterDouble,
    pub broker: Mosquitto,
}

impl LoopbackCluster {
    /// Broker files in `dir`.
    pub fn start(dir: &Path) -> Result<LoopbackCluster> {
        LoopbackCluster::start_with(dir, |o| o)
    }

    /// With the double's options changed by `tweak`.
    pub fn start_with(
        dir: &Path,
        tweak: impl FnOnce(ClusterOptions) -> ClusterOptions,
    ) -> Result<LoopbackCluster> {
        let broker = Mosquitto::loopback(dir)?;
        let cluster = tweak(ClusterDouble::options(broker.endpoint())).start()?;
        Ok(LoopbackCluster { cluster, broker })
    }
}

struct Shared {
    log: Vec<Message>,
    manager: Manager,
    services: Services,
    /// (job, instance, arrival) of every `service/deployed`.
    deployed: Vec<(String, u64, Instant)>,
}

pub struct ClusterDouble {
    shared: Arc<Mutex<Shared>>,
    client: AsyncClient,
    http: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // A panic while holding the lock leaves plain data behind; keep going.
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

impl ClusterDouble {
    /// On loopback (no namespace) with the broker at `broker`.
    pub fn options(broker: Endpoint) -> ClusterOptions {
        ClusterOptions::new(broker)
    }

    pub fn start(opts: ClusterOptions) -> Result<ClusterDouble> {
        let shared = Arc::new(Mutex::new(Shared {
            log: Vec::new(),
            manager: Manager::new(opts.failure_window),
            services: Services::default(),
            deployed: Vec::new(),
        }));
        let mut mqtt = MqttOptions::new(
            unique("cluster-double-"),
            opts.broker.host.clone(),
            opts.broker.port,
        );
        mqtt.set_keep_alive(Duration::from_secs(5));
        mqtt.set_clean_session(true);
        mqtt.set_max_packet_size(4 << 20, 4 << 20);
        if let Some(login) = &opts.login {
            mqtt.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(login.tls.clone()),
            ));
            mqtt.set_credentials(login.user.clone(), login.password.clone());
        }
        let (client, mut eventloop) = AsyncClient::new(mqtt, 1000);
        // Table results and deploy commands are small messages on the
        // measured paths: with Nagle's algorithm each could wait for a
        // delayed ACK (~40 ms) behind an unacknowledged PUBACK.
        let mut net = eventloop.network_options();
        net.set_tcp_nodelay(true);
        eventloop.set_network_options(net);
        let ns = opts.broker.netns.as_ref().map(|n| n.open()).transpose()?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<SocketAddr, String>>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (s, c) = (shared.clone(), client.clone());
        let thread = std::thread::Builder::new()
            .name("cluster-double".into())
            .spawn(move || {
                let fail = |e: String| {
                    let _ = ready_tx.send(Err(e));
                };
                if let Some(ns) = ns
                    && let Err(e) = nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                {
                    return fail(format!("setns: {e}"));
                }
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => return fail(e.to_string()),
                };
                rt.block_on(async move {
                    tokio::select! {
                        _ = run(s, c, eventloop, opts, ready_tx) => {}
                        _ = stop_rx => {}
                    }
                });
            })
            .context("starting the cluster double's thread")?;
        let http = ready_rx
            .recv_timeout(Duration::from_secs(15))
            .context("the cluster double did not come up (is the broker running?)")?
            .map_err(|e| anyhow!("cluster double: {e}"))?;
        Ok(ClusterDouble {
            shared,
            client,
            http,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        lock(&self.shared)
    }

    // ------------------------------------------------------- cluster manager

    /// Where the registration endpoint listens.
    pub fn http_addr(&self) -> SocketAddr {
        self.http
    }

    pub fn http_port(&self) -> u16 {
        self.http.port()
    }

    /// The id a node called `hostname` gets at registration (the same
    /// before and after, and on every registration).
    pub fn id_for_host(&self, hostname: &str) -> String {
        self.lock().manager.id_for(hostname)
    }

    /// Registered nodes, in registration order.
    pub fn nodes(&self) -> Vec<NodeRecord> {
        self.lock().manager.nodes().to_vec()
    }

    /// The registered node called `hostname`.
    pub fn node(&self, hostname: &str) -> Option<NodeRecord> {
        self.nodes().into_iter().find(|n| n.hostname == hostname)
    }

    /// Every node document posted to the registration endpoint.
    pub fn registrations(&self) -> Vec<Value> {
        self.lock().manager.registrations().to_vec()
    }

    /// Schedules instance `n` of `job` on `node` (`control/deploy`).
    pub fn deploy(&self, node: &str, job: &JobSpec, n: u64) -> Result<()> {
        self.deploy_with(node, job, n, &serde_json::Map::new())
    }

    /// As [`ClusterDouble::deploy`], with the document's fields in
    /// `overrides` (virtualization, memory, port, ...) set as given.
    pub fn deploy_with(
        &self,
        node: &str,
        job: &JobSpec,
        n: u64,
        overrides: &serde_json::Map<String, Value>,
    ) -> Result<()> {
        let doc = {
            let mut g = self.lock();
            let (rr, _) = g.services.service_ips(&job.job_name);
            let mut doc = job_document(job, n, &rr)?;
            for (k, v) in overrides {
                doc[k] = v.clone();
            }
            g.services.schedule(&job.job_name, n, node);
            g.manager.schedule(&job.job_name, n, node, Instant::now());
            doc
        };
        self.publish(&format!("nodes/{node}/control/deploy"), doc.to_string())
    }

    /// Forgets `job` once its instances are gone, as upstream drops an
    /// undeployed service: its service addresses no longer resolve (table
    /// queries about them answer an empty table), and its reports go, so a
    /// service deployed again under the same name starts afresh. Whether
    /// the service manager knew it.
    pub fn forget_job(&self, job: &str) -> bool {
        let mut g = self.lock();
        g.manager.forget(job);
        g.deployed.retain(|(j, _, _)| j != job);
        g.services.forget(job)
    }

    /// Sends `node` a deploy document as is (fields [`JobSpec`] does not
    /// vary: virtualization, volumes, ...; start from [`job_document`]);
    /// the cluster counts the instance as placed there.
    pub fn deploy_document(&self, node: &str, doc: &Value) -> Result<()> {
        if let (Some(job), Some(n)) = (doc["job_name"].as_str(), doc["instance_number"].as_u64()) {
            self.lock().manager.schedule(job, n, node, Instant::now());
        }
        self.publish(&format!("nodes/{node}/control/deploy"), doc.to_string())
    }

    /// Removes instance `n` of `job` from `node` (`control/delete`); the
    /// service manager drops it and tells interested workers.
    pub fn undeploy(&self, node: &str, job: &str, n: u64) -> Result<()> {
        {
            let mut g = self.lock();
            g.manager.unschedule(job, n);
            g.services.unschedule(job, n);
        }
        let body = json!({"job_name": job, "virtualization": "docker", "instance_number": n});
        self.publish(&format!("nodes/{node}/control/delete"), body.to_string())?;
        self.publish(
            &updates_topic(job),
            json!({"type": "UNDEPLOYMENT"}).to_string(),
        )
    }

    /// Status reports (`nodes/<id>/job`) of instance `n` of `job`, oldest first.
    pub fn statuses(&self, job: &str, n: u64) -> Vec<String> {
        self.lock()
            .manager
            .reports()
            .iter()
            .filter(|r| r.body["sname"] == job && r.body["instance"] == n)
            .filter_map(|r| r.body["status"].as_str().map(str::to_string))
            .collect()
    }

    /// When instance `n` of `job` first reported `status`.
    pub fn status_time(&self, job: &str, n: u64, status: &str) -> Option<Instant> {
        self.lock()
            .manager
            .reports()
            .iter()
            .find(|r| {
                r.body["sname"] == job && r.body["instance"] == n && r.body["status"] == status
            })
            .map(|r| r.at)
    }

    /// When a NetManager first reported instance `n` of `job` as deployed.
    pub fn deployed_time(&self, job: &str, n: u64) -> Option<Instant> {
        self.lock()
            .deployed
            .iter()
            .find(|(j, i, _)| j == job && *i == n)
            .map(|(_, _, t)| *t)
    }

    /// What the cluster believes about instance `n` of `job` (it placed).
    pub fn instance_state(&self, job: &str, n: u64) -> Option<InstanceState> {
        self.lock().manager.instance(job, n)
    }

    /// Waits until instance `n` of `job` has reported `status` `count` times.
    pub fn wait_status(&self, job: &str, n: u64, status: &str, count: usize) -> Result<()> {
        wait_for(
            &format!("{job} instance {n} to report {status}"),
            Duration::from_secs(60),
            || {
                self.statuses(job, n)
                    .iter()
                    .filter(|s| *s == status)
                    .count()
                    >= count
            },
        )
        .with_context(|| format!("statuses so far: {:?}", self.statuses(job, n)))
    }

    /// Waits until NetManagers reported exactly `count` instances of `job`;
    /// gives up at once, with the worker's reason, when one reports FAILED.
    pub fn wait_instances(&self, job: &str, count: usize) -> Result<()> {
        let mut failure = None;
        let waited = wait_for(
            &format!("{count} deployed instance(s) of {job}"),
            Duration::from_secs(60),
            || {
                failure = self.failure(job);
                failure.is_some() || self.instances(job).len() == count
            },
        );
        match failure {
            Some(detail) => bail!("{job} failed on a worker: {detail}"),
            None => waited,
        }
    }

    /// The status_detail of the first FAILED report for `job`.
    pub fn failure(&self, job: &str) -> Option<String> {
        self.lock()
            .manager
            .reports()
            .iter()
            .find(|r| r.body["sname"] == job && r.body["status"] == "FAILED")
            .map(|r| r.body["status_detail"].as_str().unwrap_or("").to_string())
    }

    // ----------------------------------------------- cluster service manager

    /// From now on `node` gets this subnet at every request.
    pub fn pin_subnet(&self, node: &str, v4: &str, v6: &str) {
        self.lock()
            .services
            .pin_subnet(node, (v4.to_string(), v6.to_string()));
    }

    /// The subnet on `node`'s record (the last one handed out).
    pub fn subnet_of(&self, node: &str) -> Option<Pair> {
        self.lock().services.subnet_of(node)
    }

    /// Answers table queries about `job` with `table` (plus `app_name` and
    /// `query_key`) from now on, whatever the double knows about it.
    pub fn set_table(&self, job: &str, table: Value) {
        self.lock().services.set_table(job, table);
    }

    /// RR and Closest addresses of `job` (allocated on first use).
    pub fn service_ips(&self, job: &str) -> (Pair, Pair) {
        self.lock().services.service_ips(job)
    }

    pub fn instance_ip(&self, job: &str, n: u64) -> Pair {
        self.lock().services.instance_ip(job, n)
    }

    /// Instances of `job` whose NetManager reported their addresses.
    pub fn instances(&self, job: &str) -> Vec<(u64, Instance)> {
        self.lock().services.instances(job)
    }

    /// Jobs `node` asked about and did not drop its interest in.
    pub fn interests_of(&self, node: &str) -> Vec<String> {
        self.lock().services.interests_of(node)
    }

    /// Whether table queries are answered (false: they go unanswered).
    pub fn answer_table_queries(&self, yes: bool) {
        self.lock().services.answer_tables = yes;
    }

    /// Whether subnet requests are answered (false: they go unanswered).
    pub fn answer_subnet_requests(&self, yes: bool) {
        self.lock().services.answer_subnets = yes;
    }

    /// `jobs/<job>/updates_available`, as after a deployment.
    pub fn publish_update(&self, job: &str) {
        let body = json!({"type": "DEPLOYMENT"}).to_string();
        if let Err(e) = self.publish(&updates_topic(job), body) {
            panic!("{e:#}");
        }
    }

    // ---------------------------------------------------------------- MQTT

    /// Publishes anything as the cluster (QoS 1).
    pub fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) -> Result<()> {
        self.client
            .try_publish(topic, QoS::AtLeastOnce, false, payload.into())
            .with_context(|| format!("publishing on {topic}"))
    }

    /// Every message seen on a topic ending with `suffix`, as JSON.
    pub fn seen_on(&self, suffix: &str) -> Vec<Value> {
        self.lock()
            .log
            .iter()
            .filter(|m| m.topic.ends_with(suffix))
            .map(Message::json)
            .collect()
    }

    /// Waits until `count` messages were seen on topics ending with `suffix`.
    pub fn wait_for(&self, suffix: &str, count: usize, timeout: Duration) -> Vec<Value> {
        wait_until(&format!("{count} message(s) on {suffix}"), timeout, || {
            self.seen_on(suffix).len() >= count
        });
        self.seen_on(suffix)
    }

    /// Every message seen so far, one line each (time since the first,
    /// topic, payload cut at 200 bytes), for a failing test's message.
    pub fn transcript(&self) -> String {
        let s = self.lock();
        let Some(first) = s.log.first().map(|m| m.at) else {
            return "(no messages)\n".to_string();
        };
        s.log
            .iter()
            .map(|m| {
                let body = String::from_utf8_lossy(&m.payload);
                let cut: String = body.chars().take(200).collect();
                format!(
                    "{:>9.3}s {} {cut}\n",
                    m.at.duration_since(first).as_secs_f64(),
                    m.topic
                )
            })
            .collect()
    }

    /// Forgets the messages seen so far (reports and bookkeeping stay).
    pub fn clear_seen(&self) {
        self.lock().log.clear();
    }

    /// Waits until the double is (again) connected and subscribed: publishes
    /// a probe it subscribes to until it sees one.
    pub fn wait_subscribed(&self, timeout: Duration) {
        let probe = unique("probe");
        let topic = format!("nodes/{probe}/net/ping");
        wait_until("the cluster double to subscribe", timeout, || {
            let _ = self.publish(&topic, "{}");
            std::thread::sleep(Duration::from_millis(300));
            !self.seen_on(&topic).is_empty()
        });
    }

    /// The messages of one node.
    pub fn node_view(&self, id: &str) -> NodeView<'_> {
        NodeView {
            cluster: self,
            id: id.to_string(),
        }
    }
}

impl Drop for ClusterDouble {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // Its sockets close before a namespace it lives in goes.
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The cluster as one node sees it: its topics `nodes/<id>/...`.
pub struct NodeView<'a> {
    cluster: &'a ClusterDouble,
    id: String,
}

impl NodeView<'_> {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn topic(&self, suffix: &str) -> String {
        format!("nodes/{}/{suffix}", self.id)
    }

    /// Publishes on `nodes/<id>/<suffix>` (panics if the client is gone).
    pub fn publish(&self, suffix: &str, payload: impl Into<Vec<u8>>) {
        if let Err(e) = self.cluster.publish(&self.topic(suffix), payload) {
            panic!("{e:#}");
        }
    }

    /// Sends this node a deploy document; the cluster counts the instance
    /// as placed here (see [`ClusterDouble::instance_state`]).
    pub fn deploy(&self, doc: &Value) {
        if let Err(e) = self.cluster.deploy_document(&self.id, doc) {
            panic!("{e:#}");
        }
    }

    /// What the cluster believes about instance `n` of `job`.
    pub fn instance_state(&self, job: &str, n: u64) -> Option<InstanceState> {
        self.cluster.instance_state(job, n)
    }

    /// Messages on exactly `nodes/<id>/<suffix>`, as JSON.
    pub fn messages(&self, suffix: &str) -> Vec<Value> {
        let topic = self.topic(suffix);
        self.cluster
            .lock()
            .log
            .iter()
            .filter(|m| m.topic == topic)
            .map(Message::json)
            .collect()
    }

    /// The first message on `suffix` (among all seen) that satisfies `pred`.
    pub fn wait_for(
        &self,
        suffix: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        let mut found = None;
        let _ = wait_for(&format!("a message on {suffix}"), timeout, || {
            found = self.messages(suffix).into_iter().find(|v| pred(v));
            found.is_some()
        });
        found
    }

    /// The job status report of `job`/`instance` with `status` (60 s).
    pub fn wait_status(&self, job: &str, instance: u64, status: &str) -> Value {
        self.wait_for("job", Duration::from_secs(60), |v| {
            v["sname"] == job && v["instance"] == instance && v["status"] == status
        })
        .unwrap_or_else(|| {
            panic!(
                "no {status} for {job}/{instance}; job messages: {:?}",
                self.messages("job")
            )
        })
    }
}

fn updates_topic(job: &str) -> String {
    format!("jobs/{job}/updates_available")
}

async fn run(
    shared: Arc<Mutex<Shared>>,
    client: AsyncClient,
    eventloop: rumqttc::EventLoop,
    opts: ClusterOptions,
    ready: std::sync::mpsc::Sender<Result<SocketAddr, String>>,
) {
    let listener = match tokio::net::TcpListener::bind(opts.http).await {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(format!("binding {}: {e}", opts.http)));
            return;
        }
    };
    let http = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    };
    let port = opts.advertised_mqtt_port.unwrap_or(opts.broker.port);
    tokio::spawn(serve_registration(listener, shared.clone(), port));
    tokio::spawn(watch_silence(shared.clone(), opts.failure_window));
    mqtt_loop(shared, client, eventloop, move || {
        let _ = ready.send(Ok(http));
    })
    .await;
}

/// Marks silent instances FAILED, a few times per window.
async fn watch_silence(shared: Arc<Mutex<Shared>>, window: Duration) {
    let every = (window / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
    loop {
        tokio::time::sleep(every).await;
        lock(&shared).manager.expire(Instant::now());
    }
}

// ---------------------------------------------------------------- register

async fn serve_registration(
    listener: tokio::net::TcpListener,
    shared: Arc<Mutex<Shared>>,
    port: u16,
) {
    let app = axum::Router::new()
        .route("/api/node/register", post(register_node))
        .fallback(|| async { (StatusCode::NOT_FOUND, Json(json!({"error": "not found"}))) })
        .with_state((shared, port));
    let service = app.into_make_service_with_connect_info::<SocketAddr>();
    if let Err(e) = axum::serve(listener, service).await {
        eprintln!("cluster double: the registration endpoint stopped: {e}");
    }
}

async fn register_node(
    State((shared, port)): State<(Arc<Mutex<Shared>>, u16)>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: axum::body::Bytes,
) -> (StatusCode, Json<Value>) {
    let Ok(doc) = serde_json::from_slice::<Value>(&body) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "the node document is not JSON"})),
        );
    };
    let id = lock(&shared).manager.register(doc, peer.ip());
    (
        StatusCode::OK,
        Json(json!({"id": id, "MQTT_BROKER_PORT": port.to_string()})),
    )
}

// -------------------------------------------------------------------- MQTT

async fn mqtt_loop(
    shared: Arc<Mutex<Shared>>,
    client: AsyncClient,
    mut eventloop: rumqttc::EventLoop,
    ready: impl FnOnce(),
) {
    let mut ready = Some(ready);
    loop {
        match eventloop.poll().await {
            // Clean session: subscriptions are gone after every reconnect.
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                let _ = client.try_subscribe("nodes/#", QoS::AtLeastOnce);
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                if let Some(r) = ready.take() {
                    r();
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let answers = on_message(&mut lock(&shared), &p.topic, &p.payload, Instant::now());
                for (topic, body) in answers {
                    if let Err(e) = client.try_publish(&topic, QoS::AtLeastOnce, false, body) {
                        eprintln!("cluster double: could not answer on {topic}: {e}");
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("cluster double: the MQTT link failed ({e}); reconnecting");
                tokio::time::sleep(Duration::from_millis(200)).await
            }
        }
    }
}

/// Records one message and handles what a worker sends the cluster;
/// returns what to publish in answer.
fn on_message(s: &mut Shared, topic: &str, payload: &[u8], now: Instant) -> Vec<(String, String)> {
    s.log.push(Message {
        topic: topic.to_string(),
        payload: payload.to_vec(),
        at: now,
    });
    // Never trust a peer's payload: anything unparsable is only recorded.
    let Ok(msg) = serde_json::from_slice::<Value>(payload) else {
        return Vec::new();
    };
    let parts: Vec<&str> = topic.splitn(3, '/').collect();
    let ["nodes", node, rest] = parts[..] else {
        return Vec::new();
    };
    let changed = match rest {
        "job" => {
            s.manager.job_report(node, msg, now);
            None
        }
        "jobs/resources" => {
            s.manager.resources(node, &msg, now);
            None
        }
        "net/subnet" if s.services.answer_subnets && msg["METHOD"] == "GET" => {
            return match s.services.request_subnet(node) {
                Some((v4, v6)) => vec![(
                    format!("nodes/{node}/net/subnetwork/result"),
                    json!({"address": v4, "addressv6": v6}).to_string(),
                )],
                None => {
                    eprintln!("cluster double: no subnet left for {node}");
                    Vec::new()
                }
            };
        }
        "net/tablequery/request" if s.services.answer_tables => {
            let answer = s.services.table_query(node, &msg);
            return vec![(
                format!("nodes/{node}/net/tablequery/result"),
                answer.to_string(),
            )];
        }
        "net/service/deployed" => {
            if let (Some(job), Some(n)) = (msg["appname"].as_str(), msg["instance_number"].as_u64())
            {
                s.deployed.push((job.to_string(), n, now));
            }
            s.services.deployed(&msg)
        }
        "net/service/address-changed" => s.services.address_changed(&msg),
        "net/interest/remove" => {
            s.services.remove_interest(node, &msg);
            None
        }
        _ => None,
    };
    changed
        .map(|job| {
            (
                updates_topic(&job),
                json!({"type": "DEPLOYMENT"}).to_string(),
            )
        })
        .into_iter()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Shared {
        Shared {
            log: Vec::new(),
            manager: Manager::new(FAILURE_WINDOW),
            services: Services::default(),
            deployed: Vec::new(),
        }
    }

    #[test]
    fn subnet_requests_are_answered_fresh_each_time() {
        let mut s = shared();
        let now = Instant::now();
        let a = on_message(&mut s, "nodes/n1/net/subnet", br#"{"METHOD":"GET"}"#, now);
        let b = on_message(&mut s, "nodes/n1/net/subnet", br#"{"METHOD":"GET"}"#, now);
        assert_eq!(a[0].0, "nodes/n1/net/subnetwork/result");
        assert_ne!(a[0].1, b[0].1);
        s.services.answer_subnets = false;
        assert!(on_message(&mut s, "nodes/n1/net/subnet", br#"{"METHOD":"GET"}"#, now).is_empty());
        assert_eq!(s.log.len(), 3);
    }

    #[test]
    fn deployed_instances_are_announced_and_garbage_is_only_recorded() {
        let mut s = shared();
        let now = Instant::now();
        s.services.schedule("a.b.c.d", 0, "n1");
        let body = json!({"appname": "a.b.c.d", "instance_number": 0, "nsip": "10.18.0.66",
                          "host_ip": "198.51.100.1", "host_port": "50103"});
        let out = on_message(
            &mut s,
            "nodes/n1/net/service/deployed",
            body.to_string().as_bytes(),
            now,
        );
        assert_eq!(
            out,
            vec![(
                "jobs/a.b.c.d/updates_available".to_string(),
                r#"{"type":"DEPLOYMENT"}"#.to_string()
            )]
        );
        assert_eq!(s.deployed.len(), 1);
        // Upstream's cluster ignores service/undeployed.
        let gone = json!({"appname": "a.b.c.d", "instance_number": 0}).to_string();
        assert!(
            on_message(
                &mut s,
                "nodes/n1/net/service/undeployed",
                gone.as_bytes(),
                now
            )
            .is_empty()
        );
        assert_eq!(s.services.instances("a.b.c.d").len(), 1);
        assert!(on_message(&mut s, "nodes/n1/net/tablequery/request", b"\xff\xfe", now).is_empty());
        assert_eq!(s.log.len(), 3);
    }
}
