//! The cluster service manager's half of the double, as plain state:
//! node subnets, service addresses, the instances of each job, table query
//! answers and interests -- behaving like upstream's where a worker can
//! tell (docs/contract.md §2.3 and §3):
//!
//! - every subnet request allocates a fresh /26 + /120 and the node's record
//!   keeps the last one (a test may pin a node's subnet instead);
//! - an instance the cluster scheduled but whose worker has not reported it
//!   yet is listed with `null` addresses;
//! - `query_key` echoes the `sip` (or, without one, the `sname`) asked;
//! - a table query registers the asking node's interest in the job;
//! - `service/undeployed` is ignored, as upstream's cluster does.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::{Value, json};

/// A v4/v6 address pair.
pub type Pair = (String, String);

/// The addresses a worker reported for one instance (`service/deployed`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    pub ns_ip: String,
    pub ns_ip6: String,
    pub host_ip: String,
    pub host_port: u16,
}

#[derive(Debug)]
struct Placement {
    /// The node it was scheduled on (None: known from a report only).
    node: Option<String>,
    /// None until the worker's NetManager reported it.
    addresses: Option<Instance>,
}

#[derive(Debug)]
struct Job {
    rr: Pair,
    closest: Pair,
    instances: BTreeMap<u64, Placement>,
}

/// Subnets handed out: 1023 /26 in 10.18.0.0/16 (not the network's first).
const MAX_SUBNETS: u32 = 1023;

/// The n-th subnet: 10.18.0.0/16 in /26 steps, fc00::/112 in /120 steps.
fn subnet(k: u32) -> Pair {
    let base = k * 64;
    (
        format!("10.18.{}.{}", base >> 8, base & 0xff),
        format!("fc00::{:x}", k << 8),
    )
}

/// The n-th service address: 10.30.0.0/16 and fdff::/16.
fn service_ip(n: u32) -> Pair {
    (
        format!("10.30.{}.{}", (n >> 8) & 0xff, n & 0xff),
        format!("fdff::{n:x}"),
    )
}

/// `host_port` arrives as a string (contract) or a number.
fn port_of(v: &Value) -> Option<u16> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_u64().and_then(|p| u16::try_from(p).ok()),
        _ => None,
    }
}

pub struct Services {
    /// The last subnet each node was given.
    subnets: HashMap<String, Pair>,
    pinned_subnets: HashMap<String, Pair>,
    subnets_given: u32,
    jobs: BTreeMap<String, Job>,
    /// Never freed, so a moved instance keeps its address.
    instance_ips: HashMap<(String, u64), Pair>,
    service_ips_given: u32,
    /// Tables a test set by hand; they win over what the double knows.
    tables: HashMap<String, Value>,
    /// job -> nodes that asked for it and did not drop their interest.
    interests: BTreeMap<String, BTreeSet<String>>,
    pub answer_tables: bool,
    pub answer_subnets: bool,
}

impl Default for Services {
    fn default() -> Services {
        Services {
            subnets: HashMap::new(),
            pinned_subnets: HashMap::new(),
            subnets_given: 0,
            jobs: BTreeMap::new(),
            instance_ips: HashMap::new(),
            service_ips_given: 0,
            tables: HashMap::new(),
            interests: BTreeMap::new(),
            answer_tables: true,
            answer_subnets: true,
        }
    }
}

impl Services {
    /// From now on, `node` always gets `subnet`.
    pub fn pin_subnet(&mut self, node: &str, subnet: Pair) {
        self.pinned_subnets.insert(node.to_string(), subnet);
    }

    /// The subnet on `node`'s record (the last one handed out).
    pub fn subnet_of(&self, node: &str) -> Option<Pair> {
        self.subnets.get(node).cloned()
    }

    /// `{"METHOD": "GET"}` on `nodes/<id>/net/subnet`: a fresh subnet (None
    /// once the range is used up).
    pub fn request_subnet(&mut self, node: &str) -> Option<Pair> {
        let s = match self.pinned_subnets.get(node) {
            Some(p) => p.clone(),
            None if self.subnets_given >= MAX_SUBNETS => return None,
            None => {
                self.subnets_given += 1;
                subnet(self.subnets_given)
            }
        };
        self.subnets.insert(node.to_string(), s.clone());
        Some(s)
    }

    fn next_service_ip(&mut self) -> Pair {
        // .0 and .1 stay unused, like a network and a gateway address would.
        self.service_ips_given = self.service_ips_given.max(1) + 1;
        service_ip(self.service_ips_given)
    }

    fn job_mut(&mut self, name: &str) -> &mut Job {
        if !self.jobs.contains_key(name) {
            let rr = self.next_service_ip();
            let closest = self.next_service_ip();
            self.jobs.insert(
                name.to_string(),
                Job {
                    rr,
                    closest,
                    instances: BTreeMap::new(),
                },
            );
        }
        self.jobs
            .get_mut(name)
            .unwrap_or_else(|| unreachable!("inserted above"))
    }

    /// RR and Closest addresses of `job` (allocated on first use).
    pub fn service_ips(&mut self, job: &str) -> (Pair, Pair) {
        let j = self.job_mut(job);
        (j.rr.clone(), j.closest.clone())
    }

    /// The instance address of instance `n` of `job` (allocated on first use).
    pub fn instance_ip(&mut self, job: &str, n: u64) -> Pair {
        let key = (job.to_string(), n);
        if let Some(p) = self.instance_ips.get(&key) {
            return p.clone();
        }
        let p = self.next_service_ip();
        self.instance_ips.insert(key, p.clone());
        p
    }

    /// The cluster scheduled instance `n` of `job` on `node`: listed from
    /// now on, without addresses until its worker reports them.
    pub fn schedule(&mut self, job: &str, n: u64, node: &str) {
        self.instance_ip(job, n);
        self.job_mut(job).instances.insert(
            n,
            Placement {
                node: Some(node.to_string()),
                addresses: None,
            },
        );
    }

    /// The cluster removed instance `n` of `job`; whether it was listed.
    pub fn unschedule(&mut self, job: &str, n: u64) -> bool {
        self.jobs
            .get_mut(job)
            .is_some_and(|j| j.instances.remove(&n).is_some())
    }

    /// Drops `job`, its service addresses and its instances' addresses
    /// (later queries about them find nothing); whether it was known.
    pub fn forget(&mut self, job: &str) -> bool {
        self.instance_ips.retain(|(j, _), _| j != job);
        self.tables.remove(job);
        self.jobs.remove(job).is_some()
    }

    /// `service/deployed`: the instance's addresses; the job to announce as
    /// changed. Upstream updates only instances it scheduled; reports of
    /// others are dropped.
    pub fn deployed(&mut self, msg: &Value) -> Option<String> {
        let job = msg["appname"].as_str()?;
        let n = msg["instance_number"].as_u64()?;
        if self.tables.contains_key(job) {
            return None;
        }
        let addresses = Instance {
            ns_ip: msg["nsip"].as_str()?.to_string(),
            ns_ip6: msg["nsipv6"].as_str().unwrap_or("").to_string(),
            host_ip: msg["host_ip"].as_str()?.to_string(),
            host_port: port_of(&msg["host_port"]).unwrap_or(50103),
        };
        let placement = self.jobs.get_mut(job)?.instances.get_mut(&n)?;
        placement.addresses = Some(addresses);
        Some(job.to_string())
    }

    /// `service/address-changed`: the instance's new place, in the job's
    /// record and in a table pinned with [`Services::set_table`] (upstream
    /// updates the one table it serves); the job to announce as changed.
    pub fn address_changed(&mut self, msg: &Value) -> Option<String> {
        let job = msg["appname"].as_str()?;
        let n = msg["instance_number"].as_u64()?;
        let host_ip = msg["host_ip"].as_str()?;
        let port = port_of(&msg["host_port"]);
        let mut changed = false;
        if let Some(inst) = self
            .jobs
            .get_mut(job)
            .and_then(|j| j.instances.get_mut(&n))
            .and_then(|i| i.addresses.as_mut())
        {
            inst.host_ip = host_ip.to_string();
            inst.host_port = port.unwrap_or(inst.host_port);
            changed = true;
        }
        if let Some(pinned) = self
            .tables
            .get_mut(job)
            .and_then(|t| t["instance_list"].as_array_mut())
            .and_then(|l| l.iter_mut().find(|i| i["instance_number"] == n))
        {
            pinned["host_ip"] = host_ip.into();
            if let Some(p) = port {
                pinned["host_port"] = p.into();
            }
            changed = true;
        }
        changed.then(|| job.to_string())
    }

    /// Answers every table query about `job` with `table` from now on.
    pub fn set_table(&mut self, job: &str, table: Value) {
        self.tables.insert(job.to_string(), table);
    }

    /// Instances whose worker reported their addresses.
    pub fn instances(&self, job: &str) -> Vec<(u64, Instance)> {
        self.jobs
            .get(job)
            .map(|j| {
                j.instances
                    .iter()
                    .filter_map(|(n, p)| p.addresses.clone().map(|a| (*n, a)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Jobs `node` holds an interest in.
    pub fn interests_of(&self, node: &str) -> Vec<String> {
        self.interests
            .iter()
            .filter(|(_, nodes)| nodes.contains(node))
            .map(|(job, _)| job.clone())
            .collect()
    }

    /// `interest/remove` `{"appname"}`.
    pub fn remove_interest(&mut self, node: &str, msg: &Value) {
        if let Some(job) = msg["appname"].as_str()
            && let Some(nodes) = self.interests.get_mut(job)
        {
            nodes.remove(node);
        }
    }

    fn pinned_by_ip(&self, ip: &str) -> Option<&str> {
        self.tables
            .iter()
            .find(|(_, t)| {
                t["instance_list"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|i| i["service_ip"].as_array().into_iter().flatten())
                    .any(|s| s["Address"] == ip || s["Address_v6"] == ip)
            })
            .map(|(job, _)| job.as_str())
    }

    fn job_by_ip(&self, ip: &str) -> Option<&str> {
        let has = |p: &Pair| p.0 == ip || p.1 == ip;
        self.jobs
            .iter()
            .find(|(name, j)| {
                has(&j.rr)
                    || has(&j.closest)
                    || j.instances.keys().any(|n| {
                        self.instance_ips
                            .get(&(name.to_string(), *n))
                            .is_some_and(has)
                    })
            })
            .map(|(name, _)| name.as_str())
    }

    /// `tablequery/request` `{"sname", "sip"}` from `node`: the result,
    /// and `node`'s interest in the job it names.
    pub fn table_query(&mut self, node: &str, req: &Value) -> Value {
        let sname = req["sname"].as_str().unwrap_or("");
        let sip = req["sip"].as_str().unwrap_or("");
        let key = if sip.is_empty() { sname } else { sip };
        let name = if sip.is_empty() {
            (!sname.is_empty()).then_some(sname)
        } else {
            self.pinned_by_ip(sip).or_else(|| self.job_by_ip(sip))
        }
        .map(str::to_string);
        if let Some(job) = &name {
            self.interests
                .entry(job.clone())
                .or_default()
                .insert(node.to_string());
        }
        if let Some(mut t) = name.as_ref().and_then(|j| self.tables.get(j).cloned()) {
            t["app_name"] = json!(name);
            t["query_key"] = json!(key);
            return t;
        }
        let list = name
            .as_deref()
            .and_then(|n| self.jobs.get(n).map(|j| self.instance_list(n, j)))
            .unwrap_or_default();
        json!({"app_name": name.as_deref().unwrap_or(sname), "query_key": key, "instance_list": list})
    }

    fn instance_list(&self, name: &str, job: &Job) -> Vec<Value> {
        let ip = |kind: &str, p: &Pair| json!({"IpType": kind, "Address": p.0, "Address_v6": p.1});
        job.instances
            .iter()
            .map(|(n, placement)| {
                let iip = self
                    .instance_ips
                    .get(&(name.to_string(), *n))
                    .cloned()
                    .unwrap_or_default();
                let a = placement.addresses.as_ref();
                json!({
                    "instance_number": n,
                    "instance_ip": iip.0, "instance_ip_v6": iip.1,
                    "namespace_ip": a.map(|a| &a.ns_ip),
                    "namespace_ip_v6": a.map(|a| &a.ns_ip6),
                    "host_ip": a.map(|a| &a.host_ip),
                    "host_port": a.map(|a| a.host_port),
                    "worker_id": placement.node,
                    "service_ip": [ip("RR", &job.rr), ip("Closest", &job.closest), ip("instance_ip", &iip)],
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployed(job: &str, n: u64, nsip: &str) -> Value {
        json!({"appname": job, "status": "DEPLOYED", "instance_number": n, "nsip": nsip,
               "nsipv6": "fc00::2", "host_ip": "198.51.100.1", "host_port": "50103"})
    }

    #[test]
    fn every_subnet_request_allocates_and_the_record_keeps_the_last() {
        let mut s = Services::default();
        let a1 = s.request_subnet("a").unwrap();
        assert_eq!(a1, ("10.18.0.64".into(), "fc00::100".into()));
        let b = s.request_subnet("b").unwrap();
        assert_eq!(b, ("10.18.0.128".into(), "fc00::200".into()));
        let a2 = s.request_subnet("a").unwrap();
        assert_ne!(a1, a2, "a second request gets a fresh subnet");
        assert_eq!(s.subnet_of("a"), Some(a2));
        s.pin_subnet("p", ("10.18.9.0".into(), "fc00::900".into()));
        assert_eq!(s.request_subnet("p"), s.request_subnet("p"));
        assert_eq!(s.subnet_of("p").unwrap().0, "10.18.9.0");
    }

    #[test]
    fn scheduled_instances_are_listed_with_null_addresses_until_deployed() {
        let mut s = Services::default();
        let (rr, _) = s.service_ips("a.b.c.d");
        s.schedule("a.b.c.d", 0, "node1");
        let t = s.table_query("n", &json!({"sname": "", "sip": rr.0}));
        assert_eq!(t["app_name"], "a.b.c.d");
        assert_eq!(t["query_key"], json!(rr.0));
        let i = &t["instance_list"][0];
        for k in ["namespace_ip", "namespace_ip_v6", "host_ip", "host_port"] {
            assert!(i[k].is_null(), "{k} in {i}");
        }
        assert!(i["instance_ip"].is_string());
        assert!(s.instances("a.b.c.d").is_empty());

        assert_eq!(
            s.deployed(&deployed("a.b.c.d", 0, "10.18.0.66")).as_deref(),
            Some("a.b.c.d")
        );
        let t = s.table_query("n", &json!({"sname": "a.b.c.d", "sip": ""}));
        assert_eq!(t["query_key"], "a.b.c.d");
        let i = &t["instance_list"][0];
        assert_eq!(i["namespace_ip"], "10.18.0.66");
        assert_eq!(i["host_port"], 50103);
        assert_eq!(i["service_ip"][2]["IpType"], "instance_ip");
        assert_eq!(s.instances("a.b.c.d").len(), 1);

        // Reports of instances the cluster never scheduled change nothing.
        assert_eq!(s.deployed(&deployed("a.b.c.d", 7, "10.18.0.67")), None);
        assert!(s.unschedule("a.b.c.d", 0));
        assert_eq!(
            s.table_query("n", &json!({"sname": "a.b.c.d"}))["instance_list"],
            json!([])
        );
    }

    #[test]
    fn a_forgotten_job_no_longer_resolves() {
        let mut s = Services::default();
        let (rr, closest) = s.service_ips("a.b.c.d");
        s.schedule("a.b.c.d", 0, "node1");
        s.deployed(&deployed("a.b.c.d", 0, "10.18.0.66"));
        let iip = s.instance_ip("a.b.c.d", 0);
        assert!(s.forget("a.b.c.d"));
        assert!(!s.forget("a.b.c.d"));
        for ip in [&rr.0, &rr.1, &closest.0, &iip.0] {
            let t = s.table_query("n", &json!({"sname": "", "sip": ip}));
            assert_eq!(t["app_name"], "", "{ip}");
            assert_eq!(t["instance_list"], json!([]), "{ip}");
        }
        // Deployed again, it gets fresh addresses.
        let (rr2, _) = s.service_ips("a.b.c.d");
        assert_ne!(rr, rr2);
    }

    #[test]
    fn queries_register_interests_and_unknown_keys_answer_empty() {
        let mut s = Services::default();
        let t = s.table_query("n1", &json!({"sname": "", "sip": "10.30.99.99"}));
        assert_eq!(
            t,
            json!({"app_name": "", "query_key": "10.30.99.99", "instance_list": []})
        );
        s.table_query("n1", &json!({"sname": "x.y.z.w", "sip": ""}));
        s.table_query("n2", &json!({"sname": "x.y.z.w", "sip": ""}));
        assert_eq!(s.interests_of("n1"), vec!["x.y.z.w".to_string()]);
        s.remove_interest("n1", &json!({"appname": "x.y.z.w"}));
        assert!(s.interests_of("n1").is_empty());
        assert_eq!(s.interests_of("n2").len(), 1);
    }

    #[test]
    fn an_address_change_moves_the_instance_in_a_pinned_table_too() {
        let mut s = Services::default();
        s.set_table(
            "a.b.c.d",
            json!({"instance_list": [{"instance_number": 0, "host_ip": "198.51.100.1",
                                      "host_port": 50103}]}),
        );
        let msg = json!({"appname": "a.b.c.d", "instance_number": 0,
                         "host_ip": "198.51.100.11", "host_port": "50200"});
        assert_eq!(s.address_changed(&msg).as_deref(), Some("a.b.c.d"));
        let t = &s.tables["a.b.c.d"]["instance_list"][0];
        assert_eq!(
            (&t["host_ip"], &t["host_port"]),
            (&json!("198.51.100.11"), &json!(50200))
        );
        let unknown =
            json!({"appname": "x.y.z.w", "instance_number": 0, "host_ip": "198.51.100.9"});
        assert_eq!(s.address_changed(&unknown), None);
    }

    #[test]
    fn pinned_tables_win_and_are_found_by_any_service_address() {
        let mut s = Services::default();
        s.set_table(
            "p.q.r.s",
            json!({"instance_list": [{"instance_number": 0, "service_ip": [
                {"IpType": "RR", "Address": "10.30.55.55", "Address_v6": "fdff::55"}]}]}),
        );
        let t = s.table_query("n", &json!({"sname": "", "sip": "fdff::55"}));
        assert_eq!(t["app_name"], "p.q.r.s");
        assert_eq!(t["query_key"], "fdff::55");
        assert_eq!(t["instance_list"][0]["instance_number"], 0);
        assert_eq!(s.deployed(&deployed("p.q.r.s", 0, "10.18.0.2")), None);
    }
}
