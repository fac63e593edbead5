//! The dataplane's own veth pairs. Frames written into the first end (by a
//! packet socket, or redirected there by a program) arrive at the second,
//! where a program runs on them: `oakinj0`/`oakinj1` for reinjected misses
//! and for GSO packets to be cut into segments, `oakslow0`/`oakslow1` for
//! the slow path.

use futures::TryStreamExt;
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::{Handle, LinkUnspec, LinkVeth};

use super::{DataplaneError, Result};

/// One pair and what its ends must be like.
pub struct VethPair {
    /// The end frames are written to.
    pub name: &'static str,
    /// The end the program runs on.
    pub peer: &'static str,
    /// GSO packets sent into `name` leave it cut into segments when this is
    /// 1 (the kernel segments what exceeds a device's `gso_max_segs`).
    pub gso_max_segs: Option<u32>,
    /// MTU of both ends (the default, 1500, when None).
    pub mtu: Option<u32>,
}

/// What [`ensure`] found or made.
pub struct Ensured {
    pub ifindex: u32,
    pub peer_ifindex: u32,
    /// MAC of the peer end: frames for its stack must be addressed to it.
    pub peer_mac: [u8; 6],
    /// Whether `gso_max_segs` is in force (creating the pair sets it on any
    /// kernel; changing it on an existing one needs Linux 5.19, so an older
    /// kernel gets the pair recreated).
    pub gso_limited: bool,
}

/// Creates the pair (up) unless it exists, and applies the settings.
pub fn ensure(pair: &'static VethPair) -> Result<Ensured> {
    // rtnetlink is async; run it on a private runtime so `open` works both
    // inside and outside the caller's runtime.
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| DataplaneError::bpf("starting a netlink runtime", e))?;
        rt.block_on(async {
            let (conn, handle, _) = rtnetlink::new_connection()
                .map_err(|e| DataplaneError::bpf("opening netlink", e))?;
            tokio::spawn(conn);
            ensure_with(&handle, pair).await
        })
    })
    .join()
    .map_err(|_| DataplaneError::Other("netlink thread panicked".into()))?
}

async fn ensure_with(h: &Handle, pair: &VethPair) -> Result<Ensured> {
    let what = |action: &str| format!("{action} the veth pair {}/{}", pair.name, pair.peer);
    let mut first = link(h, pair.name).await?;
    let mut second = link(h, pair.peer).await?;
    if let (Some(a), Some(_)) = (&first, &second)
        && !settings_hold(h, a, pair).await
    {
        tracing::info!(
            "recreating the veth pair {}/{} to apply its settings",
            pair.name,
            pair.peer
        );
        delete(h, a.header.index, &what("deleting")).await?;
        (first, second) = (None, None);
    }
    if first.is_none() || second.is_none() {
        // A half pair cannot be completed: start over.
        for l in [&first, &second].into_iter().flatten() {
            delete(h, l.header.index, &what("deleting")).await?;
        }
        // Created down: IPv6 goes off before either end is up (below).
        let mut builder = LinkVeth::new(pair.name, pair.peer);
        if let Some(mtu) = pair.mtu {
            builder = builder.mtu(mtu);
        }
        if let Some(segs) = pair.gso_max_segs {
            builder = builder.append_extra_attribute(LinkAttribute::GsoMaxSegs(segs));
        }
        h.link()
            .add(builder.build())
            .execute()
            .await
            .map_err(|e| DataplaneError::bpf(what("creating"), e))?;
    }
    let first = link(h, pair.name)
        .await?
        .ok_or_else(|| DataplaneError::Other(format!("{} vanished", pair.name)))?;
    let second = link(h, pair.peer)
        .await?
        .ok_or_else(|| DataplaneError::Other(format!("{} vanished", pair.peer)))?;
    for end in [pair.name, pair.peer] {
        without_ipv6(end)?;
    }
    for (index, peer_end) in [(first.header.index, false), (second.header.index, true)] {
        let mut set = LinkUnspec::new_with_index(index).up();
        if let (Some(mtu), true) = (pair.mtu, peer_end) {
            set = set.mtu(mtu);
        }
        h.link()
            .set(set.build())
            .execute()
            .await
            .map_err(|e| DataplaneError::bpf(what("bringing up"), e))?;
    }
    let gso_limited = match pair.gso_max_segs {
        Some(segs) => attr_gso_max_segs(&first) == Some(segs),
        None => false,
    };
    Ok(Ensured {
        ifindex: first.header.index,
        peer_ifindex: second.header.index,
        peer_mac: mac(&second).unwrap_or_default(),
        gso_limited,
    })
}

/// Switches IPv6 off on one end. Otherwise the kernel's own IPv6 chatter
/// on a new link (router solicitations, MLD reports, duplicate address
/// detection) crosses the pair into the program, which counts it as
/// malformed tunnel traffic: seven "drops" on every start that meant
/// nothing and hid the real ones. The programs see IPv6 frames written
/// into the pair all the same (TC runs before the protocol handlers).
fn without_ipv6(ifname: &str) -> Result<()> {
    let path = format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6");
    match std::fs::write(&path, "1") {
        Ok(()) => Ok(()),
        // A kernel without IPv6 has no chatter to silence.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DataplaneError::Other(format!("writing 1 to {path}: {e}"))),
    }
}

/// Whether an existing pair has the settings, after trying to apply them
/// in place.
async fn settings_hold(h: &Handle, first: &LinkMessage, pair: &VethPair) -> bool {
    let Some(segs) = pair.gso_max_segs else {
        return true;
    };
    if attr_gso_max_segs(first) == Some(segs) {
        return true;
    }
    let msg = LinkUnspec::new_with_index(first.header.index)
        .append_extra_attribute(LinkAttribute::GsoMaxSegs(segs))
        .build();
    if h.link().set(msg).execute().await.is_err() {
        return false;
    }
    matches!(link(h, pair.name).await, Ok(Some(l)) if attr_gso_max_segs(&l) == Some(segs))
}

async fn link(h: &Handle, name: &str) -> Result<Option<LinkMessage>> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(l) => Ok(l),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(DataplaneError::bpf(format!("looking up {name}"), e)),
    }
}

async fn delete(h: &Handle, index: u32, what: &str) -> Result<()> {
    match h.link().del(index).execute().await {
        Ok(()) => Ok(()),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(()),
        Err(e) => Err(DataplaneError::bpf(what.to_string(), e)),
    }
}

fn attr_gso_max_segs(l: &LinkMessage) -> Option<u32> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::GsoMaxSegs(n) => Some(*n),
        _ => None,
    })
}

fn mac(l: &LinkMessage) -> Option<[u8; 6]> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) => m.as_slice().try_into().ok(),
        _ => None,
    })
}
