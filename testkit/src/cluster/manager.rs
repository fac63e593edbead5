//! The cluster manager's half of the double, as plain state: registered
//! nodes, the reports they send, and the instances the cluster placed --
//! behaving like upstream's where a worker can tell (docs/contract.md §3):
//!
//! - the node id follows the hostname: registering again with the same
//!   hostname gives the same id;
//! - an instance without `jobs/resources` from its node for the failure
//!   window (about 30 s upstream) is marked FAILED; a later report is still
//!   accepted and makes it RUNNING again.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Upstream's silence window before an instance counts as FAILED.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(30);

/// A registered node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRecord {
    pub id: String,
    pub hostname: String,
    /// Where its registration came from.
    pub address: IpAddr,
}

/// A status report on `nodes/<id>/job`.
#[derive(Clone, Debug)]
pub struct Report {
    pub node: String,
    pub body: Value,
    pub at: Instant,
}

/// What the cluster believes about one instance it placed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceState {
    pub node: String,
    /// NODE_SCHEDULED, then the worker's CREATED/FAILED/DEAD/COMPLETED,
    /// RUNNING while it is in `jobs/resources`, FAILED after silence.
    pub status: String,
    pub detail: String,
}

#[derive(Debug)]
struct Tracked {
    state: InstanceState,
    /// Scheduling or the last `jobs/resources` that listed it.
    heard: Instant,
}

/// Statuses after which the cluster no longer expects reports.
fn settled(status: &str) -> bool {
    matches!(status, "FAILED" | "DEAD" | "COMPLETED" | "UNDEPLOYED")
}

/// A 24-hex id, like a MongoDB ObjectId.
fn random_id() -> String {
    let mut b = [0u8; 12];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The instance number of a report entry: a number or a numeric string.
fn instance_of(v: &Value) -> Option<u64> {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

pub struct Manager {
    ids: HashMap<String, String>,
    nodes: Vec<NodeRecord>,
    registrations: Vec<Value>,
    reports: Vec<Report>,
    instances: BTreeMap<(String, u64), Tracked>,
    failure_window: Duration,
}

impl Manager {
    pub fn new(failure_window: Duration) -> Manager {
        Manager {
            ids: HashMap::new(),
            nodes: Vec::new(),
            registrations: Vec::new(),
            reports: Vec::new(),
            instances: BTreeMap::new(),
            failure_window,
        }
    }

    /// The id a node with `hostname` gets (the same every time).
    pub fn id_for(&mut self, hostname: &str) -> String {
        self.ids
            .entry(hostname.to_string())
            .or_insert_with(random_id)
            .clone()
    }

    /// `POST /api/node/register` with node document `doc` from `peer`.
    pub fn register(&mut self, doc: Value, peer: IpAddr) -> String {
        let hostname = doc["host"].as_str().unwrap_or("").to_string();
        let id = self.id_for(&hostname);
        self.registrations.push(doc);
        let record = NodeRecord {
            id: id.clone(),
            hostname,
            address: peer,
        };
        match self.nodes.iter_mut().find(|n| n.id == id) {
            Some(n) => *n = record,
            None => self.nodes.push(record),
        }
        id
    }

    pub fn nodes(&self) -> &[NodeRecord] {
        &self.nodes
    }

    pub fn registrations(&self) -> &[Value] {
        &self.registrations
    }

    pub fn reports(&self) -> &[Report] {
        &self.reports
    }

    /// `nodes/<id>/job`.
    pub fn job_report(&mut self, node: &str, body: Value, now: Instant) {
        if let (Some(job), Some(n), Some(status)) = (
            body["sname"].as_str(),
            instance_of(&body["instance"]),
            body["status"].as_str(),
        ) && let Some(t) = self.instances.get_mut(&(job.to_string(), n))
            && t.state.node == node
        {
            t.state.status = status.to_string();
            t.state.detail = body["status_detail"].as_str().unwrap_or("").to_string();
            t.heard = now;
        }
        self.reports.push(Report {
            node: node.to_string(),
            body,
            at: now,
        });
    }

    /// `nodes/<id>/jobs/resources`: every listed instance is RUNNING.
    pub fn resources(&mut self, node: &str, body: &Value, now: Instant) {
        for s in body["services"].as_array().into_iter().flatten() {
            let (Some(job), Some(n)) = (
                s["job_name"].as_str(),
                instance_of(&s["instance"]).or_else(|| instance_of(&s["instance_number"])),
            ) else {
                continue;
            };
            if let Some(t) = self.instances.get_mut(&(job.to_string(), n))
                && t.state.node == node
                && !matches!(t.state.status.as_str(), "UNDEPLOYED" | "COMPLETED" | "DEAD")
            {
                t.state.status = "RUNNING".into();
                t.state.detail.clear();
                t.heard = now;
            }
        }
    }

    pub fn schedule(&mut self, job: &str, n: u64, node: &str, now: Instant) {
        self.instances.insert(
            (job.to_string(), n),
            Tracked {
                state: InstanceState {
                    node: node.to_string(),
                    status: "NODE_SCHEDULED".into(),
                    detail: String::new(),
                },
                heard: now,
            },
        );
    }

    pub fn unschedule(&mut self, job: &str, n: u64) {
        self.instances.remove(&(job.to_string(), n));
    }

    /// Drops every instance and report of `job`.
    pub fn forget(&mut self, job: &str) {
        self.instances.retain(|(j, _), _| j != job);
        self.reports.retain(|r| r.body["sname"] != job);
    }

    /// Marks instances not heard of within the window FAILED; returns them.
    pub fn expire(&mut self, now: Instant) -> Vec<(String, u64)> {
        let window = self.failure_window;
        let mut failed = Vec::new();
        for ((job, n), t) in &mut self.instances {
            if !settled(&t.state.status) && now.duration_since(t.heard) > window {
                t.state.status = "FAILED".into();
                t.state.detail = format!("no jobs/resources from its node for {window:?}");
                failed.push((job.clone(), *n));
            }
        }
        failed
    }

    pub fn instance(&self, job: &str, n: u64) -> Option<InstanceState> {
        self.instances
            .get(&(job.to_string(), n))
            .map(|t| t.state.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn the_node_id_follows_the_hostname() {
        let mut m = Manager::new(FAILURE_WINDOW);
        let early = m.id_for("w1");
        let a = m.register(json!({"host": "w1"}), PEER);
        let b = m.register(json!({"host": "w1", "id": ""}), PEER);
        let c = m.register(json!({"host": "w2"}), PEER);
        assert_eq!((early.as_str(), a.as_str()), (b.as_str(), b.as_str()));
        assert_ne!(a, c);
        assert_eq!(a.len(), 24);
        assert_eq!(m.nodes().len(), 2);
        assert_eq!(m.registrations().len(), 3);
    }

    #[test]
    fn silence_fails_instances_and_a_later_report_revives_them() {
        let window = Duration::from_secs(2);
        let mut m = Manager::new(window);
        let t0 = Instant::now();
        m.schedule("a.b.c.d", 0, "n1", t0);
        m.schedule("a.b.c.d", 1, "n1", t0);
        m.job_report(
            "n1",
            json!({"sname": "a.b.c.d", "instance": 0, "status": "CREATED"}),
            t0,
        );
        let listed = json!({"services": [{"job_name": "a.b.c.d", "instance": 0}]});
        m.resources("n1", &listed, t0 + Duration::from_secs(1));
        assert_eq!(m.instance("a.b.c.d", 0).unwrap().status, "RUNNING");
        // Another node's report does not count for n1's instance.
        m.resources("n2", &listed, t0 + Duration::from_secs(3));
        let failed = m.expire(t0 + Duration::from_millis(3500));
        assert_eq!(
            failed,
            vec![("a.b.c.d".to_string(), 0), ("a.b.c.d".to_string(), 1)]
        );
        assert_eq!(m.instance("a.b.c.d", 1).unwrap().status, "FAILED");
        assert!(m.expire(t0 + Duration::from_secs(10)).is_empty());
        m.resources("n1", &listed, t0 + Duration::from_secs(11));
        assert_eq!(m.instance("a.b.c.d", 0).unwrap().status, "RUNNING");
    }
}
