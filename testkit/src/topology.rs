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
        let u = Underlay::bridge(ns)?;
        u.ns.add_address("br0", &format!("{UNDERLAY_GATEWAY}/24"))?
            .keep();
        Ok(u)
    }

    /// Another segment: the bridge `br0` and nothing on it (no gateway,
    /// no cluster), for nodes with a second interface.
    pub fn segment(tag: &str) -> Result<Underlay> {
        Underlay::bridge(Netns::new(tag)?)
    }

    fn bridge(ns: Netns) -> Result<Underlay> {
        ns.add_bridge("br0")?.keep();
        ns.set_up("br0")?;
        Ok(Underlay { ns })
    }

    /// Interface `ifname` of namespace `ns` into this segment's bridge,
    /// carrying `addresses` (with prefix, IPv4 or IPv6); no routes. Returns
    /// the far end's name in the underlay (where a capture listens).
    pub fn plug_in(&self, ns: &NsPath, ifname: &str, addresses: &[&str]) -> Result<String> {
        let peer = crate::netns::unique("u");
        self.veth_to_bridge(ns, ifname, &peer)?;
        ns.set_up(ifname)?;
        for a in addresses {
            ns.add_address(ifname, a)?.keep();
        }
        Ok(peer)
    }

    /// A node namespace plugged into the underlay as 198.51.100.<host>.
    pub fn node(&self, host: u8) -> Result<Node> {
        self.plug(Netns::new(&format!("n{host}"))?, host)
    }

    /// A node with a fixed namespace name (the sandbox's).
    pub fn node_named(&self, name: &str, host: u8) -> Result<Node> {
        self.plug(Netns::named(name)?, host)
    }

    /// Another way out for `node`: interface `name` into the underlay with
    /// 198.51.100.<host>/24 and a default route of `metric` (a second
    /// uplink, less preferred than the first while that one is up). Its far
    /// end in the underlay is `up<host>`.
    pub fn add_uplink(&self, node: &Node, name: &str, host: u8, metric: u32) -> Result<()> {
        // Both uplinks sit on one segment here (unlike Wi-Fi and LTE): each
        // must answer ARP for its own address only, or peers would send to
        // one address through the other interface.
        node.ns.sysctl("net/ipv4/conf/all/arp_ignore", "1")?;
        node.ns.sysctl("net/ipv4/conf/all/arp_announce", "2")?;
        let peer = format!("up{host}");
        self.veth_to_bridge(&node.ns, name, &peer)?;
        node.ns
            .add_address(name, &format!("{}/24", node_ip(host)))?
            .keep();
        node.ns.set_up(name)?;
        node.ns
            .add_route(
                &Route::default_via(IpAddr::V4(UNDERLAY_GATEWAY))
                    .dev(name)
                    .metric(metric),
            )?
            .keep();
        Ok(())
    }

    /// A veth pair: `ifname` in `ns`, its `peer` end in this segment's
    /// bridge, up.
    fn veth_to_bridge(&self, ns: &NsPath, ifname: &str, peer: &str) -> Result<()> {
        ns.add_veth(ifname, peer, Some(&self.ns))?.keep();
        self.ns.set_link(
            peer,
            &LinkSettings {
                up: true,
                master: Some("br0"),
                ..Default::default()
            },
        )
    }

    fn plug(&self, ns: Netns, host: u8) -> Result<Node> {
        let peer = format!("u{host}");
        self.veth_to_bridge(&ns, UPLINK, &peer)?;
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
        container_bridge(&self.ns, gw4, gw6)
    }

    /// A container namespace behind the container bridge: `eth0` with
    /// `ip4`/`ip6` (with prefix), MTU 1450, default routes via `gw4`/`gw6`,
    /// and a MAC derived from the last IPv4 octet; the host end is
    /// `veth-<name>` on the bridge.
    pub fn container(&self, name: &str, net: [&str; 4]) -> Result<Container> {
        container(&self.ns, name, net)
    }
}

/// A node namespace without any uplink (for nodes wired by hand: behind a
/// NAT router, with two interfaces, on an IPv6 underlay): forwarding on and
/// the container bridge with `gw4`/`gw6`.
pub fn bare_node(tag: &str, gw4: &str, gw6: &str) -> Result<Netns> {
    let ns = Netns::new(tag)?;
    container_bridge(&ns, gw4, gw6)?;
    Ok(ns)
}

/// A veth pair between two namespaces, both ends up: `a_if` in `a`, `b_if`
/// in `b`.
pub fn link(a: &NsPath, a_if: &str, b: &NsPath, b_if: &str) -> Result<()> {
    a.add_veth(a_if, b_if, Some(b))?.keep();
    a.set_up(a_if)?;
    b.set_up(b_if)
}

/// Forwarding on and the container bridge in `ns` (see
/// [`Node::container_bridge`]).
pub fn container_bridge(ns: &NsPath, gw4: &str, gw6: &str) -> Result<()> {
    ns.sysctl("net/ipv4/ip_forward", "1")?;
    ns.sysctl("net/ipv6/conf/all/forwarding", "1")?;
    ns.add_bridge(CONTAINER_BRIDGE)?.keep();
    ns.set_up(CONTAINER_BRIDGE)?;
    ns.add_address(CONTAINER_BRIDGE, gw4)?.keep();
    ns.add_address(CONTAINER_BRIDGE, gw6)?.keep();
    Ok(())
}

/// A container behind the container bridge of `node` (see
/// [`Node::container`]).
pub fn container(node: &NsPath, name: &str, net: [&str; 4]) -> Result<Container> {
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
    node.add_veth(&veth, "eth0", Some(&ns))?.keep();
    node.set_link(
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
