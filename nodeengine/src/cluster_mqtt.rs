//! The MQTT session with the cluster (docs/contract.md §1.3 step 3 and 1.4).
//!
//! One client id `<node id>-ne`, clean session, keepalive 30 s. Because the session
//! is clean, the broker forgets our subscriptions on every reconnect, so they are
//! renewed on every ConnAck. Periodic reports use `try_publish` so that a broker
//! outage can never block the loop; status reports wait for room in the queue.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use tokio::sync::{mpsc, watch};
use worker_common::backoff::Backoff;
use worker_common::tls::ClientTls;

use crate::config::Config;
use crate::deploy::{Control, Engine};
use crate::job::StatusReport;
use crate::last_report::LastReport;
use crate::metrics::{Metrics, Report};
use crate::node_report::{NodeIp, NodeSampler};
use crate::public_ip::PublicIpSource;

pub const REPORT_INTERVAL: Duration = Duration::from_secs(2);
const KEEPALIVE: Duration = Duration::from_secs(30);
/// Job documents and node documents can exceed rumqttc's 10 KiB default.
const MAX_PACKET: usize = 4 << 20;
/// A password file is a line, not a document.
const MAX_PASSWORD_FILE: u64 = 4096;

#[derive(Debug, Clone)]
pub struct MqttSettings {
    pub node_id: String,
    pub host: String,
    pub port: u16,
    pub security: MqttSecurity,
}

/// How the session is protected: upstream's client certificate, and our
/// additions (docs/security.md): server-verified TLS without a client
/// certificate, a broker user and password.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MqttSecurity {
    pub cert_file: String,
    pub key_file: String,
    pub ca_file: String,
    pub tls: bool,
    pub username: String,
    pub password_file: String,
}

impl MqttSecurity {
    pub fn from_config(cfg: &Config) -> MqttSecurity {
        MqttSecurity {
            cert_file: cfg.mqtt_cert_file.clone(),
            key_file: cfg.mqtt_key_file.clone(),
            ca_file: cfg.mqtt_ca_file.clone(),
            tls: cfg.mqtt_tls,
            username: cfg.mqtt_username.clone(),
            password_file: cfg.mqtt_password_file.clone(),
        }
    }

    fn has_identity(&self) -> bool {
        !self.cert_file.is_empty() && !self.key_file.is_empty()
    }

    /// TLS when asked for, or, as upstream, when a client certificate is set.
    pub fn uses_tls(&self) -> bool {
        self.tls || self.has_identity()
    }

    /// The broker is checked against the system roots plus the configured CA,
    /// else `ca.crt` next to the client certificate, where Oakestra's setup
    /// scripts put the cluster CA.
    fn client_tls(&self) -> ClientTls {
        let mut tls = ClientTls::system_roots();
        if self.has_identity() {
            tls = tls.with_identity(&self.cert_file, &self.key_file);
        }
        if !self.ca_file.is_empty() {
            return tls.with_extra_ca(&self.ca_file);
        }
        match Path::new(&self.cert_file)
            .parent()
            .map(|d| d.join("ca.crt"))
        {
            Some(ca) if !self.cert_file.is_empty() && ca.exists() => tls.with_extra_ca(ca),
            _ => tls,
        }
    }

    /// The password: the file without its trailing line end (as NetManager
    /// reads its `MqttPasswordFile`).
    fn password(&self) -> Result<String> {
        use std::io::Read;
        use std::os::unix::fs::PermissionsExt;
        let path = Path::new(&self.password_file);
        let f = std::fs::File::open(path)
            .with_context(|| format!("MQTT password file {}", path.display()))?;
        if f.metadata()
            .is_ok_and(|m| m.permissions().mode() & 0o077 != 0)
        {
            tracing::warn!(
                file = %path.display(),
                "the MQTT password file can be read by other users; chmod 600 it"
            );
        }
        let mut text = String::new();
        f.take(MAX_PASSWORD_FILE)
            .read_to_string(&mut text)
            .with_context(|| format!("MQTT password file {}", path.display()))?;
        Ok(text.trim_end_matches(['\n', '\r']).to_string())
    }
}

/// Topic names for one node.
#[derive(Debug, Clone)]
pub struct Topics {
    pub deploy: String,
    pub delete: String,
    pub error: String,
    pub information: String,
    pub resources: String,
    pub job: String,
}

impl Topics {
    pub fn new(node_id: &str) -> Self {
        let t = |s: &str| format!("nodes/{node_id}/{s}");
        Topics {
            deploy: t("control/deploy"),
            delete: t("control/delete"),
            error: t("control/error"),
            information: t("information"),
            resources: t("jobs/resources"),
            job: t("job"),
        }
    }
}

pub fn options(s: &MqttSettings) -> Result<MqttOptions> {
    let mut o = MqttOptions::new(format!("{}-ne", s.node_id), s.host.clone(), s.port);
    o.set_keep_alive(KEEPALIVE);
    o.set_clean_session(true);
    o.set_max_packet_size(MAX_PACKET, MAX_PACKET);
    let sec = &s.security;
    if sec.uses_tls() {
        let cfg = sec.client_tls().build().context("MQTT over TLS")?;
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(cfg)));
    }
    if !sec.username.is_empty() {
        let password = if sec.password_file.is_empty() {
            String::new()
        } else {
            sec.password()?
        };
        o.set_credentials(sec.username.clone(), password);
    }
    Ok(o)
}

/// Says loudly at start when the link to the cluster is not encrypted: any
/// host on the path could then read the node's reports and, worse, publish
/// deploy commands to it.
pub fn warn_if_plaintext(s: &MqttSettings) {
    if s.security.uses_tls() {
        tracing::info!(host = %s.host, port = s.port, "MQTT to the cluster over TLS");
        return;
    }
    tracing::warn!(
        "MQTT to the cluster broker at {}:{} is PLAINTEXT: anyone on the network path can read \
         this node's reports and publish deploy commands to it{}. Configure TLS \
         (`NodeEngine config auth --tls on --ca CA`, or a client certificate) and broker \
         credentials (docs/security.md).",
        s.host,
        s.port,
        if s.security.username.is_empty() {
            ""
        } else {
            ", and the broker password travels in the clear"
        }
    );
}

/// What the session needs besides the engine.
pub struct Session {
    pub settings: MqttSettings,
    pub sampler: NodeSampler,
    pub public_ip: PublicIpSource,
    pub node_ip: NodeIp,
    pub last_report: LastReport,
    /// Broker link state, report publish failures, reported resources.
    pub metrics: Metrics,
}

/// Runs the session until `shutdown` turns true.
pub async fn run(
    session: Session,
    engine: Arc<Engine>,
    mut status_rx: mpsc::Receiver<StatusReport>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let settings = session.settings.clone();
    let topics = Topics::new(&settings.node_id);
    warn_if_plaintext(&settings);
    let (client, mut eventloop) = AsyncClient::new(options(&settings)?, 256);
    // Status reports (CREATED) follow other publishes closely: with Nagle's
    // algorithm one could wait for the broker's delayed ACK (~40 ms).
    let mut net = eventloop.network_options();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    let connected = Arc::new(AtomicBool::new(false));
    let last_report = Arc::new(std::sync::Mutex::new(session.last_report));
    let metrics = session.metrics;

    let reporter = tokio::spawn(report_loop(
        client.clone(),
        topics.clone(),
        engine.clone(),
        Reporting {
            node_id: settings.node_id.clone(),
            sampler: session.sampler,
            public_ip: session.public_ip,
            node_ip: session.node_ip,
            last_report: last_report.clone(),
            connected: connected.clone(),
            metrics: metrics.clone(),
        },
    ));
    let status_client = client.clone();
    let job_topic = topics.job.clone();
    let status_metrics = metrics.clone();
    let status_pub = tokio::spawn(async move {
        while let Some(report) = status_rx.recv().await {
            if !publish_json(&status_client, &job_topic, &report).await {
                status_metrics.publish_failed(Report::Status);
            }
        }
    });

    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            ev = eventloop.poll() => match ev {
                Ok(ev) => {
                    backoff.reset();
                    if matches!(ev, Event::Incoming(Packet::ConnAck(_))) {
                        connected.store(true, Ordering::SeqCst);
                        metrics.set_broker_connected(true);
                    }
                    on_event(ev, &client, &topics, &engine);
                }
                Err(e) => {
                    connected.store(false, Ordering::SeqCst);
                    metrics.set_broker_connected(false);
                    let delay = backoff.next_delay();
                    tracing::warn!(host = %settings.host, port = settings.port,
                        "MQTT connection: {e}; reconnecting in {delay:?}");
                    tokio::select! {
                        _ = shutdown.changed() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
    reporter.abort();
    status_pub.abort();
    metrics.set_broker_connected(false);
    let _ = client.try_disconnect();
    // Give the disconnect a moment to reach the broker.
    let _ = tokio::time::timeout(Duration::from_millis(500), eventloop.poll()).await;
    let flushed = tokio::task::spawn_blocking(move || {
        last_report
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .flush()
    })
    .await;
    if let Ok(Err(e)) = flushed {
        tracing::warn!("{e:#}");
    }
    Ok(())
}

fn on_event(ev: Event, client: &AsyncClient, topics: &Topics, engine: &Arc<Engine>) {
    match ev {
        Event::Incoming(Packet::ConnAck(_)) => {
            tracing::info!("connected to the cluster broker; subscribing");
            let client = client.clone();
            let subs = [
                topics.deploy.clone(),
                topics.delete.clone(),
                topics.error.clone(),
            ];
            // Subscribing goes through the request queue the event loop drains, so
            // it must not be awaited from inside the loop.
            tokio::spawn(async move {
                for t in subs {
                    if let Err(e) = client.subscribe(t.clone(), QoS::AtLeastOnce).await {
                        tracing::warn!(topic = t, "subscribe: {e}");
                    }
                }
            });
        }
        Event::Incoming(Packet::Publish(p)) => {
            if p.topic == topics.deploy {
                engine.submit(Control::Deploy(p.payload));
            } else if p.topic == topics.delete {
                engine.submit(Control::Delete(p.payload));
            } else if p.topic == topics.error {
                log_cluster_error(&p.payload);
            } else {
                tracing::debug!(topic = %p.topic, "message on an unexpected topic");
            }
        }
        _ => {}
    }
}

fn log_cluster_error(payload: &[u8]) {
    let msg = serde_json::from_slice::<serde_json::Value>(payload)
        .ok()
        .and_then(|v| v.get("message").map(|m| m.to_string()))
        .unwrap_or_else(|| String::from_utf8_lossy(payload).into_owned());
    tracing::error!(message = %msg, "cluster reported an error for this node");
}

/// Queues a report, waiting for room; returns whether it was queued.
async fn publish_json<T: serde::Serialize>(client: &AsyncClient, topic: &str, value: &T) -> bool {
    match serde_json::to_vec(value) {
        Ok(body) => match client.publish(topic, QoS::AtLeastOnce, false, body).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(topic, "publish: {e}");
                false
            }
        },
        Err(e) => {
            tracing::error!(topic, "cannot encode report: {e}");
            false
        }
    }
}

/// Queues a report without waiting; returns whether it was queued.
fn try_publish_json<T: serde::Serialize>(client: &AsyncClient, topic: &str, value: &T) -> bool {
    match serde_json::to_vec(value) {
        Ok(body) => match client.try_publish(topic, QoS::AtLeastOnce, false, body) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(topic, "report dropped: {e}");
                false
            }
        },
        Err(e) => {
            tracing::error!(topic, "cannot encode report: {e}");
            false
        }
    }
}

/// What the periodic reports need.
struct Reporting {
    node_id: String,
    sampler: NodeSampler,
    public_ip: PublicIpSource,
    node_ip: NodeIp,
    last_report: Arc<std::sync::Mutex<LastReport>>,
    connected: Arc<AtomicBool>,
    metrics: Metrics,
}

async fn report_loop(client: AsyncClient, topics: Topics, engine: Arc<Engine>, r: Reporting) {
    let Reporting {
        node_id,
        sampler,
        mut public_ip,
        node_ip,
        last_report,
        connected,
        metrics,
    } = r;
    let sampler = Arc::new(std::sync::Mutex::new(sampler));
    let mut tick = tokio::time::interval(REPORT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let public = public_ip.current().await;
        let s = sampler.clone();
        let id = node_id.clone();
        // sysinfo reads /proc and /sys synchronously.
        let doc = tokio::task::spawn_blocking(move || {
            let mut s = s.lock().unwrap_or_else(|p| p.into_inner());
            s.set_public_ip(public);
            s.sample(&id)
        })
        .await;
        if let Ok(doc) = doc {
            // Refreshed every report; status reports carry the same address.
            node_ip.set(&doc.ip);
            if try_publish_json(&client, &topics.information, &doc) {
                metrics.reported(&doc);
            } else {
                metrics.publish_failed(Report::Node);
            }
        }
        let resources = engine.resources().await;
        let queued = try_publish_json(&client, &topics.resources, &resources);
        if !queued {
            metrics.publish_failed(Report::Resources);
        }
        if queued && connected.load(Ordering::SeqCst) {
            let last = last_report.clone();
            let written = tokio::task::spawn_blocking(move || {
                last.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .record(SystemTime::now())
            })
            .await;
            if let Ok(Err(e)) = written {
                tracing::warn!("{e:#}");
            }
        }
    }
}
