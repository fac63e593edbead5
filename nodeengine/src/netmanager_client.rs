//! Client of NetManager's local API: HTTP/1.1 over a unix socket
//! (docs/contract.md, NetManager local API).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;
use worker_common::http;
pub use worker_common::netmanager_api::{DeployAnswer, DeployRequest, UndeployRequest};
use worker_common::netmanager_api::{RegisterRequest, routes};

/// NetManager plumbs a deployment's network before answering; give it time.
const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct NetManagerClient {
    socket: PathBuf,
    http: http::Client,
}

impl NetManagerClient {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        let socket = socket.into();
        NetManagerClient {
            http: http::Client::unix(&socket)
                .timeout(TIMEOUT)
                .user_agent(crate::cluster_link::USER_AGENT),
            socket,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub async fn register(&self, node_id: &str, cluster_address: &str) -> Result<()> {
        let body = RegisterRequest {
            client_id: node_id.to_string(),
            cluster_address: cluster_address.to_string(),
        };
        self.post(routes::REGISTER, &body).await.map(|_| ())
    }

    pub async fn deploy_container(&self, body: &DeployRequest) -> Result<DeployAnswer> {
        let answer = self.post(routes::CONTAINER_DEPLOY, body).await?;
        // An empty or odd answer is not fatal: the netns is configured either way.
        Ok(answer.json().unwrap_or_default())
    }

    pub async fn undeploy_container(&self, body: &UndeployRequest) -> Result<()> {
        self.post(routes::CONTAINER_UNDEPLOY, body)
            .await
            .map(|_| ())
    }

    pub async fn deploy_unikernel(&self, body: &DeployRequest) -> Result<DeployAnswer> {
        let answer = self.post(routes::UNIKERNEL_DEPLOY, body).await?;
        Ok(answer.json().unwrap_or_default())
    }

    pub async fn undeploy_unikernel(&self, body: &UndeployRequest) -> Result<()> {
        self.post(routes::UNIKERNEL_UNDEPLOY, body)
            .await
            .map(|_| ())
    }

    /// POSTs a JSON body; any non-2xx answer is an error carrying NetManager's text.
    async fn post<T: Serialize>(&self, route: &str, body: &T) -> Result<http::Response> {
        Ok(self.http.post_json(route, body).await?.success()?)
    }
}
