//! Payloads exchanged with the cluster service manager (contract 2.3).
//!
//! Incoming documents are parsed leniently: unknown keys are ignored, absent
//! keys take defaults, and numbers may arrive as strings (upstream clusters
//! send both). Addresses stay strings here; `services` parses them and skips
//! the ones that are not valid, so one bad entry does not discard a table.

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};

/// `tablequery/result`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct TableResult {
    #[serde(default)]
    pub app_name: String,
    #[serde(default, deserialize_with = "string_or_number")]
    pub query_key: String,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub instance_list: Vec<TableInstance>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct TableInstance {
    #[serde(default, deserialize_with = "u32_lenient")]
    pub instance_number: u32,
    #[serde(default)]
    pub namespace_ip: String,
    #[serde(default, deserialize_with = "null_as_empty_string")]
    pub namespace_ip_v6: String,
    #[serde(default)]
    pub host_ip: String,
    #[serde(default, deserialize_with = "u16_lenient")]
    pub host_port: u16,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub service_ip: Vec<ServiceIpEntry>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct ServiceIpEntry {
    #[serde(rename = "IpType", default)]
    pub ip_type: String,
    #[serde(rename = "Address", default, deserialize_with = "null_as_empty_string")]
    pub address: String,
    #[serde(
        rename = "Address_v6",
        default,
        deserialize_with = "null_as_empty_string"
    )]
    pub address_v6: String,
}

/// `subnetwork/result`.
#[derive(Debug, Clone, Deserialize)]
pub struct SubnetResult {
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub addressv6: String,
}

#[derive(Debug, Serialize)]
pub struct TableQueryRequest<'a> {
    pub sname: &'a str,
    pub sip: &'a str,
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

fn null_as_empty<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

fn null_as_empty_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

fn string_or_number<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => s,
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    })
}

fn u64_lenient<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| de::Error::custom(format!("{n} is not a non-negative integer"))),
        serde_json::Value::String(s) => s
            .trim()
            .parse::<u64>()
            .map_err(|_| de::Error::custom(format!("{s:?} is not a number"))),
        serde_json::Value::Null => Ok(0),
        other => Err(de::Error::custom(format!(
            "expected a number, found {other}"
        ))),
    }
}

fn u16_lenient<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    let v = u64_lenient(d)?;
    u16::try_from(v).map_err(|_| de::Error::custom(format!("{v} is not a port")))
}

fn u32_lenient<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let v = u64_lenient(d)?;
    u32::try_from(v).map_err(|_| de::Error::custom(format!("{v} is out of range")))
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
    fn null_instance_list() {
        let r: TableResult =
            serde_json::from_str(r#"{"app_name":"a","instance_list":null}"#).unwrap();
        assert!(r.instance_list.is_empty());
    }
}
