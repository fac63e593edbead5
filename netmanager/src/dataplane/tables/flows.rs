//! The flow tables as userspace sees them: who opened each flow (the
//! per-container quota's counts, rebuilt at start), idle expiry, and single
//! flows for tests and tools.

use std::collections::HashMap as StdHashMap;

use netmanager_common::{
    FLOW_IDLE_NS, FLOWS_CLOSED, FLOWS_OPENED, Flow, FlowCountKey, FlowKey, INSTANCE_LOCAL,
    ReverseFlow,
};

use netmanager_common::maps;

use super::{Result, Tables, ignore_missing, insert_err};

impl Tables {
    /// The container (veth ifindex) that opened a flow, when it is still here.
    fn owner(&self, key: &FlowKey) -> Option<u32> {
        self.mirror
            .get(&key.src)
            .filter(|i| i.flags & INSTANCE_LOCAL != 0)
            .map(|i| i.ifindex)
    }

    /// FLOW_COUNTS from the flows as they are: an earlier NetManager's
    /// closed counts died with it (or the map is new after an upgrade). A
    /// flow the old programs open while this runs may go uncounted.
    pub(super) fn recount_flows(&mut self) -> Result<()> {
        let mut live: StdHashMap<u32, u64> = StdHashMap::new();
        for key in self.flows.keys().filter_map(|k| k.ok()) {
            if let Some(owner) = self.owner(&key) {
                *live.entry(owner).or_default() += 1;
            }
        }
        let old: Vec<FlowCountKey> = self.flow_counts.keys().filter_map(|k| k.ok()).collect();
        for k in old {
            ignore_missing(self.flow_counts.remove(&k), "resetting", maps::FLOW_COUNTS)?;
        }
        for (ifindex, n) in live {
            let key = FlowCountKey {
                ifindex,
                kind: FLOWS_OPENED,
            };
            self.flow_counts
                .insert(key, n, 0)
                .map_err(insert_err(maps::FLOW_COUNTS, "flow counts"))?;
        }
        Ok(())
    }

    /// Adds `closed` flows per container to their FLOWS_CLOSED counts (only
    /// NetManager writes those), and drops the counts of containers that
    /// are gone.
    fn count_closed(&mut self, closed: StdHashMap<u32, u64>) -> Result<()> {
        for (ifindex, n) in closed {
            let key = FlowCountKey {
                ifindex,
                kind: FLOWS_CLOSED,
            };
            let before = self.flow_counts.get(&key, 0).unwrap_or(0);
            self.flow_counts
                .insert(key, before + n, 0)
                .map_err(insert_err(maps::FLOW_COUNTS, "flow counts"))?;
        }
        let here: Vec<u32> = self
            .mirror
            .values()
            .filter(|i| i.flags & INSTANCE_LOCAL != 0)
            .map(|i| i.ifindex)
            .collect();
        let gone: Vec<FlowCountKey> = self
            .flow_counts
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !here.contains(&k.ifindex))
            .collect();
        for k in gone {
            ignore_missing(
                self.flow_counts.remove(&k),
                "removing from",
                maps::FLOW_COUNTS,
            )?;
        }
        Ok(())
    }

    /// (opened, closed) flows of the container behind `ifindex`.
    pub fn flow_counts(&self, ifindex: u32) -> (u64, u64) {
        let get = |kind| {
            self.flow_counts
                .get(&FlowCountKey { ifindex, kind }, 0)
                .unwrap_or(0)
        };
        (get(FLOWS_OPENED), get(FLOWS_CLOSED))
    }

    /// Deletes flows (both directions) idle for longer than the contract's
    /// 60 s, so the maps' fill level means live flows.
    pub fn expire_flows(&mut self, now_ns: u64) -> Result<usize> {
        let stale = |last: u64| now_ns.saturating_sub(last) >= FLOW_IDLE_NS;
        let old_fwd: Vec<FlowKey> = self
            .flows
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(_, f)| stale(f.last_seen_ns))
            .map(|(k, _)| k)
            .collect();
        let old_rev: Vec<FlowKey> = self
            .reverse
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(_, f)| stale(f.last_seen_ns))
            .map(|(k, _)| k)
            .collect();
        let mut closed: StdHashMap<u32, u64> = StdHashMap::new();
        for k in &old_fwd {
            ignore_missing(self.flows.remove(k), "expiring", maps::FLOWS)?;
            if let Some(owner) = self.owner(k) {
                *closed.entry(owner).or_default() += 1;
            }
        }
        for k in &old_rev {
            ignore_missing(self.reverse.remove(k), "expiring", maps::REVERSE_FLOWS)?;
        }
        self.count_closed(closed)?;
        Ok(old_fwd.len() + old_rev.len())
    }

    /// Read access for tests and inspection.
    pub fn flow(&self, key: &FlowKey) -> Option<Flow> {
        self.flows.get(key, 0).ok()
    }

    pub fn reverse_flow(&self, key: &FlowKey) -> Option<ReverseFlow> {
        self.reverse.get(key, 0).ok()
    }
}
