//! Container networking through netlink: the node bridge, one veth pair per
//! container, addresses and routes inside the container namespace, the
//! uplink/default-route lookups and their change events (`route_events`),
//! sysctls, NAT (`nft`) and the host's FORWARD chain (`forward`).

pub mod forward;
pub mod netns;
pub mod nft;
pub mod route_events;
mod uplink;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result, anyhow};
use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressFlags};
use netlink_packet_route::link::MacVtapMode;
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkMessage};
use rtnetlink::{
    Handle, LinkBridge, LinkMacVtap, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
};

use crate::addresses::{AddressPair, Subnet, V4_PREFIX, V6_PREFIX};
pub use netns::NetnsRef;
pub use uplink::UplinkInterface;

pub const BRIDGE: &str = "goProxyBridge";
/// Name of the container end inside its namespace.
pub const CONTAINER_IFNAME: &str = "eth0";
/// The guest's NIC in a unikernel namespace.
pub const UNIKERNEL_TAP: &str = "tap0";

/// What was created for one deployment.
#[derive(Debug, Clone, Copy)]
pub struct Attached {
    pub host_ifindex: u32,
    pub mac: [u8; 6],
}

/// Netlink handle of the daemon's own namespace.
#[derive(Clone)]
pub struct Plumbing {
    handle: Handle,
    mtu: u16,
    /// GRO (hence NAPI) on every container end: the XDP uplink program
    /// redirects into the veths (`--uplink-hook xdp-redirect`).
    container_gro: bool,
}

fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -errno)
}

/// Deterministic, locally administered MAC from the container's v4 address:
/// unique within the node, stable across restarts, easy to read in dumps.
pub fn container_mac(v4: Ipv4Addr) -> [u8; 6] {
    let o = v4.octets();
    [0x02, 0x0a, o[0], o[1], o[2], o[3]]
}

/// Host-side veth name; derived from the address offset, so it is unique in
/// the node namespace and short enough for IFNAMSIZ.
pub fn host_ifname(subnet: &Subnet, v4: Ipv4Addr) -> String {
    let off = u32::from(v4).wrapping_sub(u32::from(subnet.v4));
    format!("oakv{off}")
}

impl Plumbing {
    /// Open a netlink connection in the current namespace.
    pub fn new(mtu: u16) -> Result<Plumbing> {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening a netlink socket")?;
        tokio::spawn(conn);
        Ok(Plumbing {
            handle,
            mtu,
            container_gro: false,
        })
    }

    /// Enables GRO on the container end of every veth made from now on,
    /// which XDP redirection into the veth needs ([`crate::ethtool`]).
    pub fn with_container_gro(mut self, on: bool) -> Plumbing {
        self.container_gro = on;
        self
    }

    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    pub async fn link_by_name(&self, name: &str) -> Result<Option<LinkMessage>> {
        link_by_name(&self.handle, name).await
    }

    pub async fn link_name(&self, index: u32) -> Result<Option<String>> {
        let mut s = self.handle.link().get().match_index(index).execute();
        match s.try_next().await {
            Ok(Some(m)) => Ok(ifname(&m)),
            Ok(None) => Ok(None),
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(None),
            Err(e) => Err(e).context("looking up a link by index"),
        }
    }

    /// Create (or adopt) the bridge with the gateway addresses, and switch on
    /// forwarding. Idempotent, so restarts and re-registrations reuse it.
    pub async fn ensure_bridge(&self, subnet: &Subnet) -> Result<u32> {
        let index = match self.link_by_name(BRIDGE).await? {
            Some(l) => l.header.index,
            None => {
                self.handle
                    .link()
                    .add(LinkBridge::new(BRIDGE).build())
                    .execute()
                    .await
                    .with_context(|| format!("creating bridge {BRIDGE}"))?;
                self.link_by_name(BRIDGE)
                    .await?
                    .ok_or_else(|| anyhow!("bridge {BRIDGE} vanished after creation"))?
                    .header
                    .index
            }
        };
        let gw = subnet.gateway();
        add_address(&self.handle, index, IpAddr::V4(gw.v4), V4_PREFIX).await?;
        add_address(&self.handle, index, IpAddr::V6(gw.v6), V6_PREFIX).await?;
        // A bridge without an address of its own takes the lowest MAC of
        // its ports, so it would change whenever a container's veth joins;
        // containers that cached the gateway's old MAC within the kernel's
        // ARP lock time ignore the gratuitous ARP and lose their way out.
        // Set, the address stays put.
        let mac = container_mac(gw.v4).to_vec();
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().address(mac).build())
            .execute()
            .await
            .with_context(|| format!("bringing {BRIDGE} up"))?;
        enable_forwarding()?;
        Ok(index)
    }

    /// Veth pair for one deployment: host end on the bridge, the other end
    /// created directly inside the target namespace as eth0, then addressed
    /// and routed there.
    pub async fn attach(
        &self,
        target: &NetnsRef,
        host_name: &str,
        addrs: AddressPair,
        subnet: &Subnet,
    ) -> Result<Attached> {
        let ns = target.open()?;
        let bridge = self
            .link_by_name(BRIDGE)
            .await?
            .ok_or_else(|| anyhow!("bridge {BRIDGE} is missing"))?
            .header
            .index;
        // A leftover from a crash would make the creation fail.
        self.delete_link(host_name).await?;
        let mac = container_mac(addrs.v4);
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(CONTAINER_IFNAME.to_string())
            .mtu(self.mtu as u32)
            .address(mac.to_vec())
            .append_extra_attribute(LinkAttribute::NetNsFd(std::os::fd::AsRawFd::as_raw_fd(&ns)))
            .build();
        let msg = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(host_name.to_string())
            .mtu(self.mtu as u32)
            .controller(bridge)
            .up()
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .with_context(|| {
                format!("creating veth {host_name} into {}", target.path().display())
            })?;
        let host = self
            .link_by_name(host_name)
            .await?
            .ok_or_else(|| anyhow!("veth {host_name} vanished after creation"))?;
        let gw = subnet.gateway();
        let mtu = self.mtu;
        let gro = self.container_gro;
        let inside = netns::in_netns(ns, move |h| {
            configure_container_side(h, addrs, gw, mtu, gro)
        })
        .await;
        if let Err(e) = inside {
            let _ = self.delete_link(host_name).await;
            return Err(e.context(format!(
                "configuring {CONTAINER_IFNAME} in {}",
                target.path().display()
            )));
        }
        // Host end: no rp_filter surprises for replies from the container.
        let _ = write_sysctl(&format!("net/ipv4/conf/{host_name}/rp_filter"), "0");
        Ok(Attached {
            host_ifindex: host.header.index,
            mac,
        })
    }

    /// Delete a link by name; absent is fine (deleting one veth end removes both).
    pub async fn delete_link(&self, name: &str) -> Result<()> {
        let Some(l) = self.link_by_name(name).await? else {
            return Ok(());
        };
        match self.handle.link().del(l.header.index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("deleting link {name}")),
        }
    }

    /// Remove the bridge and what lets its traffic through the host's
    /// FORWARD chain (used by tests and a full teardown).
    pub async fn remove_bridge(&self) -> Result<()> {
        self.delete_link(BRIDGE).await?;
        tokio::task::spawn_blocking(|| forward::remove(BRIDGE))
            .await
            .context("removing the FORWARD accepts")?
    }
}

/// GRO on the container end of a veth made earlier (by a run whose hook
/// was not `xdp-redirect`): what [`Plumbing::with_container_gro`] gives the
/// veths it makes.
pub async fn enable_container_gro(target: &NetnsRef) -> Result<()> {
    let ns = target.open()?;
    netns::blocking_in_netns(ns, || crate::ethtool::enable_gro(CONTAINER_IFNAME)).await
}

fn ifname(m: &LinkMessage) -> Option<String> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<LinkMessage>> {
    let mut s = handle.link().get().match_name(name.to_string()).execute();
    match s.try_next().await {
        Ok(m) => Ok(m),
        Err(e) if is_errno(&e, libc::ENODEV) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("looking up link {name}")),
    }
}

/// Add an address (replace, so repeating it is harmless). IPv6 addresses skip
/// duplicate address detection: the subnet is ours alone, and a tentative
/// address would drop the first second of traffic.
async fn add_address(handle: &Handle, index: u32, ip: IpAddr, prefix: u8) -> Result<()> {
    let mut req = handle.address().add(index, ip, prefix).replace();
    if ip.is_ipv6() {
        req.message_mut()
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    req.execute()
        .await
        .with_context(|| format!("adding address {ip}/{prefix}"))
}

/// Inside the container namespace: lo and eth0 up (with GRO when `gro`),
/// addresses, default routes.
async fn configure_container_side(
    h: Handle,
    addrs: AddressPair,
    gw: AddressPair,
    mtu: u16,
    gro: bool,
) -> Result<()> {
    if let Some(lo) = link_by_name(&h, "lo").await? {
        h.link()
            .set(LinkUnspec::new_with_index(lo.header.index).up().build())
            .execute()
            .await
            .context("bringing lo up")?;
    }
    let eth = link_by_name(&h, CONTAINER_IFNAME)
        .await?
        .ok_or_else(|| anyhow!("{CONTAINER_IFNAME} did not arrive in the namespace"))?
        .header
        .index;
    h.link()
        .set(LinkUnspec::new_with_index(eth).mtu(mtu as u32).up().build())
        .execute()
        .await
        .context("bringing eth0 up")?;
    if gro {
        crate::ethtool::enable_gro(CONTAINER_IFNAME)?;
    }
    add_address(&h, eth, IpAddr::V4(addrs.v4), V4_PREFIX).await?;
    add_address(&h, eth, IpAddr::V6(addrs.v6), V6_PREFIX).await?;
    let r4 = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(gw.v4)
        .output_interface(eth)
        .build();
    h.route()
        .add(r4)
        .replace()
        .execute()
        .await
        .with_context(|| format!("adding default route via {}", gw.v4))?;
    let r6 = RouteMessageBuilder::<Ipv6Addr>::new()
        .gateway(gw.v6)
        .output_interface(eth)
        .build();
    h.route()
        .add(r6)
        .replace()
        .execute()
        .await
        .with_context(|| format!("adding IPv6 default route via {}", gw.v6))?;
    Ok(())
}

/// Write a value under /proc/sys (of the calling thread's namespace).
pub fn write_sysctl(key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{key}");
    std::fs::write(&path, value).with_context(|| format!("writing {value} to {path}"))
}

/// Routing between bridge, uplink and tunnel; no reverse-path filtering on
/// the bridge, whose sources (service and remote addresses after the eBPF
/// rewrite) are not routed back through it.
fn enable_forwarding() -> Result<()> {
    write_sysctl("net/ipv4/ip_forward", "1")?;
    write_sysctl("net/ipv6/conf/all/forwarding", "1")?;
    write_sysctl(&format!("net/ipv4/conf/{BRIDGE}/rp_filter"), "0")?;
    Ok(())
}

/// The guest's NIC in a unikernel namespace, as upstream's NetManager makes
/// it: a macvtap `tap0` in bridge mode on the namespace's `eth0`. The guest
/// takes over the instance address (NodeEngine moves it from `eth0` to the
/// guest), so the dataplane delivers to the macvtap's MAC, which is
/// returned.
pub async fn unikernel_tap(ns_name: &str) -> Result<[u8; 6]> {
    let ns = NetnsRef::Named(ns_name.to_string()).open()?;
    netns::in_netns(ns, |h| async move {
        let eth = link_by_name(&h, CONTAINER_IFNAME)
            .await?
            .ok_or_else(|| anyhow!("{CONTAINER_IFNAME} missing in the unikernel namespace"))?
            .header
            .index;
        h.link()
            .add(
                LinkMacVtap::new(UNIKERNEL_TAP, eth, MacVtapMode::Bridge)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .context("creating the macvtap tap0 (is the macvtap module available?)")?;
        let tap = link_by_name(&h, UNIKERNEL_TAP)
            .await?
            .ok_or_else(|| anyhow!("{UNIKERNEL_TAP} vanished after creation"))?;
        tap.attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Address(mac) => <[u8; 6]>::try_from(mac.as_slice()).ok(),
                _ => None,
            })
            .ok_or_else(|| anyhow!("{UNIKERNEL_TAP} has no MAC address"))
    })
    .await
}
