//! Deploying and undeploying local instances as one step each: allocate an
//! address, plumb the veth, program the dataplane, rewrite NAT and save the
//! state file -- and on any failure undo exactly what was done, because a
//! half-deployed container is worse than a failed one.

use std::net::IpAddr;
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::addresses::{AddressPair, Subnet};
use crate::cluster_link::{ClusterLink, QueryKey};
use crate::error::{NodeError, NodeResult, bad};
use crate::forwarding::Forwarding;
use crate::local::LocalState;
use crate::plumbing::{self, NetnsRef, Plumbing, nft};
use crate::resolver::Resolver;
use crate::routes::Routes;
use crate::state::{Deployment, DeploymentKind};
use crate::uplink::{Uplink, UplinkChange};
use worker_common::netmanager_api::{DeployAnswer, DeployRequest};
use worker_common::task_id::{task_id, validate_job_name};

mod nat;
pub use nat::NatWriter;
use nat::nat_rules;

/// How far a deployment got, so a failure undoes exactly that much.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Allocated,
    Plumbed,
    Programmed,
    Recorded,
}

pub struct Deployer {
    pub(crate) subnet: Subnet,
    pub(crate) local: Arc<LocalState>,
    pub(crate) routes: Arc<Routes>,
    pub(crate) resolver: Arc<Resolver>,
    pub(crate) link: ClusterLink,
    pub(crate) fwd: Arc<dyn Forwarding>,
    pub(crate) net: Plumbing,
    pub(crate) uplink: Arc<Uplink>,
    /// Serialises deploy/undeploy so plumbing, NAT and the state file agree.
    pub(crate) ops: tokio::sync::Mutex<()>,
    pub(crate) nat: Arc<NatWriter>,
}

/// Job names name files, namespaces and MQTT topics: the shared rule.
pub fn validate_service_name(name: &str) -> NodeResult<()> {
    validate_job_name(name).map_err(|e| NodeError::BadRequest(format!("serviceName: {e}")))
}

impl Deployer {
    /// `/container/deploy` and `/unikernel/deploy`.
    pub async fn deploy(
        self: &Arc<Self>,
        req: &DeployRequest,
        kind: DeploymentKind,
    ) -> NodeResult<DeployAnswer> {
        validate_service_name(&req.service_name)?;
        let ports = nft::parse_port_mappings(&req.port_mappings)
            .map_err(|e| NodeError::BadRequest(format!("{e:#}")))?;
        if kind == DeploymentKind::Container && req.pid == 0 {
            return bad("pid must be the container's process id");
        }
        let _op = self.ops.lock().await;
        let key = task_id(&req.service_name, req.instance_number);
        if let Some(existing) = self.local.get(&key) {
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
        let addrs = self.local.allocate()?;
        let mut d = Deployment {
            service_name: req.service_name.clone(),
            instance: req.instance_number,
            kind,
            pid: req.pid,
            netns: (kind == DeploymentKind::Unikernel).then(|| key.clone()),
            host_ifname: plumbing::host_ifname(&self.subnet, addrs.v4),
            host_ifindex: 0,
            mac: [0; 6],
            addresses: addrs,
            port_mappings: req.port_mappings.clone(),
            ports,
        };
        let mut reached = Stage::Allocated;
        if let Err(e) = self.bring_up(&mut d, &target, &mut reached).await {
            let _ = self.tear_down(&d, reached).await;
            return Err(e.into());
        }
        tracing::info!(%key, nsip = %addrs.v4, nsipv6 = %addrs.v6, veth = %d.host_ifname, "deployed");
        self.announce_deployed(&d);
        Ok(answer(&d))
    }

    async fn bring_up(
        &self,
        d: &mut Deployment,
        target: &NetnsRef,
        reached: &mut Stage,
    ) -> Result<()> {
        let attached = self
            .plumb(target, &d.host_ifname, d.addresses, d.kind)
            .await?;
        d.host_ifindex = attached.host_ifindex;
        d.mac = attached.mac;
        *reached = Stage::Plumbed;
        self.program(d)
            .with_context(|| format!("programming the dataplane for {}", d.key()))?;
        *reached = Stage::Programmed;
        self.local.insert(d.clone());
        *reached = Stage::Recorded;
        self.update_nat().await?;
        self.local.save().await
    }

    /// Undo a deployment down from `reached`; the result is that of
    /// rewriting NAT and the state file (the rest only logs).
    async fn tear_down(&self, d: &Deployment, reached: Stage) -> Result<()> {
        let mut saved = Ok(());
        if reached >= Stage::Recorded {
            self.local.remove(&d.key());
            saved = match self.update_nat().await {
                Ok(()) => self.local.save().await,
                Err(e) => Err(e),
            };
        }
        if reached >= Stage::Programmed {
            self.unprogram(d);
        }
        if reached >= Stage::Plumbed {
            self.unplumb(d).await;
        }
        self.local.release(d.addresses.v4);
        saved
    }

    /// `/container/undeploy`; false when the instance was not deployed here.
    pub async fn undeploy(&self, service_name: &str, instance: u32) -> NodeResult<bool> {
        validate_service_name(service_name)?;
        let _op = self.ops.lock().await;
        let key = task_id(service_name, instance);
        let Some(d) = self.local.get(&key) else {
            tracing::info!(%key, "undeploy of an unknown instance");
            return Ok(false);
        };
        let saved = self.tear_down(&d, Stage::Recorded).await;
        self.link.release_holder(&key);
        self.routes.reapply(&d.service_name);
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

    async fn plumb(
        &self,
        target: &NetnsRef,
        host_ifname: &str,
        addrs: AddressPair,
        kind: DeploymentKind,
    ) -> Result<plumbing::Attached> {
        if let NetnsRef::Named(name) = target {
            plumbing::netns::create_named(name).await?;
        }
        let attached = self
            .net
            .attach(target, host_ifname, addrs, &self.subnet)
            .await;
        let mut attached = match (attached, target) {
            (Ok(a), _) => a,
            (Err(e), NetnsRef::Named(name)) => {
                let _ = plumbing::netns::delete_named(name);
                return Err(e);
            }
            (Err(e), _) => return Err(e),
        };
        if let (DeploymentKind::Unikernel, NetnsRef::Named(name)) = (kind, target) {
            match plumbing::unikernel_tap(name).await {
                // The guest owns the instance address behind this MAC.
                Ok(mac) => attached.mac = mac,
                Err(e) => {
                    let _ = self.net.delete_link(host_ifname).await;
                    let _ = plumbing::netns::delete_named(name);
                    return Err(e);
                }
            }
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
        self.routes.write_local_entries(d)?;
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

    /// Rewrite the node's NAT table from the deployments (off the async
    /// workers). When the rules are what the table already holds (a
    /// deployment without port mappings came or went), the rewrite runs in
    /// the background instead -- it still repairs a table or FORWARD rule
    /// someone removed -- and the deployment does not wait for it.
    pub async fn update_nat(&self) -> Result<()> {
        let (nat, local, subnet) = (self.nat.clone(), self.local.clone(), self.subnet);
        if nat.unchanged(&nat_rules(&local, &subnet)) {
            tokio::task::spawn_blocking(move || {
                if let Err(e) = nat.write(&local, &subnet) {
                    tracing::warn!("rewriting NAT: {e:#}");
                }
            });
            return Ok(());
        }
        tokio::task::spawn_blocking(move || nat.write(&local, &subnet))
            .await
            .context("rewriting NAT")?
    }

    /// Publish service/deployed and learn the job's own table early, so the
    /// container's instance address is known before it sends anything.
    fn announce_deployed(&self, d: &Deployment) {
        let (link, resolver, uplink) = (
            self.link.clone(),
            self.resolver.clone(),
            self.uplink.clone(),
        );
        let d = d.clone();
        tokio::spawn(async move {
            let published = link
                .publish_deployed(
                    &d.service_name,
                    d.instance,
                    d.addresses,
                    uplink.ip(),
                    uplink.port(),
                )
                .await;
            if let Err(e) = published {
                tracing::warn!("announcing {}: {e:#}", d.key());
            }
            if let Err(e) = link.hold_interest(&d.service_name, &d.key()).await {
                tracing::warn!("interest in {}: {e:#}", d.service_name);
            }
            if let Err(e) = resolver
                .refresh(QueryKey::Job(d.service_name.clone()))
                .await
            {
                tracing::info!("own table of {}: {e:#}", d.key());
            }
        });
    }

    /// Take back deployments from the state file whose interface survived.
    pub async fn adopt(&self, saved: Vec<Deployment>) {
        for d in saved {
            if let Some(d) = self.adopt_one(d).await {
                tracing::info!(key = %d.key(), nsip = %d.addresses.v4, "adopted");
                let (link, resolver, job, key) = (
                    self.link.clone(),
                    self.resolver.clone(),
                    d.service_name.clone(),
                    d.key(),
                );
                tokio::spawn(async move {
                    if let Err(e) = link.hold_interest(&job, &key).await {
                        tracing::warn!("interest in {job}: {e:#}");
                    }
                    if let Err(e) = resolver.refresh(QueryKey::Job(job.clone())).await {
                        tracing::info!("table of {job}: {e:#}");
                    }
                });
            }
        }
    }

    async fn adopt_one(&self, mut d: Deployment) -> Option<Deployment> {
        let key = d.key();
        match self.net.link_by_name(&d.host_ifname).await {
            Ok(Some(link)) => d.host_ifindex = link.header.index,
            Ok(None) => {
                tracing::info!(%key, "interface gone while we were down; dropping the deployment");
                if let Some(ns) = &d.netns {
                    let _ = plumbing::netns::delete_named(ns);
                }
                return None;
            }
            Err(e) => {
                tracing::warn!(%key, "checking {}: {e:#}", d.host_ifname);
                return None;
            }
        }
        if let Err(e) = self.local.reserve(d.addresses.v4) {
            tracing::warn!(%key, "cannot re-reserve address: {e:#}");
            return None;
        }
        d.ports = nft::parse_port_mappings(&d.port_mappings).unwrap_or_else(|e| {
            tracing::warn!(%key, "ignoring unreadable port mappings: {e:#}");
            Vec::new()
        });
        if let Err(e) = self.program(&d) {
            tracing::error!(%key, "re-programming the dataplane: {e:#}");
        }
        self.local.insert(d.clone());
        Some(d)
    }

    /// The uplink moved or the node address changed: the dataplane
    /// follows, and the cluster hears of a new address.
    pub async fn uplink_changed(&self, change: UplinkChange) {
        if let Some(ifname) = &change.interface {
            let ip = self.uplink.ip();
            match self.fwd.set_uplink(ifname, ip) {
                Ok(()) => {
                    tracing::info!(uplink = %ifname, node_ip = %ip, "dataplane follows the uplink")
                }
                Err(e) => {
                    tracing::error!(
                        "moving the dataplane to uplink {ifname}: {e:#}; retried at the next change or check"
                    );
                    self.uplink.retry_interface();
                }
            }
        }
        if let Some(ip) = change.address {
            self.address_changed(ip).await;
        }
    }

    /// The node address changed: reprogram and tell the cluster.
    async fn address_changed(&self, ip: IpAddr) {
        if let Err(e) = self.fwd.set_node_ip(ip) {
            tracing::warn!("writing the new node address {ip}: {e:#}");
        }
        for d in self.local.list() {
            if let Err(e) = self.routes.write_local_entries(&d) {
                tracing::warn!("updating {}: {e:#}", d.key());
            }
            let published = self
                .link
                .publish_address_changed(&d.service_name, d.instance, ip, self.uplink.port())
                .await;
            if let Err(e) = published {
                tracing::warn!("announcing new address of {}: {e:#}", d.key());
            }
        }
    }
}

fn answer(d: &Deployment) -> DeployAnswer {
    DeployAnswer {
        service_name: d.service_name.clone(),
        ns_address: d.addresses.v4.to_string(),
        ns_address_v6: d.addresses.v6.to_string(),
    }
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
