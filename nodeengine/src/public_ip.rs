//! The node's public address, for nodes whose `public_ip` is on (`NodeEngine
//! config visibility public`): what a discovery service sees us coming from
//! (upstream asks https://ifconfig.co), refreshed every 60th report (2 min)
//! as upstream refreshes it, to spare the service. It becomes the node
//! report's `ip` and so the `publicip` of every status report.
//!
//! Unlike upstream, a failed or odd answer never becomes the address: the
//! last good one stays (or the machine's own until there is one), and the
//! failure is logged.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::time::Instant;
use worker_common::http;
use worker_common::tls::ClientTls;

use crate::config::PublicIp;

/// Upstream's discovery service.
pub const DEFAULT_URL: &str = "https://ifconfig.co";
/// Upstream refreshes every 60th report of 2 s.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(120);
/// The answer is one address.
const MAX_ANSWER: usize = 1024;
const TIMEOUT: Duration = Duration::from_secs(10);

/// Where the public address comes from.
pub struct PublicIpSource {
    mode: PublicIp,
    url: String,
    refresh: Duration,
    client: Option<http::Client>,
    last: Option<String>,
    next: Option<Instant>,
}

/// The address in a discovery answer (`"203.0.113.5\n"`).
pub fn parse_answer(body: &[u8]) -> Result<IpAddr> {
    let text = std::str::from_utf8(body).context("the answer is not text")?;
    let text = text.trim();
    match text.parse::<IpAddr>() {
        Ok(ip) => Ok(ip),
        Err(_) => bail!(
            "the answer is not an IP address: {:?}",
            text.chars().take(64).collect::<String>()
        ),
    }
}

impl PublicIpSource {
    pub fn new(mode: PublicIp, url: &str, refresh: Duration) -> Result<PublicIpSource> {
        let client = match mode {
            PublicIp::Discover => {
                let tls = ClientTls::system_roots()
                    .build()
                    .context("TLS setup for the public address discovery")?;
                Some(
                    http::Client::tcp(tls)
                        .timeout(TIMEOUT)
                        .max_body(MAX_ANSWER)
                        .user_agent(crate::cluster_link::USER_AGENT),
                )
            }
            _ => None,
        };
        Ok(PublicIpSource {
            last: match &mode {
                PublicIp::Fixed(ip) => Some(ip.clone()),
                _ => None,
            },
            mode,
            url: url.to_string(),
            refresh,
            client,
            next: None,
        })
    }

    /// The address to report (`None`: the machine's own), refreshed when due.
    pub async fn current(&mut self) -> Option<String> {
        let Some(client) = &self.client else {
            return self.last.clone();
        };
        let now = Instant::now();
        if self.next.is_some_and(|n| now < n) {
            return self.last.clone();
        }
        self.next = Some(now + self.refresh);
        match fetch(client, &self.url).await {
            Ok(ip) => {
                let ip = ip.to_string();
                if self.last.as_deref() != Some(&ip) {
                    tracing::info!(public_ip = %ip, url = %self.url, "public address discovered");
                }
                self.last = Some(ip);
            }
            Err(e) => {
                tracing::warn!(url = %self.url, "public address discovery: {e:#}; keeping {:?}", self.last);
            }
        }
        self.last.clone()
    }

    pub fn mode(&self) -> &PublicIp {
        &self.mode
    }
}

async fn fetch(client: &http::Client, url: &str) -> Result<IpAddr> {
    let answer = client.get(url).await?.success()?;
    parse_answer(&answer.body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() {
        assert_eq!(
            parse_answer(b"203.0.113.5\n").expect("v4"),
            "203.0.113.5".parse::<IpAddr>().expect("ip")
        );
        assert!(parse_answer(b"2001:db8::1").is_ok());
        assert!(parse_answer(b"<html>rate limited</html>").is_err());
        assert!(parse_answer(b"").is_err());
        assert!(parse_answer(&[0xff, 0xfe]).is_err());
    }
}
