//! First-packet latency: TCP connect() to service addresses the dataplane
//! has never seen, against connect() to a known one. The misses are answered
//! by oak-static-dataplane's `deferred_services` loop (map write, reinject
//! of the held SYN), i.e. the dataplane half of the miss path with no
//! cluster round trip; see docs/performance.md.

use std::path::Path;

use anyhow::Result;
use serde_json::{Value, json};

use testkit::NsPath;

use super::latency;

/// Never-seen service addresses: one connect each.
pub const FRESH: u32 = 50;

pub fn deferred_addresses() -> Vec<String> {
    (1..=FRESH).map(|i| format!("10.30.60.{i}")).collect()
}

pub fn first_packet(bins: &Path, client_ns: &NsPath, known: &str) -> Result<Value> {
    let fresh = latency::connects(bins, client_ns, &deferred_addresses(), FRESH as usize)?;
    let known = latency::connects(bins, client_ns, &[known.to_string()], 200)?;
    Ok(json!({"never_seen_service": fresh, "known_service": known}))
}
