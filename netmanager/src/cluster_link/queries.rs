//! Questions to the cluster service manager: the node subnet and table
//! queries (coalesced per key, answered within a timeout or failed).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use tokio::sync::oneshot;

use super::messages::{self, TableResult};
use super::{ClusterLink, QueryKey, SUBNET_REQUEST, SUBNET_RETRY, Shared};
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
        let (rx, first) = self.join_query(key);
        if first {
            self.send_query(key).await?;
        }
        self.await_answer(key, rx, first).await
    }

    /// A table query whose answer was asked for after this call began: what
    /// a refresh after `updates_available` or a reconnect needs. Joining a
    /// request that is already out could hand back an answer the cluster
    /// gave before the change, or wait out a request the broker dropped
    /// while the cluster was not subscribed, and the update would be lost.
    /// So a joiner waits that request out and then asks again (joining only
    /// a request sent after it began).
    pub async fn table_query_fresh(&self, key: &QueryKey) -> Result<Arc<TableResult>> {
        let (rx, first) = self.join_query(key);
        if first {
            self.send_query(key).await?;
            return self.await_answer(key, rx, first).await;
        }
        let _ = self.await_answer(key, rx, first).await;
        self.table_query(key).await
    }

    /// Wait on `key`'s request; true when the caller is the first and must
    /// send it.
    fn join_query(&self, key: &QueryKey) -> (oneshot::Receiver<Arc<TableResult>>, bool) {
        let (tx, rx) = oneshot::channel();
        let mut st = self.shared.state();
        let waiters = st.pending.entry(key.clone()).or_default();
        waiters.push(tx);
        (rx, waiters.len() == 1)
    }

    async fn send_query(&self, key: &QueryKey) -> Result<()> {
        tracing::debug!(%key, "table query");
        self.shared.count(|s| s.queries_sent += 1);
        if let Err(e) = self.publish_query(key).await {
            self.shared.state().pending.remove(key);
            return Err(e);
        }
        Ok(())
    }

    async fn await_answer(
        &self,
        key: &QueryKey,
        rx: oneshot::Receiver<Arc<TableResult>>,
        first: bool,
    ) -> Result<Arc<TableResult>> {
        match tokio::time::timeout(self.opts.query_timeout, rx).await {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(_)) => bail!("table query for {key} failed (the request it joined timed out)"),
            Err(_) => {
                if first {
                    // Fail every joiner too: they wait on the same request.
                    self.shared.state().pending.remove(key);
                    self.shared.count(|s| s.queries_timed_out += 1);
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

/// Hand a result to the one query it answers: the one its `query_key`
/// names (the cluster echoes the `sip` or `sname` it was asked), and only if
/// the result is about what was asked. Results nobody asked for -- late,
/// duplicated or forged -- are dropped, so a publisher on the broker cannot
/// install routes for a job we never queried.
pub(super) fn deliver_table(shared: &Shared, result: Arc<TableResult>) {
    let Some(key) = answered_key(&result) else {
        if super::log_unusable() {
            tracing::info!(job = %result.app_name, "ignoring a table result without a query key");
        }
        return;
    };
    let waiters = shared.state().pending.remove(&key);
    match waiters {
        Some(waiters) => {
            shared.count(|s| s.queries_answered += 1);
            for w in waiters {
                let _ = w.send(result.clone());
            }
        }
        None => tracing::debug!(%key, "ignoring a table result nobody is waiting for"),
    }
}

/// The query a result answers, when it is consistent with it.
fn answered_key(result: &TableResult) -> Option<QueryKey> {
    let query_key = result.query_key.trim();
    if let Ok(ip) = query_key.parse::<IpAddr>() {
        return Some(QueryKey::Ip(ip));
    }
    // A job query: the answer must be about that job (empty when unknown).
    let job = if query_key.is_empty() {
        result.app_name.as_str()
    } else {
        query_key
    };
    let consistent = result.app_name.is_empty() || result.app_name == job;
    (!job.is_empty() && consistent).then(|| QueryKey::Job(job.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(app: &str, key: &str) -> TableResult {
        TableResult {
            app_name: app.into(),
            query_key: key.into(),
            instance_list: vec![],
        }
    }

    #[test]
    fn a_result_answers_only_the_query_it_names() {
        assert_eq!(
            answered_key(&result("a.b.c.d", "10.30.0.4")),
            Some(QueryKey::Ip("10.30.0.4".parse().unwrap()))
        );
        assert_eq!(
            answered_key(&result("", "10.30.0.4")),
            Some(QueryKey::Ip("10.30.0.4".parse().unwrap()))
        );
        assert_eq!(
            answered_key(&result("a.b.c.d", "a.b.c.d")),
            Some(QueryKey::Job("a.b.c.d".into()))
        );
        assert_eq!(
            answered_key(&result("", "a.b.c.d")),
            Some(QueryKey::Job("a.b.c.d".into()))
        );
        // A result about another job than the one its key names answers nothing.
        assert_eq!(answered_key(&result("x.y.z.w", "a.b.c.d")), None);
        assert_eq!(answered_key(&result("", "")), None);
    }
}
