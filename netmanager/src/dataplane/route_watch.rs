//! Retires the programs' cached routes (ROUTE_CACHE, see the eBPF crate's
//! `route` module) whenever the kernel's routing may answer differently: a
//! route, policy rule, neighbour or link event starts a new ROUTE_EPOCH, so
//! the next packet to each peer asks the FIB again. (The programs also
//! refresh every cached route within 20 ms on their own, for what comes
//! without an event, such as path-MTU exceptions.)

use std::sync::{Arc, Mutex};

use futures::StreamExt;
use rtnetlink::MulticastGroup;

use super::background::Background;
use super::{DataplaneError, Result, State};

/// Starts following; returns once subscribed.
pub fn start(state: Arc<Mutex<State>>) -> Result<Background> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
    let bg = Background::spawn("oak-routes", move || follow(state, ready_tx))?;
    ready_rx.recv().map_err(|_| {
        DataplaneError::Other("the route watch stopped before it subscribed".into())
    })??;
    Ok(bg)
}

async fn follow(state: Arc<Mutex<State>>, ready: std::sync::mpsc::Sender<Result<()>>) {
    let groups = [
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv6Route,
        MulticastGroup::Ipv4Rule,
        MulticastGroup::Ipv6Rule,
        MulticastGroup::Neigh,
        MulticastGroup::Link,
    ];
    let (conn, _handle, mut events) = match rtnetlink::new_multicast_connection(&groups) {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(DataplaneError::bpf(
                "subscribing to route and neighbour events",
                e,
            )));
            return;
        }
    };
    tokio::spawn(conn);
    // Whatever changed before the subscription: retired too.
    let _ = ready.send(new_epoch(&state));
    while events.next().await.is_some() {
        // One new epoch for a burst (an interface going down).
        while events.try_recv().is_ok() {}
        if let Err(e) = new_epoch(&state) {
            tracing::warn!("retiring cached routes: {e}");
        }
    }
    tracing::warn!("route events stopped; cached routes now refresh only on their own");
}

fn new_epoch(state: &Mutex<State>) -> Result<()> {
    state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .tables
        .new_route_epoch()
}
