//! Namespaces wired like Oakestra workers on one machine: an underlay
//! namespace with the bridge `br0` at 198.51.100.254/24, node namespaces
//! with an uplink `eth0` (198.51.100.<host>/24) into it and a default route
//! through it, and -- for static dataplanes that do without NetManager --
//! the container bridge `goProxyBridge` and containers behind it. Nothing
//! is added to the root namespace; every namespace goes with its guard.

use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sched::CloneFlags;
use nix::sys::signal::Signal;

use crate::netlink::{LinkSettings, Route};
use crate::netns::{Netns, NsPath};
use crate::process::Proc;

/// The underlay's own address, where the cluster (broker, registration) listens.
pub const UNDERLAY_GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 254);
/// A node's uplink interface.
pub const UPLINK: &str = "eth0";
/// The container bridge NetManager builds (and static dataplanes expect).
pub const CONTAINER_BRIDGE: &str = "goProxyBridge";
/// MTU inside containers: the overlay's tunnel MTU.
pub const CONTAINER_MTU: u32 = 1450;

/// The address of node `host` on the underlay.
pub fn node_ip(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, host)
}

/// The shared underlay: one namespace with the bridge `br0` at
/// 198.51.100.254/24.
pub struct Underlay {
    pub ns: Netns,
}

impl Underlay {
    pub fn new() -> Result<Underlay> {
        Underlay::wire(Netns::new("u")?)
    }

    /// With a fixed namespace name (the sandbox's).
    pub fn named(name: &str) -> Result<Underlay> {
        Underlay::wire(Netns::named(name)?)
    }

    fn wire(ns: Netns) -> Result<Underlay> {
        ns.add_bridge("br0")?.keep();
        ns.add_address("br0", &format!("{UNDERLAY_GATEWAY}/24"))?
            .keep();
        ns.set_up("br0")?;
        Ok(Underlay { ns })
    }

    /// A node namespace plugged into the underlay as 198.51.100.<host>.
    pub fn node(&self, host: u8) -> Result<Node> {
        self.plug(Netns::new(&format!("n{host}"))?, host)
    }

    /// A node with a fixed namespace name (the sandbox's).
    pub fn node_named(&self, name: &str, host: u8) -> Result<Node> {
        self.plug(Netns::named(name)?, host)
    }

    fn plug(&self, ns: Netns, host: u8) -> Result<Node> {
        let peer = format!("u{host}");
        ns.add_veth(UPLINK, &peer, Some(&self.ns))?.keep();
        self.ns.set_link(
            &peer,
            &LinkSettings {
                up: true,
                master: Some("br0"),
                ..Default::default()
            },
        )?;
        Node::address_uplink(ns, host, peer)
            .with_context(|| format!("wiring node {host} into the underlay"))
    }
}

/// A node namespace with its uplink; `peer` is the uplink's other end (in
/// the underlay, where a capture of the node's traffic listens).
pub struct Node {
    pub ns: Netns,
    pub ip: Ipv4Addr,
    pub peer: String,
}

impl Node {
    /// A node on no underlay: the uplink's peer stays inside, so the node
    /// has an address and a default route (for NetManager to infer its
    /// address from) but reaches nothing.
    pub fn standalone(host: u8) -> Result<Node> {
        let ns = Netns::new(&format!("n{host}"))?;
        let peer = "uplinkp".to_string();
        ns.add_veth(UPLINK, &peer, None)?.keep();
        ns.set_up(&peer)?;
        Node::address_uplink(ns, host, peer)
    }

    fn address_uplink(ns: Netns, host: u8, peer: String) -> Result<Node> {
        let ip = node_ip(host);
        ns.add_address(UPLINK, &format!("{ip}/24"))?.keep();
        ns.set_up(UPLINK)?;
        ns.add_route(&Route::default_via(IpAddr::V4(UNDERLAY_GATEWAY)))?
            .keep();
        Ok(Node { ns, ip, peer })
    }

    /// What NetManager would build, for static dataplanes: forwarding on
    /// and the container bridge with the gateway addresses `gw4`/`gw6`
    /// (with prefix).
    pub fn container_bridge(&self, gw4: &str, gw6: &str) -> Result<()> {
        self.ns.sysctl("net/ipv4/ip_forward", "1")?;
        self.ns.sysctl("net/ipv6/conf/all/forwarding", "1")?;
        self.ns.add_bridge(CONTAINER_BRIDGE)?.keep();
        self.ns.set_up(CONTAINER_BRIDGE)?;
        self.ns.add_address(CONTAINER_BRIDGE, gw4)?.keep();
        self.ns.add_address(CONTAINER_BRIDGE, gw6)?.keep();
        Ok(())
    }

    /// A container namespace behind the container bridge: `eth0` with
    /// `ip4`/`ip6` (with prefix), MTU 1450, default routes via `gw4`/`gw6`,
    /// and a MAC derived from the last IPv4 octet; the host end is
    /// `veth-<name>` on the bridge.
    pub fn container(&self, name: &str, net: [&str; 4]) -> Result<Container> {
        let [ip4, ip6, gw4, gw6] = net;
        let ns = Netns::new(name)?;
        let veth = format!("veth-{name}");
        let strip = |s: &str| s.split('/').next().unwrap_or(s).to_string();
        let last: u8 = strip(ip4)
            .rsplit('.')
            .next()
            .and_then(|o| o.parse().ok())
            .unwrap_or(0);
        let mac = [0x02, 0x00, 0x0a, 0x12, 0x00, last];
        self.ns.add_veth(&veth, "eth0", Some(&ns))?.keep();
        self.ns.set_link(
            &veth,
            &LinkSettings {
                up: true,
                master: Some(CONTAINER_BRIDGE),
                ..Default::default()
            },
        )?;
        ns.set_link(
            "eth0",
            &LinkSettings {
                up: true,
                mtu: Some(CONTAINER_MTU),
                mac: Some(mac),
                master: None,
            },
        )?;
        ns.add_address("eth0", ip4)?.keep();
        ns.add_address("eth0", ip6)?.keep();
        let gw = |s: &str| s.parse::<IpAddr>().with_context(|| format!("gateway {s}"));
        ns.add_route(&Route::default_via(gw(gw4)?))?.keep();
        ns.add_route(&Route::default_via(gw(gw6)?))?.keep();
        Ok(Container {
            ns,
            veth,
            ip4: strip(ip4),
            ip6: strip(ip6),
            mac,
        })
    }
}

/// A container of a static topology: its namespace, host-side veth,
/// addresses and MAC.
pub struct Container {
    pub ns: Netns,
    pub veth: String,
    pub ip4: String,
    pub ip6: String,
    pub mac: [u8; 6],
}

/// A container as NetManager sees one: a process (`sleep`) in a network
/// namespace of its own, with nothing in it but `lo` (down). Killed on drop,
/// which also ends its namespace.
pub struct ContainerProcess {
    proc: Proc,
}

impl ContainerProcess {
    pub fn start() -> Result<ContainerProcess> {
        let mut cmd = Command::new("sleep");
        cmd.arg("100000").stdin(Stdio::null());
        // SAFETY: unshare(2) is async-signal-safe; the child is single-threaded.
        unsafe {
            cmd.pre_exec(|| {
                nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
            });
        }
        // The namespace exists from fork on: once spawn returns (after exec),
        // /proc/<pid>/ns/net names it.
        let proc =
            Proc::spawn("container", cmd)?.stop_with(Signal::SIGKILL, Duration::from_secs(5));
        Ok(ContainerProcess { proc })
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn ns(&self) -> NsPath {
        NsPath::of_pid(self.pid())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_addresses() {
        assert_eq!(node_ip(7).to_string(), "198.51.100.7");
    }
}
