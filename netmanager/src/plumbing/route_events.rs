//! The kernel's own notice that the uplink may have changed: rtnetlink
//! multicast messages for links, routes and addresses of both families
//! (what `ip monitor link route address` prints), filtered down to the ones
//! that can move the default route or renumber an interface (an IPv6-only
//! underlay follows the IPv6 default route). Links count because the kernel
//! drops the IPv4 routes of an interface that goes down without a route
//! notification; only the link's own message says so.

use anyhow::{Context, Result};
use futures::StreamExt;
use futures::channel::mpsc::UnboundedReceiver;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::address::{AddressMessage, AddressScope};
use netlink_packet_route::route::RouteMessage;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::{MulticastGroup, sys::SocketAddr};
use tokio::task::JoinHandle;

use netlink_packet_route::AddressFamily;

/// The main routing table, where default routes live.
const MAIN_TABLE: u32 = 254;

/// Route and address changes in this network namespace. Dropping it
/// closes the netlink socket.
pub struct RouteEvents {
    messages: UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>,
    connection: JoinHandle<()>,
}

impl Drop for RouteEvents {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl RouteEvents {
    /// Subscribe (in the calling thread's namespace, like every netlink
    /// socket here).
    pub fn subscribe() -> Result<RouteEvents> {
        let (connection, _handle, messages) = rtnetlink::new_multicast_connection(&[
            MulticastGroup::Link,
            MulticastGroup::Ipv4Route,
            MulticastGroup::Ipv4Ifaddr,
            MulticastGroup::Ipv6Route,
            MulticastGroup::Ipv6Ifaddr,
        ])
        .context("subscribing to link, route and address changes (rtnetlink multicast)")?;
        Ok(RouteEvents {
            messages,
            connection: tokio::spawn(connection),
        })
    }

    /// Waits for the next change that may concern the uplink; None once
    /// the socket is gone.
    pub async fn next(&mut self) -> Option<()> {
        loop {
            let (msg, _) = self.messages.next().await?;
            if concerns_uplink(&msg) {
                return Some(());
            }
        }
    }
}

fn concerns_uplink(msg: &NetlinkMessage<RouteNetlinkMessage>) -> bool {
    let NetlinkPayload::InnerMessage(inner) = &msg.payload else {
        return false;
    };
    match inner {
        RouteNetlinkMessage::NewRoute(r) | RouteNetlinkMessage::DelRoute(r) => is_default_route(r),
        RouteNetlinkMessage::NewAddress(a) | RouteNetlinkMessage::DelAddress(a) => {
            may_be_underlay(a)
        }
        // Up, down, gone (state changes; no statistics come this way).
        RouteNetlinkMessage::NewLink(_) | RouteNetlinkMessage::DelLink(_) => true,
        _ => false,
    }
}

fn is_default_route(r: &RouteMessage) -> bool {
    r.header.destination_prefix_length == 0 && super::uplink::route_table(r) == MAIN_TABLE
}

/// IPv4 addresses, and global IPv6 ones: not the link-local address every
/// new container veth gets.
fn may_be_underlay(a: &AddressMessage) -> bool {
    match a.header.family {
        AddressFamily::Inet => true,
        AddressFamily::Inet6 => a.header.scope == AddressScope::Universe,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::route::RouteAttribute;

    fn route(prefix: u8, table: u32) -> NetlinkMessage<RouteNetlinkMessage> {
        let mut r = RouteMessage::default();
        r.header.destination_prefix_length = prefix;
        r.attributes.push(RouteAttribute::Table(table));
        NetlinkMessage::from(RouteNetlinkMessage::NewRoute(r))
    }

    #[test]
    fn only_links_default_routes_and_underlay_addresses_count() {
        assert!(concerns_uplink(&route(0, MAIN_TABLE)));
        assert!(!concerns_uplink(&route(24, MAIN_TABLE)));
        // The local table's entries come with every address.
        assert!(!concerns_uplink(&route(0, 255)));
        let mut a = AddressMessage::default();
        a.header.family = AddressFamily::Inet;
        assert!(concerns_uplink(&NetlinkMessage::from(
            RouteNetlinkMessage::NewAddress(a.clone())
        )));
        a.header.family = AddressFamily::Inet6;
        a.header.scope = AddressScope::Link;
        assert!(!concerns_uplink(&NetlinkMessage::from(
            RouteNetlinkMessage::DelAddress(a.clone())
        )));
        a.header.scope = AddressScope::Universe;
        assert!(concerns_uplink(&NetlinkMessage::from(
            RouteNetlinkMessage::DelAddress(a)
        )));
        assert!(concerns_uplink(&NetlinkMessage::from(
            RouteNetlinkMessage::NewLink(Default::default())
        )));
    }
}
