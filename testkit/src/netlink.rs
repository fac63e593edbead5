//! Links, addresses and routes inside a namespace through netlink
//! (rtnetlink), with guards that remove what they created on drop -- for
//! changes to a namespace that outlives the change (a benchmark scenario's
//! routes); inside a namespace the kit deletes anyway, `keep()` them.
//!
//! A netlink socket talks to the namespace it was created in, so every call
//! opens one on a thread inside the namespace ([`NsPath::within`]).

use std::fmt;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::str::FromStr;

use anyhow::{Context, Result, anyhow, bail};
use futures::TryStreamExt;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoMacVtap, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{NeighbourFlags, NeighbourState};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteMetric, RouteType,
};
use rtnetlink::{
    Handle, LinkBridge, LinkMacVtap, LinkMessageBuilder, LinkUnspec, LinkVeth, LinkVxlan,
    RouteMessageBuilder,
};

use crate::netns::NsPath;

pub use netlink_packet_route::link::MacVtapMode;

/// An interface address with its prefix length, e.g. `10.18.0.2/26`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl FromStr for Cidr {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Cidr> {
        let (a, p) = s
            .split_once('/')
            .with_context(|| format!("{s:?} is not address/prefix"))?;
        let addr: IpAddr = a.parse().with_context(|| format!("address in {s:?}"))?;
        let prefix: u8 = p.parse().with_context(|| format!("prefix in {s:?}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            bail!("prefix /{prefix} is too long in {s:?}");
        }
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// What the kernel says about a link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkState {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    pub mac: Option<[u8; 6]>,
    /// Index of the bridge it is enslaved to.
    pub master: Option<u32>,
    /// Index of the link it sits on (a macvtap's or a vlan's lower device).
    pub parent: Option<u32>,
    /// Its kind (`veth`, `bridge`, `macvtap`, ...); None for plain devices.
    pub kind: Option<String>,
    /// A macvtap's mode.
    pub macvtap_mode: Option<MacVtapMode>,
    pub up: bool,
}

impl LinkState {
    fn from_message(m: &LinkMessage) -> LinkState {
        let mut s = LinkState {
            index: m.header.index,
            name: String::new(),
            mtu: 0,
            mac: None,
            master: None,
            parent: None,
            kind: None,
            macvtap_mode: None,
            up: m.header.flags.contains(LinkFlags::Up),
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => s.name = n.clone(),
                LinkAttribute::Mtu(v) => s.mtu = *v,
                LinkAttribute::Address(a) => s.mac = a.as_slice().try_into().ok(),
                LinkAttribute::Controller(i) => s.master = Some(*i),
                LinkAttribute::Link(i) => s.parent = Some(*i),
                LinkAttribute::LinkInfo(infos) => s.read_link_info(infos),
                _ => {}
            }
        }
        s
    }

    fn read_link_info(&mut self, infos: &[LinkInfo]) {
        for info in infos {
            match info {
                LinkInfo::Kind(k) => self.kind = Some(k.to_string()),
                LinkInfo::Data(InfoData::MacVtap(data)) => {
                    self.macvtap_mode = data.iter().find_map(|d| match d {
                        InfoMacVtap::Mode(m) => Some(*m),
                        _ => None,
                    });
                }
                _ => {}
            }
        }
    }
}

/// Changes to one link; unset fields stay as they are.
#[derive(Clone, Debug, Default)]
pub struct LinkSettings<'a> {
    pub up: bool,
    pub mtu: Option<u32>,
    pub mac: Option<[u8; 6]>,
    /// Enslave to this bridge.
    pub master: Option<&'a str>,
}

/// A route of the main table: to `dest` (None: the default route) via a
/// gateway and/or out of a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub dest: Option<Cidr>,
    pub via: Option<IpAddr>,
    pub dev: Option<String>,
    /// The family when neither `dest` nor `via` says it.
    pub v6: bool,
    /// The route's metric (priority); lower wins.
    pub metric: Option<u32>,
    /// A locked path MTU (`mtu lock N`): forwarded traffic honours it too.
    pub mtu_lock: Option<u32>,
    /// Drops what it matches (`blackhole`).
    pub blackhole: bool,
}

impl Route {
    pub fn default_via(gateway: IpAddr) -> Route {
        Route {
            via: Some(gateway),
            v6: gateway.is_ipv6(),
            ..Route::none()
        }
    }

    fn none() -> Route {
        Route {
            dest: None,
            via: None,
            dev: None,
            v6: false,
            metric: None,
            mtu_lock: None,
            blackhole: false,
        }
    }

    /// Drops everything to `dest`.
    pub fn blackhole(dest: &str) -> Result<Route> {
        let mut r = Route::to(dest)?;
        r.blackhole = true;
        Ok(r)
    }

    pub fn metric(mut self, metric: u32) -> Route {
        self.metric = Some(metric);
        self
    }

    pub fn mtu_locked(mut self, mtu: u32) -> Route {
        self.mtu_lock = Some(mtu);
        self
    }

    /// The IPv4 (or IPv6) default route straight out of `dev`.
    pub fn default_dev(dev: &str, v6: bool) -> Route {
        Route {
            dev: Some(dev.to_string()),
            v6,
            ..Route::none()
        }
    }

    pub fn to(dest: &str) -> Result<Route> {
        let dest: Cidr = dest.parse()?;
        Ok(Route {
            dest: Some(dest),
            v6: dest.addr.is_ipv6(),
            ..Route::none()
        })
    }

    pub fn via(mut self, gateway: IpAddr) -> Route {
        self.via = Some(gateway);
        self
    }

    pub fn dev(mut self, dev: &str) -> Route {
        self.dev = Some(dev.to_string());
        self
    }
}

/// A VXLAN device (as flannel's vxlan backend makes them).
#[derive(Clone, Debug)]
pub struct Vxlan<'a> {
    pub vni: u32,
    pub local: Ipv4Addr,
    pub remote: Ipv4Addr,
    pub port: u16,
    pub dev: &'a str,
}

fn is_errno(e: &rtnetlink::Error, errno: nix::errno::Errno) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -(errno as i32))
}

/// Every link of the namespace (a test's namespaces hold a handful).
async fn all_links(h: &Handle) -> Result<Vec<LinkState>> {
    let dump: Vec<LinkMessage> = h.link().get().execute().try_collect().await?;
    Ok(dump.iter().map(LinkState::from_message).collect())
}

async fn find_link(h: &Handle, name: &str) -> Result<Option<LinkState>> {
    let links = all_links(h)
        .await
        .with_context(|| format!("looking for link {name}"))?;
    Ok(links.into_iter().find(|l| l.name == name))
}

async fn index_of(h: &Handle, name: &str) -> Result<u32> {
    Ok(find_link(h, name)
        .await?
        .with_context(|| format!("no link {name}"))?
        .index)
}

/// The first address of `m`: its local one, else its peer's.
fn address_of(m: &AddressMessage) -> Option<IpAddr> {
    let attr = |want_local: bool| {
        m.attributes.iter().find_map(|a| match (a, want_local) {
            (AddressAttribute::Local(a), true) | (AddressAttribute::Address(a), false) => Some(*a),
            _ => None,
        })
    };
    attr(true).or_else(|| attr(false))
}

/// Main-table routes of one family.
async fn main_routes(h: &Handle, v6: bool) -> Result<Vec<RouteMessage>> {
    let family = if v6 {
        RouteMessageBuilder::<Ipv6Addr>::new().build()
    } else {
        RouteMessageBuilder::<Ipv4Addr>::new().build()
    };
    let mut dump: Vec<RouteMessage> = h.route().get(family).execute().try_collect().await?;
    dump.retain(|r| r.header.table == RouteHeader::RT_TABLE_MAIN);
    Ok(dump)
}

fn address_message(index: u32, cidr: Cidr) -> AddressMessage {
    let mut m = AddressMessage::default();
    m.header.family = match cidr.addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    m.header.prefix_len = cidr.prefix;
    m.header.index = index;
    m.attributes.push(AddressAttribute::Address(cidr.addr));
    if cidr.addr.is_ipv4() {
        m.attributes.push(AddressAttribute::Local(cidr.addr));
    }
    m
}

async fn route_message(h: &Handle, r: &Route) -> Result<RouteMessage> {
    let mut b = RouteMessageBuilder::<IpAddr>::new();
    b.get_mut().header.address_family = if r.v6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    if let Some(d) = r.dest {
        b = b
            .destination_prefix(d.addr, d.prefix)
            .map_err(|e| anyhow!("route to {d}: {e}"))?;
    }
    if let Some(g) = r.via {
        b = b.gateway(g).map_err(|e| anyhow!("route via {g}: {e}"))?;
    }
    if let Some(dev) = &r.dev {
        b = b.output_interface(index_of(h, dev).await?);
    }
    if let Some(m) = r.metric {
        b = b.priority(m);
    }
    if r.blackhole {
        b = b.kind(RouteType::BlackHole);
    }
    let mut msg = b.build();
    if let Some(mtu) = r.mtu_lock {
        // RTAX_MTU is metric 2: its lock bit is 1 << 2.
        msg.attributes.push(RouteAttribute::Metrics(vec![
            RouteMetric::Lock(1 << 2),
            RouteMetric::Mtu(mtu),
        ]));
    }
    Ok(msg)
}

impl NsPath {
    /// Runs `f` with a netlink handle of this namespace.
    pub fn netlink<T, F, Fut>(&self, f: F) -> Result<T>
    where
        T: Send,
        F: FnOnce(Handle) -> Fut + Send,
        Fut: Future<Output = Result<T>>,
    {
        self.within(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("a runtime for netlink")?;
            rt.block_on(async {
                let (conn, handle, _) =
                    rtnetlink::new_connection().context("opening a netlink socket")?;
                tokio::spawn(conn);
                f(handle).await
            })
        })?
        .with_context(|| format!("netlink in {}", self.path().display()))
    }

    /// The link called `name`, if there is one.
    pub fn link(&self, name: &str) -> Result<Option<LinkState>> {
        self.netlink(|h| async move { find_link(&h, name).await })
    }

    /// Every link.
    pub fn links(&self) -> Result<Vec<LinkState>> {
        self.netlink(|h| async move { all_links(&h).await.context("listing links") })
    }

    /// The name of the bridge `name` is enslaved to.
    pub fn master_of(&self, name: &str) -> Result<Option<String>> {
        let Some(master) = self.link(name)?.and_then(|l| l.master) else {
            return Ok(None);
        };
        Ok(self
            .links()?
            .into_iter()
            .find(|l| l.index == master)
            .map(|l| l.name))
    }

    /// The addresses of device `dev`.
    pub fn addresses(&self, dev: &str) -> Result<Vec<Cidr>> {
        self.netlink(|h| async move {
            let index = index_of(&h, dev).await?;
            let dump: Vec<AddressMessage> = h.address().get().execute().try_collect().await?;
            Ok(dump
                .iter()
                .filter(|m| m.header.index == index)
                .filter_map(|m| {
                    address_of(m).map(|addr| Cidr {
                        addr,
                        prefix: m.header.prefix_len,
                    })
                })
                .collect())
        })
    }

    /// The gateway of the IPv4 (or IPv6) default route of the main table.
    pub fn default_gateway(&self, v6: bool) -> Result<Option<IpAddr>> {
        self.netlink(|h| async move {
            let routes = main_routes(&h, v6).await.context("listing routes")?;
            let gateway = |r: &RouteMessage| {
                r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Gateway(RouteAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
                    RouteAttribute::Gateway(RouteAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
                    _ => None,
                })
            };
            Ok(routes
                .iter()
                .filter(|r| r.header.destination_prefix_length == 0)
                .find_map(gateway))
        })
    }

    /// A veth pair `name` -- `peer`, the peer created right inside
    /// `peer_ns` if given (so it may share a name with a link here).
    pub fn add_veth(&self, name: &str, peer: &str, peer_ns: Option<&NsPath>) -> Result<LinkGuard> {
        let target = peer_ns.map(NsPath::open).transpose()?;
        self.netlink(|h| async move {
            let mut peer_msg = LinkMessageBuilder::<LinkUnspec>::new().name(peer.to_string());
            if let Some(ns) = &target {
                peer_msg = peer_msg.append_extra_attribute(LinkAttribute::NetNsFd(ns.as_raw_fd()));
            }
            let msg = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
                .name(name.to_string())
                .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg.build())))
                .build();
            h.link()
                .add(msg)
                .execute()
                .await
                .with_context(|| format!("creating veth {name} -- {peer}"))
        })?;
        Ok(LinkGuard::new(self, name))
    }

    /// A permanent neighbour entry: `addr` is at `mac` on `dev`.
    pub fn add_neighbour(&self, dev: &str, addr: IpAddr, mac: [u8; 6]) -> Result<()> {
        self.netlink(|h| async move {
            let index = index_of(&h, dev).await?;
            h.neighbours()
                .add(index, addr)
                .state(NeighbourState::Permanent)
                .flags(NeighbourFlags::empty())
                .link_layer_address(&mac)
                .execute()
                .await
                .with_context(|| format!("adding neighbour {addr} on {dev}"))
        })
    }

    /// A macvtap `name` on `parent` in `mode` (a unikernel guest's NIC).
    pub fn add_macvtap(&self, name: &str, parent: &str, mode: MacVtapMode) -> Result<LinkGuard> {
        self.netlink(|h| async move {
            let parent_index = index_of(&h, parent).await?;
            h.link()
                .add(LinkMacVtap::new(name, parent_index, mode).build())
                .execute()
                .await
                .with_context(|| format!("creating macvtap {name} on {parent}"))
        })?;
        Ok(LinkGuard::new(self, name))
    }

    /// A bridge with an address of its own (see [`bridge_mac`]).
    pub fn add_bridge(&self, name: &str) -> Result<LinkGuard> {
        let mac = bridge_mac().to_vec();
        self.netlink(|h| async move {
            h.link()
                .add(LinkBridge::new(name).address(mac).build())
                .execute()
                .await
                .with_context(|| format!("creating bridge {name}"))
        })?;
        Ok(LinkGuard::new(self, name))
    }

    pub fn add_vxlan(&self, name: &str, v: &Vxlan) -> Result<LinkGuard> {
        self.netlink(|h| async move {
            let dev = index_of(&h, v.dev).await?;
            let msg = LinkVxlan::new(name, v.vni)
                .local(v.local)
                .remote(v.remote)
                .port(v.port)
                .dev(dev)
                .build();
            h.link()
                .add(msg)
                .execute()
                .await
                .with_context(|| format!("creating vxlan {name}"))
        })?;
        Ok(LinkGuard::new(self, name))
    }

    /// Applies `s` to link `name`.
    pub fn set_link(&self, name: &str, s: &LinkSettings) -> Result<()> {
        self.netlink(|h| async move {
            let index = index_of(&h, name).await?;
            let mut b = LinkUnspec::new_with_index(index);
            if let Some(m) = s.master {
                b = b.controller(index_of(&h, m).await?);
            }
            if let Some(mtu) = s.mtu {
                b = b.mtu(mtu);
            }
            if let Some(mac) = s.mac {
                b = b.address(mac.to_vec());
            }
            if s.up {
                b = b.up();
            }
            h.link()
                .set(b.build())
                .execute()
                .await
                .with_context(|| format!("changing link {name}"))
        })
    }

    pub fn set_up(&self, name: &str) -> Result<()> {
        self.set_link(
            name,
            &LinkSettings {
                up: true,
                ..Default::default()
            },
        )
    }

    /// Takes the link down (it keeps its addresses; its routes go).
    pub fn set_down(&self, name: &str) -> Result<()> {
        self.netlink(|h| async move {
            let index = index_of(&h, name).await?;
            h.link()
                .set(LinkUnspec::new_with_index(index).down().build())
                .execute()
                .await
                .with_context(|| format!("taking link {name} down"))
        })
    }

    pub fn del_link(&self, name: &str) -> Result<()> {
        self.netlink(|h| async move {
            let Some(l) = find_link(&h, name).await? else {
                return Ok(());
            };
            match h.link().del(l.index).execute().await {
                Err(e) if !is_errno(&e, nix::errno::Errno::ENODEV) => {
                    Err(e).with_context(|| format!("deleting link {name}"))
                }
                _ => Ok(()),
            }
        })
    }

    /// Adds `cidr` to `dev` (IPv6 without duplicate address detection, so
    /// it is usable at once).
    pub fn add_address(&self, dev: &str, cidr: &str) -> Result<AddressGuard> {
        let c: Cidr = cidr.parse()?;
        self.netlink(|h| async move {
            let index = index_of(&h, dev).await?;
            let mut req = h.address().add(index, c.addr, c.prefix);
            if c.addr.is_ipv6() {
                req.message_mut()
                    .attributes
                    .push(AddressAttribute::Flags(AddressFlags::Nodad));
            }
            req.execute()
                .await
                .with_context(|| format!("adding {c} to {dev}"))
        })?;
        Ok(AddressGuard {
            ns: self.clone(),
            dev: dev.to_string(),
            cidr: c,
        })
    }

    pub fn del_address(&self, dev: &str, cidr: &str) -> Result<()> {
        let c: Cidr = cidr.parse()?;
        self.netlink(|h| async move {
            let index = index_of(&h, dev).await?;
            h.address()
                .del(address_message(index, c))
                .execute()
                .await
                .with_context(|| format!("removing {c} from {dev}"))
        })
    }

    pub fn add_route(&self, r: &Route) -> Result<RouteGuard> {
        self.route_change(r, false)?;
        Ok(RouteGuard {
            ns: self.clone(),
            route: r.clone(),
        })
    }

    /// Adds or replaces a route (`ip route replace`).
    pub fn replace_route(&self, r: &Route) -> Result<()> {
        self.route_change(r, true)
    }

    fn route_change(&self, r: &Route, replace: bool) -> Result<()> {
        self.netlink(|h| async move {
            let msg = route_message(&h, r).await?;
            let req = h.route().add(msg);
            let req = if replace { req.replace() } else { req };
            req.execute()
                .await
                .with_context(|| format!("adding route {r:?}"))
        })
    }

    pub fn del_route(&self, r: &Route) -> Result<()> {
        self.netlink(|h| async move {
            let msg = route_message(&h, r).await?;
            h.route()
                .del(msg)
                .execute()
                .await
                .with_context(|| format!("deleting route {r:?}"))
        })
    }
}

/// A link the kit created; deleted on drop (with its peer, for a veth).
#[must_use = "dropping the guard deletes the link; keep() leaves it to its namespace"]
pub struct LinkGuard {
    ns: NsPath,
    name: String,
}

impl LinkGuard {
    fn new(ns: &NsPath, name: &str) -> LinkGuard {
        LinkGuard {
            ns: ns.clone(),
            name: name.to_string(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Leaves the link in place (its namespace goes with the test).
    pub fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for LinkGuard {
    fn drop(&mut self) {
        if self.ns.path().exists() {
            let _ = self.ns.del_link(&self.name);
        }
    }
}

/// An address the kit added; removed on drop.
#[must_use = "dropping the guard removes the address; keep() leaves it"]
pub struct AddressGuard {
    ns: NsPath,
    dev: String,
    cidr: Cidr,
}

impl AddressGuard {
    pub fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for AddressGuard {
    fn drop(&mut self) {
        if self.ns.path().exists() {
            let _ = self.ns.del_address(&self.dev, &self.cidr.to_string());
        }
    }
}

/// A route the kit added; deleted on drop.
#[must_use = "dropping the guard deletes the route; keep() leaves it"]
pub struct RouteGuard {
    ns: NsPath,
    route: Route,
}

impl RouteGuard {
    pub fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for RouteGuard {
    fn drop(&mut self) {
        if self.ns.path().exists() {
            let _ = self.ns.del_route(&self.route);
        }
    }
}

/// A locally administered MAC, different for every bridge this process
/// creates. A bridge without one takes the lowest MAC of its ports and
/// changes it when a port joins; a neighbour that learnt the old one less
/// than the ARP lock time before ignores the gratuitous ARP and keeps
/// sending to an address nobody owns (a node's broker connection stalled
/// that way when a test added a second uplink).
fn bridge_mac() -> [u8; 6] {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(1);
    let pid = (std::process::id() & 0xffff) as u16;
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let [p0, p1] = pid.to_be_bytes();
    let [n0, n1] = n.to_be_bytes();
    [0x02, 0xb7, p0, p1, n0, n1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_and_print() {
        let c: Cidr = "10.18.0.2/26".parse().unwrap();
        assert_eq!(c.addr, IpAddr::from([10, 18, 0, 2]));
        assert_eq!(c.prefix, 26);
        assert_eq!(c.to_string(), "10.18.0.2/26");
        assert_eq!("fc00::42/120".parse::<Cidr>().unwrap().prefix, 120);
        assert!("10.18.0.2".parse::<Cidr>().is_err());
        assert!("10.18.0.2/33".parse::<Cidr>().is_err());
    }
}
