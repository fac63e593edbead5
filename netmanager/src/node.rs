//! The daemon's state machine: unregistered until the NodeEngine's
//! `/register`, then one `Node` holding the cluster link, the forwarding
//! plane, the bridge and every local deployment.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::task::JoinHandle;

use crate::addresses::{AddressPool, Subnet, V4_PREFIX, V6_PREFIX};
use crate::cluster_link::{ClusterLink, LinkEvent, LinkOptions, QueryKey, TableResult};
use crate::config::Settings;
use crate::dataplane::{DataplaneConfig, InstanceEntry, LocalPort, MapSizes};
use crate::forwarding::{Ebpf, Forwarding, InMemory};
use crate::plumbing::{self, NetnsRef, Plumbing, nft};
use crate::services::{LocalView, ServiceTables};
use crate::state::{self, Deployment, DeploymentKind, PersistedState};
pub use worker_common::netmanager_api::{DeployAnswer, DeployRequest};
use worker_common::task_id::task_id;

/// How an operation failed, for the HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The caller's fault (400).
    #[error("{0}")]
    BadRequest(String),
    /// Ours (500).
    #[error("{0:#}")]
    Failed(#[from] anyhow::Error),
}

pub type NodeResult<T> = std::result::Result<T, NodeError>;

fn bad<T>(msg: impl Into<String>) -> NodeResult<T> {
    Err(NodeError::BadRequest(msg.into()))
}

/// How long `/register` waits for the cluster to hand out a subnet.
const SUBNET_TIMEOUT: Duration = Duration::from_secs(30);

/// The whole daemon: registration state around an optional `Node`.
pub struct Daemon {
    settings: Arc<Settings>,
    node: tokio::sync::Mutex<Option<Arc<Node>>>,
}

impl Daemon {
    pub fn new(settings: Settings) -> Daemon {
        Daemon {
            settings: Arc::new(settings),
            node: tokio::sync::Mutex::new(None),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub async fn node(&self) -> Option<Arc<Node>> {
        self.node.lock().await.clone()
    }

    /// Re-create the node from the state file after a restart.
    pub async fn restore(&self) -> Result<()> {
        let Some(saved) = state::load(&self.settings.state_path)? else {
            return Ok(());
        };
        tracing::info!(node = %saved.node_id, deployments = saved.deployments.len(), "restoring from state file");
        let mut slot = self.node.lock().await;
        let node = Node::start(
            self.settings.clone(),
            &saved.node_id,
            &saved.cluster_address,
            Some(saved.subnet),
        )
        .await
        .context("restoring the registered node")?;
        node.adopt(saved.deployments).await;
        node.go_live()?;
        *slot = Some(node);
        Ok(())
    }

    /// `POST /register`.
    pub async fn register(&self, client_id: &str, cluster_address: &str) -> NodeResult<()> {
        if client_id.trim().is_empty() {
            return bad("client_id must not be empty");
        }
        let mut slot = self.node.lock().await;
        if let Some(node) = slot.as_ref() {
            if node.id == client_id {
                return Ok(());
            }
            return bad(format!(
                "already registered as {}, not {client_id}",
                node.id
            ));
        }
        let cluster = self
            .settings
            .net
            .cluster_url
            .clone()
            .unwrap_or_else(|| cluster_address.trim().to_string());
        if cluster.is_empty() || cluster == "0.0.0.0" {
            return bad("cluster_address missing and ClusterUrl not configured");
        }
        let node = Node::start(self.settings.clone(), client_id, &cluster, None).await?;
        node.go_live()?;
        *slot = Some(node);
        Ok(())
    }

    async fn registered(&self) -> NodeResult<Arc<Node>> {
        match self.node().await {
            Some(n) => Ok(n),
            None => bad("node not registered: POST /register first"),
        }
    }

    pub async fn deploy(
        &self,
        req: &DeployRequest,
        kind: DeploymentKind,
    ) -> NodeResult<DeployAnswer> {
        validate_service_name(&req.service_name)?;
        // Validate before touching anything; the rules are rebuilt from the stored string.
        nft::parse_port_mappings(&req.port_mappings)
            .map_err(|e| NodeError::BadRequest(format!("{e:#}")))?;
        if kind == DeploymentKind::Container && req.pid == 0 {
            return bad("pid must be the container's process id");
        }
        let node = self.registered().await?;
        node.deploy(req, kind).await
    }

    pub async fn undeploy(&self, service_name: &str, instance: u32) -> NodeResult<bool> {
        validate_service_name(service_name)?;
        let node = self.registered().await?;
        node.undeploy(service_name, instance).await
    }

    pub async fn status(&self) -> serde_json::Value {
        match self.node().await {
            None => serde_json::json!({"registered": false}),
            Some(n) => n.status(),
        }
    }
}

/// Job names name files, namespaces and MQTT topics: the shared rule.
pub fn validate_service_name(name: &str) -> NodeResult<()> {
    worker_common::task_id::validate_job_name(name)
        .map_err(|e| NodeError::BadRequest(format!("serviceName: {e}")))
}

struct Inner {
    pool: AddressPool,
    deployments: BTreeMap<String, Deployment>,
}

/// A registered node.
pub struct Node {
    settings: Arc<Settings>,
    pub id: String,
    pub cluster_address: String,
    pub subnet: Subnet,
    pub link: ClusterLink,
    pub fwd: Arc<dyn Forwarding>,
    net: Plumbing,
    uplink: String,
    node_ip: Mutex<Ipv4Addr>,
    inner: Mutex<Inner>,
    services: Mutex<ServiceTables>,
    /// Serialises deploy/undeploy so plumbing and the state file stay consistent.
    ops: tokio::sync::Mutex<()>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Link events wait here until the node is fully set up (see `go_live`).
    pending_events: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<LinkEvent>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Drop for Node {
    fn drop(&mut self) {
        for t in lock(&self.tasks).iter() {
            t.abort();
        }
    }
}

impl Node {
    /// Connect to the cluster, get (or reuse) the subnet, build the bridge and
    /// NAT, load the forwarding plane, start the background tasks.
    async fn start(
        settings: Arc<Settings>,
        id: &str,
        cluster: &str,
        subnet: Option<Subnet>,
    ) -> Result<Arc<Node>> {
        let mut opts = LinkOptions::new(id, cluster, settings.net.cluster_mqtt_port);
        if let (Some(c), Some(k)) = (&settings.net.mqtt_cert, &settings.net.mqtt_key) {
            opts.tls = Some((c.clone(), k.clone()));
        }
        let (link, events) = ClusterLink::connect(opts).context("starting the MQTT client")?;
        let subnet = match subnet {
            Some(s) => s,
            None => link.request_subnet(SUBNET_TIMEOUT).await?,
        };
        tracing::info!(node = id, subnet = %subnet.v4, subnet_v6 = %subnet.v6, "node subnet");
        let net = Plumbing::new(settings.tunnel_mtu)?;
        net.ensure_bridge(&subnet).await?;
        let preferred = settings
            .uplink
            .clone()
            .or_else(|| settings.net.default_interface.clone());
        let (uplink, inferred) = net.uplink(preferred.as_deref()).await?;
        let node_ip = settings.net.node_public_address.unwrap_or(inferred);
        if settings.net.public_ip_networking && settings.net.node_public_address.is_none() {
            tracing::warn!(
                "PublicIPNetworking needs an external lookup we do not do; using {node_ip}; set NodePublicAddress instead"
            );
        }
        let fwd = open_forwarding(&settings, &uplink, node_ip)?;
        fwd.set_node_ip(node_ip)?;
        let node = Arc::new(Node {
            settings: settings.clone(),
            id: id.to_string(),
            cluster_address: cluster.to_string(),
            subnet,
            link,
            fwd,
            net,
            uplink,
            node_ip: Mutex::new(node_ip),
            inner: Mutex::new(Inner {
                pool: AddressPool::new(subnet),
                deployments: BTreeMap::new(),
            }),
            services: Mutex::new(ServiceTables::new()),
            ops: tokio::sync::Mutex::new(()),
            tasks: Mutex::new(Vec::new()),
            pending_events: Mutex::new(None),
        });
        *lock(&node.pending_events) = Some(events);
        tracing::info!(node = id, uplink = %node.uplink, %node_ip, "registered");
        Ok(node)
    }

    /// Persist, program NAT and start the background tasks. Called once the
    /// node knows its deployments (after adoption on a restart), so neither
    /// the state file nor the NAT table is ever written without them, and no
    /// miss is handled before the local containers are known.
    fn go_live(self: &Arc<Self>) -> Result<()> {
        self.update_nat()?;
        self.save()?;
        let mut tasks = lock(&self.tasks);
        if let Some(events) = lock(&self.pending_events).take() {
            tasks.push(tokio::spawn(link_events(self.clone(), events)));
        }
        if let Some(rx) = self.fwd.take_misses() {
            tasks.push(tokio::spawn(crate::misses::run(self.clone(), rx)));
        }
        if self.settings.net.node_public_address.is_none() {
            tasks.push(tokio::spawn(crate::address_watch::run(
                self.clone(),
                crate::address_watch::period(),
            )));
        }
        let fwd = self.fwd.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            loop {
                tick.tick().await;
                match fwd.expire_flows() {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(flows = n, "expired idle flows"),
                    Err(e) => tracing::warn!("expiring flows: {e:#}"),
                }
            }
        }));
        Ok(())
    }

    pub fn node_ip(&self) -> Ipv4Addr {
        *lock(&self.node_ip)
    }

    pub fn tunnel_port(&self) -> u16 {
        self.settings.net.node_public_port
    }

    /// Interface the operator asked for (flag/env, else DefaultInterface).
    pub fn preferred_uplink(&self) -> Option<String> {
        self.settings
            .uplink
            .clone()
            .or_else(|| self.settings.net.default_interface.clone())
    }

    pub fn plumbing(&self) -> &Plumbing {
        &self.net
    }

    pub fn deployments(&self) -> Vec<Deployment> {
        lock(&self.inner).deployments.values().cloned().collect()
    }

    /// Local deployment owning a namespace address.
    pub fn deployment_by_ns(&self, ns: IpAddr) -> Option<Deployment> {
        lock(&self.inner)
            .deployments
            .values()
            .find(|d| IpAddr::V4(d.addresses.v4) == ns || IpAddr::V6(d.addresses.v6) == ns)
            .cloned()
    }

    pub fn view(&self) -> LocalView {
        let mut locals = HashMap::new();
        for d in lock(&self.inner).deployments.values() {
            let port = LocalPort {
                ifindex: d.host_ifindex,
                mac: d.mac,
            };
            locals.insert(IpAddr::V4(d.addresses.v4), port);
            locals.insert(IpAddr::V6(d.addresses.v6), port);
        }
        LocalView {
            node_ip: Some(self.node_ip()),
            node_port: self.tunnel_port(),
            locals,
        }
    }

    fn save(&self) -> Result<()> {
        let snapshot = PersistedState {
            node_id: self.id.clone(),
            cluster_address: self.cluster_address.clone(),
            subnet: self.subnet,
            deployments: self.deployments(),
        };
        state::save(&self.settings.state_path, &snapshot)
    }

    fn update_nat(&self) -> Result<()> {
        let containers = self
            .deployments()
            .iter()
            .filter_map(|d| {
                let mappings = nft::parse_port_mappings(&d.port_mappings).ok()?;
                (!mappings.is_empty()).then_some(nft::ContainerPorts {
                    v4: d.addresses.v4,
                    v6: d.addresses.v6,
                    mappings,
                })
            })
            .collect();
        nft::apply(&nft::Ruleset {
            bridge: plumbing::BRIDGE.to_string(),
            subnet_v4: (self.subnet.v4_network(), V4_PREFIX),
            subnet_v6: (self.subnet.v6_network(), V6_PREFIX),
            containers,
        })
    }

    /// INSTANCES entries for a local deployment; instance_ip from the job
    /// table when it is already known.
    fn write_local_entries(&self, d: &Deployment) -> Result<()> {
        let local = Some(LocalPort {
            ifindex: d.host_ifindex,
            mac: d.mac,
        });
        let services = lock(&self.services);
        for ns in [IpAddr::V4(d.addresses.v4), IpAddr::V6(d.addresses.v6)] {
            let entry = InstanceEntry {
                instance_ip: services.instance(ns).and_then(|e| e.instance_ip),
                node_ip: self.node_ip(),
                node_port: self.tunnel_port(),
                local,
            };
            self.fwd.upsert_instance(ns, entry)?;
        }
        Ok(())
    }

    async fn deploy(
        self: &Arc<Self>,
        req: &DeployRequest,
        kind: DeploymentKind,
    ) -> NodeResult<DeployAnswer> {
        let _op = self.ops.lock().await;
        let key = task_id(&req.service_name, req.instance_number);
        if let Some(existing) = lock(&self.inner).deployments.get(&key).cloned() {
            if existing.pid == req.pid && existing.kind == kind {
                // A retry of a deployment that already succeeded.
                return Ok(answer(&existing));
            }
            return bad(format!(
                "{key} is already deployed (pid {}); undeploy it first",
                existing.pid
            ));
        }
        let target = match kind {
            DeploymentKind::Container => NetnsRef::Pid(req.pid),
            DeploymentKind::Unikernel => NetnsRef::Named(key.clone()),
        };
        if let NetnsRef::Pid(_) = target
            && let Err(e) = target.open()
        {
            return bad(format!("{e:#}"));
        }
        let addrs = lock(&self.inner).pool.allocate()?;
        let host_ifname = plumbing::host_ifname(&self.subnet, addrs.v4);
        let result = self.plumb(&target, &host_ifname, addrs, kind).await;
        let attached = match result {
            Ok(a) => a,
            Err(e) => {
                lock(&self.inner).pool.release(addrs.v4);
                return Err(e.into());
            }
        };
        let d = Deployment {
            service_name: req.service_name.clone(),
            instance: req.instance_number,
            kind,
            pid: req.pid,
            netns: (kind == DeploymentKind::Unikernel).then(|| key.clone()),
            host_ifname: host_ifname.clone(),
            host_ifindex: attached.host_ifindex,
            mac: attached.mac,
            addresses: addrs,
            port_mappings: req.port_mappings.clone(),
        };
        if let Err(e) = self.program(&d) {
            self.unplumb(&d).await;
            lock(&self.inner).pool.release(addrs.v4);
            return Err(e
                .context(format!("programming the dataplane for {key}"))
                .into());
        }
        lock(&self.inner).deployments.insert(key.clone(), d.clone());
        if let Err(e) = self.update_nat().and_then(|_| self.save()) {
            // Roll back completely: a half-deployed container is worse than a failed one.
            lock(&self.inner).deployments.remove(&key);
            self.unprogram(&d);
            self.unplumb(&d).await;
            lock(&self.inner).pool.release(addrs.v4);
            let _ = self.update_nat();
            let _ = self.save();
            return Err(e.into());
        }
        tracing::info!(%key, nsip = %addrs.v4, nsipv6 = %addrs.v6, veth = %host_ifname, "deployed");
        self.announce_deployed(&d);
        Ok(answer(&d))
    }

    async fn plumb(
        &self,
        target: &NetnsRef,
        host_ifname: &str,
        addrs: crate::addresses::AddressPair,
        kind: DeploymentKind,
    ) -> Result<plumbing::Attached> {
        if let NetnsRef::Named(name) = target {
            plumbing::netns::create_named(name).await?;
        }
        let attached = self
            .net
            .attach(target, host_ifname, addrs, &self.subnet)
            .await;
        let attached = match (attached, target) {
            (Ok(a), _) => a,
            (Err(e), NetnsRef::Named(name)) => {
                let _ = plumbing::netns::delete_named(name);
                return Err(e);
            }
            (Err(e), _) => return Err(e),
        };
        if let (DeploymentKind::Unikernel, NetnsRef::Named(name)) = (kind, target)
            && let Err(e) = plumbing::configure_unikernel_ns(name, addrs.v4).await
        {
            let _ = self.net.delete_link(host_ifname).await;
            let _ = plumbing::netns::delete_named(name);
            return Err(e);
        }
        Ok(attached)
    }

    async fn unplumb(&self, d: &Deployment) {
        if let Err(e) = self.net.delete_link(&d.host_ifname).await {
            tracing::warn!("removing {}: {e:#}", d.host_ifname);
        }
        if let Some(ns) = &d.netns
            && let Err(e) = plumbing::netns::delete_named(ns)
        {
            tracing::warn!("removing namespace {ns}: {e:#}");
        }
    }

    /// Dataplane side of a deployment: entries first, then the program, so
    /// the first packet already finds its sender.
    fn program(&self, d: &Deployment) -> Result<()> {
        self.write_local_entries(d)?;
        self.fwd.attach_container(&d.host_ifname)
    }

    fn unprogram(&self, d: &Deployment) {
        if let Err(e) = self.fwd.detach_container(&d.host_ifname) {
            tracing::warn!("detaching {}: {e:#}", d.host_ifname);
        }
        for ns in [IpAddr::V4(d.addresses.v4), IpAddr::V6(d.addresses.v6)] {
            if let Err(e) = self.fwd.remove_instance(ns) {
                tracing::warn!("removing instance {ns}: {e:#}");
            }
        }
    }

    /// Publish service/deployed and learn the job's own table early, so the
    /// container's instance_ip is known before it sends anything.
    fn announce_deployed(self: &Arc<Self>, d: &Deployment) {
        let node = self.clone();
        let d = d.clone();
        tokio::spawn(async move {
            if let Err(e) = node
                .link
                .publish_deployed(
                    &d.service_name,
                    d.instance,
                    d.addresses,
                    node.node_ip(),
                    node.tunnel_port(),
                )
                .await
            {
                tracing::warn!("announcing {}: {e:#}", d.key());
            }
            if let Err(e) = node.link.hold_interest(&d.service_name, &d.key()).await {
                tracing::warn!("interest in {}: {e:#}", d.service_name);
            }
            if let Err(e) = node.refresh(QueryKey::Job(d.service_name.clone())).await {
                tracing::info!("own table of {}: {e:#}", d.key());
            }
        });
    }

    async fn undeploy(self: &Arc<Self>, service_name: &str, instance: u32) -> NodeResult<bool> {
        let _op = self.ops.lock().await;
        let key = task_id(service_name, instance);
        let Some(d) = lock(&self.inner).deployments.remove(&key) else {
            tracing::info!(%key, "undeploy of an unknown instance");
            return Ok(false);
        };
        self.unprogram(&d);
        self.unplumb(&d).await;
        lock(&self.inner).pool.release(d.addresses.v4);
        let saved = self.update_nat().and_then(|_| self.save());
        self.link.release_holder(&key);
        let view = self.view();
        if let Err(e) = lock(&self.services).reapply(self.fwd.as_ref(), &d.service_name, &view) {
            tracing::warn!(
                "updating routes of {} after undeploy: {e:#}",
                d.service_name
            );
        }
        let link = self.link.clone();
        let (job, inst) = (d.service_name.clone(), d.instance);
        tokio::spawn(async move {
            if let Err(e) = link.publish_undeployed(&job, inst).await {
                tracing::warn!("announcing undeploy of {job}.{inst}: {e:#}");
            }
        });
        tracing::info!(%key, "undeployed");
        saved.map_err(NodeError::Failed)?;
        Ok(true)
    }

    /// Take back deployments from the state file whose interface survived.
    async fn adopt(self: &Arc<Self>, saved: Vec<Deployment>) {
        for mut d in saved {
            let key = d.key();
            match self.net.link_by_name(&d.host_ifname).await {
                Ok(Some(link)) => d.host_ifindex = link.header.index,
                Ok(None) => {
                    tracing::info!(%key, "interface gone while we were down; dropping the deployment");
                    if let Some(ns) = &d.netns {
                        let _ = plumbing::netns::delete_named(ns);
                    }
                    continue;
                }
                Err(e) => {
                    tracing::warn!(%key, "checking {}: {e:#}", d.host_ifname);
                    continue;
                }
            }
            if let Err(e) = lock(&self.inner).pool.reserve(d.addresses.v4) {
                tracing::warn!(%key, "cannot re-reserve address: {e:#}");
                continue;
            }
            if let Err(e) = self.program(&d) {
                tracing::error!(%key, "re-programming the dataplane: {e:#}");
            }
            lock(&self.inner).deployments.insert(key.clone(), d.clone());
            tracing::info!(%key, nsip = %d.addresses.v4, "adopted");
            let node = self.clone();
            tokio::spawn(async move {
                if let Err(e) = node.link.hold_interest(&d.service_name, &d.key()).await {
                    tracing::warn!("interest in {}: {e:#}", d.service_name);
                }
                if let Err(e) = node.refresh(QueryKey::Job(d.service_name.clone())).await {
                    tracing::info!("table of {}: {e:#}", d.service_name);
                }
            });
        }
    }

    /// Query the cluster and write what it answers; keeps an interest in the job.
    pub async fn refresh(&self, key: QueryKey) -> Result<Arc<TableResult>> {
        let result = self.link.table_query(&key).await?;
        self.apply(&result)?;
        if !result.app_name.is_empty() {
            let holders: Vec<String> = lock(&self.inner).deployments.keys().cloned().collect();
            if holders.is_empty() {
                self.link.register_interest(&result.app_name).await?;
            }
            for h in holders {
                self.link.hold_interest(&result.app_name, &h).await?;
            }
        }
        Ok(result)
    }

    /// instance_ip written for a namespace address, if a table listed it.
    pub fn known_instance_ip(&self, ns: IpAddr) -> Option<IpAddr> {
        lock(&self.services)
            .instance(ns)
            .and_then(|e| e.instance_ip)
    }

    pub fn apply(&self, result: &TableResult) -> Result<()> {
        let view = self.view();
        lock(&self.services).apply(self.fwd.as_ref(), result, &view)
    }

    /// The node address changed: reprogram and tell the cluster.
    pub async fn set_node_ip(&self, ip: Ipv4Addr) -> Result<()> {
        let old = std::mem::replace(&mut *lock(&self.node_ip), ip);
        if old == ip {
            return Ok(());
        }
        tracing::info!(%old, new = %ip, "node address changed");
        self.fwd.set_node_ip(ip)?;
        for d in self.deployments() {
            if let Err(e) = self.write_local_entries(&d) {
                tracing::warn!("updating {}: {e:#}", d.key());
            }
            if let Err(e) = self
                .link
                .publish_address_changed(&d.service_name, d.instance, ip, self.tunnel_port())
                .await
            {
                tracing::warn!("announcing new address of {}: {e:#}", d.key());
            }
        }
        Ok(())
    }

    pub fn status(&self) -> serde_json::Value {
        let dp = match self.fwd.status() {
            Ok(s) => serde_json::to_value(s).unwrap_or_default(),
            Err(e) => serde_json::json!({"error": format!("{e:#}")}),
        };
        let (instances, services) = lock(&self.services).counts();
        let deployments: Vec<_> = self
            .deployments()
            .iter()
            .map(|d| {
                serde_json::json!({
                    "serviceName": d.service_name, "instance": d.instance, "kind": d.kind,
                    "pid": d.pid, "veth": d.host_ifname, "nsAddress": d.addresses.v4.to_string(),
                    "nsAddressv6": d.addresses.v6.to_string(), "portMappings": d.port_mappings,
                })
            })
            .collect();
        serde_json::json!({
            "registered": true,
            "node_id": self.id,
            "cluster_address": self.cluster_address,
            "subnet": format!("{}/{V4_PREFIX}", self.subnet.v4),
            "subnet_v6": format!("{}/{V6_PREFIX}", self.subnet.v6),
            "node_ip": self.node_ip().to_string(),
            "tunnel_port": self.tunnel_port(),
            "uplink": self.uplink,
            "deployments": deployments,
            "interests": self.link.interests(),
            "routes": {"jobs": lock(&self.services).jobs(), "instances": instances, "services": services},
            "dataplane": dp,
        })
    }
}

fn answer(d: &Deployment) -> DeployAnswer {
    DeployAnswer {
        service_name: d.service_name.clone(),
        ns_address: d.addresses.v4.to_string(),
        ns_address_v6: d.addresses.v6.to_string(),
    }
}

fn open_forwarding(
    settings: &Settings,
    uplink: &str,
    node_ip: Ipv4Addr,
) -> Result<Arc<dyn Forwarding>> {
    if settings.no_dataplane {
        tracing::warn!("running without the eBPF dataplane: no overlay traffic will flow");
        return Ok(Arc::new(InMemory::default()));
    }
    let cfg = DataplaneConfig {
        pin_dir: settings.bpf_dir.clone(),
        uplink: uplink.to_string(),
        node_ip,
        tunnel_port: settings.net.node_public_port,
        tunnel_mtu: settings.tunnel_mtu,
        service_ranges: service_ranges(),
        sizes: MapSizes {
            flows: settings.net.tables.flows,
            services: settings.net.tables.services,
            backends: settings.net.tables.backends,
            instances: settings.net.tables.instances,
            pending: settings.net.tables.pending,
        },
        miss_hold: settings.net.tables.miss_hold,
    };
    Ok(Arc::new(Ebpf::open(&cfg)?))
}

/// Service address ranges: 10.30.0.0/16 (contract 2.4), the contract's IPv6
/// proxy subnet fcef::/21, and fdff::/16, which upstream clusters actually
/// hand out (see the table query fixture).
fn service_ranges() -> Vec<(IpAddr, u8)> {
    vec![
        (IpAddr::V4(Ipv4Addr::new(10, 30, 0, 0)), 16),
        (
            IpAddr::V6("fcef::".parse().unwrap_or(std::net::Ipv6Addr::UNSPECIFIED)),
            21,
        ),
        (
            IpAddr::V6("fdff::".parse().unwrap_or(std::net::Ipv6Addr::UNSPECIFIED)),
            16,
        ),
    ]
}

/// React to what the cluster link reports.
async fn link_events(node: Arc<Node>, mut events: tokio::sync::mpsc::UnboundedReceiver<LinkEvent>) {
    let mut connected_before = false;
    while let Some(ev) = events.recv().await {
        match ev {
            LinkEvent::JobUpdated(job) => {
                let n = node.clone();
                tokio::spawn(async move {
                    if let Err(e) = n.refresh(QueryKey::Job(job.clone())).await {
                        tracing::warn!("refreshing {job} after an update: {e:#}");
                    }
                });
            }
            LinkEvent::InterestDropped(job) => {
                let view = node.view();
                lock(&node.services).forget(node.fwd.as_ref(), &job, &view);
            }
            LinkEvent::Unsolicited(result) => {
                // Only keep tables we route for; others are someone's late answer.
                let known = lock(&node.services).jobs().contains(&result.app_name);
                if known && let Err(e) = node.apply(&result) {
                    tracing::warn!("{e:#}");
                }
            }
            LinkEvent::Connected => {
                if connected_before {
                    // Updates may have been missed while the broker was away.
                    let jobs = lock(&node.services).jobs();
                    for job in jobs {
                        let n = node.clone();
                        tokio::spawn(async move {
                            if let Err(e) = n.refresh(QueryKey::Job(job.clone())).await {
                                tracing::info!("refreshing {job} after reconnect: {e:#}");
                            }
                        });
                    }
                }
                connected_before = true;
            }
        }
    }
    tracing::debug!("cluster link event stream ended");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names() {
        assert!(validate_service_name("a.b.c.d").is_ok());
        for bad in ["a.b.c", "a.b.c.d.e", "a..c.d", "", "a.b.c.", "a b.c.d.e"] {
            assert!(validate_service_name(bad).is_err(), "{bad}");
        }
    }
}
