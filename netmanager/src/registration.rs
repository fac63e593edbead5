//! The daemon's state machine: unregistered until NodeEngine's `/register`
//! (or a restart that finds the state file), then one live `Node` with the
//! supervisor that runs its background work.

use std::sync::Arc;

use anyhow::{Context, Result};

use crate::config::Settings;
use crate::error::{NodeResult, bad};
use crate::node::Node;
use crate::state::{self, DeploymentKind};
use crate::status::Status;
use crate::supervisor::Supervisor;
use worker_common::netmanager_api::{DeployAnswer, DeployRequest};

struct Live {
    node: Arc<Node>,
    /// Dropped with the node: stops its background tasks.
    _supervisor: Supervisor,
    /// False for a node restored from the state file until NodeEngine
    /// registers in this process: only then is its id confirmed.
    confirmed: bool,
}

pub struct Daemon {
    settings: Arc<Settings>,
    live: tokio::sync::Mutex<Option<Live>>,
}

impl Daemon {
    pub fn new(settings: Settings) -> Daemon {
        Daemon {
            settings: Arc::new(settings),
            live: tokio::sync::Mutex::new(None),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub async fn node(&self) -> Option<Arc<Node>> {
        self.live.lock().await.as_ref().map(|l| l.node.clone())
    }

    /// Re-create the node from the state file after a restart.
    pub async fn restore(&self) -> Result<()> {
        let Some(saved) = state::load(&self.settings.state_path)? else {
            return Ok(());
        };
        tracing::info!(node = %saved.node_id, deployments = saved.deployments.len(), "restoring from state file");
        let mut slot = self.live.lock().await;
        let live = self
            .start(
                &saved.node_id,
                &saved.cluster_address,
                Some(saved.subnet),
                saved.deployments,
            )
            .await
            .context("restoring the registered node")?;
        *slot = Some(live);
        Ok(())
    }

    /// `POST /register`.
    pub async fn register(&self, client_id: &str, cluster_address: &str) -> NodeResult<()> {
        if client_id.trim().is_empty() {
            return bad("client_id must not be empty");
        }
        let mut slot = self.live.lock().await;
        if let Some(live) = slot.as_mut() {
            if live.node.id() == client_id {
                live.confirmed = true;
                return Ok(());
            }
            if live.confirmed {
                return bad(format!(
                    "already registered as {}, not {client_id}",
                    live.node.id()
                ));
            }
        }
        // A different id at this process's first /register: the node joined
        // another cluster or its hostname changed (docs/contract.md §3).
        if let Some(old) = slot.take() {
            self.retire(old, client_id).await;
        }
        let cluster = self.cluster_for(cluster_address)?;
        let mut live = self.start(client_id, &cluster, None, Vec::new()).await?;
        live.confirmed = true;
        *slot = Some(live);
        Ok(())
    }

    /// Upstream's precedence: a non-empty cluster address in `/register`
    /// wins over the configured ClusterUrl.
    fn cluster_for(&self, cluster_address: &str) -> NodeResult<String> {
        let given = cluster_address.trim();
        if !given.is_empty() && given != "0.0.0.0" {
            return Ok(given.to_string());
        }
        match &self.settings.net.cluster_url {
            Some(url) => Ok(url.clone()),
            None => bad("cluster_address missing and ClusterUrl not configured"),
        }
    }

    /// Drop a restored identity that the cluster replaced: its deployments,
    /// routes and bridge go, so the new identity starts clean.
    async fn retire(&self, old: Live, new_id: &str) {
        tracing::warn!(
            old = old.node.id(),
            new = new_id,
            "registered under a new node id; dropping the previous identity's state"
        );
        for d in old.node.local.list() {
            if let Err(e) = old
                .node
                .deployer
                .undeploy(&d.service_name, d.instance)
                .await
            {
                tracing::warn!("removing {} of the previous identity: {e:#}", d.key());
            }
        }
        old.node.routes.forget_all();
        if let Err(e) = old.node.net.remove_bridge().await {
            tracing::warn!("removing the previous identity's bridge: {e:#}");
        }
        old.node.link.disconnect().await;
        state::remove(&self.settings.state_path);
    }

    async fn start(
        &self,
        id: &str,
        cluster: &str,
        subnet: Option<crate::addresses::Subnet>,
        saved: Vec<state::Deployment>,
    ) -> Result<Live> {
        let (node, events) =
            Node::start(self.settings.clone(), id, cluster, subnet, &saved).await?;
        node.go_live(saved).await?;
        let supervisor = Supervisor::start(&node, events, self.settings.address_check);
        Ok(Live {
            node,
            _supervisor: supervisor,
            confirmed: false,
        })
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
        crate::deployer::validate_service_name(&req.service_name)?;
        self.registered().await?.deployer.deploy(req, kind).await
    }

    pub async fn undeploy(&self, service_name: &str, instance: u32) -> NodeResult<bool> {
        crate::deployer::validate_service_name(service_name)?;
        self.registered()
            .await?
            .deployer
            .undeploy(service_name, instance)
            .await
    }

    /// The typed status; reading the maps runs off the async workers.
    pub async fn status(&self) -> Status {
        let Some(node) = self.node().await else {
            return Status::default();
        };
        match tokio::task::spawn_blocking(move || node.status()).await {
            Ok(status) => Status {
                registered: true,
                node: Some(status),
            },
            Err(e) => {
                tracing::warn!("collecting the status: {e}");
                Status {
                    registered: true,
                    node: None,
                }
            }
        }
    }

    /// Leave the broker politely; containers, bridge and dataplane stay.
    pub async fn shutdown(&self) {
        if let Some(node) = self.node().await {
            node.link.disconnect().await;
        }
    }
}
