//! Payloads exchanged with the cluster service manager (docs/contract.md §2.3).
//!
//! Incoming documents are parsed leniently, the way upstream's Go structs
//! read them: unknown keys are ignored, absent keys and `null` take the empty
//! value, and numbers may arrive as strings (upstream clusters send both).
//! The real cluster lists instances that are scheduled but not running yet
//! with `null` addresses (docs/contract.md §3), so a list entry that cannot be read
//! costs only that entry, never the whole message. Addresses stay strings
//! here; `services` parses them and skips the ones that are not valid.

use serde::{Deserialize, Serialize};
use worker_common::lenient;

/// `tablequery/result`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct TableResult {
    #[serde(default, deserialize_with = "lenient::string")]
    pub app_name: String,
    #[serde(default, deserialize_with = "lenient::string")]
    pub query_key: String,
    #[serde(default, deserialize_with = "lenient::list")]
    pub instance_list: Vec<TableInstance>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct TableInstance {
    #[serde(default, deserialize_with = "lenient::u32")]
    pub instance_number: u32,
    #[serde(default, deserialize_with = "lenient::string")]
    pub namespace_ip: String,
    #[serde(default, deserialize_with = "lenient::string")]
    pub namespace_ip_v6: String,
    #[serde(default, deserialize_with = "lenient::string")]
    pub host_ip: String,
    /// 0 when absent or `null` (an instance that is not running yet).
    #[serde(default, deserialize_with = "lenient::u16")]
    pub host_port: u16,
    #[serde(default, deserialize_with = "lenient::list")]
    pub service_ip: Vec<ServiceIpEntry>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct ServiceIpEntry {
    #[serde(rename = "IpType", default, deserialize_with = "lenient::string")]
    pub ip_type: String,
    #[serde(rename = "Address", default, deserialize_with = "lenient::string")]
    pub address: String,
    #[serde(rename = "Address_v6", default, deserialize_with = "lenient::string")]
    pub address_v6: String,
}

/// `subnetwork/result`.
#[derive(Debug, Clone, Deserialize)]
pub struct SubnetResult {
    #[serde(default, deserialize_with = "lenient::string")]
    pub address: String,
    #[serde(default, deserialize_with = "lenient::string")]
    pub addressv6: String,
}

#[derive(Debug, Serialize)]
pub struct TableQueryRequest {
    pub sname: String,
    pub sip: String,
}

#[derive(Debug, Serialize)]
pub struct Deployed<'a> {
    pub appname: &'a str,
    pub status: &'a str,
    pub instance_number: u32,
    pub nsip: String,
    pub nsipv6: String,
    pub host_ip: String,
    pub host_port: String,
}

#[derive(Debug, Serialize)]
pub struct Undeployed<'a> {
    pub appname: &'a str,
    pub instance_number: u32,
}

#[derive(Debug, Serialize)]
pub struct AddressChanged<'a> {
    pub appname: &'a str,
    pub instance_number: u32,
    pub host_ip: String,
    pub host_port: String,
}

#[derive(Debug, Serialize)]
pub struct InterestRemove<'a> {
    pub appname: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_number_or_string() {
        let r: TableResult = serde_json::from_str(
            r#"{"app_name":"a.b.c.d","query_key":"x","instance_list":[
                {"instance_number":0,"namespace_ip":"10.18.0.2","host_ip":"1.2.3.4","host_port":50103,"service_ip":[]},
                {"instance_number":"1","namespace_ip":"10.18.0.3","host_ip":"1.2.3.4","host_port":"50104","service_ip":null,"extra":1}
            ]}"#,
        )
        .unwrap();
        assert_eq!(r.instance_list[0].host_port, 50103);
        assert_eq!(r.instance_list[1].host_port, 50104);
        assert_eq!(r.instance_list[1].instance_number, 1);
        assert!(r.instance_list[1].service_ip.is_empty());
    }

    #[test]
    fn pending_instance_with_null_fields_is_kept_empty() {
        let r: TableResult = serde_json::from_str(include_str!(
            "../../tests/fixtures/tablequery-result-pending-instance.json"
        ))
        .unwrap();
        assert_eq!(r.instance_list.len(), 2);
        assert_eq!(r.instance_list[0].host_ip, "198.51.100.2");
        let pending = &r.instance_list[1];
        assert_eq!(pending.instance_number, 1);
        assert_eq!(pending.namespace_ip, "");
        assert_eq!(pending.namespace_ip_v6, "");
        assert_eq!(pending.host_ip, "");
        assert_eq!(pending.host_port, 0);
        assert_eq!(pending.service_ip.len(), 2);
    }

    #[test]
    fn a_bad_entry_costs_only_that_entry() {
        let r: TableResult = serde_json::from_str(
            r#"{"app_name":null,"query_key":null,"instance_list":[
                {"instance_number":0,"namespace_ip":"10.18.0.2","host_ip":"1.2.3.4","host_port":50103,
                 "service_ip":[{"IpType":"RR","Address":"10.30.0.9"},{"IpType":["x"]},7,null]},
                {"instance_number":"one","namespace_ip":"10.18.0.3"},
                {"instance_number":2,"host_port":70000},
                "garbage",
                null,
                {"instance_number":3,"namespace_ip":{"a":1}},
                {"instance_number":4,"namespace_ip":"10.18.0.5","host_ip":"1.2.3.4","host_port":"50103"}
            ]}"#,
        )
        .unwrap();
        assert_eq!(r.app_name, "");
        let numbers: Vec<u32> = r.instance_list.iter().map(|i| i.instance_number).collect();
        assert_eq!(numbers, vec![0, 4]);
        assert_eq!(r.instance_list[0].service_ip.len(), 1);
        assert_eq!(r.instance_list[1].host_port, 50103);
    }

    #[test]
    fn subnet_result_with_nulls() {
        let r: SubnetResult =
            serde_json::from_str(r#"{"address":"10.18.0.64","addressv6":null}"#).unwrap();
        assert_eq!(r.address, "10.18.0.64");
        assert_eq!(r.addressv6, "");
    }

    #[test]
    fn null_instance_list() {
        let r: TableResult =
            serde_json::from_str(r#"{"app_name":"a","instance_list":null}"#).unwrap();
        assert!(r.instance_list.is_empty());
    }
}
