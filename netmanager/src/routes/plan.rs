//! From one table query result to the dataplane entries it means: which
//! namespace addresses live where, and which backends each service address
//! has (ordered nearest first for Closest).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use crate::addresses::{ServiceRanges, is_namespace_address, is_node_address};
use crate::cluster_link::{TableInstance, TableResult};
use crate::dataplane::{InstanceEntry, LocalPort, ServiceKind};

/// What planning needs to know about this node.
#[derive(Debug, Clone, Default)]
pub struct LocalView {
    pub node_ip: Option<IpAddr>,
    pub node_port: u16,
    /// Namespace address (v4 and v6) of each local container -> its port.
    pub locals: HashMap<IpAddr, LocalPort>,
    /// Namespace address of each local container -> its job. Only that
    /// job's table may describe the address.
    pub owners: HashMap<IpAddr, String>,
    /// What counts as a service address.
    pub service_ranges: ServiceRanges,
}

/// Most instances one table may describe; the rest are ignored, so one
/// message cannot fill the maps (real services have a handful).
pub const MAX_INSTANCES_PER_TABLE: usize = 256;
/// Most service addresses one instance may carry (upstream sends 3).
pub const MAX_SERVICE_IPS_PER_INSTANCE: usize = 16;

/// Entries computed from one table result.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub instances: BTreeMap<IpAddr, InstanceEntry>,
    pub services: BTreeMap<IpAddr, (ServiceKind, Vec<IpAddr>)>,
}

pub(super) fn instance_eq(a: &InstanceEntry, b: &InstanceEntry) -> bool {
    a.instance_ip == b.instance_ip
        && a.node_ip == b.node_ip
        && a.node_port == b.node_port
        && a.local.map(|l| (l.ifindex, l.mac)) == b.local.map(|l| (l.ifindex, l.mac))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SipKind {
    RoundRobin,
    Closest,
    Instance,
}

/// IpType strings: "RR", "Closest"; "instance_ip", "InstanceNumber" and any
/// other string name the instance itself (upstream behaviour).
fn sip_kind(ip_type: &str) -> SipKind {
    match ip_type {
        "RR" => SipKind::RoundRobin,
        "Closest" => SipKind::Closest,
        _ => SipKind::Instance,
    }
}

/// Parsed view of one instance of a table.
struct Inst {
    number: u32,
    ns: [Option<IpAddr>; 2],
    node_ip: IpAddr,
    node_port: u16,
    local: [Option<LocalPort>; 2],
    /// (kind, v4 address, v6 address)
    sips: Vec<(SipKind, Option<IpAddr>, Option<IpAddr>)>,
}

impl Inst {
    fn parse(t: &TableInstance, job: &str, view: &LocalView) -> Option<Inst> {
        let skip = |why: &str| {
            tracing::warn!(job, instance = t.instance_number, "instance skipped: {why}");
            None
        };
        if t.host_ip.trim().is_empty() || t.host_port == 0 {
            // Scheduled but not running yet: the cluster sends null addresses.
            tracing::debug!(
                job,
                instance = t.instance_number,
                "instance not running yet, skipped"
            );
            return None;
        }
        // IPv6 host_ip: our extension between our own workers.
        let node_ip = match t.host_ip.trim().parse::<IpAddr>() {
            Ok(ip) if is_node_address(ip) => ip.to_canonical(),
            _ => return skip(&format!("host_ip {:?} is not a node address", t.host_ip)),
        };
        let v4 = namespace_address(&t.namespace_ip, job, view);
        let v6 = namespace_address(&t.namespace_ip_v6, job, view);
        if v4.is_none() && v6.is_none() {
            return skip("no usable namespace address");
        }
        let local = [v4, v6].map(|a| a.and_then(|a| view.locals.get(&a).copied()));
        let on_this_node = Some(node_ip) == view.node_ip && t.host_port == view.node_port;
        if on_this_node && local.iter().all(Option::is_none) {
            // The cluster still lists an instance here that we no longer run;
            // tunnelling to ourselves would black-hole it.
            tracing::debug!(
                job,
                instance = t.instance_number,
                "stale instance on this node, skipped"
            );
            return None;
        }
        if t.service_ip.len() > MAX_SERVICE_IPS_PER_INSTANCE {
            tracing::warn!(
                job,
                instance = t.instance_number,
                count = t.service_ip.len(),
                "too many service addresses; extra ones ignored"
            );
        }
        let sips = t
            .service_ip
            .iter()
            .take(MAX_SERVICE_IPS_PER_INSTANCE)
            .map(|s| {
                (
                    sip_kind(&s.ip_type),
                    service_address(&s.address, job, &view.service_ranges),
                    service_address(&s.address_v6, job, &view.service_ranges),
                )
            })
            .collect();
        Some(Inst {
            number: t.instance_number,
            ns: [v4, v6],
            node_ip,
            node_port: t.host_port,
            local,
            sips,
        })
    }

    /// This instance's own instance address of family `fam` (0 = v4, 1 = v6).
    fn instance_ip(&self, fam: usize) -> Option<IpAddr> {
        self.sips
            .iter()
            .filter(|s| s.0 == SipKind::Instance)
            .find_map(|s| if fam == 0 { s.1 } else { s.2 })
    }

    /// Rank for Closest: local first, then same node address, then the rest.
    fn distance(&self, fam: usize, view: &LocalView) -> u8 {
        if self.local[fam].is_some() {
            0
        } else if Some(self.node_ip) == view.node_ip {
            1
        } else {
            2
        }
    }
}

/// A namespace address from a table: empty is absent; outside the namespace
/// ranges, or a local container's address in another job's table, is refused.
fn namespace_address(text: &str, job: &str, view: &LocalView) -> Option<IpAddr> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    let Ok(ip) = text.parse::<IpAddr>() else {
        tracing::warn!(
            job,
            address = text,
            "namespace address does not parse; ignored"
        );
        return None;
    };
    if !is_namespace_address(ip) {
        tracing::warn!(job, %ip, "namespace address outside the namespace ranges; ignored");
        return None;
    }
    if let Some(owner) = view.owners.get(&ip).filter(|o| o.as_str() != job) {
        tracing::warn!(job, %ip, owner = %owner, "table describes another job's local instance; ignored");
        return None;
    }
    Some(ip)
}

/// A service address from a table: empty is absent; outside the service
/// ranges is refused (it would capture traffic to that address).
fn service_address(text: &str, job: &str, ranges: &ServiceRanges) -> Option<IpAddr> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    match text.parse::<IpAddr>() {
        Ok(ip) if ranges.contains(ip) => Some(ip),
        _ => {
            tracing::warn!(
                job,
                address = text,
                "service address outside the service ranges; ignored"
            );
            None
        }
    }
}

/// Compute the entries for one table result.
pub fn plan(result: &TableResult, view: &LocalView) -> Plan {
    if result.instance_list.len() > MAX_INSTANCES_PER_TABLE {
        tracing::warn!(job = %result.app_name, count = result.instance_list.len(), "table lists too many instances; extra ones ignored");
    }
    let mut insts: Vec<Inst> = result
        .instance_list
        .iter()
        .take(MAX_INSTANCES_PER_TABLE)
        .filter_map(|t| Inst::parse(t, &result.app_name, view))
        .collect();
    insts.sort_by_key(|i| i.number);
    let mut plan = Plan::default();
    for inst in &insts {
        for fam in 0..2 {
            let Some(ns) = inst.ns[fam] else { continue };
            plan.instances.insert(
                ns,
                InstanceEntry {
                    instance_ip: inst.instance_ip(fam),
                    node_ip: inst.node_ip,
                    node_port: inst.node_port,
                    local: inst.local[fam],
                },
            );
        }
    }
    // Shared service addresses: every instance carrying the address is a backend.
    let mut shared: BTreeMap<IpAddr, (SipKind, Vec<(u8, IpAddr)>)> = BTreeMap::new();
    for inst in &insts {
        for &(kind, a4, a6) in &inst.sips {
            for (fam, addr) in [(0usize, a4), (1, a6)] {
                let (Some(addr), Some(ns)) = (addr, inst.ns[fam]) else {
                    continue;
                };
                if kind == SipKind::Instance {
                    plan.services
                        .insert(addr, (ServiceKind::Instance, vec![ns]));
                } else {
                    let e = shared.entry(addr).or_insert((kind, Vec::new()));
                    e.1.push((inst.distance(fam, view), ns));
                }
            }
        }
    }
    for (addr, (kind, mut backends)) in shared {
        let kind = match kind {
            SipKind::Closest => {
                // Stable: equal distance keeps instance-number order.
                backends.sort_by_key(|b| b.0);
                ServiceKind::Closest
            }
            _ => ServiceKind::RoundRobin,
        };
        backends.dedup_by_key(|b| b.1);
        backends.truncate(usize::from(netmanager_common::MAX_BACKENDS));
        plan.services
            .insert(addr, (kind, backends.into_iter().map(|b| b.1).collect()));
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> TableResult {
        serde_json::from_str(include_str!("../../tests/fixtures/tablequery-result.json")).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn view_node1_with_local() -> LocalView {
        let mut locals = HashMap::new();
        let port = LocalPort {
            ifindex: 7,
            mac: [2, 0, 0, 0, 0, 1],
        };
        locals.insert(ip("10.18.0.66"), port);
        locals.insert(ip("fc00::42"), port);
        LocalView {
            node_ip: Some("198.51.100.1".parse().unwrap()),
            node_port: 50103,
            locals,
            ..Default::default()
        }
    }

    #[test]
    fn hostile_tables_cannot_capture_addresses() {
        let mut r = fixture();
        // Outside the service ranges, outside the namespace ranges, a bogus
        // node address: each costs only its own entry.
        r.instance_list[0].service_ip[0].address = "192.168.1.1".into();
        r.instance_list[0].namespace_ip = "8.8.8.8".into();
        r.instance_list[1].host_ip = "127.0.0.1".into();
        let p = plan(&r, &LocalView::default());
        assert!(!p.services.contains_key(&ip("192.168.1.1")));
        assert!(!p.instances.contains_key(&ip("8.8.8.8")));
        assert!(
            p.instances.contains_key(&ip("fc00::82")),
            "the v6 address of instance 0 stays"
        );
        assert!(
            !p.instances.contains_key(&ip("10.18.0.66")),
            "instance 1 has a loopback host"
        );
        // Another job's table cannot describe a local container.
        let mut v = view_node1_with_local();
        v.owners.insert(ip("10.18.0.66"), "other.job.x.y".into());
        let p = plan(&fixture(), &v);
        assert!(!p.instances.contains_key(&ip("10.18.0.66")));
        // One message cannot insert without bound.
        let mut big = fixture();
        let template = big.instance_list[0].clone();
        big.instance_list = (0..10_000u32)
            .map(|n| {
                let mut i = template.clone();
                i.instance_number = n;
                i.namespace_ip = format!("10.19.{}.{}", n / 250, n % 250 + 2);
                i.namespace_ip_v6 = String::new();
                i.service_ip.truncate(1);
                i
            })
            .collect();
        let p = plan(&big, &LocalView::default());
        assert_eq!(p.instances.len(), MAX_INSTANCES_PER_TABLE);
        assert!(
            p.services
                .values()
                .all(|(_, b)| b.len() <= usize::from(netmanager_common::MAX_BACKENDS))
        );
    }

    #[test]
    fn fixture_plan() {
        let p = plan(&fixture(), &view_node1_with_local());
        assert_eq!(p.instances.len(), 4);
        let i0 = p.instances[&ip("10.18.0.130")];
        assert_eq!(i0.instance_ip, Some(ip("10.30.0.3")));
        assert_eq!(i0.node_ip, "198.51.100.2".parse::<IpAddr>().unwrap());
        assert!(i0.local.is_none());
        let i1v6 = p.instances[&ip("fc00::42")];
        assert_eq!(i1v6.instance_ip, Some(ip("fdff::4")));
        assert_eq!(i1v6.local.unwrap().ifindex, 7);
        // RR keeps instance order; Closest puts the local instance first.
        assert_eq!(
            p.services[&ip("10.30.55.56")],
            (
                ServiceKind::RoundRobin,
                vec![ip("10.18.0.130"), ip("10.18.0.66")]
            )
        );
        assert_eq!(
            p.services[&ip("10.30.55.57")],
            (
                ServiceKind::Closest,
                vec![ip("10.18.0.66"), ip("10.18.0.130")]
            )
        );
        assert_eq!(
            p.services[&ip("fdff:2000::55:57")].1,
            vec![ip("fc00::42"), ip("fc00::82")]
        );
        assert_eq!(
            p.services[&ip("10.30.0.4")],
            (ServiceKind::Instance, vec![ip("10.18.0.66")])
        );
        assert_eq!(
            p.services[&ip("fdff::3")],
            (ServiceKind::Instance, vec![ip("fc00::82")])
        );
        assert_eq!(p.services.len(), 8);
    }

    #[test]
    fn stale_instance_on_this_node_is_skipped() {
        let mut v = view_node1_with_local();
        v.locals.clear();
        let p = plan(&fixture(), &v);
        assert!(!p.instances.contains_key(&ip("10.18.0.66")));
        assert_eq!(p.services[&ip("10.30.55.56")].1, vec![ip("10.18.0.130")]);
        assert!(!p.services.contains_key(&ip("10.30.0.4")));
    }

    #[test]
    fn pending_instance_is_skipped_and_running_one_used() {
        let r: TableResult = serde_json::from_str(include_str!(
            "../../tests/fixtures/tablequery-result-pending-instance.json"
        ))
        .unwrap();
        let p = plan(&r, &LocalView::default());
        assert_eq!(
            p.instances.keys().copied().collect::<Vec<_>>(),
            vec![ip("10.18.0.131"), ip("fc00::203")]
        );
        assert_eq!(
            p.services[&ip("10.30.0.4")],
            (ServiceKind::RoundRobin, vec![ip("10.18.0.131")])
        );
        assert_eq!(
            p.services[&ip("fdff:2000::2")],
            (ServiceKind::RoundRobin, vec![ip("fc00::203")])
        );
        assert!(!p.services.contains_key(&ip("10.30.0.6")));
    }

    #[test]
    fn unknown_ip_type_is_an_instance_address() {
        let mut r = fixture();
        r.instance_list[0].service_ip[2].ip_type = "InstanceNumber".into();
        r.instance_list[1].service_ip[2].ip_type = "whatever".into();
        let p = plan(&r, &LocalView::default());
        assert_eq!(p.services[&ip("10.30.0.3")].0, ServiceKind::Instance);
        assert_eq!(
            p.instances[&ip("10.18.0.66")].instance_ip,
            Some(ip("10.30.0.4"))
        );
    }
}
