//! The MQTT link to the cluster service manager (contract 2.3).
//!
//! One client per node, client id = node id. It asks for the node subnet,
//! runs table queries (coalesced per key, answered within a timeout or
//! failed), publishes instance lifecycle messages, and keeps "interests":
//! subscriptions to `jobs/<job>/updates_available` that live while a holder
//! (a local instance) uses the job and are dropped a while after the last one
//! lets go. Everything subscribed is subscribed again after every reconnect,
//! so a broker restart is survived without help from the caller.

pub mod messages;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use rumqttc::{AsyncClient, Event, EventLoop, Incoming, MqttOptions, QoS, Transport};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::addresses::Subnet;
pub use messages::{ServiceIpEntry, TableInstance, TableResult};

/// How long an unanswered subnet request waits before it is repeated
/// (upstream's worker waits about as long).
pub const SUBNET_RETRY: Duration = Duration::from_secs(10);

const SUBNET_REQUEST: &[u8] = br#"{"METHOD":"GET"}"#;

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
    /// A table result nobody was waiting for (e.g. a late answer).
    Unsolicited(Arc<TableResult>),
    /// (Re)connected to the broker and resubscribed.
    Connected,
}

#[derive(Debug, Clone)]
pub struct LinkOptions {
    pub node_id: String,
    pub host: String,
    pub port: u16,
    /// Client certificate and key (PEM) for MQTTS.
    pub tls: Option<(PathBuf, PathBuf)>,
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
    events: mpsc::UnboundedSender<LinkEvent>,
    /// True while connected and subscribed to the result topics.
    connected: tokio::sync::watch::Sender<bool>,
}

impl Shared {
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
    pub fn connect(opts: LinkOptions) -> Result<(ClusterLink, mpsc::UnboundedReceiver<LinkEvent>)> {
        let mut mqtt = MqttOptions::new(opts.node_id.clone(), opts.host.clone(), opts.port);
        mqtt.set_keep_alive(opts.keep_alive);
        // We resubscribe ourselves on every ConnAck, so a clean session is fine
        // and avoids a broker replaying stale results from a previous run.
        mqtt.set_clean_session(true);
        mqtt.set_max_packet_size(1 << 20, 1 << 20);
        if let Some((cert, key)) = &opts.tls {
            mqtt.set_transport(Transport::tls_with_config(tls_config(cert, key)?));
        }
        let (client, eventloop) = AsyncClient::new(mqtt, 256);
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            node_id: opts.node_id.clone(),
            client,
            state: Mutex::new(LinkState::default()),
            events: tx,
            connected: tokio::sync::watch::Sender::new(false),
        });
        let poller = tokio::spawn(run_eventloop(shared.clone(), eventloop));
        let sweeper = tokio::spawn(sweep_interests(shared.clone(), opts.interest_ttl));
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

    /// Ask for the node subnet once, and again only after
    /// [`SUBNET_RETRY`] without an answer (contract 3: every request makes
    /// the cluster allocate a fresh subnet, so asking twice burns one).
    /// Requests go out only while connected and subscribed, so the answer
    /// cannot be missed; the first answer is taken, later ones are ignored.
    pub async fn request_subnet(&self, timeout: Duration) -> Result<Subnet> {
        let (tx, mut rx) = oneshot::channel();
        self.shared.state().subnet_waiters.push(tx);
        let result = self.await_subnet(&mut rx, timeout).await;
        // A timed-out request must not keep a stale waiter around.
        self.shared
            .state()
            .subnet_waiters
            .retain(|w| !w.is_closed());
        result
    }

    async fn await_subnet(
        &self,
        rx: &mut oneshot::Receiver<Subnet>,
        timeout: Duration,
    ) -> Result<Subnet> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut connected = self.shared.connected.subscribe();
        let mut next_ask = tokio::time::Instant::now();
        let mut asked = false;
        loop {
            let now = tokio::time::Instant::now();
            if *connected.borrow_and_update() && now >= next_ask {
                if asked {
                    tracing::info!("subnet request unanswered for {SUBNET_RETRY:?}, asking again");
                }
                self.publish_net("subnet", SUBNET_REQUEST.to_vec()).await?;
                asked = true;
                next_ask = now + SUBNET_RETRY;
            }
            let wake = if *connected.borrow() {
                next_ask.min(deadline)
            } else {
                deadline
            };
            tokio::select! {
                answer = &mut *rx => {
                    return answer.map_err(|_| anyhow!("MQTT link closed while waiting for the subnet"));
                }
                _ = tokio::time::sleep_until(wake) => {}
                changed = connected.changed() => {
                    if changed.is_err() {
                        bail!("MQTT link closed while waiting for the subnet");
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "no subnet from the cluster (broker {}:{}) within {timeout:?}",
                    self.opts.host,
                    self.opts.port
                );
            }
        }
    }

    /// Table query; concurrent queries for the same key share one request.
    pub async fn table_query(&self, key: &QueryKey) -> Result<Arc<TableResult>> {
        let (tx, rx) = oneshot::channel();
        let first = {
            let mut st = self.shared.state();
            let waiters = st.pending.entry(key.clone()).or_default();
            waiters.push(tx);
            waiters.len() == 1
        };
        if first {
            tracing::debug!(%key, "table query");
            if let Err(e) = self.publish_query(key).await {
                self.shared.state().pending.remove(key);
                return Err(e);
            }
        }
        match tokio::time::timeout(self.opts.query_timeout, rx).await {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(_)) => bail!("table query for {key} failed (the request it joined timed out)"),
            Err(_) => {
                if first {
                    // Fail every joiner too: they wait on the same request.
                    self.shared.state().pending.remove(key);
                }
                bail!(
                    "table query for {key}: no answer within {:?}",
                    self.opts.query_timeout
                )
            }
        }
    }

    async fn publish_query(&self, key: &QueryKey) -> Result<()> {
        let ip;
        let req = match key {
            QueryKey::Job(job) => messages::TableQueryRequest {
                sname: job,
                sip: "",
            },
            QueryKey::Ip(addr) => {
                ip = addr.to_string();
                messages::TableQueryRequest {
                    sname: "",
                    sip: &ip,
                }
            }
        };
        self.publish_net("tablequery/request", serde_json::to_vec(&req)?)
            .await
    }

    /// Subscribe to a job's updates (idempotent). Without holders it expires
    /// after the interest TTL.
    pub async fn register_interest(&self, job: &str) -> Result<()> {
        let new = {
            let mut st = self.shared.state();
            let mut new = false;
            st.interests.entry(job.to_string()).or_insert_with(|| {
                new = true;
                Interest {
                    holders: HashSet::new(),
                    idle_since: Some(Instant::now()),
                }
            });
            new
        };
        if new {
            tracing::debug!(job, "registering interest");
            self.shared
                .client
                .subscribe(updates_topic(job), QoS::AtLeastOnce)
                .await
                .with_context(|| format!("subscribing to updates of {job}"))?;
        }
        Ok(())
    }

    /// `holder` (a local instance) uses `job`; keeps the interest alive.
    pub async fn hold_interest(&self, job: &str, holder: &str) -> Result<()> {
        self.register_interest(job).await?;
        let mut st = self.shared.state();
        if let Some(i) = st.interests.get_mut(job) {
            i.holders.insert(holder.to_string());
            i.idle_since = None;
        }
        Ok(())
    }

    /// `holder` is gone: release it from every interest.
    pub fn release_holder(&self, holder: &str) {
        let mut st = self.shared.state();
        for i in st.interests.values_mut() {
            if i.holders.remove(holder) && i.holders.is_empty() {
                i.idle_since = Some(Instant::now());
            }
        }
    }

    /// Jobs with a live interest.
    pub fn interests(&self) -> Vec<String> {
        let mut v: Vec<String> = self.shared.state().interests.keys().cloned().collect();
        v.sort();
        v
    }

    pub async fn publish_deployed(
        &self,
        job: &str,
        instance: u32,
        ns: crate::addresses::AddressPair,
        host_ip: std::net::Ipv4Addr,
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
        host_ip: std::net::Ipv4Addr,
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

fn updates_topic(job: &str) -> String {
    format!("jobs/{job}/updates_available")
}

/// Drive the MQTT event loop forever; rumqttc reconnects on the next poll
/// after an error, we only pace the retries.
async fn run_eventloop(shared: Arc<Shared>, mut eventloop: EventLoop) {
    let mut was_down = false;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                tracing::info!(resumed = was_down, "connected to the cluster MQTT broker");
                was_down = false;
                // Subscribing through the bounded request channel from inside
                // the poll loop could deadlock; do it from a separate task.
                tokio::spawn(on_connected(shared.clone()));
            }
            Ok(Event::Incoming(Incoming::Publish(p))) => dispatch(&shared, &p.topic, &p.payload),
            Ok(_) => {}
            Err(e) => {
                shared.connected.send_replace(false);
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
    topics.extend(jobs.iter().map(|j| updates_topic(j)));
    for t in topics {
        if let Err(e) = shared.client.subscribe(t.clone(), QoS::AtLeastOnce).await {
            tracing::warn!("subscribing to {t}: {e}");
        }
    }
    // Requests published while the broker was away may be lost with the old
    // session; asking again is harmless because answers are coalesced.
    for key in queries {
        let ip;
        let req = match &key {
            QueryKey::Job(job) => messages::TableQueryRequest {
                sname: job,
                sip: "",
            },
            QueryKey::Ip(a) => {
                ip = a.to_string();
                messages::TableQueryRequest {
                    sname: "",
                    sip: &ip,
                }
            }
        };
        if let Ok(body) = serde_json::to_vec(&req) {
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
    let _ = shared.events.send(LinkEvent::Connected);
}

fn dispatch(shared: &Shared, topic: &str, payload: &[u8]) {
    if topic == shared.net_topic("tablequery/result") {
        match serde_json::from_slice::<TableResult>(payload) {
            Ok(r) => deliver_table(shared, Arc::new(r)),
            Err(e) => tracing::warn!("ignoring malformed table query result: {e}"),
        }
    } else if topic == shared.net_topic("subnetwork/result") {
        match serde_json::from_slice::<messages::SubnetResult>(payload)
            .map_err(anyhow::Error::from)
            .and_then(|r| Subnet::parse(&r.address, &r.addressv6))
        {
            Ok(subnet) => {
                let waiters = std::mem::take(&mut shared.state().subnet_waiters);
                if waiters.is_empty() {
                    tracing::info!(subnet = %subnet.v4, "ignoring a subnet result nobody asked for");
                }
                for w in waiters {
                    let _ = w.send(subnet);
                }
            }
            Err(e) => tracing::warn!("ignoring malformed subnet result: {e:#}"),
        }
    } else if let Some(job) = topic
        .strip_prefix("jobs/")
        .and_then(|t| t.strip_suffix("/updates_available"))
    {
        let _ = shared.events.send(LinkEvent::JobUpdated(job.to_string()));
    } else {
        tracing::debug!(topic, "message on an unexpected topic");
    }
}

/// Hand a result to every query it answers: by query key, by job name, and
/// by any service address it contains (upstream matches the same way).
fn deliver_table(shared: &Shared, result: Arc<TableResult>) {
    let mut keys = vec![QueryKey::Job(result.app_name.clone())];
    match result.query_key.parse::<IpAddr>() {
        Ok(ip) => keys.push(QueryKey::Ip(ip)),
        Err(_) if !result.query_key.is_empty() => {
            keys.push(QueryKey::Job(result.query_key.clone()))
        }
        Err(_) => {}
    }
    for inst in &result.instance_list {
        for sip in &inst.service_ip {
            for a in [&sip.address, &sip.address_v6] {
                if let Ok(ip) = a.parse::<IpAddr>() {
                    keys.push(QueryKey::Ip(ip));
                }
            }
        }
    }
    let mut delivered = false;
    {
        let mut st = shared.state();
        for k in keys {
            if let Some(waiters) = st.pending.remove(&k) {
                for w in waiters {
                    delivered |= w.send(result.clone()).is_ok();
                }
            }
        }
    }
    if !delivered {
        let _ = shared.events.send(LinkEvent::Unsolicited(result));
    }
}

/// Drop interests nobody has held for `ttl`: unsubscribe and tell the cluster.
async fn sweep_interests(shared: Arc<Shared>, ttl: Duration) {
    let period = (ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        tokio::time::sleep(period).await;
        let expired: Vec<String> = {
            let mut st = shared.state();
            let now = Instant::now();
            let gone: Vec<String> = st
                .interests
                .iter()
                .filter(|(_, i)| {
                    i.holders.is_empty() && i.idle_since.is_some_and(|t| now - t >= ttl)
                })
                .map(|(j, _)| j.clone())
                .collect();
            for j in &gone {
                st.interests.remove(j);
            }
            gone
        };
        for job in expired {
            tracing::debug!(job, "interest expired");
            if let Err(e) = shared.client.unsubscribe(updates_topic(&job)).await {
                tracing::warn!("unsubscribing from updates of {job}: {e}");
            }
            if let Ok(body) = serde_json::to_vec(&messages::InterestRemove { appname: &job }) {
                let _ = shared
                    .client
                    .publish(
                        shared.net_topic("interest/remove"),
                        QoS::AtLeastOnce,
                        false,
                        body,
                    )
                    .await;
            }
            let _ = shared.events.send(LinkEvent::InterestDropped(job));
        }
    }
}

/// rustls client configuration for MQTTS: the node's certificate and key, and
/// the system roots plus an optional extra CA (`NETMANAGER_MQTT_CA`), since
/// Oakestra clusters usually run their broker with a private CA.
fn tls_config(cert: &PathBuf, key: &PathBuf) -> Result<rumqttc::TlsConfiguration> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow!("reading MqttCert {}: {e}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow!("reading MqttKey {}: {e}", key.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(c);
    }
    if let Ok(ca) = std::env::var("NETMANAGER_MQTT_CA") {
        for c in CertificateDer::pem_file_iter(&ca)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| anyhow!("reading NETMANAGER_MQTT_CA {ca}: {e}"))?
        {
            roots
                .add(c)
                .with_context(|| format!("adding CA from {ca}"))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .context("MQTT client certificate and key do not match")?;
    Ok(rumqttc::TlsConfiguration::Rustls(Arc::new(config)))
}
