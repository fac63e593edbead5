//! The one HTTP/1.1 client of the workers, their tools and their tests:
//! hyper-util's pooled client over a unix socket (NetManager's local API)
//! or over TCP with optional TLS (the registration handshake, kernel
//! downloads). Every request has a deadline and every answer a size limit,
//! since the peer may be slow, broken or hostile.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{CONTENT_TYPE, HOST, HeaderValue, USER_AGENT};
pub use hyper::{Method, StatusCode};
use hyper::{Request, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as Pool;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Deadline of a whole exchange (connect, send, read the answer) unless set.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest answer read unless set.
pub const DEFAULT_MAX_BODY: usize = 4 << 20;
/// How much of an error answer's body goes into the error message.
const ERROR_BODY_CHARS: usize = 512;

const DEFAULT_USER_AGENT: &str = concat!("oakestra-worker/", env!("CARGO_PKG_VERSION"));

/// An HTTP client bound to one transport. Cloning is cheap and shares the
/// connection pool.
#[derive(Clone)]
pub struct Client {
    transport: Transport,
    timeout: Duration,
    max_body: usize,
    user_agent: HeaderValue,
}

#[derive(Clone)]
enum Transport {
    Unix {
        socket: PathBuf,
        pool: Pool<hyperlocal::UnixConnector, Full<Bytes>>,
    },
    Tcp {
        pool: Pool<HttpsConnector<HttpConnector>, Full<Bytes>>,
    },
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Client");
        match &self.transport {
            Transport::Unix { socket, .. } => d.field("socket", socket),
            Transport::Tcp { .. } => d.field("transport", &"tcp"),
        };
        d.field("timeout", &self.timeout)
            .field("max_body", &self.max_body)
            .finish()
    }
}

/// An answer: status and the whole (size-limited) body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: StatusCode,
    pub body: Bytes,
    /// "METHOD target", for error messages.
    request: String,
}

/// A failed exchange; the message names the request.
#[derive(Debug, thiserror::Error)]
#[error("{request}: {kind}")]
pub struct Error {
    /// "METHOD target" (for a unix socket: the socket path and the route).
    pub request: String,
    pub kind: ErrorKind,
}

#[derive(Debug, thiserror::Error)]
pub enum ErrorKind {
    #[error("invalid target: {0}")]
    Target(String),
    #[error("encoding the request: {0}")]
    Encode(serde_json::Error),
    /// Connecting, the TLS handshake or sending failed; the text includes
    /// every cause (e.g. the OS error).
    #[error("{0}")]
    Transport(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the answer is larger than {0} bytes")]
    TooLarge(usize),
    #[error("reading the answer: {0}")]
    Body(String),
    #[error("answered {status}: {body}")]
    Status { status: StatusCode, body: String },
    #[error("the answer is not the expected JSON: {0}")]
    Json(serde_json::Error),
}

impl Error {
    /// The status of an answer that was not a success, if that was the error.
    pub fn status(&self) -> Option<StatusCode> {
        match &self.kind {
            ErrorKind::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

impl Client {
    /// HTTP over the unix socket at `socket`; targets are paths (`/status`).
    pub fn unix(socket: impl Into<PathBuf>) -> Client {
        let pool = pool_builder().build(hyperlocal::UnixConnector);
        Client::with_transport(Transport::Unix {
            socket: socket.into(),
            pool,
        })
    }

    /// HTTP and HTTPS over TCP, HTTPS verified with `tls`
    /// (see [`crate::tls::ClientTls`]); targets are absolute URLs.
    pub fn tcp(tls: Arc<rustls::ClientConfig>) -> Client {
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*tls).clone())
            .https_or_http()
            .enable_http1()
            .build();
        Client::with_transport(Transport::Tcp {
            pool: pool_builder().build(connector),
        })
    }

    fn with_transport(transport: Transport) -> Client {
        Client {
            transport,
            timeout: DEFAULT_TIMEOUT,
            max_body: DEFAULT_MAX_BODY,
            user_agent: HeaderValue::from_static(DEFAULT_USER_AGENT),
        }
    }

    /// Deadline of each whole exchange.
    pub fn timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// Largest answer body accepted.
    pub fn max_body(mut self, bytes: usize) -> Client {
        self.max_body = bytes;
        self
    }

    /// The `User-Agent` sent (`product/version`).
    pub fn user_agent(mut self, agent: &'static str) -> Client {
        self.user_agent = HeaderValue::from_static(agent);
        self
    }

    /// The socket of a unix-socket client.
    pub fn socket(&self) -> Option<&Path> {
        match &self.transport {
            Transport::Unix { socket, .. } => Some(socket),
            Transport::Tcp { .. } => None,
        }
    }

    /// `GET target`, whatever the status.
    pub async fn get(&self, target: &str) -> Result<Response, Error> {
        self.send(Method::GET, target, None).await
    }

    /// `GET target`; a success answer's JSON body.
    pub async fn get_json<R: DeserializeOwned>(&self, target: &str) -> Result<R, Error> {
        self.get(target).await?.success()?.json()
    }

    /// `POST target` with `body` as JSON, whatever the status.
    pub async fn post_json<T: Serialize + ?Sized>(
        &self,
        target: &str,
        body: &T,
    ) -> Result<Response, Error> {
        let json = serde_json::to_vec(body).map_err(|e| Error {
            request: self.describe(&Method::POST, target),
            kind: ErrorKind::Encode(e),
        })?;
        self.send(
            Method::POST,
            target,
            Some(("application/json", Bytes::from(json))),
        )
        .await
    }

    /// One exchange: `method target` with an optional (content type, body).
    pub async fn send(
        &self,
        method: Method,
        target: &str,
        body: Option<(&'static str, Bytes)>,
    ) -> Result<Response, Error> {
        let request = self.describe(&method, target);
        let fail = |kind| Error {
            request: request.clone(),
            kind,
        };
        let req = self.build(method, target, body).map_err(fail)?;
        let exchange = async {
            let resp = match &self.transport {
                Transport::Unix { pool, .. } => pool.request(req).await,
                Transport::Tcp { pool } => pool.request(req).await,
            }
            .map_err(|e| ErrorKind::Transport(causes(&e)))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), self.max_body)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        ErrorKind::TooLarge(self.max_body)
                    } else {
                        ErrorKind::Body(causes(e.as_ref()))
                    }
                })?
                .to_bytes();
            Ok((status, body))
        };
        let (status, body) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| fail(ErrorKind::Timeout(self.timeout)))?
            .map_err(fail)?;
        Ok(Response {
            status,
            body,
            request,
        })
    }

    /// `GET target`, streaming a success answer's body into `out` frame by
    /// frame (each frame also goes to `inspect`, e.g. a hasher) instead of
    /// holding it in memory; returns the byte count. The body limit
    /// ([`Client::max_body`]) and the deadline ([`Client::timeout`]) apply to
    /// the whole download. Error answers are reported like
    /// [`Response::success`] does.
    pub async fn download<W>(
        &self,
        target: &str,
        out: &mut W,
        mut inspect: impl FnMut(&[u8]),
    ) -> Result<u64, Error>
    where
        W: tokio::io::AsyncWrite + Unpin,
    {
        use tokio::io::AsyncWriteExt;
        let request = self.describe(&Method::GET, target);
        let fail = |kind| Error {
            request: request.clone(),
            kind,
        };
        let req = self.build(Method::GET, target, None).map_err(fail)?;
        let exchange = async {
            let resp = match &self.transport {
                Transport::Unix { pool, .. } => pool.request(req).await,
                Transport::Tcp { pool } => pool.request(req).await,
            }
            .map_err(|e| ErrorKind::Transport(causes(&e)))?;
            let status = resp.status();
            let mut body = resp.into_body();
            if !status.is_success() {
                let bytes = Limited::new(body, ERROR_BODY_CHARS * 4)
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let text: String = String::from_utf8_lossy(&bytes)
                    .trim()
                    .chars()
                    .take(ERROR_BODY_CHARS)
                    .collect();
                return Err(ErrorKind::Status { status, body: text });
            }
            let mut total: u64 = 0;
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| ErrorKind::Body(causes(&e)))?;
                let Ok(data) = frame.into_data() else {
                    continue; // trailers
                };
                total += data.len() as u64;
                if total > self.max_body as u64 {
                    return Err(ErrorKind::TooLarge(self.max_body));
                }
                inspect(&data);
                out.write_all(&data)
                    .await
                    .map_err(|e| ErrorKind::Body(format!("writing: {e}")))?;
            }
            out.flush()
                .await
                .map_err(|e| ErrorKind::Body(format!("writing: {e}")))?;
            Ok(total)
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| fail(ErrorKind::Timeout(self.timeout)))?
            .map_err(fail)
    }

    fn build(
        &self,
        method: Method,
        target: &str,
        body: Option<(&'static str, Bytes)>,
    ) -> Result<Request<Full<Bytes>>, ErrorKind> {
        let (uri, host) = match &self.transport {
            Transport::Unix { socket, .. } => {
                if !target.starts_with('/') {
                    return Err(ErrorKind::Target(format!(
                        "{target:?} is not a path starting with '/'"
                    )));
                }
                // The socket path travels hex-encoded in the URI's authority;
                // the server sees a plain Host.
                let uri: Uri = hyperlocal::Uri::new(socket, target).into();
                (uri, Some(HeaderValue::from_static("localhost")))
            }
            Transport::Tcp { .. } => (tcp_uri(target)?, None),
        };
        let mut builder = Request::builder()
            .method(method)
            .uri(uri)
            .header(USER_AGENT, self.user_agent.clone());
        if let Some(host) = host {
            builder = builder.header(HOST, host);
        }
        let bytes = match body {
            Some((content_type, bytes)) => {
                builder = builder.header(CONTENT_TYPE, content_type);
                bytes
            }
            None => Bytes::new(),
        };
        builder
            .body(Full::new(bytes))
            .map_err(|e| ErrorKind::Target(e.to_string()))
    }

    fn describe(&self, method: &Method, target: &str) -> String {
        match &self.transport {
            Transport::Unix { socket, .. } => {
                format!("{method} {target} on {}", socket.display())
            }
            Transport::Tcp { .. } => format!("{method} {target}"),
        }
    }
}

impl Response {
    /// Self for a 2xx answer; otherwise an error with the status and the
    /// start of the body (where servers put their reason).
    pub fn success(self) -> Result<Response, Error> {
        if self.status.is_success() {
            return Ok(self);
        }
        let body: String = self.text().trim().chars().take(ERROR_BODY_CHARS).collect();
        Err(Error {
            request: self.request,
            kind: ErrorKind::Status {
                status: self.status,
                body,
            },
        })
    }

    /// The body as JSON.
    pub fn json<R: DeserializeOwned>(&self) -> Result<R, Error> {
        serde_json::from_slice(&self.body).map_err(|e| Error {
            request: self.request.clone(),
            kind: ErrorKind::Json(e),
        })
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.body)
    }
}

fn pool_builder() -> hyper_util::client::legacy::Builder {
    let mut b = Pool::builder(TokioExecutor::new());
    // Idle connections are dropped after a while, so a restarted peer is
    // reached on a fresh connection (the timer makes the timeout effective).
    b.pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(30));
    b
}

/// An absolute `http://` or `https://` URL with a host.
fn tcp_uri(target: &str) -> Result<Uri, ErrorKind> {
    let uri: Uri = target
        .parse()
        .map_err(|e| ErrorKind::Target(format!("{target:?}: {e}")))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => {
            return Err(ErrorKind::Target(format!(
                "{target:?}: only http:// and https:// URLs"
            )));
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(ErrorKind::Target(format!("{target:?} names no host")));
    }
    Ok(uri)
}

/// An error and all its causes, "outer: inner: root".
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        // hyper repeats a cause's text in its own sometimes.
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// The same client for synchronous code (xtask, test harnesses): calls block
/// on the client's own runtime. Not for use inside an async runtime.
pub mod blocking {
    use super::*;

    pub struct Client {
        runtime: tokio::runtime::Runtime,
        inner: super::Client,
    }

    impl Client {
        /// Wraps an async client (configured with its timeout and limits).
        pub fn new(inner: super::Client) -> std::io::Result<Client> {
            // One worker thread keeps pooled connections' tasks running
            // between calls, so a connection the server closed is noticed
            // (and not reused) just as with the async client.
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("http-blocking")
                .enable_all()
                .build()?;
            Ok(Client { runtime, inner })
        }

        /// See [`super::Client::unix`].
        pub fn unix(socket: impl Into<PathBuf>) -> std::io::Result<Client> {
            Client::new(super::Client::unix(socket))
        }

        pub fn get(&self, target: &str) -> Result<Response, Error> {
            self.runtime.block_on(self.inner.get(target))
        }

        pub fn get_json<R: DeserializeOwned>(&self, target: &str) -> Result<R, Error> {
            self.runtime.block_on(self.inner.get_json(target))
        }

        pub fn post_json<T: Serialize + ?Sized>(
            &self,
            target: &str,
            body: &T,
        ) -> Result<Response, Error> {
            self.runtime.block_on(self.inner.post_json(target, body))
        }

        pub fn send(
            &self,
            method: Method,
            target: &str,
            body: Option<(&'static str, Bytes)>,
        ) -> Result<Response, Error> {
            self.runtime.block_on(self.inner.send(method, target, body))
        }
    }
}
