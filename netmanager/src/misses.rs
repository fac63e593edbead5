//! Resolving dataplane misses: a packet to a service address we have no
//! route for, or from a local container whose own instance address is not
//! known yet. The programs hold the first frames; we ask the cluster, write
//! the answer, send the held frames through again and clear the pending mark.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use tokio::sync::mpsc;

use crate::cluster_link::QueryKey;
use crate::dataplane::{Miss, MissReason};
use crate::node::Node;

/// After a failed lookup, further misses for the address are dropped without
/// asking again for this long, so an unknown address cannot flood the cluster.
const NEGATIVE_TTL: Duration = Duration::from_secs(2);

#[derive(Default)]
struct Pending {
    /// Frames held per address while its lookup is in flight.
    frames: HashMap<IpAddr, Vec<Vec<u8>>>,
    failed: HashMap<IpAddr, Instant>,
}

pub async fn run(node: Arc<Node>, mut rx: mpsc::Receiver<Miss>) {
    let pending = Arc::new(Mutex::new(Pending::default()));
    while let Some(miss) = rx.recv().await {
        let start = {
            let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
            if p.failed
                .get(&miss.addr)
                .is_some_and(|t| t.elapsed() < NEGATIVE_TTL)
            {
                drop(p);
                let _ = node.fwd.resolved(miss.addr);
                continue;
            }
            let first = !p.frames.contains_key(&miss.addr);
            let held = p.frames.entry(miss.addr).or_default();
            if let Some(f) = miss.frame {
                held.push(f);
            }
            first
        };
        if start {
            tokio::spawn(resolve(
                node.clone(),
                pending.clone(),
                miss.reason,
                miss.addr,
            ));
        }
    }
    tracing::warn!("dataplane miss stream closed");
}

async fn resolve(node: Arc<Node>, pending: Arc<Mutex<Pending>>, reason: MissReason, addr: IpAddr) {
    let outcome = lookup(&node, &reason, addr).await;
    let frames = {
        let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
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
                if let Err(e) = node.fwd.reinject(f) {
                    tracing::warn!(%addr, "reinjecting a held frame: {e:#}");
                }
            }
        }
        Err(e) => {
            tracing::info!(%addr, dropped = frames.len(), "unresolved {reason:?} miss: {e:#}")
        }
    }
    if let Err(e) = node.fwd.resolved(addr) {
        tracing::warn!(%addr, "clearing the pending mark: {e:#}");
    }
}

/// Ask the cluster and write the answer; fails when the answer does not
/// cover the address (reinjecting would only miss again).
async fn lookup(node: &Node, reason: &MissReason, addr: IpAddr) -> Result<()> {
    match reason {
        MissReason::Service => {
            let result = node.refresh(QueryKey::Ip(addr)).await?;
            let covered = result.instance_list.iter().any(|i| {
                i.service_ip.iter().any(|s| {
                    s.address.parse::<IpAddr>().ok() == Some(addr)
                        || s.address_v6.parse::<IpAddr>().ok() == Some(addr)
                })
            });
            if !covered {
                bail!("the cluster knows no instance behind {addr}");
            }
            Ok(())
        }
        MissReason::Sender => {
            let d = node
                .deployment_by_ns(addr)
                .ok_or_else(|| anyhow!("{addr} is not a local container"))?;
            node.refresh(QueryKey::Job(d.service_name.clone())).await?;
            let entry = node.view();
            if !entry.locals.contains_key(&addr) {
                bail!("{addr} was undeployed meanwhile");
            }
            if node.known_instance_ip(addr).is_none() {
                bail!("the table of {} does not list {addr} yet", d.service_name);
            }
            Ok(())
        }
    }
}
