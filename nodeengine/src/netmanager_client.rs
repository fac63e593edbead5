//! Client of NetManager's local API: HTTP/1.1 over a unix socket (contract 2.2).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::UnixStream;
pub use worker_common::netmanager_api::{DeployAnswer, DeployRequest, UndeployRequest};
use worker_common::netmanager_api::{RegisterRequest, routes};

#[derive(Debug, Clone)]
pub struct NetManagerClient {
    socket: PathBuf,
    timeout: Duration,
}

impl NetManagerClient {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        NetManagerClient {
            socket: socket.into(),
            timeout: Duration::from_secs(30),
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
        let raw = self.post(routes::CONTAINER_DEPLOY, body).await?;
        // An empty or odd answer is not fatal: the netns is configured either way.
        Ok(serde_json::from_slice(&raw).unwrap_or_default())
    }

    pub async fn undeploy_container(&self, body: &UndeployRequest) -> Result<()> {
        self.post(routes::CONTAINER_UNDEPLOY, body)
            .await
            .map(|_| ())
    }

    pub async fn deploy_unikernel(&self, body: &DeployRequest) -> Result<DeployAnswer> {
        let raw = self.post(routes::UNIKERNEL_DEPLOY, body).await?;
        Ok(serde_json::from_slice(&raw).unwrap_or_default())
    }

    pub async fn undeploy_unikernel(&self, body: &UndeployRequest) -> Result<()> {
        self.post(routes::UNIKERNEL_UNDEPLOY, body)
            .await
            .map(|_| ())
    }

    /// POSTs a JSON body; any non-2xx answer is an error carrying NetManager's text.
    async fn post<T: Serialize>(&self, path: &str, body: &T) -> Result<Bytes> {
        let json = serde_json::to_vec(body).context("encoding NetManager request")?;
        tokio::time::timeout(self.timeout, self.post_raw(path, json))
            .await
            .map_err(|_| {
                anyhow!(
                    "NetManager {} {path}: no answer within {:?}",
                    self.socket.display(),
                    self.timeout
                )
            })?
    }

    async fn post_raw(&self, path: &str, json: Vec<u8>) -> Result<Bytes> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .with_context(|| format!("connecting to NetManager at {}", self.socket.display()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP handshake with NetManager")?;
        let conn_task = tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::post(path)
            .header("host", "localhost")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(json)))
            .context("building NetManager request")?;
        let resp = sender
            .send_request(req)
            .await
            .with_context(|| format!("NetManager POST {path}"))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .with_context(|| format!("reading NetManager answer to {path}"))?
            .to_bytes();
        conn_task.abort();
        if !status.is_success() {
            return Err(anyhow!(
                "NetManager POST {path} answered {status}: {}",
                String::from_utf8_lossy(&bytes).trim()
            ));
        }
        Ok(bytes)
    }
}
