//! The background work of a live node, owned in one place: reacting to the
//! cluster link, resolving dataplane misses, following the node address and
//! expiring idle flows. Dropping the supervisor stops all of it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::Receiver;
use tokio::task::JoinHandle;

use crate::cluster_link::LinkEvent;
use crate::node::Node;

/// How often idle flows are swept out of the flow tables.
const FLOW_SWEEP: Duration = Duration::from_secs(10);

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
    /// an inferred node address.
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
        if node.uplink.inferred() {
            tasks.push(tokio::spawn(watch_address(node.clone(), address_check)));
        }
        Supervisor { tasks }
    }
}

/// React to what the cluster link reports.
async fn link_events(node: Arc<Node>, mut events: Receiver<LinkEvent>) {
    let mut connected_before = false;
    while let Some(ev) = events.recv().await {
        match ev {
            LinkEvent::JobUpdated(job) => {
                // Something changed in the cluster: an address that just
                // failed to resolve may have an instance now.
                node.resolver.forget_failures();
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

/// Re-check the inferred node address and follow it.
async fn watch_address(node: Arc<Node>, period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.tick().await; // the first tick fires at once; start() just looked
    loop {
        tick.tick().await;
        match node.uplink.recheck(&node.net).await {
            Ok(Some(ip)) => node.address_changed(ip).await,
            Ok(None) => {}
            Err(e) => tracing::warn!("re-checking the node address: {e:#}"),
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
