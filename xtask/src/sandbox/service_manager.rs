//! The cluster-service-manager part of the stand-in, as plain state: node
//! subnets, service IPs, the instances NetManagers reported, and answers to
//! table queries. The MQTT plumbing around it is in `cluster_standin`.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Value, json};

/// A v4/v6 address pair.
pub type Pair = (String, String);

#[derive(Clone, Debug)]
pub struct Instance {
    pub ns_ip: String,
    pub ns_ip6: String,
    pub host_ip: String,
    pub host_port: u16,
}

#[derive(Default, Debug)]
pub struct Job {
    pub rr: Pair,
    pub closest: Pair,
    pub instances: BTreeMap<u64, Instance>,
}

#[derive(Default)]
pub struct ServiceManager {
    subnets: HashMap<String, u32>,
    jobs: BTreeMap<String, Job>,
    /// Never freed, so a moved instance keeps its address.
    instance_ips: HashMap<(String, u64), Pair>,
    next_service_ip: u32,
}

/// The n-th service address: 10.30.0.0/16 and fdff::/16.
fn service_ip(n: u32) -> Pair {
    (
        format!("10.30.{}.{}", (n >> 8) & 0xff, n & 0xff),
        format!("fdff::{n:x}"),
    )
}

impl ServiceManager {
    fn next_ip(&mut self) -> Pair {
        // .0 and .1 stay unused, like a network and a gateway address would.
        self.next_service_ip = self.next_service_ip.max(1) + 1;
        service_ip(self.next_service_ip)
    }

    /// The node's /26 in 10.18.0.0/16 and /120 in fc00::/112 (stable per node).
    pub fn subnet(&mut self, node: &str) -> Pair {
        // Index 0 would hand out 10.18.0.0, the network address of the /16.
        let next = self.subnets.len() as u32 + 1;
        let k = *self.subnets.entry(node.to_string()).or_insert(next);
        let base = k * 64;
        (
            format!("10.18.{}.{}", base >> 8, base & 0xff),
            format!("fc00::{:x}", k << 8),
        )
    }

    /// Creates the job's RR and Closest addresses on first use.
    pub fn job(&mut self, name: &str) -> &Job {
        if !self.jobs.contains_key(name) {
            let rr = self.next_ip();
            let closest = self.next_ip();
            self.jobs.insert(
                name.to_string(),
                Job {
                    rr,
                    closest,
                    instances: BTreeMap::new(),
                },
            );
        }
        &self.jobs[name]
    }

    pub fn instance_ip(&mut self, job: &str, n: u64) -> Pair {
        let key = (job.to_string(), n);
        if let Some(p) = self.instance_ips.get(&key) {
            return p.clone();
        }
        let p = self.next_ip();
        self.instance_ips.insert(key, p.clone());
        p
    }

    /// `service/deployed`; returns the job to announce as changed.
    pub fn deployed(&mut self, msg: &Value) -> Option<String> {
        let job = msg["appname"].as_str()?.to_string();
        let n = msg["instance_number"].as_u64()?;
        let inst = Instance {
            ns_ip: msg["nsip"].as_str()?.to_string(),
            ns_ip6: msg["nsipv6"].as_str().unwrap_or("").to_string(),
            host_ip: msg["host_ip"].as_str()?.to_string(),
            host_port: port_of(&msg["host_port"]).unwrap_or(50103),
        };
        self.job(&job);
        self.instance_ip(&job, n);
        self.jobs.get_mut(&job)?.instances.insert(n, inst);
        Some(job)
    }

    /// `service/undeployed`; returns the job to announce as changed.
    pub fn undeployed(&mut self, msg: &Value) -> Option<String> {
        let job = msg["appname"].as_str()?;
        let n = msg["instance_number"].as_u64()?;
        self.jobs.get_mut(job)?.instances.remove(&n)?;
        Some(job.to_string())
    }

    /// `service/address-changed`.
    pub fn address_changed(&mut self, msg: &Value) -> Option<String> {
        let job = msg["appname"].as_str()?;
        let n = msg["instance_number"].as_u64()?;
        let inst = self.jobs.get_mut(job)?.instances.get_mut(&n)?;
        inst.host_ip = msg["host_ip"].as_str()?.to_string();
        inst.host_port = port_of(&msg["host_port"]).unwrap_or(inst.host_port);
        Some(job.to_string())
    }

    fn find_by_ip(&self, ip: &str) -> Option<&str> {
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

    /// Answers `tablequery/request` `{"sname", "sip"}`.
    pub fn table(&self, req: &Value) -> Value {
        let sname = req["sname"].as_str().unwrap_or("");
        let sip = req["sip"].as_str().unwrap_or("");
        let key = if sip.is_empty() { sname } else { sip };
        let name = if sname.is_empty() {
            self.find_by_ip(sip)
        } else {
            Some(sname)
        };
        let list: Vec<Value> = name
            .and_then(|n| self.jobs.get(n).map(|j| (n, j)))
            .map(|(n, j)| self.instance_list(n, j))
            .unwrap_or_default();
        json!({"app_name": name.unwrap_or(sname), "query_key": key, "instance_list": list})
    }

    fn instance_list(&self, name: &str, job: &Job) -> Vec<Value> {
        let ip = |kind: &str, p: &Pair| json!({"IpType": kind, "Address": p.0, "Address_v6": p.1});
        job.instances
            .iter()
            .map(|(n, i)| {
                let mut sips = vec![ip("RR", &job.rr), ip("Closest", &job.closest)];
                if let Some(p) = self.instance_ips.get(&(name.to_string(), *n)) {
                    sips.push(ip("instance_ip", p));
                }
                json!({
                    "instance_number": n, "namespace_ip": i.ns_ip, "namespace_ip_v6": i.ns_ip6,
                    "host_ip": i.host_ip, "host_port": i.host_port, "service_ip": sips
                })
            })
            .collect()
    }

    pub fn instances(&self, job: &str) -> Vec<(u64, Instance)> {
        self.jobs
            .get(job)
            .map(|j| j.instances.iter().map(|(n, i)| (*n, i.clone())).collect())
            .unwrap_or_default()
    }
}

/// `host_port` arrives as a string (contract) or a number.
fn port_of(v: &Value) -> Option<u16> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_u64().and_then(|p| u16::try_from(p).ok()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_are_distinct_and_stable() {
        let mut sm = ServiceManager::default();
        let a = sm.subnet("a");
        let b = sm.subnet("b");
        assert_eq!(a, ("10.18.0.64".into(), "fc00::100".into()));
        assert_eq!(b, ("10.18.0.128".into(), "fc00::200".into()));
        assert_eq!(sm.subnet("a"), a);
    }

    #[test]
    fn table_by_service_ip_lists_instances_with_their_addresses() {
        let mut sm = ServiceManager::default();
        let rr = sm.job("a.b.c.d").rr.clone();
        let msg = json!({"appname": "a.b.c.d", "instance_number": 1, "nsip": "10.18.0.2",
                         "nsipv6": "fc00::2", "host_ip": "198.51.100.1", "host_port": "50103"});
        assert_eq!(sm.deployed(&msg).as_deref(), Some("a.b.c.d"));
        let t = sm.table(&json!({"sname": "", "sip": rr.0}));
        assert_eq!(t["app_name"], "a.b.c.d");
        let i = &t["instance_list"][0];
        assert_eq!(i["host_port"], 50103);
        assert_eq!(i["service_ip"][2]["IpType"], "instance_ip");
        assert!(sm.undeployed(&msg).is_some());
        assert_eq!(
            sm.table(&json!({"sname": "a.b.c.d"}))["instance_list"],
            json!([])
        );
    }
}
