//! Parser fuzzing of everything a peer hands NetManager (issue 12, "the
//! adversarial suite"): MQTT payloads from the cluster service manager
//! (table query results, subnet results), the bodies of the unix-socket
//! API, and `netcfg.json`. Property: every input parses or returns an
//! error -- never a panic -- and what parses stays inside what the dataplane
//! may be given (addresses in their ranges, bounded entries, a local
//! container's address never described by another job). The process stays
//! under the memory cap (fuzz_support).
//!
//! CI runs a fixed-seed share; `OAK_FUZZ_CASES` runs more.

mod fuzz_support;

use std::net::{IpAddr, Ipv4Addr};

use fuzz_support::{fail, fuzz, payloads};
use netmanager::addresses::{Subnet, is_namespace_address, is_node_address, is_service_address};
use netmanager::cluster_link::TableResult;
use netmanager::cluster_link::messages::SubnetResult;
use netmanager::config::NetConfig;
use netmanager::dataplane::LocalPort;
use netmanager::forwarding::InMemory;
use netmanager::routes::plan::{MAX_INSTANCES_PER_TABLE, plan};
use netmanager::routes::{Limits, LocalView, ServiceTables};
use proptest::test_runner::TestCaseError;
use worker_common::netmanager_api::{DeployRequest, RegisterRequest, UndeployRequest};
use worker_common::task_id::{parse_task_id, task_id, validate_job_name};

const TABLE_RESULT: &str = include_str!("fixtures/tablequery-result.json");
const TABLE_RESULT_PENDING: &str = include_str!("fixtures/tablequery-result-pending-instance.json");
const NETCFG: &str = include_str!("fixtures/netcfg.json");
/// The job of this node's one local container (10.18.0.66 / fc00::42).
const LOCAL_JOB: &str = "clientsrvr.test.curl.test";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

/// Node 198.51.100.1:50103 with one local container of [`LOCAL_JOB`]; the
/// fixtures name its address in another job's table, which must be refused.
fn view() -> LocalView {
    let port = LocalPort {
        ifindex: 7,
        mac: [2, 0, 0, 0, 0, 1],
    };
    let local = [ip("10.18.0.66"), ip("fc00::42")];
    LocalView {
        node_ip: Some(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1))),
        node_port: 50103,
        locals: local.iter().map(|a| (*a, port)).collect(),
        owners: local.iter().map(|a| (*a, LOCAL_JOB.to_string())).collect(),
        service_ranges: netmanager::addresses::ServiceRanges::default(),
    }
}

fn ensure(ok: bool, what: impl std::fmt::Display, input: &[u8]) -> Result<(), TestCaseError> {
    if ok { Ok(()) } else { Err(fail(what, input)) }
}

/// `nodes/<id>/net/tablequery/result`, through the planner and the route
/// tables into an in-memory dataplane with small limits.
#[test]
fn table_query_results() {
    let limits = Limits {
        instances: 64,
        services: 64,
        backends: 128,
    };
    fuzz(
        "tablequery/result",
        payloads(vec![TABLE_RESULT, TABLE_RESULT_PENDING], &[]),
        |input| {
            let Ok(result) = serde_json::from_slice::<TableResult>(input) else {
                return Ok(());
            };
            let _ = validate_job_name(&result.app_name);
            let view = view();
            let p = plan(&result, &view);
            ensure(
                p.instances.len() <= 2 * MAX_INSTANCES_PER_TABLE,
                format!("{} instance entries from one table", p.instances.len()),
                input,
            )?;
            for (ns, e) in &p.instances {
                ensure(
                    is_namespace_address(*ns) && is_node_address(e.node_ip) && e.node_port != 0,
                    format!("instance entry {ns} -> {e:?}"),
                    input,
                )?;
                if let Some(owner) = view.owners.get(ns) {
                    ensure(
                        *owner == result.app_name,
                        format!("{} describes {owner}'s local {ns}", result.app_name),
                        input,
                    )?;
                }
            }
            for (sip, (_, backends)) in &p.services {
                ensure(
                    is_service_address(*sip)
                        && backends.len() <= usize::from(netmanager_common::MAX_BACKENDS)
                        && backends.iter().all(|b| p.instances.contains_key(b)),
                    format!("service entry {sip} -> {backends:?}"),
                    input,
                )?;
            }
            let fwd = InMemory::default();
            let mut tables = ServiceTables::with_limits(limits);
            let _ = tables.apply(&fwd, &result, &view);
            let written = fwd.snapshot();
            let backends: usize = written.services.values().map(|(_, b)| b.len()).sum();
            ensure(
                written.instances.len() <= limits.instances
                    && written.services.len() <= limits.services
                    && backends <= limits.backends,
                format!(
                    "wrote {} instances, {} services, {backends} backends over {limits:?}",
                    written.instances.len(),
                    written.services.len()
                ),
                input,
            )
        },
    );
}

/// `nodes/<id>/net/subnetwork/result`: only subnets in the namespace ranges.
#[test]
fn subnet_results() {
    fuzz(
        "subnetwork/result",
        payloads(
            vec![r#"{"address":"10.18.0.64","addressv6":"fc00::40"}"#],
            &[],
        ),
        |input| {
            let Ok(r) = serde_json::from_slice::<SubnetResult>(input) else {
                return Ok(());
            };
            match Subnet::parse(&r.address, &r.addressv6) {
                Ok(s) => ensure(
                    is_namespace_address(IpAddr::V4(s.v4))
                        && is_namespace_address(IpAddr::V6(s.v6)),
                    format!("subnet {} / {} accepted", s.v4, s.v6),
                    input,
                ),
                Err(_) => Ok(()),
            }
        },
    );
}

/// The unix-socket API's bodies, read as the router reads them and then
/// validated as the deployer does before touching anything.
#[test]
fn api_bodies() {
    let deploy = r#"{"pid":4242,"serviceName":"clientsrvr.test.curl.test","instanceNumber":0,"portMappings":"8080:80/tcp;9000:90/udp"}"#;
    let register = r#"{"client_id":"6650aa00bb22cc33dd440002","cluster_address":"127.0.0.1"}"#;
    let undeploy = r#"{"serviceName":"clientsrvr.test.curl.test","instanceNumber":3}"#;
    fuzz(
        "socket API bodies",
        payloads(vec![deploy, register, undeploy], &[]),
        |input| {
            if let Ok(r) = serde_json::from_slice::<DeployRequest>(input) {
                let _ = netmanager::plumbing::nft::parse_port_mappings(&r.port_mappings);
                check_name(&r.service_name, r.instance_number, input)?;
            }
            if let Ok(r) = serde_json::from_slice::<UndeployRequest>(input) {
                check_name(&r.service_name, r.instance_number, input)?;
            }
            let _ = serde_json::from_slice::<RegisterRequest>(input);
            Ok(())
        },
    );
}

/// A valid service name makes a task id that reads back as itself (names
/// become interface, namespace and file names and MQTT topic levels).
fn check_name(name: &str, instance: u32, input: &[u8]) -> Result<(), TestCaseError> {
    if netmanager::deployer::validate_service_name(name).is_err() {
        return Ok(());
    }
    ensure(
        !name.contains(['+', '#', '/', '\0']),
        format!("service name {name:?} accepted"),
        input,
    )?;
    let id = task_id(name, instance);
    ensure(
        parse_task_id(&id) == Some((name.to_string(), instance)),
        format!("task id {id:?} does not read back"),
        input,
    )
}

/// `/etc/netmanager/netcfg.json`.
#[test]
fn netcfg_json() {
    let full = r#"{"NodePublicAddress":"198.51.100.1","NodePublicPort":50103,"ClusterUrl":"cluster.example","ClusterMqttPort":"10003","DefaultInterface":"eth0","Debug":true,"PublicIPNetworking":false,"MqttCert":"/etc/c.pem","MqttKey":"/etc/k.pem","MqttTls":true,"MqttCa":"/etc/ca.pem","MqttUsername":"node","MqttPasswordFile":"/etc/pw","FlowTableSize":65536,"ServiceTableSize":"4096","BackendTableSize":4096,"InstanceTableSize":8192,"PendingTableSize":1024,"MissHold":8}"#;
    fuzz("netcfg.json", payloads(vec![NETCFG, full], &[]), |input| {
        let _ = NetConfig::parse(&String::from_utf8_lossy(input));
        Ok(())
    });
}

/// The hostile documents are refused where they must be: the checks above
/// would pass on a parser that refuses everything, so the fixtures must
/// still parse and the oversized table must still be cut to the bound.
#[test]
fn fixtures_parse_and_oversized_tables_are_cut() {
    let r: TableResult = serde_json::from_str(TABLE_RESULT).expect("fixture parses");
    let p = plan(&r, &view());
    // Instance 0 (v4 and v6) on the other node; instance 1 is the local
    // container's address in another job's table: refused.
    assert_eq!(p.instances.len(), 2, "{:?}", p.instances);
    assert!(NetConfig::parse(NETCFG).is_ok());
    let mut big: serde_json::Value = serde_json::from_str(TABLE_RESULT).expect("fixture parses");
    let entry = big["instance_list"][0].clone();
    big["instance_list"] = (0..5000u32)
        .map(|n| {
            let mut e = entry.clone();
            e["instance_number"] = n.into();
            e["namespace_ip"] = format!("10.19.{}.{}", n / 256, n % 256).into();
            e["namespace_ip_v6"] = serde_json::Value::Null;
            e
        })
        .collect();
    let big: TableResult = serde_json::from_value(big).expect("grown fixture parses");
    assert_eq!(plan(&big, &view()).instances.len(), MAX_INSTANCES_PER_TABLE);
}
