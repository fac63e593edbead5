//! The MQTT session with the cluster (contract 1.3 step 3 and 1.4).
//!
//! One client id `<node id>-ne`, clean session, keepalive 30 s. Because the session
//! is clean, the broker forgets our subscriptions on every reconnect, so they are
//! renewed on every ConnAck. Periodic reports use `try_publish` so that a broker
//! outage can never block the loop; status reports wait for room in the queue.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use tokio::sync::{mpsc, watch};
use worker_common::backoff::Backoff;
use worker_common::tls::ClientTls;

use crate::deploy::{Control, Engine};
use crate::job::StatusReport;
use crate::node_report::NodeSampler;

pub const REPORT_INTERVAL: Duration = Duration::from_secs(2);
const KEEPALIVE: Duration = Duration::from_secs(30);
/// Job documents and node documents can exceed rumqttc's 10 KiB default.
const MAX_PACKET: usize = 4 << 20;

#[derive(Debug, Clone)]
pub struct MqttSettings {
    pub node_id: String,
    pub host: String,
    pub port: u16,
    pub cert_file: String,
    pub key_file: String,
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

/// TLS for MQTTS with the node's client certificate. The broker is checked
/// against the system roots plus `ca.crt` next to the client certificate,
/// where Oakestra's setup scripts put the cluster CA.
fn mqtts_tls(cert_file: &str, key_file: &str) -> ClientTls {
    let tls = ClientTls::system_roots().with_identity(cert_file, key_file);
    match Path::new(cert_file).parent().map(|d| d.join("ca.crt")) {
        Some(ca) if ca.exists() => tls.with_extra_ca(ca),
        _ => tls,
    }
}

pub fn options(s: &MqttSettings) -> Result<MqttOptions> {
    let mut o = MqttOptions::new(format!("{}-ne", s.node_id), s.host.clone(), s.port);
    o.set_keep_alive(KEEPALIVE);
    o.set_clean_session(true);
    o.set_max_packet_size(MAX_PACKET, MAX_PACKET);
    if !s.cert_file.is_empty() && !s.key_file.is_empty() {
        let cfg = mqtts_tls(&s.cert_file, &s.key_file)
            .build()
            .context("MQTT over TLS")?;
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(cfg)));
    }
    Ok(o)
}

/// Runs the session until `shutdown` turns true.
pub async fn run(
    settings: MqttSettings,
    engine: Arc<Engine>,
    mut status_rx: mpsc::UnboundedReceiver<StatusReport>,
    sampler: NodeSampler,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let topics = Topics::new(&settings.node_id);
    let (client, mut eventloop) = AsyncClient::new(options(&settings)?, 256);

    let reporter = tokio::spawn(report_loop(
        client.clone(),
        topics.clone(),
        settings.node_id.clone(),
        engine.clone(),
        sampler,
    ));
    let status_client = client.clone();
    let job_topic = topics.job.clone();
    let status_pub = tokio::spawn(async move {
        while let Some(report) = status_rx.recv().await {
            publish_json(&status_client, &job_topic, &report).await;
        }
    });

    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            ev = eventloop.poll() => match ev {
                Ok(ev) => {
                    backoff.reset();
                    on_event(ev, &client, &topics, &engine);
                }
                Err(e) => {
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
    let _ = client.try_disconnect();
    // Give the disconnect a moment to reach the broker.
    let _ = tokio::time::timeout(Duration::from_millis(500), eventloop.poll()).await;
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

async fn publish_json<T: serde::Serialize>(client: &AsyncClient, topic: &str, value: &T) {
    match serde_json::to_vec(value) {
        Ok(body) => {
            if let Err(e) = client.publish(topic, QoS::AtLeastOnce, false, body).await {
                tracing::warn!(topic, "publish: {e}");
            }
        }
        Err(e) => tracing::error!(topic, "cannot encode report: {e}"),
    }
}

fn try_publish_json<T: serde::Serialize>(client: &AsyncClient, topic: &str, value: &T) {
    match serde_json::to_vec(value) {
        Ok(body) => {
            if let Err(e) = client.try_publish(topic, QoS::AtLeastOnce, false, body) {
                tracing::debug!(topic, "report dropped: {e}");
            }
        }
        Err(e) => tracing::error!(topic, "cannot encode report: {e}"),
    }
}

async fn report_loop(
    client: AsyncClient,
    topics: Topics,
    node_id: String,
    engine: Arc<Engine>,
    sampler: NodeSampler,
) {
    let sampler = Arc::new(std::sync::Mutex::new(sampler));
    let mut tick = tokio::time::interval(REPORT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let s = sampler.clone();
        let id = node_id.clone();
        // sysinfo reads /proc and /sys synchronously.
        let doc = tokio::task::spawn_blocking(move || {
            s.lock().unwrap_or_else(|p| p.into_inner()).sample(&id)
        })
        .await;
        if let Ok(doc) = doc {
            try_publish_json(&client, &topics.information, &doc);
        }
        let resources = engine.resources().await;
        try_publish_json(&client, &topics.resources, &resources);
    }
}
