//! Per-packet program cost through BPF_PROG_TEST_RUN. The measuring code is
//! the bench-only `oak-bench-progcost` binary (tests crate): it needs the
//! netmanager library, which xtask cannot link (see mod.rs). Here we run it
//! and keep its JSON.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Flow-table and service-table fill for the "filled" measurements.
pub const FLOWS: u32 = 1_000_000;
pub const SERVICES: u32 = 100_000;

pub fn run(bins: &Path, prefix: &str) -> Result<Value> {
    // Its own pin directory (the binary removes it, also on failure).
    let pin = format!("/sys/fs/bpf/{prefix}-progcost");
    let out = Command::new(bins.join("oak-bench-progcost"))
        .args([&pin, &FLOWS.to_string(), &SERVICES.to_string()])
        .stderr(Stdio::inherit()) // its progress lines
        .output()
        .context("running oak-bench-progcost")?;
    if !out.status.success() {
        bail!("oak-bench-progcost failed ({})", out.status);
    }
    serde_json::from_slice(&out.stdout).context("parsing oak-bench-progcost output")
}
