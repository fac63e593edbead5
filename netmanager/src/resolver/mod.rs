//! Asking the cluster for routes: table queries by job or by service address,
//! the interests that keep a job's routes fresh, and dataplane misses -- a
//! packet to a service address we have no route for, from a local
//! container whose own instance address is not known yet, or a tunnel
//! datagram whose inner source no node we know runs. The programs hold
//! the first frames; we ask the cluster, write the answer, send the held
//! frames through again and clear the pending mark. A held tunnel datagram
//! goes through again only when the cluster names its sender as the node
//! that runs its inner source: anyone on the underlay can send them. The
//! cluster's answer is written first, so a node that moved is accepted by
//! the programs from then on; a sender the cluster just refused is refused
//! again without asking for `NEGATIVE_TTL`.
//!
//! A failed lookup is refused again for `NEGATIVE_TTL` -- unless a table
//! result answers it first: every result written (a query's, or the
//! re-query after `jobs/<job>/updates_available`) drops the negative
//! entries the routes now answer, and a container's frames refused
//! meanwhile (parked, the newest few) go through at once. A client that
//! was already dialing a service when it was deployed connects when the
//! cluster announces the instance, not at its next SYN retransmit.

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

mod budget;
mod stats;

use budget::*;
pub use budget::{MAX_LOOKUPS, MAX_LOOKUPS_PER_CONTAINER, MAX_LOOKUPS_PER_PEER};
pub use stats::{LATENCY_BOUNDS, Latency, ResolverStats};

/// After a failed lookup, further misses for the address are dropped without
/// asking again for this long, so an unknown address cannot flood the cluster.
const NEGATIVE_TTL: Duration = Duration::from_secs(2);
/// How often a refresh after a change is tried before it waits for the
/// next change, and its back-off (each failed try already waited a query
/// timeout).
const REFRESH_ATTEMPTS: u32 = 5;
const REFRESH_RETRY_FIRST: Duration = Duration::from_secs(1);
const REFRESH_RETRY_MAX: Duration = Duration::from_secs(8);
/// A miss as the resolver tracks it: the same address can miss as a
/// service and as a tunnel source at once, and they resolve differently.
type MissKey = (MissReason, IpAddr);

pub struct Resolver {
    link: ClusterLink,
    routes: Arc<dyn RouteTables>,
    fwd: Arc<dyn Forwarding>,
    pending: Mutex<Pending>,
    stats: Mutex<ResolverStats>,
    /// Jobs with a refresh after a change running, and whether another
    /// change arrived meanwhile.
    refreshing: Mutex<HashMap<String, bool>>,
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
            stats: Mutex::new(ResolverStats::default()),
            refreshing: Mutex::new(HashMap::new()),
        }
    }

    pub fn stats(&self) -> ResolverStats {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count(&self, f: impl FnOnce(&mut ResolverStats)) {
        f(&mut self.stats.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ask the cluster for `key`'s table and apply it; any answer will do,
    /// including one to a request already out (a miss).
    pub async fn refresh(&self, key: QueryKey) -> Result<Arc<TableResult>> {
        let result = self.link.table_query(&key).await?;
        self.apply(&key, result).await
    }

    /// Like [`Resolver::refresh`], but only with an answer asked for after
    /// the call began: after `updates_available`, a reconnect or a local
    /// deployment, an older answer would miss the change.
    pub async fn refresh_after_change(&self, key: QueryKey) -> Result<Arc<TableResult>> {
        let result = self.link.table_query_fresh(&key).await?;
        self.apply(&key, result).await
    }

    async fn apply(&self, key: &QueryKey, result: Arc<TableResult>) -> Result<Arc<TableResult>> {
        if !result.app_name.is_empty() {
            // The name becomes an MQTT topic level and a map key: a name
            // with `+`, `#` or `/` would subscribe to other jobs' updates.
            worker_common::task_id::validate_job_name(&result.app_name)
                .map_err(|e| anyhow!("table result for {key}: {e}"))?;
        }
        self.routes.apply(&result)?;
        self.clear_answered();
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

    /// Refresh `job` after a change in the background, logging a failure
    /// with `why`. An unanswered query is asked again with back-off while
    /// this node is interested in the job: the change it follows would otherwise
    /// be lost until the next one (a request published while the cluster
    /// was resubscribing after a broker restart gets no answer). It stops
    /// when the job's interest is gone.
    ///
    /// One refresh per job at a time: a change arriving while one runs
    /// marks the job, and the running one refreshes once more when done. A
    /// burst (or a flood) of `updates_available` costs at most two rounds
    /// and one task, never a task per message.
    pub fn refresh_later(self: &Arc<Self>, job: String, why: &'static str) {
        {
            let mut running = self.refreshing();
            if let Some(again) = running.get_mut(&job) {
                *again = true;
                return;
            }
            running.insert(job.clone(), false);
        }
        let resolver = self.clone();
        tokio::spawn(async move {
            loop {
                resolver.refresh_with_retries(&job, why).await;
                let mut running = resolver.refreshing();
                match running.get_mut(&job) {
                    Some(again) if *again => *again = false,
                    _ => {
                        running.remove(&job);
                        return;
                    }
                }
            }
        });
    }

    fn refreshing(&self) -> MutexGuard<'_, HashMap<String, bool>> {
        self.refreshing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Refreshes in flight (job -> another change arrived meanwhile).
    #[cfg(test)]
    fn refreshes_running(&self) -> usize {
        self.refreshing().len()
    }

    async fn refresh_with_retries(&self, job: &str, why: &'static str) {
        let mut pause = REFRESH_RETRY_FIRST;
        for attempt in 1..=REFRESH_ATTEMPTS {
            let key = QueryKey::Job(job.to_string());
            match self.refresh_after_change(key).await {
                Ok(_) => return,
                Err(e) if attempt == REFRESH_ATTEMPTS => {
                    tracing::warn!(
                        "refreshing {job} {why}: {e:#}; giving up until the next update"
                    );
                }
                Err(e) => {
                    tracing::info!("refreshing {job} {why}: {e:#}; again in {pause:?}");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(REFRESH_RETRY_MAX);
                    if !self.link.interests().iter().any(|j| j == job) {
                        return;
                    }
                }
            }
        }
    }

    /// Resolve the dataplane's misses until the stream ends.
    pub async fn run(self: Arc<Self>, mut misses: mpsc::Receiver<Miss>) {
        while let Some(miss) = misses.recv().await {
            let key = (miss.reason.clone(), miss.addr);
            let origin = Origin::of(&miss);
            if self.hold(miss) {
                tokio::spawn(self.clone().resolve(key, origin));
            }
        }
        tracing::warn!("dataplane miss stream closed");
    }

    /// Hold the miss's frame; true when this is the first miss for its
    /// address and a lookup may start. A refused miss has its pending mark
    /// cleared at once, so the dataplane never keeps a stale one.
    fn hold(&self, miss: Miss) -> bool {
        let key = (miss.reason.clone(), miss.addr);
        let origin = Origin::of(&miss);
        let frame = miss.frame.map(|bytes| HeldFrame {
            sender: miss.peer,
            bytes,
        });
        let refusal = {
            let mut p = self.pending();
            if let Some(held) = p.frames.get_mut(&key) {
                if let Some(f) = frame.filter(|_| held.len() < MAX_FRAMES_PER_LOOKUP) {
                    held.push(f);
                }
                return false;
            }
            let recent = |t: &Instant| t.elapsed() < NEGATIVE_TTL;
            if p.failed.get(&key).is_some_and(|f| recent(&f.at)) {
                if let Some(f) = frame.filter(|_| miss.reason != MissReason::Peer) {
                    p.park(&key, f);
                }
                Some(Refusal::RecentFailure)
            } else if miss.reason == MissReason::Peer
                && p.wrong_sender
                    .get(&(miss.addr, miss.peer))
                    .is_some_and(recent)
            {
                Some(Refusal::RecentFailure)
            } else if p.frames.len() >= MAX_LOOKUPS
                || p.per_origin.get(&origin).copied().unwrap_or(0) >= origin.max_lookups()
            {
                Some(Refusal::Busy)
            } else if !p.take_query(origin) {
                Some(Refusal::Rate)
            } else {
                *p.per_origin.entry(origin).or_default() += 1;
                p.started.insert(key.clone(), Instant::now());
                p.frames.insert(key, frame.into_iter().collect());
                None
            }
        };
        match refusal {
            None => true,
            Some(r) => {
                self.count(|s| match r {
                    Refusal::RecentFailure => s.refused_recent_failure += 1,
                    Refusal::Busy => s.refused_busy += 1,
                    Refusal::Rate => s.refused_rate += 1,
                });
                if let Err(e) = self.fwd.resolved(miss.addr) {
                    tracing::warn!(addr = %miss.addr, "clearing the pending mark: {e:#}");
                }
                false
            }
        }
    }

    async fn resolve(self: Arc<Self>, key: MissKey, origin: Origin) {
        let (reason, addr) = (key.0.clone(), key.1);
        let outcome = self.lookup(&reason, addr).await;
        let frames = {
            let mut p = self.pending();
            if outcome.is_err() {
                p.failed.retain(|_, f| f.at.elapsed() < NEGATIVE_TTL);
                p.failed.insert(
                    key.clone(),
                    Failure {
                        at: Instant::now(),
                        parked: Vec::new(),
                    },
                );
            }
            if let Some(t) = p.started.remove(&key) {
                let took = t.elapsed();
                self.count(|s| s.latency.record(took));
            }
            if let Some(n) = p.per_origin.get_mut(&origin) {
                *n -= 1;
                if *n == 0 {
                    p.per_origin.remove(&origin);
                }
            }
            p.frames.remove(&key).unwrap_or_default()
        };
        match outcome {
            Ok(node) => {
                self.count(|s| s.resolved += 1);
                tracing::debug!(%addr, frames = frames.len(), "miss resolved");
                self.reinject(&reason, addr, node, frames);
            }
            Err(e) => {
                self.count(|s| s.failed += 1);
                let held = frames.len();
                if reason != MissReason::Peer {
                    let mut p = self.pending();
                    for f in frames {
                        p.park(&key, f);
                    }
                }
                // A result written while this lookup was out (the job's
                // update) may answer it already.
                if self.answers(&key) {
                    self.clear_answered();
                }
                self.log_unresolved(
                    || tracing::info!(%addr, held, "unresolved {reason:?} miss: {e:#}"),
                );
            }
        }
        if let Err(e) = self.fwd.resolved(addr) {
            tracing::warn!(%addr, "clearing the pending mark: {e:#}");
        }
    }

    /// Sends the held frames through again; tunnel datagrams only when
    /// `node`, the node that runs their inner source, sent them.
    fn reinject(
        &self,
        reason: &MissReason,
        addr: IpAddr,
        node: Option<IpAddr>,
        frames: Vec<HeldFrame>,
    ) {
        for f in frames {
            let sent = if *reason == MissReason::Peer {
                if f.sender != node {
                    self.count(|s| s.refused_wrong_node += 1);
                    let mut p = self.pending();
                    p.wrong_sender.retain(|_, t| t.elapsed() < NEGATIVE_TTL);
                    p.wrong_sender.insert((addr, f.sender), Instant::now());
                    drop(p);
                    self.log_unresolved(|| {
                        tracing::info!(
                            %addr,
                            sender = ?f.sender,
                            node = ?node,
                            "tunnel datagram dropped: the cluster says another node runs its source"
                        )
                    });
                    continue;
                }
                self.fwd.reinject_tunnel(&f.bytes)
            } else {
                self.fwd.reinject(&f.bytes)
            };
            if let Err(e) = sent {
                tracing::warn!(%addr, "reinjecting a held frame: {e:#}");
            }
        }
    }

    /// Drops the negative entries the routes now answer -- a service with
    /// a running instance, a local container's instance address, a tunnel
    /// source placed on the node that was refused for it -- and sends the
    /// frames parked on them through. Runs after every table result is
    /// written: a job's re-query after `updates_available` is how a new
    /// instance shows up.
    fn clear_answered(&self) {
        let (failed, senders): (Vec<MissKey>, Vec<(IpAddr, Option<IpAddr>)>) = {
            let p = self.pending();
            (
                p.failed.keys().cloned().collect(),
                p.wrong_sender.keys().copied().collect(),
            )
        };
        if failed.is_empty() && senders.is_empty() {
            return;
        }
        // The routes have a lock of their own: asked outside ours.
        let answered: Vec<MissKey> = failed.into_iter().filter(|k| self.answers(k)).collect();
        let moved: Vec<(IpAddr, Option<IpAddr>)> = senders
            .into_iter()
            .filter(|(addr, sender)| {
                sender.is_some() && self.routes.instance_node(*addr) == *sender
            })
            .collect();
        let parked: Vec<(IpAddr, HeldFrame)> = {
            let mut p = self.pending();
            for s in &moved {
                p.wrong_sender.remove(s);
            }
            answered
                .iter()
                .filter_map(|k| p.failed.remove(k).map(|f| (k.1, f.parked)))
                .flat_map(|(addr, frames)| frames.into_iter().map(move |f| (addr, f)))
                .collect()
        };
        let (cleared, sent) = (answered.len() + moved.len(), parked.len());
        if cleared == 0 {
            return;
        }
        self.count(|s| {
            s.negative_cleared += cleared as u64;
            s.parked_reinjected += sent as u64;
        });
        tracing::debug!(
            cleared,
            parked = sent,
            "negative entries answered by a table result"
        );
        for (addr, f) in parked {
            if let Err(e) = self.fwd.reinject(&f.bytes) {
                tracing::warn!(%addr, "reinjecting a parked frame: {e:#}");
            }
        }
    }

    /// Whether the routes now answer a miss of this kind for this address.
    fn answers(&self, (reason, addr): &MissKey) -> bool {
        match reason {
            MissReason::Service => self.routes.knows_service(*addr),
            MissReason::Sender => self.routes.knows_instance_ip(*addr),
            MissReason::Peer => self.routes.instance_node(*addr).is_some(),
        }
    }

    /// Logs through the per-minute budget.
    fn log_unresolved(&self, log: impl FnOnce()) {
        let (allowed, suppressed) = self.pending().log.allow();
        if suppressed > 0 {
            tracing::info!(
                suppressed,
                "unresolved misses not logged in the last minute"
            );
        }
        if allowed {
            log();
        }
    }

    /// Ask the cluster and write the answer; fails when the answer does not
    /// cover the address (reinjecting would only miss again). For a tunnel
    /// source, returns the node the tables now say runs it.
    async fn lookup(&self, reason: &MissReason, addr: IpAddr) -> Result<Option<IpAddr>> {
        match reason {
            MissReason::Service => {
                self.refresh(QueryKey::Ip(addr)).await?;
                // Not merely listed: a scheduled instance has no addresses
                // yet, and its frames would only miss again.
                if !self.routes.knows_service(addr) {
                    bail!("the cluster knows no running instance behind {addr}");
                }
                Ok(None)
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
                Ok(None)
            }
            MissReason::Peer => {
                self.refresh(QueryKey::Ip(addr)).await?;
                match self.routes.instance_node(addr) {
                    Some(node) => Ok(Some(node)),
                    None => bail!("the cluster knows no running instance with address {addr}"),
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Refusal {
    RecentFailure,
    Busy,
    Rate,
}

#[cfg(test)]
mod tests;
