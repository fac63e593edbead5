//! What the guest is told about its network, read from the namespace
//! NetManager prepared for the instance (`/unikernel/deploy`).
//!
//! Upstream's guest gets `netdev.ipv4_addr=... netdev.ipv4_gw_addr=...
//! netdev.ipv4_subnet_mask=...` on its command line and a NIC with the tap's
//! MAC. Two namespace layouts exist:
//!
//! - **macvtap** (upstream's current NetManager): `tap0` is a macvtap on the
//!   namespace's uplink. The guest takes over the instance address: address,
//!   mask and gateway are those of the uplink's default route, the address is
//!   removed from the uplink, qemu gets the macvtap's character device and
//!   the NIC gets `tap0`'s MAC (a macvtap only passes frames for its own).
//! - **bridge** (this repository's NetManager, like upstream's earlier one):
//!   `tap0` is a TAP in bridge `virbr0` (192.168.1.1/30), and the namespace
//!   NATs the instance address to the guest. The guest gets the bridge
//!   subnet's other address (192.168.1.2), the bridge as gateway and the
//!   bridge's mask. Its NIC MAC is derived from `tap0`'s (not equal: the
//!   bridge owns `tap0`'s MAC, and a guest using it would look like the
//!   bridge itself).

use std::net::Ipv4Addr;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// The tap device NetManager creates in the instance's namespace.
pub const TAP_NAME: &str = "tap0";

/// The network a guest is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestNet {
    pub address: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub prefix: u8,
    pub mac: String,
    pub backend: Backend,
}

/// How qemu reaches the namespace's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// A TAP device by name (bridge layout).
    Tap(String),
    /// A macvtap's character device, `/dev/tap<ifindex>`.
    Macvtap { device: String },
}

impl GuestNet {
    /// The dotted mask of the prefix.
    pub fn mask(&self) -> Ipv4Addr {
        prefix_mask(self.prefix)
    }

    /// The kernel command line upstream builds:
    /// `netdev.ipv4_addr=A netdev.ipv4_gw_addr=G netdev.ipv4_subnet_mask=M`.
    pub fn kernel_args(&self) -> String {
        format!(
            "netdev.ipv4_addr={} netdev.ipv4_gw_addr={} netdev.ipv4_subnet_mask={}",
            self.address,
            self.gateway,
            self.mask()
        )
    }
}

fn prefix_mask(prefix: u8) -> Ipv4Addr {
    let bits = u32::MAX
        .checked_shl(32 - u32::from(prefix.min(32)))
        .unwrap_or(0);
    Ipv4Addr::from(bits)
}

#[derive(Debug, Deserialize)]
struct Link {
    ifindex: u32,
    ifname: String,
    #[serde(default)]
    address: String,
    #[serde(default)]
    master: Option<String>,
    #[serde(default)]
    linkinfo: Option<LinkInfo>,
}

#[derive(Debug, Deserialize)]
struct LinkInfo {
    #[serde(default)]
    info_kind: String,
}

#[derive(Debug, Deserialize)]
struct AddrLink {
    ifname: String,
    #[serde(default)]
    addr_info: Vec<AddrInfo>,
}

#[derive(Debug, Deserialize)]
struct AddrInfo {
    #[serde(default)]
    family: String,
    #[serde(default)]
    local: Option<Ipv4Addr>,
    #[serde(default)]
    prefixlen: u8,
}

#[derive(Debug, Deserialize)]
struct Route {
    #[serde(default)]
    gateway: Option<Ipv4Addr>,
    #[serde(default)]
    dev: String,
}

/// The namespace as `ip -j` shows it.
#[derive(Debug)]
pub struct Namespace {
    links: Vec<Link>,
    addrs: Vec<AddrLink>,
    default_routes: Vec<Route>,
}

async fn ip_json<T: serde::de::DeserializeOwned>(netns: &str, args: &[&str]) -> Result<T> {
    let out = tokio::process::Command::new("ip")
        .args(["-j", "-n", netns])
        .args(args)
        .output()
        .await
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip -n {netns} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("reading `ip -j -n {netns} {}`", args.join(" ")))
}

impl Namespace {
    pub async fn read(netns: &str) -> Result<Namespace> {
        Ok(Namespace {
            links: ip_json(netns, &["-d", "link", "show"]).await?,
            addrs: ip_json(netns, &["-4", "addr", "show"]).await?,
            default_routes: ip_json(netns, &["-4", "route", "show", "default"]).await?,
        })
    }

    fn v4(&self, ifname: &str) -> Option<(Ipv4Addr, u8)> {
        self.addrs
            .iter()
            .find(|a| a.ifname == ifname)?
            .addr_info
            .iter()
            .find(|i| i.family == "inet")
            .and_then(|i| Some((i.local?, i.prefixlen)))
    }

    /// Decides the guest's network from the layout (see the module docs).
    pub fn guest_net(&self) -> Result<GuestNet> {
        let tap = self
            .links
            .iter()
            .find(|l| l.ifname == TAP_NAME)
            .with_context(|| format!("the instance's namespace has no {TAP_NAME}"))?;
        let kind = tap
            .linkinfo
            .as_ref()
            .map(|i| i.info_kind.as_str())
            .unwrap_or("");
        match kind {
            "macvtap" => {
                let route = self
                    .default_routes
                    .first()
                    .context("the instance's namespace has no IPv4 default route")?;
                let gateway = route.gateway.context("the default route has no gateway")?;
                let (address, prefix) = self
                    .v4(&route.dev)
                    .with_context(|| format!("{} has no IPv4 address", route.dev))?;
                Ok(GuestNet {
                    address,
                    gateway,
                    prefix,
                    mac: tap.address.clone(),
                    backend: Backend::Macvtap {
                        device: format!("/dev/tap{}", tap.ifindex),
                    },
                })
            }
            "tun" => {
                let bridge = tap.master.as_deref().with_context(|| {
                    format!("{TAP_NAME} is in no bridge, so the guest has no network")
                })?;
                let (gateway, prefix) = self
                    .v4(bridge)
                    .with_context(|| format!("bridge {bridge} has no IPv4 address"))?;
                Ok(GuestNet {
                    address: peer_address(gateway, prefix)?,
                    gateway,
                    prefix,
                    mac: derived_mac(&tap.address)?,
                    backend: Backend::Tap(TAP_NAME.into()),
                })
            }
            other => bail!("{TAP_NAME} is a {other:?} device, neither a TAP nor a macvtap"),
        }
    }

    /// The uplink whose address a macvtap guest takes (for [`release_address`]).
    pub fn uplink(&self) -> Option<(String, Ipv4Addr, u8)> {
        let dev = &self.default_routes.first()?.dev;
        let (a, p) = self.v4(dev)?;
        Some((dev.clone(), a, p))
    }
}

/// The first host address of the bridge's subnet that is not the bridge's:
/// where the namespace's NAT sends the instance's traffic.
fn peer_address(bridge: Ipv4Addr, prefix: u8) -> Result<Ipv4Addr> {
    if prefix > 30 {
        bail!("the bridge subnet /{prefix} has no room for a guest");
    }
    let mask = u32::from(prefix_mask(prefix));
    let network = u32::from(bridge) & mask;
    let broadcast = network | !mask;
    (network + 1..broadcast)
        .map(Ipv4Addr::from)
        .find(|a| *a != bridge)
        .context("the bridge subnet has no free address")
}

/// A locally administered unicast MAC differing from `tap` in its last bit.
fn derived_mac(tap: &str) -> Result<String> {
    let mut bytes = [0u8; 6];
    let parts: Vec<&str> = tap.split(':').collect();
    if parts.len() != 6 {
        bail!("{TAP_NAME} has no MAC address ({tap:?})");
    }
    for (b, p) in bytes.iter_mut().zip(&parts) {
        *b = u8::from_str_radix(p, 16).with_context(|| format!("MAC {tap:?}"))?;
    }
    bytes[0] = (bytes[0] | 0x02) & !0x01;
    bytes[5] ^= 0x01;
    Ok(bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":"))
}

/// Removes the instance address from the uplink so the macvtap guest owns
/// it, as upstream does.
pub async fn release_address(netns: &str, dev: &str, address: Ipv4Addr, prefix: u8) -> Result<()> {
    let out = tokio::process::Command::new("ip")
        .args(["-n", netns, "addr", "del"])
        .arg(format!("{address}/{prefix}"))
        .args(["dev", dev])
        .output()
        .await
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "removing {address}/{prefix} from {dev} in {netns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(links: &str, addrs: &str, routes: &str) -> Namespace {
        Namespace {
            links: serde_json::from_str(links).expect("links"),
            addrs: serde_json::from_str(addrs).expect("addrs"),
            default_routes: serde_json::from_str(routes).expect("routes"),
        }
    }

    /// What `ip -j` prints in a namespace made by this repository's NetManager.
    #[test]
    fn bridge_layout_gives_the_nat_address() {
        let n = ns(
            r#"[{"ifindex":1,"ifname":"lo","address":"00:00:00:00:00:00"},
                {"ifindex":2,"ifname":"tap0","address":"5e:10:aa:bb:cc:dd","master":"virbr0","linkinfo":{"info_kind":"tun"}},
                {"ifindex":3,"ifname":"virbr0","address":"5e:10:aa:bb:cc:dd","linkinfo":{"info_kind":"bridge"}},
                {"ifindex":4,"ifname":"eth0","address":"aa:00:00:00:00:01","linkinfo":{"info_kind":"veth"}}]"#,
            r#"[{"ifname":"virbr0","addr_info":[{"family":"inet","local":"192.168.1.1","prefixlen":30}]},
                {"ifname":"eth0","addr_info":[{"family":"inet","local":"10.18.0.5","prefixlen":16}]}]"#,
            r#"[{"dst":"default","gateway":"10.18.0.1","dev":"eth0"}]"#,
        );
        let g = n.guest_net().expect("guest net");
        assert_eq!(g.address, Ipv4Addr::new(192, 168, 1, 2));
        assert_eq!(g.gateway, Ipv4Addr::new(192, 168, 1, 1));
        assert_eq!(g.mask(), Ipv4Addr::new(255, 255, 255, 252));
        assert_eq!(g.mac, "5e:10:aa:bb:cc:dc");
        assert_eq!(g.backend, Backend::Tap("tap0".into()));
        assert_eq!(
            g.kernel_args(),
            "netdev.ipv4_addr=192.168.1.2 netdev.ipv4_gw_addr=192.168.1.1 netdev.ipv4_subnet_mask=255.255.255.252"
        );
    }

    /// Upstream's current NetManager: a macvtap on the veth.
    #[test]
    fn macvtap_layout_gives_the_instance_address() {
        let n = ns(
            r#"[{"ifindex":7,"ifname":"tap0","address":"62:01:02:03:04:05","linkinfo":{"info_kind":"macvtap"}},
                {"ifindex":6,"ifname":"veth013","address":"aa:00:00:00:00:01","linkinfo":{"info_kind":"veth"}}]"#,
            r#"[{"ifname":"veth013","addr_info":[{"family":"inet","local":"10.19.1.130","prefixlen":26}]}]"#,
            r#"[{"dst":"default","gateway":"10.19.1.129","dev":"veth013"}]"#,
        );
        let g = n.guest_net().expect("guest net");
        assert_eq!(g.address, Ipv4Addr::new(10, 19, 1, 130));
        assert_eq!(g.gateway, Ipv4Addr::new(10, 19, 1, 129));
        assert_eq!(g.mask(), Ipv4Addr::new(255, 255, 255, 192));
        assert_eq!(g.mac, "62:01:02:03:04:05");
        assert_eq!(
            g.backend,
            Backend::Macvtap {
                device: "/dev/tap7".into()
            }
        );
        assert_eq!(
            n.uplink(),
            Some(("veth013".into(), Ipv4Addr::new(10, 19, 1, 130), 26))
        );
    }

    #[test]
    fn unusable_namespaces_are_errors() {
        let no_tap = ns(r#"[{"ifindex":1,"ifname":"lo"}]"#, "[]", "[]");
        assert!(no_tap.guest_net().is_err());
        let lone_tap = ns(
            r#"[{"ifindex":2,"ifname":"tap0","address":"02:00:00:00:00:01","linkinfo":{"info_kind":"tun"}}]"#,
            "[]",
            "[]",
        );
        assert!(lone_tap.guest_net().is_err());
        assert!(peer_address(Ipv4Addr::new(10, 0, 0, 1), 31).is_err());
        assert_eq!(
            peer_address(Ipv4Addr::new(10, 0, 0, 2), 24).ok(),
            Some(Ipv4Addr::new(10, 0, 0, 1))
        );
    }
}
