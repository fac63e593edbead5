//! The local API (docs/contract.md, NetManager local API): HTTP/1.1 over a
//! root-only unix socket, routed by axum.
//!
//! Every answer is JSON; errors are `{"error": "..."}` with 400 for the
//! caller's mistakes, 404 for unknown routes, 405 for a wrong method and 500
//! for our failures. Bodies are read as JSON whatever their content type
//! (upstream's clients do not always set one) and are capped in size.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::de::DeserializeOwned;
use tokio::net::UnixListener;

use crate::error::NodeError;
use crate::registration::Daemon;
use crate::state::DeploymentKind;
use crate::status::Status;
use worker_common::netmanager_api::{
    DeployAnswer, DeployRequest, ErrorBody, RegisterAnswer, RegisterRequest, UndeployAnswer,
    UndeployRequest, routes,
};

/// Bodies are tiny; anything larger is not ours.
const MAX_BODY: usize = 64 * 1024;

/// Bind the socket (replacing a stale one), created with mode 0600: the
/// umask is narrowed around `bind`, so there is no moment in which another
/// user could connect.
pub fn bind(path: &Path) -> Result<PeerCheckedListener> {
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
    // SAFETY: umask has no preconditions; the old mask is restored at once.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let inner = bound.with_context(|| format!("binding {}", path.display()))?;
    Ok(PeerCheckedListener { inner })
}

/// Serve until the listener fails.
pub async fn serve(daemon: Arc<Daemon>, listener: PeerCheckedListener) -> Result<()> {
    axum::serve(listener, router(daemon))
        .await
        .context("serving the API socket")
}

/// The API socket, accepting only root (and the daemon's own user): the
/// peer's credentials are checked on every connection (SO_PEERCRED), so a
/// socket whose mode was loosened by hand still refuses other users.
pub struct PeerCheckedListener {
    inner: UnixListener,
}

impl PeerCheckedListener {
    fn allowed(stream: &tokio::net::UnixStream) -> std::result::Result<(), String> {
        let cred = stream
            .peer_cred()
            .map_err(|e| format!("reading the peer's credentials: {e}"))?;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if cred.uid() == 0 || cred.uid() == me {
            Ok(())
        } else {
            Err(format!(
                "uid {} (pid {:?}) is not allowed",
                cred.uid(),
                cred.pid()
            ))
        }
    }
}

impl axum::serve::Listener for PeerCheckedListener {
    type Io = tokio::net::UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => match Self::allowed(&stream) {
                    Ok(()) => return (stream, addr),
                    Err(why) => tracing::warn!("API connection refused: {why}"),
                },
                Err(e) => {
                    tracing::warn!("accepting on the API socket: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// The watchdog's health probe (worker_common::systemd::spawn_watchdog):
/// `GET /status` answers on our own socket, so the runtime, the accept loop
/// and the daemon's state lock all work. Not `/readyz`: an unregistered
/// NetManager is not ready, but alive and must not be restarted.
pub async fn probe(socket: std::path::PathBuf) -> Result<(), String> {
    worker_common::http::Client::unix(&socket)
        .get_json::<Status>(routes::STATUS)
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

pub fn router(daemon: Arc<Daemon>) -> Router {
    Router::new()
        .route(routes::STATUS, get(status))
        .merge(health_routes())
        .route(routes::REGISTER, post(register))
        .route(routes::CONTAINER_DEPLOY, post(deploy_container))
        .route(routes::UNIKERNEL_DEPLOY, post(deploy_unikernel))
        .route(routes::CONTAINER_UNDEPLOY, post(undeploy))
        .route(routes::DOCKER_UNDEPLOY, post(undeploy))
        .route(routes::UNIKERNEL_UNDEPLOY, post(undeploy))
        .fallback(|req: Request| async move {
            error(
                StatusCode::NOT_FOUND,
                format!("no route {} {}", req.method(), req.uri().path()),
            )
        })
        .method_not_allowed_fallback(|req: Request| async move {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{} not allowed on {}", req.method(), req.uri().path()),
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(daemon)
}

type Shared = State<Arc<Daemon>>;

/// `/healthz`, `/readyz` and `/metrics`: on the API socket and on the
/// metrics listener.
fn health_routes() -> Router<Arc<Daemon>> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

/// The metrics and health listener (TCP, loopback by default).
pub fn metrics_router(daemon: Arc<Daemon>) -> Router {
    health_routes()
        .fallback(|req: Request| async move {
            error(
                StatusCode::NOT_FOUND,
                format!("no route {}", req.uri().path()),
            )
        })
        .with_state(daemon)
}

use worker_common::metrics::healthz;

/// Ready: registered, programs attached, broker connected (503 and the
/// reasons otherwise), for probes and scripts.
async fn readyz(State(daemon): Shared) -> Response {
    worker_common::metrics::readiness(daemon.status().await.not_ready())
}

async fn metrics(State(daemon): Shared) -> Response {
    worker_common::metrics::exposition(crate::metrics::render(&daemon.status().await))
}

async fn status(State(daemon): Shared) -> axum::Json<Status> {
    axum::Json(daemon.status().await)
}

async fn register(
    State(daemon): Shared,
    JsonBody(b): JsonBody<RegisterRequest>,
) -> Result<axum::Json<RegisterAnswer>, ApiError> {
    daemon.register(&b.client_id, &b.cluster_address).await?;
    Ok(axum::Json(RegisterAnswer {
        client_id: b.client_id,
    }))
}

async fn deploy_container(
    State(daemon): Shared,
    JsonBody(b): JsonBody<DeployRequest>,
) -> Result<axum::Json<DeployAnswer>, ApiError> {
    Ok(axum::Json(
        daemon.deploy(&b, DeploymentKind::Container).await?,
    ))
}

async fn deploy_unikernel(
    State(daemon): Shared,
    JsonBody(b): JsonBody<DeployRequest>,
) -> Result<axum::Json<DeployAnswer>, ApiError> {
    Ok(axum::Json(
        daemon.deploy(&b, DeploymentKind::Unikernel).await?,
    ))
}

async fn undeploy(
    State(daemon): Shared,
    JsonBody(b): JsonBody<UndeployRequest>,
) -> Result<axum::Json<UndeployAnswer>, ApiError> {
    let undeployed = daemon.undeploy(&b.service_name, b.instance_number).await?;
    Ok(axum::Json(UndeployAnswer {
        service_name: b.service_name,
        instance_number: b.instance_number,
        undeployed,
    }))
}

fn error(status: StatusCode, msg: impl std::fmt::Display) -> Response {
    let body = ErrorBody {
        error: msg.to_string(),
    };
    (status, axum::Json(body)).into_response()
}

/// A JSON body of any content type; a bad one is a JSON 400.
struct JsonBody<T>(T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| error(StatusCode::BAD_REQUEST, format!("reading the body: {e}")))?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| error(StatusCode::BAD_REQUEST, format!("malformed JSON body: {e}")))
    }
}

/// A node error as an answer.
struct ApiError(NodeError);

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self.0 {
            NodeError::BadRequest(m) => {
                tracing::info!("API request refused: {m}");
                error(StatusCode::BAD_REQUEST, m)
            }
            NodeError::Failed(e) => {
                tracing::error!("request failed: {e:#}");
                error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
            }
        }
    }
}
