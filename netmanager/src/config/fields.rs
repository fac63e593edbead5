//! Readers for netcfg.json and tuncfg.json fields as upstream writes them:
//! strings where numbers are meant, upstream's "unset" spellings, and lists
//! given either as JSON arrays or comma-separated strings. Each one errors
//! with what it expected, and `serde_path_to_error` adds the field's name.

use std::net::IpAddr;

use serde::Deserialize;
use serde::de::{self, Deserializer};
use serde_json::Value;

/// A trimmed string; absent, `null` and empty are unset.
pub(super) fn text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        Value::String(s) if s.trim().is_empty() => Ok(None),
        Value::String(s) => Ok(Some(s.trim().to_string())),
        other => Err(de::Error::custom(format!(
            "expected a string, found {other}"
        ))),
    }
}

/// An http(s) URL.
pub(super) fn url<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    match text(d)? {
        None => Ok(None),
        Some(u) => check_url(&u).map(|()| Some(u)).map_err(de::Error::custom),
    }
}

/// A URL the HTTP client can ask: http or https with a host.
pub fn check_url(u: &str) -> Result<(), String> {
    let rest = u
        .strip_prefix("http://")
        .or_else(|| u.strip_prefix("https://"))
        .ok_or_else(|| format!("{u:?} is not an http:// or https:// URL"))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(format!("{u:?} has no host"));
    }
    Ok(())
}

/// Like [`text`], with upstream's "0.0.0.0" meaning unset too.
pub(super) fn unset_or_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(text(d)?.filter(|s| s != "0.0.0.0"))
}

/// An address; "0.0.0.0" (upstream's unset) and "::" are unset too.
pub(super) fn unset_or_ip<'de, D: Deserializer<'de>>(d: D) -> Result<Option<IpAddr>, D::Error> {
    match unset_or_text(d)? {
        None => Ok(None),
        Some(s) => match s.parse::<IpAddr>() {
            Ok(ip) if ip.is_unspecified() => Ok(None),
            Ok(ip) => Ok(Some(ip)),
            Err(_) => Err(de::Error::custom(format!("{s:?} is not an IP address"))),
        },
    }
}

/// Ports are strings upstream ("50103"); a bare number is accepted too.
pub(super) fn port<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    let text = match Value::deserialize(d)? {
        Value::Null => return Ok(None),
        Value::String(s) if s.trim().is_empty() => return Ok(None),
        Value::String(s) => s.trim().to_string(),
        Value::Number(n) => n.to_string(),
        other => {
            return Err(de::Error::custom(format!(
                "expected a port number as a string, found {other}"
            )));
        }
    };
    match text.parse::<u16>() {
        Ok(p) if p != 0 => Ok(Some(p)),
        _ => Err(de::Error::custom(format!(
            "{text:?} is not a port number (1-65535)"
        ))),
    }
}

/// A boolean; hand-edited files sometimes quote it.
pub(super) fn flag<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        Value::Bool(b) => Ok(Some(b)),
        Value::String(s) if s.eq_ignore_ascii_case("true") => Ok(Some(true)),
        Value::String(s) if s.eq_ignore_ascii_case("false") => Ok(Some(false)),
        other => Err(de::Error::custom(format!(
            "expected true or false, found {other}"
        ))),
    }
}

/// A positive count (map size), as a number or a numeric string.
pub(super) fn count<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let text = match Value::deserialize(d)? {
        Value::Null => return Ok(None),
        Value::String(s) => s.trim().to_string(),
        Value::Number(n) => n.to_string(),
        other => {
            return Err(de::Error::custom(format!(
                "expected a number, found {other}"
            )));
        }
    };
    match text.parse::<u32>() {
        Ok(n) if n > 0 => Ok(Some(n)),
        _ => Err(de::Error::custom(format!(
            "{text:?} is not a positive number"
        ))),
    }
}

/// Address prefixes, as a JSON list of strings or one comma-separated
/// string: "198.51.100.7", "198.51.100.0/24", "2001:db8::/32".
pub(super) fn prefixes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(IpAddr, u8)>, D::Error> {
    let items: Vec<String> = match Value::deserialize(d)? {
        Value::Null => return Ok(Vec::new()),
        Value::String(s) => s.split(',').map(str::to_string).collect(),
        Value::Array(a) => a
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                other => Err(de::Error::custom(format!(
                    "expected an address or prefix as a string, found {other}"
                ))),
            })
            .collect::<Result<_, _>>()?,
        other => {
            return Err(de::Error::custom(format!(
                "expected a list of addresses or prefixes, found {other}"
            )));
        }
    };
    items
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| parse_prefix(s).map_err(de::Error::custom))
        .collect()
}

pub(super) fn parse_prefix(s: &str) -> Result<(IpAddr, u8), String> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let ip: IpAddr = addr
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not an address or prefix"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(l) => match l.trim().parse::<u8>() {
            Ok(n) if n <= max => n,
            _ => return Err(format!("{s:?}: prefix length must be 0-{max}")),
        },
    };
    Ok((ip, len))
}
