//! A stand-in for the cluster side of the Oakestra worker contract, for the
//! sandbox and the end-to-end tests ONLY. It is a demo/test fixture: it
//! keeps everything in memory, trusts every peer and implements just enough
//! of the cluster manager (registration on HTTP 10100, scheduling by
//! publishing `nodes/<id>/control/deploy|delete`) and of the cluster service
//! manager (subnets, service IPs, table queries, `updates_available`) to
//! drive real workers. Production clusters are upstream Oakestra's.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use std::net::SocketAddr;

use anyhow::{Context, Result, anyhow};
use axum::Json;
use axum::extract::{ConnectInfo, State};
use axum::routing::post;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};

use super::broker::MQTT_PORT;
use super::procs::wait_for;
use super::service_manager::{Instance, Pair, ServiceManager};

pub const HTTP_PORT: u16 = 10100;

/// The deploy document upstream's cluster sends; we patch the fields that
/// differ per job and instance.
const JOB_TEMPLATE: &str = include_str!("../../../nodeengine/tests/fixtures/deploy-job.json");

/// What to run: the parts of a job document the sandbox varies.
#[derive(Clone, Debug)]
pub struct JobSpec {
    pub job_name: String,
    pub image: String,
    pub cmd: Vec<String>,
    pub environment: Vec<String>,
}

#[derive(Default)]
struct Shared {
    /// (uplink address, node id), in registration order.
    nodes: Vec<(String, String)>,
    sm: ServiceManager,
    /// (node id, payload, arrival) of every `nodes/<id>/job` report.
    reports: Vec<(String, Value, Instant)>,
    /// (job, instance, arrival) of every `service/deployed` from a NetManager.
    deployed: Vec<(String, u64, Instant)>,
}

pub struct ClusterStandin {
    shared: Arc<Mutex<Shared>>,
    client: AsyncClient,
    /// Dropping it ends the stand-in's thread (and closes its sockets).
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl ClusterStandin {
    /// Starts the HTTP and MQTT sides on a thread inside `netns` (the
    /// underlay), talking to the broker on 127.0.0.1:10003 there.
    pub fn start(netns: &Path) -> Result<ClusterStandin> {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let mut opts = MqttOptions::new("cluster-standin", "127.0.0.1", MQTT_PORT);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_max_packet_size(4 << 20, 4 << 20);
        let (client, eventloop) = AsyncClient::new(opts, 1000);
        let ns = std::fs::File::open(netns).with_context(|| format!("{}", netns.display()))?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let (s, c) = (shared.clone(), client.clone());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("cluster-standin".into())
            .spawn(move || {
                // SAFETY: only this thread enters the namespace; the sockets it
                // creates belong there.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    let _ = ready_tx.send(Err(std::io::Error::last_os_error().to_string()));
                    return;
                }
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                rt.block_on(async move {
                    tokio::select! {
                        _ = run(s, c, eventloop, ready_tx) => {}
                        _ = stop_rx => {}
                    }
                });
            })
            .context("starting the cluster stand-in thread")?;
        ready_rx
            .recv_timeout(Duration::from_secs(15))
            .context("the cluster stand-in did not come up")?
            .map_err(|e| anyhow!("cluster stand-in: {e}"))?;
        Ok(ClusterStandin {
            shared,
            client,
            _stop: stop_tx,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A panic while holding the lock leaves plain data behind; keep going.
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The id handed to the worker with uplink address `ip`, once registered.
    pub fn node_id(&self, ip: &str) -> Option<String> {
        self.lock()
            .nodes
            .iter()
            .find(|(a, _)| a == ip)
            .map(|(_, id)| id.clone())
    }

    /// RR and Closest addresses of `job` (allocated on first use).
    pub fn service_ips(&self, job: &str) -> (Pair, Pair) {
        let mut g = self.lock();
        let j = g.sm.job(job);
        (j.rr.clone(), j.closest.clone())
    }

    pub fn instance_ip(&self, job: &str, n: u64) -> Pair {
        self.lock().sm.instance_ip(job, n)
    }

    /// Instances NetManagers reported as deployed.
    pub fn instances(&self, job: &str) -> Vec<(u64, Instance)> {
        self.lock().sm.instances(job)
    }

    /// Schedules instance `n` of `job` on `node` (control/deploy).
    pub fn deploy(&self, node: &str, job: &JobSpec, n: u64) -> Result<()> {
        let (rr, _) = self.service_ips(&job.job_name);
        let doc = job_document(job, n, &rr)?;
        self.publish(&format!("nodes/{node}/control/deploy"), doc.to_string())
    }

    /// Sends `node` a deploy document as is (tests of fields [`JobSpec`] does
    /// not vary: virtualization, volumes, ...; start from [`job_document`]).
    pub fn deploy_document(&self, node: &str, doc: &Value) -> Result<()> {
        self.publish(&format!("nodes/{node}/control/deploy"), doc.to_string())
    }

    /// Asks `node` to remove instance `n` of `job` (control/delete).
    pub fn undeploy(&self, node: &str, job: &str, n: u64) -> Result<()> {
        let body = json!({"job_name": job, "virtualization": "docker", "instance_number": n});
        self.publish(&format!("nodes/{node}/control/delete"), body.to_string())
    }

    fn publish(&self, topic: &str, body: String) -> Result<()> {
        self.client
            .try_publish(topic, QoS::AtLeastOnce, false, body)
            .with_context(|| format!("publishing on {topic}"))
    }

    /// Status reports (`nodes/<id>/job`) for one instance, oldest first.
    pub fn statuses(&self, job: &str, n: u64) -> Vec<String> {
        self.lock()
            .reports
            .iter()
            .filter(|(_, v, _)| v["sname"] == job && v["instance"] == n)
            .filter_map(|(_, v, _)| v["status"].as_str().map(str::to_string))
            .collect()
    }

    /// When the stand-in received instance `n` of `job`'s first `status`
    /// report (benchmarks: deploy-to-status latency).
    pub fn status_time(&self, job: &str, n: u64, status: &str) -> Option<Instant> {
        self.lock()
            .reports
            .iter()
            .find(|(_, v, _)| v["sname"] == job && v["instance"] == n && v["status"] == status)
            .map(|(_, _, t)| *t)
    }

    /// When a NetManager first reported instance `n` of `job` as deployed
    /// (`service/deployed`, sent once its `/container/deploy` is done).
    pub fn deployed_time(&self, job: &str, n: u64) -> Option<Instant> {
        self.lock()
            .deployed
            .iter()
            .find(|(j, i, _)| j == job && *i == n)
            .map(|(_, _, t)| *t)
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
            Some(detail) => anyhow::bail!("{job} failed on a worker: {detail}"),
            None => waited,
        }
    }

    /// The status_detail of the first FAILED report for `job`, if any.
    pub fn failure(&self, job: &str) -> Option<String> {
        self.lock()
            .reports
            .iter()
            .find(|(_, v, _)| v["sname"] == job && v["status"] == "FAILED")
            .map(|(_, v, _)| v["status_detail"].as_str().unwrap_or("").to_string())
    }
}

/// The deploy document for instance `n`, shaped like upstream's.
pub fn job_document(job: &JobSpec, n: u64, rr: &Pair) -> Result<Value> {
    let mut v: Value = serde_json::from_str(JOB_TEMPLATE).context("the job template")?;
    let parts: Vec<&str> = job.job_name.split('.').collect();
    let [app, app_ns, service, service_ns] = parts[..] else {
        anyhow::bail!(
            "job name {:?} is not app.appns.service.servicens",
            job.job_name
        );
    };
    v["job_name"] = job.job_name.clone().into();
    for (k, val) in [
        ("app_name", app),
        ("app_ns", app_ns),
        ("service_name", service),
        ("service_ns", service_ns),
        ("microservice_name", service),
        ("microservice_namespace", service_ns),
    ] {
        v[k] = val.into();
    }
    v["instance_number"] = n.into();
    v["image"] = job.image.clone().into();
    v["code"] = job.image.clone().into();
    v["cmd"] = json!(job.cmd);
    v["environment"] = json!(job.environment);
    v["port"] = "".into();
    v["memory"] = 64.into();
    v["addresses"] = json!({"rr_ip": rr.0});
    v["RR_ip"] = rr.0.clone().into();
    v["RR_ip_v6"] = rr.1.clone().into();
    v["service_ip_list"] = json!([{"IpType": "RR", "Address": rr.0, "Address_v6": rr.1}]);
    v["instance_list"] = json!([{"instance_number": n, "status": "NODE_SCHEDULED"}]);
    Ok(v)
}

async fn run(
    shared: Arc<Mutex<Shared>>,
    client: AsyncClient,
    eventloop: rumqttc::EventLoop,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) {
    let listener = match tokio::net::TcpListener::bind(("0.0.0.0", HTTP_PORT)).await {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(format!("binding HTTP port {HTTP_PORT}: {e}")));
            return;
        }
    };
    tokio::spawn(serve_register(listener, shared.clone()));
    mqtt_loop(shared, client, eventloop, ready).await;
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

// ----------------------------------------------------------------- register

/// The cluster manager's HTTP side: only `POST /api/node/register`.
async fn serve_register(listener: tokio::net::TcpListener, shared: Arc<Mutex<Shared>>) {
    let app = axum::Router::new()
        .route("/api/node/register", post(register_node))
        .fallback(|| async {
            (
                axum::http::StatusCode::NOT_FOUND,
                Json(json!({"error": "not found"})),
            )
        })
        .with_state(shared);
    let service = app.into_make_service_with_connect_info::<SocketAddr>();
    if let Err(e) = axum::serve(listener, service).await {
        eprintln!("cluster stand-in: registration endpoint stopped: {e}");
    }
}

async fn register_node(
    State(shared): State<Arc<Mutex<Shared>>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Json<Value> {
    let id = register(&shared, &peer.ip().to_string());
    Json(json!({"id": id, "MQTT_BROKER_PORT": MQTT_PORT.to_string()}))
}

/// The same uplink address gets the same id again, so a restarted
/// NodeEngine keeps its identity (and its NetManager accepts it).
fn register(shared: &Mutex<Shared>, peer: &str) -> String {
    let mut g = lock(shared);
    if let Some((_, id)) = g.nodes.iter().find(|(a, _)| a == peer) {
        return id.clone();
    }
    let id = random_id();
    g.nodes.push((peer.to_string(), id.clone()));
    id
}

fn random_id() -> String {
    let mut b = [0u8; 12];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

// --------------------------------------------------------------------- MQTT

async fn mqtt_loop(
    shared: Arc<Mutex<Shared>>,
    client: AsyncClient,
    mut eventloop: rumqttc::EventLoop,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) {
    let mut ready = Some(ready);
    loop {
        match eventloop.poll().await {
            // Clean session: subscriptions are gone after every reconnect.
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                for f in ["nodes/+/net/#", "nodes/+/job"] {
                    let _ = client.try_subscribe(f, QoS::AtLeastOnce);
                }
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                if let Some(r) = ready.take() {
                    let _ = r.send(Ok(()));
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                for (topic, body) in on_message(&shared, &p.topic, &p.payload) {
                    let _ = client.try_publish(topic, QoS::AtLeastOnce, false, body);
                }
            }
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}

/// Handles one message from a worker; returns what to publish in answer.
fn on_message(shared: &Mutex<Shared>, topic: &str, payload: &[u8]) -> Vec<(String, String)> {
    // Never trust a peer's payload: anything unparsable is ignored.
    let Ok(msg) = serde_json::from_slice::<Value>(payload) else {
        return Vec::new();
    };
    let parts: Vec<&str> = topic.splitn(4, '/').collect();
    let (node, rest) = match parts[..] {
        ["nodes", node, "job"] => {
            lock(shared)
                .reports
                .push((node.to_string(), msg, Instant::now()));
            return Vec::new();
        }
        ["nodes", node, "net", rest] => (node, rest),
        _ => return Vec::new(),
    };
    let mut g = lock(shared);
    let changed = match rest {
        "subnet" => {
            let (v4, v6) = g.sm.subnet(node);
            let body = json!({"address": v4, "addressv6": v6}).to_string();
            return vec![(format!("nodes/{node}/net/subnetwork/result"), body)];
        }
        "tablequery/request" => {
            let body = g.sm.table(&msg).to_string();
            return vec![(format!("nodes/{node}/net/tablequery/result"), body)];
        }
        "service/deployed" => {
            if let (Some(job), Some(n)) = (msg["appname"].as_str(), msg["instance_number"].as_u64())
            {
                g.deployed.push((job.to_string(), n, Instant::now()));
            }
            g.sm.deployed(&msg)
        }
        "service/undeployed" => g.sm.undeployed(&msg),
        "service/address-changed" => g.sm.address_changed(&msg),
        _ => None,
    };
    changed
        .map(|job| (format!("jobs/{job}/updates_available"), "{}".to_string()))
        .into_iter()
        .collect::<Vec<_>>()
}
