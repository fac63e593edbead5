//! The background work of a live node, owned in one place: reacting to the
//! cluster link, resolving dataplane misses, following the uplink and the
//! node address and expiring idle flows. Dropping the supervisor stops all
//! of it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::Receiver;
use tokio::task::JoinHandle;

use crate::cluster_link::LinkEvent;
use crate::node::Node;
use crate::plumbing::route_events::RouteEvents;
use crate::uplink::Recheck;

/// How often idle flows are swept out of the flow tables.
const FLOW_SWEEP: Duration = Duration::from_secs(10);
/// A route change comes as a burst (the old default route goes, the new
/// one comes, addresses follow); look once the burst is over ...
const SETTLE: Duration = Duration::from_millis(250);
/// ... or after this long, should events never stop coming (a flapping
/// link, a stream of container deployments).
const SETTLE_MAX: Duration = Duration::from_secs(2);

pub struct Supervisor {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Supervisor {
    /// Start everything for `node`; `address_check` paces the re-check of
    /// the uplink and the node address between route events.
    pub fn start(
        node: &Arc<Node>,
        events: Receiver<LinkEvent>,
        address_check: Duration,
    ) -> Supervisor {
        let mut tasks = vec![
            tokio::spawn(link_events(node.clone(), events)),
            tokio::spawn(expire_flows(node.clone())),
        ];
        if let Some(misses) = node.fwd.take_misses() {
            tasks.push(tokio::spawn(node.resolver.clone().run(misses)));
        }
        tasks.push(tokio::spawn(watch_uplink(node.clone(), address_check)));
        Supervisor { tasks }
    }
}

/// React to what the cluster link reports.
async fn link_events(node: Arc<Node>, mut events: Receiver<LinkEvent>) {
    let mut connected_before = false;
    while let Some(ev) = events.recv().await {
        match ev {
            LinkEvent::JobUpdated(job) => {
                // Writing the new table also drops the negative entries it
                // answers and sends their parked frames through.
                node.resolver.refresh_later(job, "after an update");
            }
            LinkEvent::InterestDropped(job) => node.routes.forget(&job),
            LinkEvent::Connected => {
                if connected_before {
                    // Updates may have been missed while the broker was away.
                    for job in node.routes.jobs() {
                        node.resolver.refresh_later(job, "after reconnect");
                    }
                }
                connected_before = true;
            }
        }
    }
    tracing::debug!("cluster link event stream ended");
}

/// Follow the uplink and the node address: re-check when the kernel
/// reports a route or address change, and every `period` in case a
/// change came without one (or the public address moved behind NAT).
async fn watch_uplink(node: Arc<Node>, period: Duration) {
    let mut events = match RouteEvents::subscribe() {
        Ok(e) => Some(e),
        Err(e) => {
            tracing::warn!(
                "{e:#}; the uplink is re-checked every {} s only",
                period.as_secs()
            );
            None
        }
    };
    let mut tick = tokio::time::interval(period);
    tick.tick().await; // the first tick fires at once; start() just looked
    loop {
        let why = tokio::select! {
            _ = tick.tick() => Recheck::Poll,
            got = next_change(&mut events) => {
                if got.is_none() {
                    tracing::warn!("route events stopped; the uplink is re-checked every {} s only", period.as_secs());
                    events = None;
                    continue;
                }
                settle(events.as_mut()).await;
                tracing::debug!("links, routes or addresses changed: re-checking the uplink");
                Recheck::Event
            }
        };
        match node.uplink.recheck(&node.net, why).await {
            Ok(change) if change.is_empty() => {}
            Ok(change) => node.uplink_changed(change).await,
            // E.g. between the old default route's removal and the new one's
            // arrival; the next event looks again.
            Err(e) => tracing::info!("re-checking the uplink: {e:#}"),
        }
    }
}

/// The next relevant route event; never, without a subscription.
async fn next_change(events: &mut Option<RouteEvents>) -> Option<()> {
    match events {
        Some(e) => e.next().await,
        None => std::future::pending().await,
    }
}

/// Wait until no further event arrives for [`SETTLE`], at most [`SETTLE_MAX`].
async fn settle(events: Option<&mut RouteEvents>) {
    let Some(events) = events else { return };
    let deadline = tokio::time::Instant::now() + SETTLE_MAX;
    while tokio::time::Instant::now() < deadline {
        match tokio::time::timeout(SETTLE, events.next()).await {
            Ok(Some(())) => continue,
            _ => return,
        }
    }
}

/// Sweep idle flows; the map scan runs off the async workers.
async fn expire_flows(node: Arc<Node>) {
    let mut tick = tokio::time::interval(FLOW_SWEEP);
    loop {
        tick.tick().await;
        let fwd = node.fwd.clone();
        match tokio::task::spawn_blocking(move || fwd.expire_flows()).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::debug!(flows = n, "expired idle flows"),
            Ok(Err(e)) => tracing::warn!("expiring flows: {e:#}"),
            Err(e) => tracing::warn!("flow expiry task: {e}"),
        }
    }
}
