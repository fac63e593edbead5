//! The local API (contract 2.2): HTTP/1.1 over a root-only unix socket.
//!
//! Every answer is JSON; errors are `{"error": "..."}` with 400 for the
//! caller's mistakes, 404 for unknown routes and 500 for our failures. One
//! connection's bad request never affects another: each is served by its own
//! task and every failure becomes a response.

use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::UnixListener;

use crate::node::{Daemon, NodeError};
use crate::state::DeploymentKind;
use worker_common::netmanager_api::{
    DeployRequest, RegisterAnswer, RegisterRequest, UndeployAnswer, UndeployRequest,
};

/// Bodies are tiny; anything larger is not ours.
const MAX_BODY: usize = 64 * 1024;

/// Bind the socket (replacing a stale one) with mode 0600.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("removing stale socket {}", path.display()));
        }
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))?;
    Ok(listener)
}

/// Accept connections forever.
pub async fn serve(daemon: Arc<Daemon>, listener: UnixListener) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("accepting on the API socket: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let daemon = daemon.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let daemon = daemon.clone();
                async move { Ok::<_, Infallible>(handle(&daemon, req).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!("API connection: {e}");
            }
        });
    }
}

type Reply = Response<Full<Bytes>>;

fn json(status: StatusCode, value: &serde_json::Value) -> Reply {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn error(status: StatusCode, msg: impl std::fmt::Display) -> Reply {
    json(status, &serde_json::json!({ "error": msg.to_string() }))
}

fn from_node_error(e: NodeError) -> Reply {
    match e {
        NodeError::BadRequest(m) => error(StatusCode::BAD_REQUEST, m),
        NodeError::Failed(e) => {
            tracing::error!("request failed: {e:#}");
            error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
        }
    }
}

async fn handle(daemon: &Daemon, req: Request<Incoming>) -> Reply {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    tracing::debug!(%method, %path, "API request");
    let reply = route(daemon, &method, &path, req).await;
    if !reply.status().is_success() {
        tracing::info!(%method, %path, status = reply.status().as_u16(), "API request refused");
    }
    reply
}

async fn route(daemon: &Daemon, method: &Method, path: &str, req: Request<Incoming>) -> Reply {
    let path = path.trim_end_matches('/');
    match (method, path) {
        (&Method::GET, "/status") => json(StatusCode::OK, &daemon.status().await),
        (&Method::POST, "/register") => match body::<RegisterRequest>(req).await {
            Err(r) => r,
            Ok(b) => match daemon.register(&b.client_id, &b.cluster_address).await {
                Ok(()) => json(
                    StatusCode::OK,
                    &serde_json::to_value(RegisterAnswer {
                        client_id: b.client_id,
                    })
                    .unwrap_or_default(),
                ),
                Err(e) => from_node_error(e),
            },
        },
        (&Method::POST, "/container/deploy") => {
            deploy(daemon, req, DeploymentKind::Container).await
        }
        (&Method::POST, "/unikernel/deploy") => {
            deploy(daemon, req, DeploymentKind::Unikernel).await
        }
        (&Method::POST, "/container/undeploy" | "/docker/undeploy" | "/unikernel/undeploy") => {
            match body::<UndeployRequest>(req).await {
                Err(r) => r,
                Ok(b) => match daemon.undeploy(&b.service_name, b.instance_number).await {
                    Ok(found) => json(
                        StatusCode::OK,
                        &serde_json::to_value(UndeployAnswer {
                            service_name: b.service_name,
                            instance_number: b.instance_number,
                            undeployed: found,
                        })
                        .unwrap_or_default(),
                    ),
                    Err(e) => from_node_error(e),
                },
            }
        }
        (
            _,
            "/status"
            | "/register"
            | "/container/deploy"
            | "/unikernel/deploy"
            | "/container/undeploy"
            | "/docker/undeploy"
            | "/unikernel/undeploy",
        ) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} not allowed on {path}"),
        ),
        _ => error(StatusCode::NOT_FOUND, format!("no route {method} {path}")),
    }
}

async fn deploy(daemon: &Daemon, req: Request<Incoming>, kind: DeploymentKind) -> Reply {
    match body::<DeployRequest>(req).await {
        Err(r) => r,
        Ok(b) => match daemon.deploy(&b, kind).await {
            Ok(a) => json(StatusCode::OK, &serde_json::to_value(a).unwrap_or_default()),
            Err(e) => from_node_error(e),
        },
    }
}

/// Read and parse a JSON body; the error is a ready 400 reply.
async fn body<T: DeserializeOwned>(req: Request<Incoming>) -> std::result::Result<T, Reply> {
    let bytes = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!("reading the body: {e}"),
            ));
        }
    };
    serde_json::from_slice(&bytes)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("malformed JSON body: {e}")))
}

/// Client side, for `NetManager status`: GET a path over the socket.
pub async fn get(socket: &Path, path: &str) -> Result<(StatusCode, serde_json::Value)> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| {
            format!(
                "connecting to {} (is NetManager running?)",
                socket.display()
            )
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake")?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header(hyper::header::HOST, "localhost")
        .body(http_body_util::Empty::<Bytes>::new())
        .context("building the request")?;
    let resp = sender
        .send_request(req)
        .await
        .context("sending the request")?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .context("reading the answer")?
        .to_bytes();
    let value = serde_json::from_slice(&bytes).context("the answer is not JSON")?;
    Ok((status, value))
}
