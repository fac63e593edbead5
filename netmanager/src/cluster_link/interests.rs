//! Interests: subscriptions to `jobs/<job>/updates_available` that live
//! while a holder (a local instance) uses the job and are dropped a while
//! after the last one lets go (`interest/remove` tells the cluster).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rumqttc::QoS;

use super::messages;
use super::{ClusterLink, Interest, LinkEvent, Shared};

impl ClusterLink {
    /// Subscribe to a job's updates (idempotent). Without holders it expires
    /// after the interest TTL.
    pub async fn register_interest(&self, job: &str) -> Result<()> {
        let new = {
            let mut st = self.shared.state();
            let mut new = false;
            st.interests.entry(job.to_string()).or_insert_with(|| {
                new = true;
                Interest {
                    holders: HashSet::new(),
                    idle_since: Some(Instant::now()),
                }
            });
            new
        };
        if new {
            tracing::debug!(job, "registering interest");
            self.shared
                .client
                .subscribe(updates_topic(job), QoS::AtLeastOnce)
                .await
                .with_context(|| format!("subscribing to updates of {job}"))?;
        }
        Ok(())
    }

    /// `holder` (a local instance) uses `job`; keeps the interest alive.
    pub async fn hold_interest(&self, job: &str, holder: &str) -> Result<()> {
        self.register_interest(job).await?;
        let mut st = self.shared.state();
        if let Some(i) = st.interests.get_mut(job) {
            i.holders.insert(holder.to_string());
            i.idle_since = None;
        }
        Ok(())
    }

    /// `holder` is gone: release it from every interest.
    pub fn release_holder(&self, holder: &str) {
        let mut st = self.shared.state();
        for i in st.interests.values_mut() {
            if i.holders.remove(holder) && i.holders.is_empty() {
                i.idle_since = Some(Instant::now());
            }
        }
    }

    /// Jobs with a live interest.
    pub fn interests(&self) -> Vec<String> {
        let mut v: Vec<String> = self.shared.state().interests.keys().cloned().collect();
        v.sort();
        v
    }
}

pub(super) fn updates_topic(job: &str) -> String {
    format!("jobs/{job}/updates_available")
}

/// Drop interests nobody has held for `ttl`: unsubscribe and tell the cluster.
pub(super) async fn sweep_interests(shared: Arc<Shared>, ttl: Duration) {
    let period = (ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        tokio::time::sleep(period).await;
        let expired: Vec<String> = {
            let mut st = shared.state();
            let now = Instant::now();
            let gone: Vec<String> = st
                .interests
                .iter()
                .filter(|(_, i)| {
                    i.holders.is_empty() && i.idle_since.is_some_and(|t| now - t >= ttl)
                })
                .map(|(j, _)| j.clone())
                .collect();
            for j in &gone {
                st.interests.remove(j);
            }
            gone
        };
        for job in expired {
            tracing::debug!(job, "interest expired");
            if let Err(e) = shared.client.unsubscribe(updates_topic(&job)).await {
                tracing::warn!("unsubscribing from updates of {job}: {e}");
            }
            if let Ok(body) = serde_json::to_vec(&messages::InterestRemove { appname: &job }) {
                let _ = shared
                    .client
                    .publish(
                        shared.net_topic("interest/remove"),
                        QoS::AtLeastOnce,
                        false,
                        body,
                    )
                    .await;
            }
            let _ = shared.events.send(LinkEvent::InterestDropped(job)).await;
        }
    }
}
