//! The node's underlay address and the interface tunnel traffic leaves by.
//!
//! With `NodePublicAddress` "0.0.0.0" the address is the uplink's own,
//! inferred from the default route (`DefaultInterface` when several exist)
//! and re-checked periodically, since DHCP or roaming may change it.

use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};

use anyhow::Result;

use crate::plumbing::Plumbing;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Current {
    ifname: String,
    ip: IpAddr,
}

pub struct Uplink {
    /// Interface the operator asked for (flag/env, else DefaultInterface).
    preferred: Option<String>,
    /// The operator's fixed NodePublicAddress, which inference never replaces.
    fixed_ip: Option<IpAddr>,
    /// Tunnel UDP port advertised to the cluster.
    port: u16,
    current: Mutex<Current>,
}

impl Uplink {
    /// Find the uplink and the node address.
    pub async fn discover(
        net: &Plumbing,
        preferred: Option<String>,
        fixed_ip: Option<IpAddr>,
        port: u16,
    ) -> Result<Uplink> {
        let (ifname, inferred) = net.uplink(preferred.as_deref()).await?;
        Ok(Uplink {
            current: Mutex::new(Current {
                ifname,
                ip: fixed_ip.unwrap_or(inferred),
            }),
            preferred,
            fixed_ip,
            port,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Current> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn ip(&self) -> IpAddr {
        self.lock().ip
    }

    pub fn ifname(&self) -> String {
        self.lock().ifname.clone()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the address is inferred (and so worth re-checking).
    pub fn inferred(&self) -> bool {
        self.fixed_ip.is_none()
    }

    /// Look again; returns the new address when it changed.
    pub async fn recheck(&self, net: &Plumbing) -> Result<Option<IpAddr>> {
        if self.fixed_ip.is_some() {
            return Ok(None);
        }
        let (_, ip) = net.uplink(self.preferred.as_deref()).await?;
        let mut cur = self.lock();
        if cur.ip == ip {
            return Ok(None);
        }
        tracing::info!(old = %cur.ip, new = %ip, "node address changed");
        cur.ip = ip;
        Ok(Some(ip))
    }
}
