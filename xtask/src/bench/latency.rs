//! Request/response latency with the bench-only `oak-bench-pingpong`
//! client: one TCP connection, 64-byte messages, 10k round trips.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

use testkit::NsPath;

pub const PORT: u16 = 7000;
pub const ROUND_TRIPS: u32 = 10_000;

pub fn round_trips(bins: &Path, client_ns: &NsPath, target: &str) -> Result<Value> {
    let out = client_ns.sh(&format!(
        "{} rr {target} {PORT} {ROUND_TRIPS} 64",
        bins.join("oak-bench-pingpong").display()
    ))?;
    serde_json::from_str(out.trim()).context("parsing the ping-pong result")
}

/// connect() times to each address in `targets` in turn.
pub fn connects(
    bins: &Path,
    client_ns: &NsPath,
    targets: &[String],
    count: usize,
) -> Result<Value> {
    let out = client_ns.sh(&format!(
        "{} connect {} {PORT} {count}",
        bins.join("oak-bench-pingpong").display(),
        targets.join(",")
    ))?;
    serde_json::from_str(out.trim()).context("parsing the connect result")
}
