//! Follows the node's addresses (netlink address events) into the
//! dataplane: `NODE_ADDRESSES`, the outer source in `CONFIG`, and the
//! receive program on every Ethernet interface that carries one of them --
//! so tunnel datagrams are taken on whichever interface and address they
//! arrive, as upstream's socket on every address takes them.
//!
//! Each change triggers a fresh dump rather than an incremental update:
//! changes are rare, come in bursts (an interface going down drops all its
//! addresses), and a dump cannot drift from the kernel's view.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope,
};
use netlink_packet_route::link::{LinkAttribute, LinkLayerType, LinkMessage};
use rtnetlink::{Handle, MulticastGroup};

use super::background::Background;
use super::{DataplaneError, Result, State, UPLINK_PROGRAM};

/// The node's addresses, shared with the slow path (which accepts
/// datagrams to these only).
pub type NodeAddressSet = Arc<RwLock<BTreeSet<IpAddr>>>;

/// Quiet time after an event before the dump: the rest of a burst.
const SETTLE: Duration = Duration::from_millis(50);

/// Starts following; returns once the first dump is in the maps.
/// `bridge` is the container bridge, whose addresses are never the node's.
pub fn start(
    state: Arc<Mutex<State>>,
    bridge: String,
    shared: NodeAddressSet,
) -> Result<Background> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
    let bg = Background::spawn("oak-addresses", move || {
        follow(state, bridge, shared, ready_tx)
    })?;
    ready_rx.recv().map_err(|_| {
        DataplaneError::Other("the address watch stopped before its first dump".into())
    })??;
    Ok(bg)
}

async fn follow(
    state: Arc<Mutex<State>>,
    bridge: String,
    shared: NodeAddressSet,
    ready: std::sync::mpsc::Sender<Result<()>>,
) {
    let groups = [MulticastGroup::Ipv4Ifaddr, MulticastGroup::Ipv6Ifaddr];
    let (conn, handle, mut events) = match rtnetlink::new_multicast_connection(&groups) {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(DataplaneError::bpf("subscribing to address events", e)));
            return;
        }
    };
    tokio::spawn(conn);
    // Subscribed before the dump: nothing between the two is missed.
    let first = sync(&handle, &state, &bridge, &shared).await;
    let failed = first.is_err();
    let _ = ready.send(first);
    if failed {
        return;
    }
    while events.next().await.is_some() {
        tokio::time::sleep(SETTLE).await;
        while events.try_recv().is_ok() {}
        if let Err(e) = sync(&handle, &state, &bridge, &shared).await {
            tracing::warn!("following the node's addresses: {e}");
        }
    }
    tracing::warn!("address events stopped; node addresses are no longer followed");
}

/// One interface as the receive side cares about it.
struct Link {
    name: String,
    ethernet: bool,
}

async fn sync(
    h: &Handle,
    state: &Mutex<State>,
    bridge: &str,
    shared: &NodeAddressSet,
) -> Result<()> {
    let links = links(h).await?;
    let bridge = links
        .iter()
        .find(|(_, l)| l.name == bridge)
        .map(|(i, _)| *i);
    let addresses = node_addresses(h, bridge).await?;
    {
        let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
        // The uplink is attached by `Dataplane::open` (and moved by
        // `set_uplink`) whatever it carries.
        let receive: BTreeSet<String> = addresses
            .values()
            .filter_map(|i| links.get(i))
            .filter(|l| l.ethernet && l.name != st.cfg.uplink)
            .map(|l| l.name.clone())
            .collect();
        if st.underlay.addresses != addresses {
            tracing::info!(
                addresses = ?addresses.keys().collect::<Vec<_>>(),
                advertised = %st.underlay.advertised,
                owned = addresses.contains_key(&st.underlay.advertised),
                "node addresses"
            );
        }
        st.underlay.addresses = addresses.clone();
        let State {
            cfg,
            tables,
            underlay,
            ..
        } = &mut *st;
        tables.sync_node_addresses(&underlay.addresses)?;
        tables.write_config(cfg, underlay)?;
        follow_receive_interfaces(&mut st, &receive);
    }
    *shared.write().unwrap_or_else(|p| p.into_inner()) = addresses.keys().copied().collect();
    Ok(())
}

/// Attaches the receive program where node addresses appeared, detaches it
/// where they all went.
fn follow_receive_interfaces(st: &mut State, wanted: &BTreeSet<String>) {
    let had = st.receive_interfaces.clone();
    for ifname in wanted.difference(&had) {
        match st.attach(UPLINK_PROGRAM, ifname) {
            Ok(()) => {
                tracing::info!(interface = %ifname, "receiving tunnel traffic here too");
                st.receive_interfaces.insert(ifname.clone());
            }
            Err(e) => {
                tracing::warn!("receive program on {ifname}: {e}; its datagrams take the slow path")
            }
        }
    }
    for ifname in had.difference(wanted) {
        if let Err(e) = st.attachments.detach(UPLINK_PROGRAM, ifname) {
            tracing::warn!("detaching the receive program from {ifname}: {e}");
        }
        st.receive_interfaces.remove(ifname);
    }
}

async fn links(h: &Handle) -> Result<BTreeMap<u32, Link>> {
    let msgs: Vec<LinkMessage> = h
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| DataplaneError::bpf("listing interfaces", e))?;
    Ok(msgs
        .iter()
        .filter_map(|m| {
            let name = m.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            })?;
            Some((
                m.header.index,
                Link {
                    name,
                    ethernet: m.header.link_layer_type == LinkLayerType::Ether,
                },
            ))
        })
        .collect())
}

async fn node_addresses(h: &Handle, bridge: Option<u32>) -> Result<BTreeMap<IpAddr, u32>> {
    let msgs: Vec<AddressMessage> = h
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| DataplaneError::bpf("listing addresses", e))?;
    Ok(msgs
        .iter()
        .filter_map(|m| node_address(m, bridge))
        .collect())
}

/// The address of `m` when it is one a peer can reach this node at: global
/// scope (not loopback or link-local), usable (not tentative or failed
/// duplicate detection), and not on the container bridge, whose addresses
/// are the containers' gateways.
fn node_address(m: &AddressMessage, bridge: Option<u32>) -> Option<(IpAddr, u32)> {
    if m.header.scope != AddressScope::Universe || Some(m.header.index) == bridge {
        return None;
    }
    let unusable = m
        .header
        .flags
        .intersects(AddressHeaderFlags::Tentative | AddressHeaderFlags::Dadfailed)
        || m.attributes.iter().any(|a| {
            matches!(a, AddressAttribute::Flags(f)
                if f.intersects(AddressFlags::Tentative | AddressFlags::Dadfailed))
        });
    if unusable {
        return None;
    }
    // IFA_LOCAL is the local end on point-to-point links; else IFA_ADDRESS.
    let local = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    let address = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    });
    local.or(address).map(|ip| (ip, m.header.index))
}
