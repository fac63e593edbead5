//! The node's underlay address and the interface tunnel traffic leaves by.
//!
//! The uplink is the interface of the IPv4 default route, else of the IPv6
//! one (`DefaultInterface` or `--uplink` pins it to one interface). It is re-checked whenever the
//! kernel reports a route or address change (see `supervisor`), and on a
//! slow poll as a safety net: Wi-Fi giving way to LTE moves the default
//! route, DHCP renumbers the address.
//!
//! The address advertised to the cluster is, in this order: the operator's
//! `NodePublicAddress`; with `PublicIPNetworking`, the address a discovery
//! service sees us coming from (a NAT router's, as upstream asks
//! ifconfig.co); otherwise the uplink's own address.

use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use worker_common::http;
use worker_common::tls::ClientTls;

use crate::addresses::is_node_address;
use crate::plumbing::Plumbing;

/// How long one discovery request may take.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// An address fits in a few bytes; anything longer is not one.
const DISCOVERY_MAX_ANSWER: usize = 256;

/// What the operator configured about the uplink.
#[derive(Debug, Clone, Default)]
pub struct UplinkOptions {
    /// Interface to use instead of the default route's (flag/env, else
    /// DefaultInterface).
    pub preferred: Option<String>,
    /// NodePublicAddress: advertised as is, never replaced.
    pub fixed_ip: Option<IpAddr>,
    /// PublicIPNetworking: the discovery service's URL.
    pub discovery_url: Option<String>,
    /// Tunnel UDP port advertised to the cluster.
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Current {
    ifname: String,
    ifindex: u32,
    /// The uplink's own address.
    local: IpAddr,
    /// The advertised address.
    ip: IpAddr,
}

/// Why the uplink is looked at again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recheck {
    /// The kernel reported a change of links, routes or addresses.
    Event,
    /// The periodic look (changes nobody reports, e.g. behind NAT).
    Poll,
}

/// What a re-check found different.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UplinkChange {
    /// The uplink moved to this interface (or an interface of the same
    /// name replaced it, without the programs).
    pub interface: Option<String>,
    /// The advertised address is now this.
    pub address: Option<IpAddr>,
}

impl UplinkChange {
    pub fn is_empty(&self) -> bool {
        self.interface.is_none() && self.address.is_none()
    }
}

pub struct Uplink {
    preferred: Option<String>,
    fixed_ip: Option<IpAddr>,
    discovery: Option<Discovery>,
    port: u16,
    current: Mutex<Current>,
}

impl Uplink {
    /// Find the uplink and the node address.
    pub async fn discover(net: &Plumbing, opts: UplinkOptions) -> Result<Uplink> {
        let found = net.uplink(opts.preferred.as_deref()).await?;
        let local = found.addr;
        let discovery = match (&opts.discovery_url, opts.fixed_ip) {
            (Some(url), None) => Some(Discovery::new(url)?),
            _ => None,
        };
        let ip = match (opts.fixed_ip, &discovery) {
            (Some(ip), _) => ip,
            (None, Some(d)) => match d.lookup(local).await {
                Ok(ip) => {
                    tracing::info!(public = %ip, local = %local, url = %d.url, "public address discovered");
                    ip
                }
                Err(e) => {
                    tracing::warn!(
                        "PublicIPNetworking: {e:#}; advertising the uplink's own address {local} until a re-check succeeds"
                    );
                    local
                }
            },
            (None, None) => local,
        };
        Ok(Uplink {
            preferred: opts.preferred,
            fixed_ip: opts.fixed_ip,
            discovery,
            port: opts.port,
            current: Mutex::new(Current {
                ifname: found.name,
                ifindex: found.index,
                local,
                ip,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Current> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The advertised node address.
    pub fn ip(&self) -> IpAddr {
        self.lock().ip
    }

    pub fn ifname(&self) -> String {
        self.lock().ifname.clone()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Look again: the default route's interface (unless one is pinned)
    /// and the advertised address. Returns what changed, already recorded.
    /// The discovery service (PublicIPNetworking) is asked on the poll and
    /// when the uplink itself changed, not for every container's veth.
    pub async fn recheck(&self, net: &Plumbing, why: Recheck) -> Result<UplinkChange> {
        let found = net.uplink(self.preferred.as_deref()).await?;
        let uplink_changed = {
            let cur = self.lock();
            (cur.ifname.as_str(), cur.ifindex, cur.local)
                != (found.name.as_str(), found.index, found.addr)
        };
        let ip = match (self.fixed_ip, &self.discovery) {
            (Some(ip), _) => ip,
            (None, None) => found.addr,
            (None, Some(_)) if why == Recheck::Event && !uplink_changed => self.ip(),
            (None, Some(d)) => match d.lookup(found.addr).await {
                Ok(ip) => ip,
                Err(e) => {
                    // Keep what we advertise: a discovery service that is
                    // down says nothing about our address.
                    tracing::warn!("PublicIPNetworking: {e:#}; keeping the advertised address");
                    self.ip()
                }
            },
        };
        let mut cur = self.lock();
        let mut change = UplinkChange::default();
        if (cur.ifname.as_str(), cur.ifindex) != (found.name.as_str(), found.index) {
            tracing::info!(old = %cur.ifname, new = %found.name, index = found.index, "uplink moved");
            change.interface = Some(found.name.clone());
            cur.ifname = found.name;
            cur.ifindex = found.index;
        }
        cur.local = found.addr;
        if cur.ip != ip {
            tracing::info!(old = %cur.ip, new = %ip, "node address changed");
            change.address = Some(ip);
            cur.ip = ip;
        }
        Ok(change)
    }

    /// The dataplane could not follow the uplink: forget where it is, so
    /// the next re-check reports the interface again and it is retried.
    pub fn retry_interface(&self) {
        self.lock().ifindex = 0;
    }
}

/// PublicIPNetworking: an HTTP(S) service that answers the caller's
/// address as plain text (`203.0.113.7\n`), like ifconfig.co, which
/// upstream asks.
struct Discovery {
    url: String,
    client: http::Client,
}

impl Discovery {
    fn new(url: &str) -> Result<Discovery> {
        let tls = ClientTls::system_roots()
            .build()
            .context("TLS settings for the public address discovery")?;
        Ok(Discovery {
            url: url.to_string(),
            client: http::Client::tcp(tls)
                .timeout(DISCOVERY_TIMEOUT)
                .max_body(DISCOVERY_MAX_ANSWER),
        })
    }

    /// The public address of the same family as `local` (the uplink's).
    async fn lookup(&self, local: IpAddr) -> Result<IpAddr> {
        let answer = self
            .client
            .get(&self.url)
            .await
            .and_then(http::Response::success)
            .with_context(|| format!("asking {} for the public address", self.url))?;
        parse_answer(&answer.text(), local).with_context(|| format!("the answer of {}", self.url))
    }
}

/// The address in a discovery answer: one address, surrounding whitespace
/// allowed, nothing a peer could not reach, and of the uplink's family --
/// a dual-stack service reached over IPv6 would otherwise move an IPv4
/// node (and every upstream peer, which speaks IPv4 only) to IPv6.
fn parse_answer(text: &str, local: IpAddr) -> Result<IpAddr> {
    let text = text.trim();
    let ip: IpAddr = match text.parse() {
        Ok(ip) => ip,
        Err(_) => {
            let shown: String = text.chars().take(64).collect();
            return Err(anyhow!("{shown:?} is not an IP address"));
        }
    };
    match (ip, local) {
        (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {}
        (IpAddr::V6(_), IpAddr::V4(_)) => bail!(
            "{ip} is an IPv6 address and the uplink's is IPv4 (use a service reachable over IPv4 only)"
        ),
        (IpAddr::V4(_), IpAddr::V6(_)) => bail!(
            "{ip} is an IPv4 address and the uplink's is IPv6 (use a service reachable over IPv6 only)"
        ),
    }
    if !is_node_address(ip) {
        bail!("{ip} cannot be a node's public address");
    }
    Ok(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_answers() {
        let v4: IpAddr = "198.51.100.1".parse().unwrap();
        let v6: IpAddr = "2001:db8::2".parse().unwrap();
        let parsed = |t, local| parse_answer(t, local).map(|a| a.to_string());
        assert_eq!(parsed("203.0.113.7\n", v4).unwrap(), "203.0.113.7");
        assert_eq!(parsed("  198.51.100.4 ", v4).unwrap(), "198.51.100.4");
        assert_eq!(parsed("2001:db8::7\n", v6).unwrap(), "2001:db8::7");
        for bad in [
            "",
            "<html>hello</html>",
            "127.0.0.1",
            "0.0.0.0",
            "203.0.113.7 x",
        ] {
            assert!(parse_answer(bad, v4).is_err(), "{bad:?}");
        }
        assert!(parse_answer("fe80::1", v6).is_err());
        let e = parse_answer("2001:db8::1\n", v4).unwrap_err().to_string();
        assert!(e.contains("IPv6"), "{e}");
        let e = parse_answer("203.0.113.7", v6).unwrap_err().to_string();
        assert!(e.contains("IPv4"), "{e}");
    }

    #[test]
    fn an_empty_change_is_empty() {
        assert!(UplinkChange::default().is_empty());
        assert!(
            !UplinkChange {
                interface: Some("wlan0".into()),
                address: None
            }
            .is_empty()
        );
    }
}
