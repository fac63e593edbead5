//! A registered node: its identity and subnet, and the parts that do the
//! work -- the cluster link, the forwarding plane, the local instances, the
//! routes, the resolver and the deployer -- wired together once, here.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::addresses::{Subnet, V4_PREFIX, V6_PREFIX};
use crate::cluster_link::{ClusterLink, LinkEvent, LinkOptions};
use crate::config::Settings;
use crate::dataplane::DataplaneConfig;
use crate::deployer::Deployer;
use crate::forwarding::{Ebpf, Forwarding, InMemory};
use crate::local::{Identity, LocalState};
use crate::plumbing::{NetnsRef, Plumbing};
use crate::resolver::Resolver;
use crate::routes::{Limits, Routes};
use crate::state::Deployment;
use crate::status::{DataplaneReport, DeploymentStatus, NodeStatus, RouteCounts};
use crate::uplink::{Uplink, UplinkChange, UplinkOptions};

/// How long registration waits for the cluster to hand out a subnet.
const SUBNET_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Node {
    pub settings: Arc<Settings>,
    pub link: ClusterLink,
    pub fwd: Arc<dyn Forwarding>,
    pub net: Plumbing,
    pub uplink: Arc<Uplink>,
    pub local: Arc<LocalState>,
    pub routes: Arc<Routes>,
    pub resolver: Arc<Resolver>,
    pub deployer: Arc<Deployer>,
}

impl Node {
    /// Connect to the cluster, get (or reuse) the subnet, build the bridge,
    /// load the forwarding plane. Returns the link's events for the
    /// supervisor, which starts the background work once the node is live.
    pub async fn start(
        settings: Arc<Settings>,
        id: &str,
        cluster: &str,
        subnet: Option<Subnet>,
        saved: &[Deployment],
    ) -> Result<(Arc<Node>, tokio::sync::mpsc::Receiver<LinkEvent>)> {
        let mut opts = LinkOptions::new(id, cluster, settings.net.cluster_mqtt_port);
        opts.tls = mqtt_tls(&settings);
        opts.credentials = mqtt_credentials(&settings)?;
        let (link, events) = ClusterLink::connect(opts).context("starting the MQTT client")?;
        let subnet = match subnet {
            Some(s) => s,
            None => link.request_subnet(SUBNET_TIMEOUT).await?,
        };
        tracing::info!(node = id, subnet = %subnet.v4, subnet_v6 = %subnet.v6, "node subnet");
        if let Some((net, len)) = settings.service_ranges.collision(&subnet) {
            anyhow::bail!(
                "the service range {net}/{len} (tuncfg.json) contains this node's subnet {} / {}: \
                 container traffic would be taken for service traffic",
                subnet.v4,
                subnet.v6
            );
        }
        let xdp_delivery = settings.uplink_hook.redirects() && !settings.no_dataplane;
        let net = Plumbing::new(settings.tunnel_mtu)?.with_container_gro(xdp_delivery);
        if xdp_delivery {
            give_napi(saved).await;
        }
        net.ensure_bridge(&subnet).await?;
        let preferred = settings
            .uplink
            .clone()
            .or_else(|| settings.net.default_interface.clone());
        let uplink = Arc::new(
            Uplink::discover(
                &net,
                UplinkOptions {
                    preferred,
                    fixed_ip: settings.net.node_public_address,
                    // NodePublicAddress overrides PublicIPNetworking (upstream).
                    discovery_url: settings
                        .net
                        .public_ip_networking
                        .then(|| settings.public_ip_url.clone()),
                    port: settings.net.node_public_port,
                },
            )
            .await?,
        );
        let fwd = open_forwarding(&settings, &uplink.ifname(), uplink.ip())?;
        fwd.set_node_ip(uplink.ip())?;
        let identity = Identity {
            node_id: id.to_string(),
            cluster_address: cluster.to_string(),
            subnet,
        };
        let local = Arc::new(LocalState::new(identity, settings.state_path.clone()));
        let routes = Arc::new(Routes::new(
            fwd.clone(),
            local.clone(),
            uplink.clone(),
            route_limits(&settings),
            settings.service_ranges.clone(),
        ));
        let resolver = Arc::new(Resolver::new(link.clone(), routes.clone(), fwd.clone()));
        let deployer = Arc::new(Deployer {
            subnet,
            local: local.clone(),
            routes: routes.clone(),
            resolver: resolver.clone(),
            link: link.clone(),
            fwd: fwd.clone(),
            net: net.clone(),
            uplink: uplink.clone(),
            ops: tokio::sync::Mutex::new(()),
            nat: Default::default(),
        });
        tracing::info!(node = id, uplink = %uplink.ifname(), node_ip = %uplink.ip(), "registered");
        let node = Node {
            settings,
            link,
            fwd,
            net,
            uplink,
            local,
            routes,
            resolver,
            deployer,
        };
        Ok((Arc::new(node), events))
    }

    pub fn id(&self) -> &str {
        &self.local.identity().node_id
    }

    /// Take back the deployments of a previous run, then write NAT and the
    /// state file: neither is ever written without them.
    pub async fn go_live(&self, saved: Vec<Deployment>) -> Result<()> {
        self.deployer.adopt(saved).await;
        self.deployer.update_nat().await?;
        self.local.save().await
    }

    /// The uplink or the node address changed (uplink watch).
    pub async fn uplink_changed(&self, change: UplinkChange) {
        self.deployer.uplink_changed(change).await;
    }

    pub fn status(&self) -> NodeStatus {
        let identity = self.local.identity();
        let (instances, services) = self.routes.counts();
        NodeStatus {
            node_id: identity.node_id.clone(),
            cluster_address: identity.cluster_address.clone(),
            subnet: format!("{}/{V4_PREFIX}", identity.subnet.v4),
            subnet_v6: format!("{}/{V6_PREFIX}", identity.subnet.v6),
            node_ip: self.uplink.ip().to_string(),
            tunnel_port: self.uplink.port(),
            uplink: self.uplink.ifname(),
            deployments: self
                .local
                .list()
                .iter()
                .map(DeploymentStatus::from)
                .collect(),
            interests: self.link.interests(),
            routes: RouteCounts {
                jobs: self.routes.jobs().into_iter().collect(),
                instances,
                services,
            },
            resolver: self.resolver.stats(),
            mqtt: self.link.stats(),
            no_dataplane: self.settings.no_dataplane,
            dataplane: match self.fwd.status() {
                Ok(s) => DataplaneReport::Ok(s),
                Err(e) => DataplaneReport::Error {
                    error: format!("{e:#}"),
                },
            },
        }
    }
}

fn open_forwarding(
    settings: &Settings,
    uplink: &str,
    node_ip: IpAddr,
) -> Result<Arc<dyn Forwarding>> {
    if settings.no_dataplane {
        tracing::warn!("running without the eBPF dataplane: no overlay traffic will flow");
        return Ok(Arc::new(InMemory::default()));
    }
    let t = &settings.net.tables;
    let cfg = DataplaneConfig {
        pin_dir: settings.bpf_dir.clone(),
        uplink: uplink.to_string(),
        node_ip,
        // The local port (tuncfg.json's TunnelPort, else 50103);
        // NodePublicPort is only what the node advertises (behind NAT the
        // router forwards it here).
        tunnel_port: settings.tunnel_port,
        tunnel_mtu: settings.tunnel_mtu,
        service_ranges: settings.service_ranges.as_slice().to_vec(),
        sizes: t.map_sizes(),
        miss_hold: t.miss_hold,
        attach_mode: settings.attach_mode,
        uplink_hook: settings.uplink_hook,
        xdp_mode: settings.xdp_mode,
        container_bridge: crate::plumbing::BRIDGE.to_string(),
        trusted_peers: settings.net.tunnel_peers.clone(),
        flows_per_container: t.flows_per_container,
    };
    Ok(Arc::new(Ebpf::open(&cfg)?))
}

/// Room the tables may take in the maps: everything but what the local
/// instances need (two INSTANCES entries each for a full /26) and one
/// service's backend slice being replaced.
fn route_limits(settings: &Settings) -> Limits {
    let t = &settings.net.tables;
    let local_reserve = 2 * 64;
    let slice = usize::from(netmanager_common::MAX_BACKENDS);
    Limits {
        instances: (t.instances as usize).saturating_sub(local_reserve),
        services: t.services as usize,
        backends: (t.backends as usize).saturating_sub(slice),
    }
}

/// MQTTS when a client certificate, `MqttTls` or a CA is configured; the
/// broker is always verified (system roots plus the optional CA).
fn mqtt_tls(settings: &Settings) -> Option<worker_common::tls::ClientTls> {
    let net = &settings.net;
    let ca = net
        .mqtt_auth
        .ca
        .clone()
        .or_else(|| settings.mqtt_ca.clone());
    let identity = net.mqtt_cert.clone().zip(net.mqtt_key.clone());
    if !net.mqtt_auth.tls && ca.is_none() && identity.is_none() {
        return None;
    }
    let mut tls = worker_common::tls::ClientTls::system_roots();
    if let Some(ca) = ca {
        tls = tls.with_extra_ca(ca);
    }
    if let Some((cert, key)) = identity {
        tls = tls.with_identity(cert, key);
    }
    Some(tls)
}

/// Broker username and password (from a root-only file, so the secret is
/// not in netcfg.json itself).
fn mqtt_credentials(settings: &Settings) -> Result<Option<(String, String)>> {
    let auth = &settings.net.mqtt_auth;
    let Some(user) = &auth.username else {
        return Ok(None);
    };
    let password = match &auth.password_file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading MqttPasswordFile {}", path.display()))?
            .trim_end_matches(['\n', '\r'])
            .to_string(),
        None => String::new(),
    };
    Ok(Some((user.clone(), password)))
}

/// GRO on the container end of every deployment of a previous run, before
/// the dataplane opens and its XDP program delivers: a natively redirected
/// frame for a container end without NAPI is dropped by the kernel (a run
/// with another hook made these veths).
async fn give_napi(saved: &[Deployment]) {
    for d in saved {
        let target = match &d.netns {
            Some(name) => NetnsRef::Named(name.clone()),
            None => NetnsRef::Pid(d.pid),
        };
        if let Err(e) = crate::plumbing::enable_container_gro(&target).await {
            // Generic XDP still delivers to it; native redirects are lost.
            tracing::warn!(key = %d.key(), "GRO for XDP delivery: {e:#}");
        }
    }
}
