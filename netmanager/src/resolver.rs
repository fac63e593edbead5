//! Asking the cluster for routes: table queries by job or by service address,
//! the interests that keep a job's routes fresh, and dataplane misses -- a
//! packet to a service address we have no route for, or from a local
//! container whose own instance address is not known yet. The programs hold
//! the first frames; we ask the cluster, write the answer, send the held
//! frames through again and clear the pending mark.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use tokio::sync::mpsc;

use crate::cluster_link::{ClusterLink, QueryKey, TableResult};
use crate::dataplane::{Miss, MissReason};
use crate::forwarding::Forwarding;
use crate::routes::RouteTables;

/// After a failed lookup, further misses for the address are dropped without
/// asking again for this long, so an unknown address cannot flood the cluster.
const NEGATIVE_TTL: Duration = Duration::from_secs(2);

#[derive(Default)]
struct Pending {
    /// Frames held per address while its lookup is in flight.
    frames: HashMap<IpAddr, Vec<Vec<u8>>>,
    failed: HashMap<IpAddr, Instant>,
}

pub struct Resolver {
    link: ClusterLink,
    routes: Arc<dyn RouteTables>,
    fwd: Arc<dyn Forwarding>,
    pending: Mutex<Pending>,
}

impl Resolver {
    pub fn new(
        link: ClusterLink,
        routes: Arc<dyn RouteTables>,
        fwd: Arc<dyn Forwarding>,
    ) -> Resolver {
        Resolver {
            link,
            routes,
            fwd,
            pending: Mutex::new(Pending::default()),
        }
    }

    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Query the cluster, write what it answers, and keep an interest in the
    /// job so later changes arrive as `updates_available`.
    pub async fn refresh(&self, key: QueryKey) -> Result<Arc<TableResult>> {
        let result = self.link.table_query(&key).await?;
        if !result.app_name.is_empty() {
            // The name becomes an MQTT topic level and a map key: a name
            // with `+`, `#` or `/` would subscribe to other jobs' updates.
            worker_common::task_id::validate_job_name(&result.app_name)
                .map_err(|e| anyhow!("table result for {key}: {e}"))?;
        }
        self.routes.apply(&result)?;
        if !result.app_name.is_empty() {
            let holders = self.routes.holders();
            if holders.is_empty() {
                self.link.register_interest(&result.app_name).await?;
            }
            for h in holders {
                self.link.hold_interest(&result.app_name, &h).await?;
            }
        }
        Ok(result)
    }

    /// Refresh in the background, logging a failure with `why`.
    pub fn refresh_later(self: &Arc<Self>, job: String, why: &'static str) {
        let resolver = self.clone();
        tokio::spawn(async move {
            if let Err(e) = resolver.refresh(QueryKey::Job(job.clone())).await {
                tracing::info!("refreshing {job} {why}: {e:#}");
            }
        });
    }

    /// Resolve the dataplane's misses until the stream ends.
    pub async fn run(self: Arc<Self>, mut misses: mpsc::Receiver<Miss>) {
        while let Some(miss) = misses.recv().await {
            let (reason, addr) = (miss.reason.clone(), miss.addr);
            if self.hold(miss) {
                tokio::spawn(self.clone().resolve(reason, addr));
            }
        }
        tracing::warn!("dataplane miss stream closed");
    }

    /// Hold the miss's frame; true when this is the first miss for its
    /// address, i.e. a lookup has to start.
    fn hold(&self, miss: Miss) -> bool {
        let mut p = self.pending();
        if p.failed
            .get(&miss.addr)
            .is_some_and(|t| t.elapsed() < NEGATIVE_TTL)
        {
            drop(p);
            let _ = self.fwd.resolved(miss.addr);
            return false;
        }
        let first = !p.frames.contains_key(&miss.addr);
        let held = p.frames.entry(miss.addr).or_default();
        if let Some(f) = miss.frame {
            held.push(f);
        }
        first
    }

    async fn resolve(self: Arc<Self>, reason: MissReason, addr: IpAddr) {
        let outcome = self.lookup(&reason, addr).await;
        let frames = {
            let mut p = self.pending();
            if outcome.is_err() {
                p.failed.insert(addr, Instant::now());
                p.failed.retain(|_, t| t.elapsed() < NEGATIVE_TTL);
            }
            p.frames.remove(&addr).unwrap_or_default()
        };
        match outcome {
            Ok(()) => {
                tracing::debug!(%addr, frames = frames.len(), "miss resolved");
                for f in &frames {
                    if let Err(e) = self.fwd.reinject(f) {
                        tracing::warn!(%addr, "reinjecting a held frame: {e:#}");
                    }
                }
            }
            Err(e) => {
                tracing::info!(%addr, dropped = frames.len(), "unresolved {reason:?} miss: {e:#}")
            }
        }
        if let Err(e) = self.fwd.resolved(addr) {
            tracing::warn!(%addr, "clearing the pending mark: {e:#}");
        }
    }

    /// Ask the cluster and write the answer; fails when the answer does not
    /// cover the address (reinjecting would only miss again).
    async fn lookup(&self, reason: &MissReason, addr: IpAddr) -> Result<()> {
        match reason {
            MissReason::Service => {
                let result = self.refresh(QueryKey::Ip(addr)).await?;
                if !covers(&result, addr) {
                    bail!("the cluster knows no instance behind {addr}");
                }
                Ok(())
            }
            MissReason::Sender => {
                let job = self
                    .routes
                    .local_job(addr)
                    .ok_or_else(|| anyhow!("{addr} is not a local container"))?;
                self.refresh(QueryKey::Job(job.clone())).await?;
                if self.routes.local_job(addr).is_none() {
                    bail!("{addr} was undeployed meanwhile");
                }
                if !self.routes.knows_instance_ip(addr) {
                    bail!("the table of {job} does not list {addr} yet");
                }
                Ok(())
            }
        }
    }
}

/// Whether a table names `addr` as one of its service addresses.
fn covers(result: &TableResult, addr: IpAddr) -> bool {
    result.instance_list.iter().any(|i| {
        i.service_ip.iter().any(|s| {
            s.address.parse::<IpAddr>().ok() == Some(addr)
                || s.address_v6.parse::<IpAddr>().ok() == Some(addr)
        })
    })
}
