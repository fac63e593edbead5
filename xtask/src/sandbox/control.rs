//! The running sandbox's control API: HTTP on a unix socket in its run
//! directory (root only), so `cargo xtask sandbox deploy|ps|logs|scale|
//! undeploy` in another shell reach the process that owns the workers.
//!
//! The server thread only parses requests; each call goes over a channel
//! to the thread that owns the sandbox, which answers it between its own
//! chores (`ControlServer::answer`). The client is the workers' shared
//! HTTP client (`worker_common::http`).
//!
//! | request | call |
//! |---|---|
//! | `POST /services` `{"sla": {...}, "instances": n}` | deploy |
//! | `GET /services` | ps |
//! | `POST /services/{job}/scale` `{"instances": n}` | scale |
//! | `GET /services/{job}/instances/{n}/logs` | logs |
//! | `DELETE /services/{job}` | undeploy |

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use axum::Json;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use worker_common::http::{Method, blocking};

/// The socket's name in the sandbox's run directory.
pub const SOCKET: &str = "control.sock";

/// Deploying waits for every instance (a worker may pull an image first).
const CALL_TIMEOUT: Duration = Duration::from_secs(600);

/// One thing asked of the sandbox.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Deploy { sla: Value, instances: u64 },
    Ps,
    Scale { service: String, instances: u64 },
    Logs { service: String, instance: u64 },
    Undeploy { service: String },
}

impl Op {
    /// One line for the sandbox's console.
    pub fn describe(&self) -> String {
        match self {
            Op::Deploy { sla, instances } => {
                let names: Vec<String> = sla["applications"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|a| a["microservices"].as_array().into_iter().flatten())
                    .filter_map(|m| m["microservice_name"].as_str().map(str::to_string))
                    .collect();
                format!("deploy {names:?}, {instances} instance(s) each")
            }
            Op::Ps => "ps".into(),
            Op::Scale { service, instances } => format!("scale {service} to {instances}"),
            Op::Logs { service, instance } => format!("logs of {service} instance {instance}"),
            Op::Undeploy { service } => format!("undeploy {service}"),
        }
    }
}

struct Call {
    op: Op,
    reply: tokio::sync::oneshot::Sender<Result<Value, String>>,
}

/// The server; stops and removes its socket on drop.
pub struct ControlServer {
    calls: mpsc::Receiver<Call>,
    socket: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Deserialize)]
struct DeployBody {
    sla: Value,
    #[serde(default = "one")]
    instances: u64,
}

#[derive(Deserialize)]
struct ScaleBody {
    instances: u64,
}

fn one() -> u64 {
    1
}

type Calls = mpsc::Sender<Call>;
type Answer = (StatusCode, Json<Value>);

impl ControlServer {
    /// Listens on `socket` (replacing a stale one), readable by root only.
    pub fn start(socket: &Path) -> Result<ControlServer> {
        let _ = std::fs::remove_file(socket);
        let std_listener = std::os::unix::net::UnixListener::bind(socket)
            .with_context(|| format!("binding {}", socket.display()))?;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("chmod {}", socket.display()))?;
        std_listener
            .set_nonblocking(true)
            .context("a non-blocking control socket")?;
        let (tx, calls) = mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("sandbox-control".into())
            .spawn(move || serve(std_listener, tx, stopped))
            .context("starting the control thread")?;
        Ok(ControlServer {
            calls,
            socket: socket.to_path_buf(),
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Waits up to `timeout` for a call and answers it with `handle`;
    /// whether there was one.
    pub fn answer(&self, timeout: Duration, handle: impl FnOnce(Op) -> Result<Value>) -> bool {
        let Ok(call) = self.calls.recv_timeout(timeout) else {
            return false;
        };
        let result = handle(call.op).map_err(|e| format!("{e:#}"));
        // The client may have given up; nothing to do then.
        let _ = call.reply.send(result);
        true
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn serve(
    listener: std::os::unix::net::UnixListener,
    calls: Calls,
    stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return eprintln!("control API: no runtime: {e}"),
    };
    rt.block_on(async move {
        let listener = match tokio::net::UnixListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => return eprintln!("control API: {e}"),
        };
        let app = axum::Router::new()
            .route("/services", post(deploy).get(ps))
            .route("/services/{job}", axum::routing::delete(undeploy))
            .route("/services/{job}/scale", post(scale))
            .route("/services/{job}/instances/{n}/logs", get(logs))
            .with_state(calls);
        let served = axum::serve(listener, app).with_graceful_shutdown(async {
            let _ = stopped.await;
        });
        if let Err(e) = served.await {
            eprintln!("control API stopped: {e}");
        }
    });
}

/// Hands `op` to the sandbox's thread and waits for its answer.
async fn call(calls: &Calls, op: Op) -> Answer {
    let (reply, answer) = tokio::sync::oneshot::channel();
    if calls.send(Call { op, reply }).is_err() {
        return failed(StatusCode::SERVICE_UNAVAILABLE, "the sandbox is stopping");
    }
    match answer.await {
        Ok(Ok(v)) => (StatusCode::OK, Json(v)),
        Ok(Err(e)) => failed(StatusCode::UNPROCESSABLE_ENTITY, &e),
        Err(_) => failed(StatusCode::SERVICE_UNAVAILABLE, "the sandbox is stopping"),
    }
}

fn failed(status: StatusCode, error: &str) -> Answer {
    (status, Json(json!({"error": error})))
}

async fn deploy(State(c): State<Calls>, Json(b): Json<DeployBody>) -> Answer {
    call(
        &c,
        Op::Deploy {
            sla: b.sla,
            instances: b.instances,
        },
    )
    .await
}

async fn ps(State(c): State<Calls>) -> Answer {
    call(&c, Op::Ps).await
}

async fn scale(
    State(c): State<Calls>,
    UrlPath(service): UrlPath<String>,
    Json(b): Json<ScaleBody>,
) -> Answer {
    let instances = b.instances;
    call(&c, Op::Scale { service, instances }).await
}

async fn logs(
    State(c): State<Calls>,
    UrlPath((service, instance)): UrlPath<(String, u64)>,
) -> Answer {
    call(&c, Op::Logs { service, instance }).await
}

async fn undeploy(State(c): State<Calls>, UrlPath(service): UrlPath<String>) -> Answer {
    call(&c, Op::Undeploy { service }).await
}

/// The client side, for the CLI and the tests.
pub struct ControlClient {
    http: blocking::Client,
}

impl ControlClient {
    /// A client of the sandbox whose socket is `socket`.
    pub fn new(socket: &Path) -> Result<ControlClient> {
        if !socket.exists() {
            return Err(anyhow!(
                "no sandbox is running ({} is missing): start one with `cargo xtask sandbox`",
                socket.display()
            ));
        }
        let inner = worker_common::http::Client::unix(socket).timeout(CALL_TIMEOUT);
        Ok(ControlClient {
            http: blocking::Client::new(inner).context("an HTTP client")?,
        })
    }

    /// Deploys every microservice of `sla`, `instances` instances each.
    pub fn deploy(&self, sla: &Value, instances: u64) -> Result<Value> {
        let body = json!({"sla": sla, "instances": instances});
        self.json(self.http.post_json("/services", &body))
    }

    pub fn ps(&self) -> Result<Value> {
        self.json(self.http.get("/services"))
    }

    pub fn scale(&self, service: &str, instances: u64) -> Result<Value> {
        let target = format!("/services/{}/scale", segment(service)?);
        self.json(
            self.http
                .post_json(&target, &json!({"instances": instances})),
        )
    }

    pub fn logs(&self, service: &str, instance: u64) -> Result<Value> {
        let target = format!("/services/{}/instances/{instance}/logs", segment(service)?);
        self.json(self.http.get(&target))
    }

    pub fn undeploy(&self, service: &str) -> Result<Value> {
        let target = format!("/services/{}", segment(service)?);
        self.json(self.http.send(Method::DELETE, &target, None))
    }

    /// A success answer's JSON; otherwise the sandbox's `error`.
    fn json(
        &self,
        answer: Result<worker_common::http::Response, worker_common::http::Error>,
    ) -> Result<Value> {
        let answer = answer.context("asking the sandbox")?;
        let body: Value = answer.json().unwrap_or(Value::Null);
        if answer.status.is_success() {
            return Ok(body);
        }
        match body["error"].as_str() {
            Some(e) => Err(anyhow!("{e}")),
            None => Err(answer.success().map(drop).unwrap_err().into()),
        }
    }
}

/// A job name as one path segment: job names are letters, digits, '-',
/// '_' and dots, none of which need escaping.
fn segment(service: &str) -> Result<&str> {
    if service.is_empty()
        || !service
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(anyhow!(
            "{service:?} is not a service name (app.appns.service.servicens)"
        ));
    }
    Ok(service)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The API end to end without a sandbox: each request arrives as its
    /// call, and answers and errors come back to the client.
    #[test]
    fn requests_become_calls_and_errors_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let server = ControlServer::start(&dir.path().join(SOCKET)).unwrap();
        let client = ControlClient::new(server.socket()).unwrap();
        let mode = std::fs::metadata(server.socket())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let worker = std::thread::spawn(move || {
            let mut seen = Vec::new();
            while seen.len() < 5 {
                server.answer(Duration::from_secs(10), |op| {
                    seen.push(op.clone());
                    match op {
                        Op::Undeploy { .. } => Err(anyhow!("no service a.b.c.d")),
                        _ => Ok(json!({"ok": seen.len()})),
                    }
                });
            }
            seen
        });
        let sla = json!({"applications": []});
        assert_eq!(client.deploy(&sla, 2).unwrap(), json!({"ok": 1}));
        assert_eq!(client.ps().unwrap(), json!({"ok": 2}));
        client.scale("a.b.c.d", 3).unwrap();
        client.logs("a.b.c.d", 1).unwrap();
        let e = client.undeploy("a.b.c.d").unwrap_err();
        assert_eq!(e.to_string(), "no service a.b.c.d");
        assert!(client.undeploy("a/b").is_err());
        let seen = worker.join().unwrap();
        assert_eq!(
            seen,
            [
                Op::Deploy { sla, instances: 2 },
                Op::Ps,
                Op::Scale {
                    service: "a.b.c.d".into(),
                    instances: 3
                },
                Op::Logs {
                    service: "a.b.c.d".into(),
                    instance: 1
                },
                Op::Undeploy {
                    service: "a.b.c.d".into()
                },
            ]
        );
    }

    #[test]
    fn without_a_sandbox_the_client_says_so() {
        let e = ControlClient::new(Path::new("/nonexistent/control.sock"))
            .err()
            .unwrap();
        assert!(e.to_string().contains("no sandbox is running"), "{e}");
    }
}
