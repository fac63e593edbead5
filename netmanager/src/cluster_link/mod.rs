//! The MQTT link to the cluster service manager (docs/contract.md §2.3).
//!
//! One client per node, client id = node id. It asks for the node subnet,
//! runs table queries (coalesced per key, answered within a timeout or
//! failed), publishes instance lifecycle messages, and keeps "interests":
//! subscriptions to `jobs/<job>/updates_available` that live while a holder
//! (a local instance) uses the job and are dropped a while after the last one
//! lets go. Everything subscribed is subscribed again after every reconnect,
//! so a broker restart is survived without help from the caller.

mod interests;
pub mod messages;
mod queries;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rumqttc::{AsyncClient, Event, EventLoop, Incoming, MqttOptions, QoS, Transport};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use worker_common::logging::LogBudget;

use crate::addresses::Subnet;
pub use messages::{ServiceIpEntry, TableInstance, TableResult};
use worker_common::tls::ClientTls;

/// How long an unanswered subnet request waits before it is repeated
/// (upstream's worker waits about as long).
pub const SUBNET_RETRY: Duration = Duration::from_secs(10);

const SUBNET_REQUEST: &[u8] = br#"{"METHOD":"GET"}"#;

/// Link events waiting for the node; beyond this, updates are dropped.
const EVENT_QUEUE: usize = 1024;

/// What a table query asks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum QueryKey {
    Job(String),
    Ip(IpAddr),
}

impl std::fmt::Display for QueryKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QueryKey::Job(j) => write!(f, "job {j}"),
            QueryKey::Ip(ip) => write!(f, "service ip {ip}"),
        }
    }
}

/// Things the link tells its owner about.
#[derive(Debug, Clone)]
pub enum LinkEvent {
    /// A message on `jobs/<job>/updates_available`: query the job again.
    JobUpdated(String),
    /// An interest expired; the owner may forget the job's routes.
    InterestDropped(String),
    /// (Re)connected to the broker and resubscribed.
    Connected,
}

#[derive(Debug, Clone)]
pub struct LinkOptions {
    pub node_id: String,
    pub host: String,
    pub port: u16,
    /// MQTTS: how the broker is verified and whether we present a
    /// certificate. None: plaintext (warned about at start).
    pub tls: Option<ClientTls>,
    /// Username and password for the broker.
    pub credentials: Option<(String, String)>,
    pub query_timeout: Duration,
    pub interest_ttl: Duration,
    pub keep_alive: Duration,
}

impl LinkOptions {
    pub fn new(node_id: &str, host: &str, port: u16) -> LinkOptions {
        LinkOptions {
            node_id: node_id.to_string(),
            host: host.to_string(),
            port,
            tls: None,
            credentials: None,
            query_timeout: Duration::from_secs(10),
            interest_ttl: Duration::from_secs(10),
            keep_alive: Duration::from_secs(30),
        }
    }
}

type Waiters = Vec<oneshot::Sender<Arc<TableResult>>>;

#[derive(Default)]
struct LinkState {
    pending: HashMap<QueryKey, Waiters>,
    subnet_waiters: Vec<oneshot::Sender<Subnet>>,
    interests: HashMap<String, Interest>,
}

struct Interest {
    holders: HashSet<String>,
    /// When the last holder let go (or the interest was created without one).
    idle_since: Option<Instant>,
}

struct Shared {
    node_id: String,
    client: AsyncClient,
    state: Mutex<LinkState>,
    events: mpsc::Sender<LinkEvent>,
    /// True while connected and subscribed to the result topics.
    connected: tokio::sync::watch::Sender<bool>,
    stats: Mutex<LinkStats>,
}

/// What the link did, for status and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LinkStats {
    pub connected: bool,
    /// Successful connections (the first one, then every reconnect).
    pub connections: u64,
    /// Table queries sent (coalesced ones count once).
    pub queries_sent: u64,
    pub queries_answered: u64,
    pub queries_timed_out: u64,
}

impl Shared {
    fn count(&self, f: impl FnOnce(&mut LinkStats)) {
        f(&mut self.stats.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn state(&self) -> MutexGuard<'_, LinkState> {
        // A panic while holding this lock leaves only plain collections behind;
        // keep going rather than poisoning the whole link.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn net_topic(&self, sub: &str) -> String {
        format!("nodes/{}/net/{sub}", self.node_id)
    }
}

/// Handle to the link; cheap to clone. The background tasks stop when the
/// last clone is dropped.
#[derive(Clone)]
pub struct ClusterLink {
    shared: Arc<Shared>,
    opts: Arc<LinkOptions>,
    _tasks: Arc<TaskGuard>,
}

struct TaskGuard(Vec<JoinHandle<()>>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

impl ClusterLink {
    /// Start the client; it connects (and reconnects) in the background.
    pub fn connect(opts: LinkOptions) -> Result<(ClusterLink, mpsc::Receiver<LinkEvent>)> {
        let mut mqtt = MqttOptions::new(opts.node_id.clone(), opts.host.clone(), opts.port);
        mqtt.set_keep_alive(opts.keep_alive);
        // We resubscribe ourselves on every ConnAck, so a clean session is fine
        // and avoids a broker replaying stale results from a previous run.
        mqtt.set_clean_session(true);
        mqtt.set_max_packet_size(1 << 20, 1 << 20);
        match &opts.tls {
            Some(tls) => {
                let config = tls.build().context("MQTTS client configuration")?;
                mqtt.set_transport(Transport::tls_with_config(
                    rumqttc::TlsConfiguration::Rustls(config),
                ));
            }
            None => tracing::warn!(
                broker = %format!("{}:{}", opts.host, opts.port),
                "the MQTT link to the cluster is PLAINTEXT: anyone on the path can read it and, \
                 without broker credentials, publish table results to this node; set MqttTls \
                 (or MqttCert/MqttKey) and MqttUsername/MqttPasswordFile (docs/security.md)"
            ),
        }
        if let Some((user, password)) = &opts.credentials {
            mqtt.set_credentials(user.clone(), password.clone());
        }
        let (client, mut eventloop) = AsyncClient::new(mqtt, 256);
        // Table queries are small request/answer exchanges on the miss path:
        // with Nagle's algorithm each one waited for a delayed ACK (~40 ms
        // per direction) and a first connect took ~90 ms.
        let mut net = eventloop.network_options();
        net.set_tcp_nodelay(true);
        eventloop.set_network_options(net);
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let shared = Arc::new(Shared {
            node_id: opts.node_id.clone(),
            client,
            state: Mutex::new(LinkState::default()),
            events: tx,
            connected: tokio::sync::watch::Sender::new(false),
            stats: Mutex::new(LinkStats::default()),
        });
        let poller = tokio::spawn(run_eventloop(shared.clone(), eventloop));
        let sweeper = tokio::spawn(interests::sweep_interests(
            shared.clone(),
            opts.interest_ttl,
        ));
        Ok((
            ClusterLink {
                shared,
                opts: Arc::new(opts),
                _tasks: Arc::new(TaskGuard(vec![poller, sweeper])),
            },
            rx,
        ))
    }

    pub fn node_id(&self) -> &str {
        &self.shared.node_id
    }

    pub async fn publish_deployed(
        &self,
        job: &str,
        instance: u32,
        ns: crate::addresses::AddressPair,
        host_ip: std::net::IpAddr,
        host_port: u16,
    ) -> Result<()> {
        let msg = messages::Deployed {
            appname: job,
            status: "DEPLOYED",
            instance_number: instance,
            nsip: ns.v4.to_string(),
            nsipv6: ns.v6.to_string(),
            host_ip: host_ip.to_string(),
            host_port: host_port.to_string(),
        };
        self.publish_net("service/deployed", serde_json::to_vec(&msg)?)
            .await
    }

    pub async fn publish_undeployed(&self, job: &str, instance: u32) -> Result<()> {
        let msg = messages::Undeployed {
            appname: job,
            instance_number: instance,
        };
        self.publish_net("service/undeployed", serde_json::to_vec(&msg)?)
            .await
    }

    pub async fn publish_address_changed(
        &self,
        job: &str,
        instance: u32,
        host_ip: std::net::IpAddr,
        host_port: u16,
    ) -> Result<()> {
        let msg = messages::AddressChanged {
            appname: job,
            instance_number: instance,
            host_ip: host_ip.to_string(),
            host_port: host_port.to_string(),
        };
        self.publish_net("service/address-changed", serde_json::to_vec(&msg)?)
            .await
    }

    pub fn stats(&self) -> LinkStats {
        *self.shared.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Disconnect politely (the broker then does not wait for the keepalive).
    pub async fn disconnect(&self) {
        let _ = self.shared.client.disconnect().await;
    }

    async fn publish_net(&self, sub: &str, payload: Vec<u8>) -> Result<()> {
        let topic = self.shared.net_topic(sub);
        self.shared
            .client
            .publish(&topic, QoS::AtLeastOnce, false, payload)
            .await
            .with_context(|| format!("publishing to {topic}"))
    }
}

/// Drive the MQTT event loop forever; rumqttc reconnects on the next poll
/// after an error, we only pace the retries.
async fn run_eventloop(shared: Arc<Shared>, mut eventloop: EventLoop) {
    let mut was_down = false;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                tracing::info!(resumed = was_down, "connected to the cluster MQTT broker");
                shared.count(|s| s.connections += 1);
                was_down = false;
                // Subscribing through the bounded request channel from inside
                // the poll loop could deadlock; do it from a separate task.
                tokio::spawn(on_connected(shared.clone()));
            }
            Ok(Event::Incoming(Incoming::Publish(p))) => dispatch(&shared, &p.topic, &p.payload),
            Ok(_) => {}
            Err(e) => {
                shared.connected.send_replace(false);
                shared.count(|s| s.connected = false);
                if !was_down {
                    tracing::warn!("MQTT connection lost: {e}; reconnecting");
                }
                was_down = true;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

async fn on_connected(shared: Arc<Shared>) {
    let mut topics = vec![
        shared.net_topic("tablequery/result"),
        shared.net_topic("subnetwork/result"),
    ];
    let (jobs, queries) = {
        let st = shared.state();
        (
            st.interests.keys().cloned().collect::<Vec<_>>(),
            st.pending.keys().cloned().collect::<Vec<_>>(),
        )
    };
    topics.extend(jobs.iter().map(|j| interests::updates_topic(j)));
    for t in topics {
        if let Err(e) = shared.client.subscribe(t.clone(), QoS::AtLeastOnce).await {
            tracing::warn!("subscribing to {t}: {e}");
        }
    }
    // Requests published while the broker was away may be lost with the old
    // session; asking again is harmless because answers are coalesced.
    for key in queries {
        if let Ok(body) = serde_json::to_vec(&queries::query_request(&key)) {
            let _ = shared
                .client
                .publish(
                    shared.net_topic("tablequery/request"),
                    QoS::AtLeastOnce,
                    false,
                    body,
                )
                .await;
        }
    }
    // Subscriptions are queued before this point, so a subnet request sent
    // from now on cannot overtake them.
    shared.connected.send_replace(true);
    shared.count(|s| s.connected = true);
    let _ = shared.events.send(LinkEvent::Connected).await;
}

/// Lines per minute about cluster messages we cannot use: a broken or
/// hostile publisher on the broker must not flood the log (the rest are
/// counted and summed up).
static UNUSABLE_MESSAGES: Mutex<LogBudget<20>> = Mutex::new(LogBudget::new());

/// Whether to log one more unusable message now.
fn log_unusable() -> bool {
    let (log, suppressed) = UNUSABLE_MESSAGES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .allow();
    if suppressed > 0 {
        tracing::warn!(
            suppressed,
            "unusable cluster messages not logged in the last minute"
        );
    }
    log
}

fn dispatch(shared: &Shared, topic: &str, payload: &[u8]) {
    if topic == shared.net_topic("tablequery/result") {
        match serde_json::from_slice::<TableResult>(payload) {
            Ok(r) => queries::deliver_table(shared, Arc::new(r)),
            Err(e) if log_unusable() => {
                tracing::warn!("ignoring malformed table query result: {e}")
            }
            Err(_) => {}
        }
    } else if topic == shared.net_topic("subnetwork/result") {
        match serde_json::from_slice::<messages::SubnetResult>(payload)
            .map_err(anyhow::Error::from)
            .and_then(|r| Subnet::parse(&r.address, &r.addressv6))
        {
            Ok(subnet) => {
                let waiters = std::mem::take(&mut shared.state().subnet_waiters);
                if waiters.is_empty() && log_unusable() {
                    tracing::info!(subnet = %subnet.v4, "ignoring a subnet result nobody asked for");
                }
                for w in waiters {
                    let _ = w.send(subnet);
                }
            }
            Err(e) if log_unusable() => tracing::warn!("ignoring malformed subnet result: {e:#}"),
            Err(_) => {}
        }
    } else if let Some(job) = topic
        .strip_prefix("jobs/")
        .and_then(|t| t.strip_suffix("/updates_available"))
    {
        // Bounded: a flood of updates cannot grow memory. A dropped update
        // only delays a refresh until the next one or a reconnect.
        if shared
            .events
            .try_send(LinkEvent::JobUpdated(job.to_string()))
            .is_err()
        {
            tracing::debug!(job, "update dropped: event queue full");
        }
    } else {
        tracing::debug!(topic, "message on an unexpected topic");
    }
}
