//! NodePublicAddress "0.0.0.0": the node address is the uplink's address,
//! inferred from the default route (DefaultInterface when several exist) and
//! re-checked periodically, since DHCP or roaming may change it.

use std::sync::Arc;
use std::time::Duration;

use crate::node::Node;

pub const PERIOD: Duration = Duration::from_secs(120);

/// The re-check period; `NETMANAGER_ADDRESS_CHECK_SECS` shortens it (tests,
/// or nodes whose address changes often).
pub fn period() -> Duration {
    std::env::var("NETMANAGER_ADDRESS_CHECK_SECS")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(|&s| s > 0)
        .map_or(PERIOD, Duration::from_secs)
}

pub async fn run(node: Arc<Node>, period: Duration) {
    let preferred = node.preferred_uplink();
    let mut tick = tokio::time::interval(period);
    tick.tick().await; // the first tick fires at once; start() just looked
    loop {
        tick.tick().await;
        match node.plumbing().uplink(preferred.as_deref()).await {
            Ok((_, ip)) => {
                if let Err(e) = node.set_node_ip(ip).await {
                    tracing::warn!("applying the new node address {ip}: {e:#}");
                }
            }
            Err(e) => tracing::warn!("re-checking the node address: {e:#}"),
        }
    }
}
