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
        if let Some(live) = slot.as_ref() {
            if live.node.id() == client_id {
                return Ok(());
            }
            return bad(format!(
                "already registered as {}, not {client_id}",
                live.node.id()
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
        *slot = Some(self.start(client_id, &cluster, None, Vec::new()).await?);
        Ok(())
    }

    async fn start(
        &self,
        id: &str,
        cluster: &str,
        subnet: Option<crate::addresses::Subnet>,
        saved: Vec<state::Deployment>,
    ) -> Result<Live> {
        let (node, events) = Node::start(self.settings.clone(), id, cluster, subnet).await?;
        node.go_live(saved).await?;
        let supervisor = Supervisor::start(&node, events, self.settings.address_check);
        Ok(Live {
            node,
            _supervisor: supervisor,
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

    pub async fn status(&self) -> Status {
        let node = self.node().await;
        Status {
            registered: node.is_some(),
            node: node.map(|n| n.status()),
        }
    }

    /// Leave the broker politely; containers, bridge and dataplane stay.
    pub async fn shutdown(&self) {
        if let Some(node) = self.node().await {
            node.link.disconnect().await;
        }
    }
}
