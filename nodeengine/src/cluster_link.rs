//! Joining the cluster: the HTTP registration handshake (docs/contract.md,
//! registration).

use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use worker_common::backoff::Backoff;
use worker_common::http;
use worker_common::lenient;
use worker_common::tls::ClientTls;

use crate::node_report::NodeDocument;

/// The registration answer is a small JSON object.
const MAX_ANSWER: usize = 64 * 1024;
const TIMEOUT: Duration = Duration::from_secs(20);
pub const USER_AGENT: &str = concat!("oakestra-nodeengine/", env!("CARGO_PKG_VERSION"));

/// What the cluster answers to a registration.
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    pub node_id: String,
    pub mqtt_port: u16,
}

#[derive(Deserialize)]
struct RawAnswer {
    id: String,
    /// A string upstream; a number is accepted too.
    #[serde(rename = "MQTT_BROKER_PORT", deserialize_with = "lenient::u16")]
    mqtt_broker_port: u16,
}

/// The cluster's registration endpoint and the client that reaches it.
pub struct ClusterLink {
    url: String,
    http: http::Client,
}

/// `http(s)://address:port/api/node/register`; an IPv6 address is bracketed.
pub fn register_url(address: &str, port: u16, ssl: bool) -> String {
    let scheme = if ssl { "https" } else { "http" };
    let host = if address.contains(':') && !address.starts_with('[') {
        format!("[{address}]")
    } else {
        address.to_string()
    };
    format!("{scheme}://{host}:{port}/api/node/register")
}

/// Parses the registration answer.
pub fn parse_answer(body: &[u8]) -> Result<Registration> {
    let raw: RawAnswer = serde_json::from_slice(body).with_context(|| {
        format!(
            "unexpected registration answer: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        )
    })?;
    if raw.mqtt_broker_port == 0 {
        bail!("invalid MQTT_BROKER_PORT 0 in registration answer");
    }
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
        mqtt_port: raw.mqtt_broker_port,
    })
}

impl ClusterLink {
    /// HTTPS (`ssl`) verifies the cluster against the system's trust anchors.
    pub fn new(address: &str, port: u16, ssl: bool) -> Result<ClusterLink> {
        let tls = ClientTls::system_roots()
            .build()
            .context("TLS setup for the registration")?;
        Ok(ClusterLink {
            url: register_url(address, port, ssl),
            http: http::Client::tcp(tls)
                .timeout(TIMEOUT)
                .max_body(MAX_ANSWER)
                .user_agent(USER_AGENT),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// One registration attempt.
    pub async fn register_once(&self, node: &NodeDocument) -> Result<Registration> {
        let answer = self.http.post_json(&self.url, node).await?.success()?;
        parse_answer(&answer.body)
    }

    /// Registers, retrying with capped exponential backoff until it works.
    /// Upstream exits on the first failure; a worker that boots before its
    /// cluster should simply wait for it.
    pub async fn register_with_retry(
        &self,
        mut node_document: impl FnMut() -> NodeDocument,
    ) -> Registration {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        loop {
            match self.register_once(&node_document()).await {
                Ok(r) => return r,
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!("registration failed: {e:#}; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                }
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
        assert!(parse_answer(br#"{"id":"a","MQTT_BROKER_PORT":null}"#).is_err());
        assert!(parse_answer(br#"{"id":"a","MQTT_BROKER_PORT":"70000"}"#).is_err());
        assert!(parse_answer(br#"{"id":"a"}"#).is_err());
        assert!(parse_answer(b"null").is_err());
    }

    #[test]
    fn urls() {
        assert_eq!(
            register_url("10.0.0.1", 10100, false),
            "http://10.0.0.1:10100/api/node/register"
        );
        assert_eq!(
            register_url("fd00::1", 443, true),
            "https://[fd00::1]:443/api/node/register"
        );
    }
}
