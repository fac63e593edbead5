//! Finding the uplink: the interface of the default route (or the one the
//! operator names) and the address it carries, IPv4 first, IPv6 for an
//! IPv6-only underlay. `route_events` says when to ask again.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result, anyhow, bail};
use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressScope};
use netlink_packet_route::route::{RouteAttribute, RouteMessage};
use rtnetlink::RouteMessageBuilder;

use super::Plumbing;

/// The interface tunnel traffic leaves by, as found now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UplinkInterface {
    pub name: String,
    /// Changes when an interface of the same name is created anew (its
    /// programs went with the old one).
    pub index: u32,
    /// Its first IPv4 address, else its first global IPv6 address.
    pub addr: IpAddr,
}

impl Plumbing {
    /// The uplink: `preferred` if given, else the interface of the (first)
    /// IPv4 default route, else of the IPv6 one (an IPv6-only underlay); and
    /// its first IPv4 address, else its first global IPv6 address.
    pub async fn uplink(&self, preferred: Option<&str>) -> Result<UplinkInterface> {
        let name = match preferred {
            Some(p) => p.to_string(),
            None => {
                let mut oifs = self.default_route_oifs::<Ipv4Addr>().await?;
                if oifs.is_empty() {
                    oifs = self.default_route_oifs::<Ipv6Addr>().await?;
                }
                let Some(&oif) = oifs.first() else {
                    bail!("no default route to infer the node address from");
                };
                self.link_name(oif)
                    .await?
                    .ok_or_else(|| anyhow!("default route interface {oif} vanished"))?
            }
        };
        let link = self
            .link_by_name(&name)
            .await?
            .ok_or_else(|| anyhow!("uplink interface {name} does not exist"))?;
        let addr = match self.first_ipv4(link.header.index).await? {
            Some(v4) => IpAddr::V4(v4),
            None => self
                .first_global_ipv6(link.header.index)
                .await?
                .map(IpAddr::V6)
                .ok_or_else(|| {
                    anyhow!("uplink interface {name} has no IPv4 or global IPv6 address")
                })?,
        };
        Ok(UplinkInterface {
            name,
            index: link.header.index,
            addr,
        })
    }

    /// Output interfaces of default routes of one family in the main table,
    /// lowest metric first.
    pub async fn default_route_oifs<T>(&self) -> Result<Vec<u32>>
    where
        RouteMessageBuilder<T>: Default,
    {
        let req = RouteMessageBuilder::<T>::default().build();
        let mut routes: Vec<RouteMessage> = self
            .handle
            .route()
            .get(req)
            .execute()
            .try_collect()
            .await
            .context("listing routes")?;
        routes.retain(|r| r.header.destination_prefix_length == 0 && route_table(r) == 254);
        let mut v: Vec<(u32, u32)> = routes
            .iter()
            .filter_map(|r| {
                let mut oif = None;
                let mut prio = 0;
                for a in &r.attributes {
                    match a {
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        RouteAttribute::Priority(p) => prio = *p,
                        _ => {}
                    }
                }
                oif.map(|o| (prio, o))
            })
            .collect();
        v.sort();
        Ok(v.into_iter().map(|(_, o)| o).collect())
    }

    pub async fn first_ipv4(&self, index: u32) -> Result<Option<Ipv4Addr>> {
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .context("listing addresses")?;
        Ok(msgs
            .iter()
            .flat_map(|m| m.attributes.iter())
            .find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(v))
                | AddressAttribute::Address(IpAddr::V4(v)) => Some(*v),
                _ => None,
            }))
    }

    /// The first global-scope IPv6 address of an interface.
    pub async fn first_global_ipv6(&self, index: u32) -> Result<Option<Ipv6Addr>> {
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .context("listing addresses")?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.scope == AddressScope::Universe)
            .flat_map(|m| m.attributes.iter())
            .find_map(|a| match a {
                AddressAttribute::Address(IpAddr::V6(v)) => Some(*v),
                _ => None,
            }))
    }
}

pub(super) fn route_table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(r.header.table as u32)
}
