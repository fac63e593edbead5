//! From one table query result to the dataplane entries it means: which
//! namespace addresses live where, and which backends each service address
//! has (ordered nearest first for Closest).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use crate::cluster_link::{TableInstance, TableResult};
use crate::dataplane::{InstanceEntry, LocalPort, ServiceKind};

/// What `services` needs to know about this node.
#[derive(Debug, Clone, Default)]
pub struct LocalView {
    pub node_ip: Option<Ipv4Addr>,
    pub node_port: u16,
    /// Namespace address (v4 and v6) of each local container -> its port.
    pub locals: HashMap<IpAddr, LocalPort>,
}

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
    node_ip: Ipv4Addr,
    node_port: u16,
    local: [Option<LocalPort>; 2],
    /// (kind, v4 address, v6 address)
    sips: Vec<(SipKind, Option<IpAddr>, Option<IpAddr>)>,
}

impl Inst {
    fn parse(t: &TableInstance, job: &str, view: &LocalView) -> Option<Inst> {
        if t.host_ip.trim().is_empty() || t.host_port == 0 {
            // Scheduled but not running yet: the cluster sends null addresses.
            tracing::debug!(
                job,
                instance = t.instance_number,
                "instance not running yet, skipped"
            );
            return None;
        }
        let Ok(node_ip) = t.host_ip.trim().parse::<Ipv4Addr>() else {
            tracing::warn!(job, instance = t.instance_number, host_ip = %t.host_ip, "instance without a valid host_ip, skipped");
            return None;
        };
        let v4 = t
            .namespace_ip
            .trim()
            .parse::<Ipv4Addr>()
            .ok()
            .map(IpAddr::V4);
        let v6 = t
            .namespace_ip_v6
            .trim()
            .parse::<std::net::Ipv6Addr>()
            .ok()
            .map(IpAddr::V6);
        if v4.is_none() && v6.is_none() {
            tracing::warn!(
                job,
                instance = t.instance_number,
                "instance without a namespace address, skipped"
            );
            return None;
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
        let sips = t
            .service_ip
            .iter()
            .map(|s| {
                (
                    sip_kind(&s.ip_type),
                    s.address.trim().parse::<Ipv4Addr>().ok().map(IpAddr::V4),
                    s.address_v6
                        .trim()
                        .parse::<std::net::Ipv6Addr>()
                        .ok()
                        .map(IpAddr::V6),
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

/// Compute the entries for one table result.
pub fn plan(result: &TableResult, view: &LocalView) -> Plan {
    let mut insts: Vec<Inst> = result
        .instance_list
        .iter()
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
        }
    }

    #[test]
    fn fixture_plan() {
        let p = plan(&fixture(), &view_node1_with_local());
        assert_eq!(p.instances.len(), 4);
        let i0 = p.instances[&ip("10.18.0.130")];
        assert_eq!(i0.instance_ip, Some(ip("10.30.0.3")));
        assert_eq!(i0.node_ip, "198.51.100.2".parse::<Ipv4Addr>().unwrap());
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
