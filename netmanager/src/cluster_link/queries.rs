//! Questions to the cluster service manager: the node subnet and table
//! queries (coalesced per key, answered within a timeout or failed).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use tokio::sync::oneshot;

use super::messages::{self, TableResult};
use super::{ClusterLink, LinkEvent, QueryKey, SUBNET_REQUEST, SUBNET_RETRY, Shared};
use crate::addresses::Subnet;

impl ClusterLink {
    /// Ask for the node subnet once, and again only after
    /// [`SUBNET_RETRY`] without an answer (docs/contract.md §3: every request makes
    /// the cluster allocate a fresh subnet, so asking twice burns one).
    /// Requests go out only while connected and subscribed, so the answer
    /// cannot be missed; the first answer is taken, later ones are ignored.
    pub async fn request_subnet(&self, timeout: Duration) -> Result<Subnet> {
        let (tx, mut rx) = oneshot::channel();
        self.shared.state().subnet_waiters.push(tx);
        let result = self.await_subnet(&mut rx, timeout).await;
        // A timed-out request must not keep a stale waiter around.
        self.shared
            .state()
            .subnet_waiters
            .retain(|w| !w.is_closed());
        result
    }

    async fn await_subnet(
        &self,
        rx: &mut oneshot::Receiver<Subnet>,
        timeout: Duration,
    ) -> Result<Subnet> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut connected = self.shared.connected.subscribe();
        let mut next_ask = tokio::time::Instant::now();
        let mut asked = false;
        loop {
            let now = tokio::time::Instant::now();
            if *connected.borrow_and_update() && now >= next_ask {
                if asked {
                    tracing::info!("subnet request unanswered for {SUBNET_RETRY:?}, asking again");
                }
                self.publish_net("subnet", SUBNET_REQUEST.to_vec()).await?;
                asked = true;
                next_ask = now + SUBNET_RETRY;
            }
            let wake = if *connected.borrow() {
                next_ask.min(deadline)
            } else {
                deadline
            };
            tokio::select! {
                answer = &mut *rx => {
                    return answer.map_err(|_| anyhow!("MQTT link closed while waiting for the subnet"));
                }
                _ = tokio::time::sleep_until(wake) => {}
                changed = connected.changed() => {
                    if changed.is_err() {
                        bail!("MQTT link closed while waiting for the subnet");
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "no subnet from the cluster (broker {}:{}) within {timeout:?}",
                    self.opts.host,
                    self.opts.port
                );
            }
        }
    }

    /// Table query; concurrent queries for the same key share one request.
    pub async fn table_query(&self, key: &QueryKey) -> Result<Arc<TableResult>> {
        let (tx, rx) = oneshot::channel();
        let first = {
            let mut st = self.shared.state();
            let waiters = st.pending.entry(key.clone()).or_default();
            waiters.push(tx);
            waiters.len() == 1
        };
        if first {
            tracing::debug!(%key, "table query");
            if let Err(e) = self.publish_query(key).await {
                self.shared.state().pending.remove(key);
                return Err(e);
            }
        }
        match tokio::time::timeout(self.opts.query_timeout, rx).await {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(_)) => bail!("table query for {key} failed (the request it joined timed out)"),
            Err(_) => {
                if first {
                    // Fail every joiner too: they wait on the same request.
                    self.shared.state().pending.remove(key);
                }
                bail!(
                    "table query for {key}: no answer within {:?}",
                    self.opts.query_timeout
                )
            }
        }
    }

    async fn publish_query(&self, key: &QueryKey) -> Result<()> {
        self.publish_net(
            "tablequery/request",
            serde_json::to_vec(&query_request(key))?,
        )
        .await
    }
}

/// The request body asking for `key`.
pub(super) fn query_request(key: &QueryKey) -> messages::TableQueryRequest {
    match key {
        QueryKey::Job(job) => messages::TableQueryRequest {
            sname: job.clone(),
            sip: String::new(),
        },
        QueryKey::Ip(addr) => messages::TableQueryRequest {
            sname: String::new(),
            sip: addr.to_string(),
        },
    }
}

/// Hand a result to every query it answers: by query key, by job name, and
/// by any service address it contains (upstream matches the same way).
pub(super) fn deliver_table(shared: &Shared, result: Arc<TableResult>) {
    let mut keys = vec![QueryKey::Job(result.app_name.clone())];
    match result.query_key.parse::<IpAddr>() {
        Ok(ip) => keys.push(QueryKey::Ip(ip)),
        Err(_) if !result.query_key.is_empty() => {
            keys.push(QueryKey::Job(result.query_key.clone()))
        }
        Err(_) => {}
    }
    for inst in &result.instance_list {
        for sip in &inst.service_ip {
            for a in [&sip.address, &sip.address_v6] {
                if let Ok(ip) = a.parse::<IpAddr>() {
                    keys.push(QueryKey::Ip(ip));
                }
            }
        }
    }
    let mut delivered = false;
    {
        let mut st = shared.state();
        for k in keys {
            if let Some(waiters) = st.pending.remove(&k) {
                for w in waiters {
                    delivered |= w.send(result.clone()).is_ok();
                }
            }
        }
    }
    if !delivered {
        let _ = shared.events.send(LinkEvent::Unsolicited(result));
    }
}
