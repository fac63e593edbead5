//! What each job's table wrote into the dataplane.
//!
//! For each job we remember which namespace addresses and service addresses
//! we wrote, so a newer table for the same job can replace them: new and
//! changed entries are written first, vanished ones removed afterwards, so a
//! flow in progress never finds its route missing in between.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use anyhow::Result;

use super::plan::{LocalView, instance_eq, plan};
use crate::cluster_link::TableResult;
use crate::dataplane::{InstanceEntry, ServiceKind};
use crate::forwarding::Forwarding;

/// Per-job record of what we wrote.
#[derive(Debug, Default, Clone)]
struct JobRoutes {
    instances: BTreeMap<IpAddr, InstanceEntry>,
    services: BTreeMap<IpAddr, (ServiceKind, Vec<IpAddr>)>,
    /// The table these came from, to recompute when local containers change.
    table: TableResult,
}

/// How many route entries all tables together may write. Below the map
/// sizes, so local deployments always find room for their own entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub instances: usize,
    pub services: usize,
    pub backends: usize,
}

impl Limits {
    pub const UNLIMITED: Limits = Limits {
        instances: usize::MAX,
        services: usize::MAX,
        backends: usize::MAX,
    };
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Usage {
    instances: usize,
    services: usize,
    backends: usize,
}

impl Usage {
    fn of(
        instances: &BTreeMap<IpAddr, InstanceEntry>,
        services: &BTreeMap<IpAddr, (ServiceKind, Vec<IpAddr>)>,
    ) -> Usage {
        Usage {
            instances: instances.len(),
            services: services.len(),
            backends: services.values().map(|(_, b)| b.len()).sum(),
        }
    }

    fn fits(self, l: Limits) -> bool {
        self.instances <= l.instances && self.services <= l.services && self.backends <= l.backends
    }
}

pub struct ServiceTables {
    jobs: HashMap<String, JobRoutes>,
    limits: Limits,
}

impl Default for ServiceTables {
    fn default() -> Self {
        ServiceTables::new()
    }
}

impl ServiceTables {
    pub fn new() -> ServiceTables {
        ServiceTables::with_limits(Limits::UNLIMITED)
    }

    pub fn with_limits(limits: Limits) -> ServiceTables {
        ServiceTables {
            jobs: HashMap::new(),
            limits,
        }
    }

    /// Entries written by every job but `except`.
    fn usage_without(&self, except: &str) -> Usage {
        self.jobs
            .iter()
            .filter(|(job, _)| job.as_str() != except)
            .map(|(_, j)| Usage::of(&j.instances, &j.services))
            .fold(Usage::default(), |a, b| Usage {
                instances: a.instances + b.instances,
                services: a.services + b.services,
                backends: a.backends + b.backends,
            })
    }

    /// Apply a table result (replacing the job's previous table).
    pub fn apply(
        &mut self,
        fwd: &dyn Forwarding,
        result: &TableResult,
        view: &LocalView,
    ) -> Result<()> {
        if result.app_name.is_empty() {
            if !result.instance_list.is_empty() {
                tracing::warn!(key = %result.query_key, "table result without app_name ignored");
            }
            return Ok(());
        }
        let new = plan(result, view);
        let others = self.usage_without(&result.app_name);
        let mine = Usage::of(&new.instances, &new.services);
        let total = Usage {
            instances: others.instances + mine.instances,
            services: others.services + mine.services,
            backends: others.backends + mine.backends,
        };
        if !total.fits(self.limits) {
            // Keep the job's previous routes: a table that does not fit must
            // not take room that local deployments need.
            anyhow::bail!(
                "routes of {} do not fit the dataplane tables ({total:?} of {:?}); raise the table sizes",
                result.app_name,
                self.limits
            );
        }
        let old = self.jobs.remove(&result.app_name).unwrap_or_default();
        let mut errors = Vec::new();
        // Upsert first: a flow in progress always finds a route.
        for (ns, e) in &new.instances {
            let unchanged = old.instances.get(ns).is_some_and(|o| instance_eq(o, e));
            if !unchanged && let Err(err) = fwd.upsert_instance(*ns, *e) {
                errors.push(format!("instance {ns}: {err:#}"));
            }
        }
        for (sip, (kind, backends)) in &new.services {
            if old.services.get(sip) != Some(&(*kind, backends.clone()))
                && let Err(err) = fwd.upsert_service(*sip, *kind, backends)
            {
                errors.push(format!("service {sip}: {err:#}"));
            }
        }
        for sip in old
            .services
            .keys()
            .filter(|s| !new.services.contains_key(s))
        {
            if let Err(err) = fwd.remove_service(*sip) {
                errors.push(format!("removing service {sip}: {err:#}"));
            }
        }
        for ns in old
            .instances
            .keys()
            .filter(|n| !new.instances.contains_key(n))
        {
            // Local containers' entries belong to deploy/undeploy.
            if !view.locals.contains_key(ns)
                && let Err(err) = fwd.remove_instance(*ns)
            {
                errors.push(format!("removing instance {ns}: {err:#}"));
            }
        }
        tracing::debug!(
            job = %result.app_name,
            instances = new.instances.len(),
            services = new.services.len(),
            "table applied"
        );
        self.jobs.insert(
            result.app_name.clone(),
            JobRoutes {
                instances: new.instances,
                services: new.services,
                table: result.clone(),
            },
        );
        if errors.is_empty() {
            Ok(())
        } else {
            anyhow::bail!(
                "updating routes of {}: {}",
                result.app_name,
                errors.join("; ")
            )
        }
    }

    /// Recompute a job's entries from its last table, e.g. after a local
    /// instance went away, so services stop naming it at once instead of at
    /// the cluster's next update.
    pub fn reapply(&mut self, fwd: &dyn Forwarding, job: &str, view: &LocalView) -> Result<()> {
        match self.jobs.get(job).map(|j| j.table.clone()) {
            Some(table) => self.apply(fwd, &table, view),
            None => Ok(()),
        }
    }

    /// Forget a job's routes (its interest expired). Local containers keep theirs.
    pub fn forget(&mut self, fwd: &dyn Forwarding, job: &str, view: &LocalView) {
        let Some(old) = self.jobs.remove(job) else {
            return;
        };
        for sip in old.services.keys() {
            if let Err(e) = fwd.remove_service(*sip) {
                tracing::warn!("removing service {sip}: {e:#}");
            }
        }
        for ns in old
            .instances
            .keys()
            .filter(|n| !view.locals.contains_key(n))
        {
            if let Err(e) = fwd.remove_instance(*ns) {
                tracing::warn!("removing instance {ns}: {e:#}");
            }
        }
    }

    /// The entry last written for a namespace address, if a table had it.
    pub fn instance(&self, ns: IpAddr) -> Option<InstanceEntry> {
        self.jobs
            .values()
            .find_map(|j| j.instances.get(&ns).copied())
    }

    /// The entry last written for the instance whose instance address is `ip`.
    pub fn instance_by_address(&self, ip: IpAddr) -> Option<InstanceEntry> {
        self.jobs
            .values()
            .flat_map(|j| j.instances.values())
            .find(|e| e.instance_ip == Some(ip))
            .copied()
    }

    /// Whether some job wrote service `addr` with at least one backend.
    pub fn has_service(&self, addr: IpAddr) -> bool {
        self.jobs
            .values()
            .any(|j| j.services.get(&addr).is_some_and(|(_, b)| !b.is_empty()))
    }

    pub fn jobs(&self) -> BTreeSet<String> {
        self.jobs.keys().cloned().collect()
    }

    /// Number of (instance, service) entries written, for status.
    pub fn counts(&self) -> (usize, usize) {
        self.jobs.values().fold((0, 0), |(i, s), j| {
            (i + j.instances.len(), s + j.services.len())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::LocalPort;
    use crate::forwarding::InMemory;

    fn fixture() -> TableResult {
        serde_json::from_str(include_str!("../../tests/fixtures/tablequery-result.json")).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn tables_that_do_not_fit_are_refused_and_keep_the_old_routes() {
        let fwd = InMemory::default();
        let view = LocalView::default();
        let mut t = ServiceTables::with_limits(Limits {
            instances: 3,
            services: 100,
            backends: 100,
        });
        let mut r = fixture();
        r.instance_list.truncate(1);
        t.apply(&fwd, &r, &view).unwrap();
        assert_eq!(fwd.snapshot().instances.len(), 2);
        let full = fixture();
        assert!(t.apply(&fwd, &full, &view).is_err());
        assert_eq!(
            fwd.snapshot().instances.len(),
            2,
            "the previous routes stay"
        );
        assert_eq!(t.counts().0, 2);
    }

    #[test]
    fn replacement_removes_vanished_entries() {
        let fwd = InMemory::default();
        let view = LocalView {
            node_ip: Some("198.51.100.9".parse().unwrap()),
            node_port: 50103,
            ..Default::default()
        };
        let mut t = ServiceTables::new();
        let mut r = fixture();
        t.apply(&fwd, &r, &view).unwrap();
        assert_eq!(fwd.snapshot().instances.len(), 4);
        assert_eq!(fwd.snapshot().services.len(), 8);
        r.instance_list.truncate(1);
        t.apply(&fwd, &r, &view).unwrap();
        let s = fwd.snapshot();
        assert_eq!(s.instances.len(), 2);
        assert!(!s.services.contains_key(&ip("10.30.0.4")));
        assert_eq!(s.services[&ip("10.30.55.56")].1, vec![ip("10.18.0.130")]);
        // A local instance leaving is reflected without a new table.
        let mut local = view.clone();
        let port = LocalPort {
            ifindex: 3,
            mac: [2, 0, 0, 0, 0, 3],
        };
        local.node_ip = Some("198.51.100.2".parse().unwrap());
        local.locals.insert(ip("10.18.0.130"), port);
        t.apply(&fwd, &r, &local).unwrap();
        assert_eq!(
            fwd.snapshot().services[&ip("10.30.55.56")].1,
            vec![ip("10.18.0.130")]
        );
        local.locals.clear();
        t.reapply(&fwd, &r.app_name, &local).unwrap();
        assert!(!fwd.snapshot().services.contains_key(&ip("10.30.55.56")));
        assert!(!fwd.snapshot().instances.contains_key(&ip("10.18.0.130")));
        t.forget(&fwd, &r.app_name, &view);
        assert!(fwd.snapshot().instances.is_empty());
        assert!(fwd.snapshot().services.is_empty());
    }
}
