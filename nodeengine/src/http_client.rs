//! A minimal HTTP/1.1 client over TCP, optionally TLS (rustls with ring).
//!
//! The worker makes a handful of requests in its life (registration, kernel
//! downloads); a pooled client would buy nothing.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// A parsed `http(s)://host[:port]/path` URL.
#[derive(Debug, Clone, PartialEq)]
pub struct Url {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl Url {
    pub fn parse(url: &str) -> Result<Url> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            bail!("unsupported URL {url:?}: only http:// and https://");
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = split_host_port(authority, default_port)?;
        Ok(Url {
            tls,
            host,
            port,
            path: path.to_string(),
        })
    }
}

fn split_host_port(authority: &str, default_port: u16) -> Result<(String, u16)> {
    if let Some(rest) = authority.strip_prefix('[') {
        // [v6]:port
        let (h, p) = rest
            .split_once(']')
            .ok_or_else(|| anyhow!("bad IPv6 host in {authority:?}"))?;
        let port = match p.strip_prefix(':') {
            Some(p) => p.parse().context("bad port")?,
            None => default_port,
        };
        return Ok((h.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => Ok((h.to_string(), p.parse().context("bad port")?)),
        None => Ok((authority.to_string(), default_port)),
    }
}

/// rustls client config with the system roots and the ring provider.
pub fn tls_client_config() -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        // Single bad system certificates are skipped, as browsers do.
        let _ = roots.add(cert);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// Answer of a request: status and (size-limited) body.
pub struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
}

/// Sends one request and reads the answer, all within `timeout`.
pub async fn request(
    method: Method,
    url: &Url,
    json_body: Option<Vec<u8>>,
    max_body: usize,
    timeout: Duration,
) -> Result<Answer> {
    tokio::time::timeout(timeout, request_inner(method, url, json_body, max_body))
        .await
        .map_err(|_| {
            anyhow!(
                "no answer from {}:{} within {timeout:?}",
                url.host,
                url.port
            )
        })?
}

async fn request_inner(
    method: Method,
    url: &Url,
    json_body: Option<Vec<u8>>,
    max_body: usize,
) -> Result<Answer> {
    let tcp = TcpStream::connect((url.host.as_str(), url.port))
        .await
        .with_context(|| format!("connecting to {}:{}", url.host, url.port))?;
    if url.tls {
        let name = rustls::pki_types::ServerName::try_from(url.host.clone())
            .with_context(|| format!("invalid TLS server name {}", url.host))?;
        let tls = tokio_rustls::TlsConnector::from(tls_client_config()?)
            .connect(name, tcp)
            .await
            .with_context(|| format!("TLS handshake with {}", url.host))?;
        send(tls, method, url, json_body, max_body).await
    } else {
        send(tcp, method, url, json_body, max_body).await
    }
}

async fn send<S>(
    io: S,
    method: Method,
    url: &Url,
    json_body: Option<Vec<u8>>,
    max_body: usize,
) -> Result<Answer>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .context("HTTP handshake")?;
    let conn_task = tokio::spawn(async move {
        let _ = conn.await;
    });
    let host = if (url.tls && url.port == 443) || (!url.tls && url.port == 80) {
        url.host.clone()
    } else {
        format!("{}:{}", url.host, url.port)
    };
    let mut builder = Request::builder()
        .method(method)
        .uri(url.path.as_str())
        .header("host", host)
        .header(
            "user-agent",
            concat!("oakestra-nodeengine/", env!("CARGO_PKG_VERSION")),
        );
    if json_body.is_some() {
        builder = builder.header("content-type", "application/json");
    }
    let req = builder
        .body(Full::new(Bytes::from(json_body.unwrap_or_default())))
        .context("building request")?;
    let resp = sender.send_request(req).await.context("sending request")?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), max_body)
        .collect()
        .await
        .map_err(|e| anyhow!("reading answer: {e}"))?
        .to_bytes();
    conn_task.abort();
    Ok(Answer { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = Url::parse("http://10.0.0.1:10100/api/node/register").expect("parse");
        assert_eq!((u.tls, u.host.as_str(), u.port), (false, "10.0.0.1", 10100));
        assert_eq!(u.path, "/api/node/register");
        let u = Url::parse("https://example.org").expect("parse");
        assert_eq!((u.tls, u.port, u.path.as_str()), (true, 443, "/"));
        let u = Url::parse("http://[::1]:8080/x").expect("parse");
        assert_eq!((u.host.as_str(), u.port), ("::1", 8080));
        assert!(Url::parse("ftp://x").is_err());
    }
}
