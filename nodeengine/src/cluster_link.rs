//! Joining the cluster: the HTTP registration handshake (contract 1.3 step 1).

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use hyper::Method;
use serde::Deserialize;

use crate::http_client::{self, Url};
use crate::node_report::NodeDocument;

/// What the cluster answers to a registration.
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    pub node_id: String,
    pub mqtt_port: u16,
}

#[derive(Deserialize)]
struct RawAnswer {
    id: String,
    #[serde(rename = "MQTT_BROKER_PORT")]
    mqtt_broker_port: serde_json::Value,
}

/// Capped exponential backoff: 1 s, 2 s, 4 s ... up to `cap`.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    cap: Duration,
}

impl Backoff {
    pub fn new(first: Duration, cap: Duration) -> Self {
        Backoff { next: first, cap }
    }

    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.cap);
        d
    }
}

pub fn register_url(address: &str, port: u16, ssl: bool) -> Result<Url> {
    let scheme = if ssl { "https" } else { "http" };
    let host = if address.contains(':') && !address.starts_with('[') {
        format!("[{address}]")
    } else {
        address.to_string()
    };
    Url::parse(&format!("{scheme}://{host}:{port}/api/node/register"))
}

/// Parses the registration answer. The port is a JSON string upstream; a number is
/// accepted too.
pub fn parse_answer(body: &[u8]) -> Result<Registration> {
    let raw: RawAnswer = serde_json::from_slice(body).with_context(|| {
        format!(
            "unexpected registration answer: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        )
    })?;
    let port = match &raw.mqtt_broker_port {
        serde_json::Value::String(s) => s.trim().parse::<u16>().ok(),
        serde_json::Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        _ => None,
    }
    .ok_or_else(|| anyhow!("invalid MQTT_BROKER_PORT {}", raw.mqtt_broker_port))?;
    // The id becomes part of MQTT topics: refuse wildcards and separators.
    if raw.id.is_empty()
        || raw.id.len() > 128
        || !raw
            .id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        bail!("invalid node id {:?} in registration answer", raw.id);
    }
    Ok(Registration {
        node_id: raw.id,
        mqtt_port: port,
    })
}

/// One registration attempt.
pub async fn register_once(url: &Url, node: &NodeDocument) -> Result<Registration> {
    let body = serde_json::to_vec(node).context("encoding the node document")?;
    let answer = http_client::request(
        Method::POST,
        url,
        Some(body),
        64 * 1024,
        Duration::from_secs(20),
    )
    .await?;
    if !answer.status.is_success() {
        bail!(
            "cluster answered {}: {}",
            answer.status,
            String::from_utf8_lossy(&answer.body[..answer.body.len().min(200)]).trim()
        );
    }
    parse_answer(&answer.body)
}

/// Registers, retrying with capped exponential backoff until it works.
/// Upstream exits on the first failure; a worker that boots before its cluster
/// should simply wait for it.
pub async fn register_with_retry(
    url: &Url,
    mut node_document: impl FnMut() -> NodeDocument,
) -> Registration {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        match register_once(url, &node_document()).await {
            Ok(r) => return r,
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(
                    url = %format!("{}:{}{}", url.host, url.port, url.path),
                    "registration failed: {e:#}; retrying in {delay:?}"
                );
                tokio::time::sleep(delay).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() {
        let r = parse_answer(br#"{"id":"6650aa11bb22cc33dd44ee55","MQTT_BROKER_PORT":"10003"}"#)
            .expect("parse");
        assert_eq!(r.mqtt_port, 10003);
        assert!(parse_answer(br#"{"id":"x","MQTT_BROKER_PORT":10003}"#).is_ok());
        assert!(parse_answer(br#"{"id":"a/#","MQTT_BROKER_PORT":"1"}"#).is_err());
        assert!(parse_answer(br#"{"id":"a","MQTT_BROKER_PORT":"x"}"#).is_err());
        assert!(parse_answer(b"null").is_err());
    }

    #[test]
    fn backoff_is_capped() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
        let d: Vec<u64> = (0..5).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(d, [1, 2, 4, 5, 5]);
    }
}
