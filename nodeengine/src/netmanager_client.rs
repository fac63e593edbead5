//! Client of NetManager's local API: HTTP/1.1 over a unix socket (contract 2.2).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;

/// A container or VM deployment request body.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeployBody<'a> {
    pub pid: u32,
    #[serde(rename = "serviceName")]
    pub service_name: &'a str,
    #[serde(rename = "instanceNumber")]
    pub instance_number: u32,
    #[serde(rename = "portMappings")]
    pub port_mappings: &'a str,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct UndeployBody<'a> {
    #[serde(rename = "serviceName")]
    pub service_name: &'a str,
    #[serde(rename = "instanceNumber")]
    pub instance_number: u32,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RegisterBody<'a> {
    pub client_id: &'a str,
    pub cluster_address: &'a str,
}

/// NetManager's answer to a deployment.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
pub struct DeployAnswer {
    #[serde(rename = "serviceName", default)]
    pub service_name: String,
    #[serde(rename = "nsAddress", default)]
    pub ns_address: String,
    #[serde(rename = "nsAddressv6", default)]
    pub ns_address_v6: String,
}

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
        let body = RegisterBody {
            client_id: node_id,
            cluster_address,
        };
        self.post("/register", &body).await.map(|_| ())
    }

    pub async fn deploy_container(&self, body: &DeployBody<'_>) -> Result<DeployAnswer> {
        let raw = self.post("/container/deploy", body).await?;
        // An empty or odd answer is not fatal: the netns is configured either way.
        Ok(serde_json::from_slice(&raw).unwrap_or_default())
    }

    pub async fn undeploy_container(&self, body: &UndeployBody<'_>) -> Result<()> {
        self.post("/container/undeploy", body).await.map(|_| ())
    }

    pub async fn deploy_unikernel(&self, body: &DeployBody<'_>) -> Result<DeployAnswer> {
        let raw = self.post("/unikernel/deploy", body).await?;
        Ok(serde_json::from_slice(&raw).unwrap_or_default())
    }

    pub async fn undeploy_unikernel(&self, body: &UndeployBody<'_>) -> Result<()> {
        self.post("/unikernel/undeploy", body).await.map(|_| ())
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
