//! Footprint and scale of the overlay with NetManager's own table sizes
//! (the static runner takes them from a netcfg.json through the daemon's
//! configuration code):
//!
//! - kernel memory of the maps (`bytes_memlock`) with the default sizes and
//!   with `"TableProfile": "edge"`, and what 10,000 flows of table room
//!   cost (the flow maps at two sizes);
//! - start and restart with 1M flows in the pinned maps, per attach mode
//!   (tcx, netlink): a fresh start, 1M flows created through the container
//!   program, then the runner on node 1 is stopped and started again on
//!   the same pins while a TCP connection through the overlay exchanges a
//!   round trip every 5 ms. The connection must survive (no error, every
//!   answer within 10 s) and the flows must still be there.

use std::io::Read as _;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use testkit::NsPath;

use super::topology::Topology;
use super::traffic::overlay_table;
use super::{footprint, latency, progress};

/// Flows created before the restart.
pub const FLOWS: u32 = 1_000_000;
/// The flow table for them: LRU-free hash maps refuse new flows when full,
/// so some room above FLOWS.
const FLOW_TABLE: u32 = FLOWS + FLOWS / 8;
pub const ATTACH_MODES: [&str; 2] = ["tcx", "netlink"];

pub fn run(bins: &Path, started: Instant) -> Result<Value> {
    let mut t = Topology::build()?;
    let runner = bins
        .join("oak-static-dataplane")
        .to_string_lossy()
        .into_owned();
    let pingpong = bins
        .join("oak-bench-pingpong")
        .to_string_lossy()
        .into_owned();
    let n1 = NsPath::clone(&t.n1.ns);
    let c2 = NsPath::clone(&t.c2.ns);
    t.spawn(
        &c2,
        &pingpong,
        &["server", &latency::PORT.to_string()],
        true,
    )?;

    let mut memory = json!({});
    for (profile, netcfg) in [
        ("default", json!({})),
        ("edge", json!({"TableProfile": "edge"})),
        (
            "flows_1m",
            json!({"FlowTableSize": FLOW_TABLE, "FlowsPerContainer": FLOW_TABLE}),
        ),
    ] {
        progress(started, &format!("footprint: map memory, {profile} sizes"));
        let pin = t.pin_dir(&format!("m{profile}"));
        // No uplink and no containers: the maps only.
        let table = json!({
            "pin_dir": pin, "uplink": "", "node_ip": "198.51.100.1",
            "service_ranges": [["10.30.0.0", 16]], "instances": [], "services": [],
            "netcfg": netcfg,
        });
        let file = t.file(&format!("memory-{profile}.json"), &table.to_string())?;
        let pid = t.spawn(&n1, &runner, &[&file], true)?;
        memory[profile] = footprint::maps(&pin, &netmanager_common::MAP_NAMES)?;
        memory[profile]["netcfg"] = netcfg;
        t.stop(pid);
        t.unpin(&pin);
    }
    let per_10k = per_10k_flows(&memory["default"], &memory["flows_1m"]);

    let mut restarts = json!({});
    for mode in ATTACH_MODES {
        restarts[mode] = restart(&mut t, &runner, &pingpong, mode, started)
            .with_context(|| format!("restart with {FLOWS} flows, attach mode {mode}"))?;
    }
    Ok(json!({
        "map_memory": memory,
        "flow_table_kib_per_10k_flows": per_10k,
        "restart": restarts,
    }))
}

/// Bytes of FLOWS + REVERSE_FLOWS per 10,000 entries of FlowTableSize,
/// from two sizes (the difference cancels the fixed part of each map).
pub fn per_10k_flows(small: &Value, large: &Value) -> Value {
    let flow_maps = |m: &Value| -> Option<(f64, f64)> {
        let maps = m["maps"].as_array()?;
        let mut bytes = 0.0;
        let mut entries = None;
        for x in maps {
            let name = x["map"].as_str()?;
            if name == netmanager_common::maps::FLOWS
                || name == netmanager_common::maps::REVERSE_FLOWS
            {
                bytes += x["bytes_memlock"].as_f64()?;
                entries = x["max_entries"].as_f64();
            }
        }
        Some((bytes, entries?))
    };
    match (flow_maps(small), flow_maps(large)) {
        (Some((b1, e1)), Some((b2, e2))) if e2 > e1 => json!((b2 - b1) / (e2 - e1) * 1e4 / 1024.0),
        _ => Value::Null,
    }
}

fn restart(
    t: &mut Topology,
    runner: &str,
    pingpong: &str,
    mode: &str,
    started: Instant,
) -> Result<Value> {
    let (n1, n2) = (NsPath::clone(&t.n1.ns), NsPath::clone(&t.n2.ns));
    let pin1 = t.pin_dir(&format!("r1{mode}"));
    let pin2 = t.pin_dir(&format!("r2{mode}"));
    let report = |t: &mut Topology, name: &str| t.file(name, "");
    let first_report = report(t, &format!("start-{mode}.json"))?;
    let again_report = report(t, &format!("restart-{mode}.json"))?;
    let mut table1 = overlay_table(t, 1, &pin1.to_string_lossy());
    table1["attach_mode"] = json!(mode);
    table1["netcfg"] = json!({"FlowTableSize": FLOW_TABLE, "FlowsPerContainer": FLOW_TABLE});
    let mut table2 = overlay_table(t, 2, &pin2.to_string_lossy());
    table2["attach_mode"] = json!(mode);
    let mut first = table1.clone();
    first["prefill_flows"] = json!(FLOWS);
    first["prefill_service"] = json!("10.30.55.56");
    first["report"] = json!(first_report);
    table1["report"] = json!(again_report);
    let f_first = t.file(&format!("restart-n1-first-{mode}.json"), &first.to_string())?;
    let f_again = t.file(
        &format!("restart-n1-again-{mode}.json"),
        &table1.to_string(),
    )?;
    let f2 = t.file(&format!("restart-n2-{mode}.json"), &table2.to_string())?;

    progress(
        started,
        &format!(
            "footprint: {mode}: fresh start, then {FLOWS} flows through the container program"
        ),
    );
    let t0 = Instant::now();
    let pid1 = t.spawn(&n1, runner, &[&f_first], true)?;
    let first_total_s = t0.elapsed().as_secs_f64();
    t.spawn(&n2, runner, &[&f2], true)?;
    let before = read_json(&first_report)?;

    progress(
        started,
        &format!("footprint: {mode}: restart on node 1 under an established connection"),
    );
    let mut hold = hold_client(t, pingpong)?;
    std::thread::sleep(Duration::from_secs(1));
    t.stop(pid1);
    let t1 = Instant::now();
    let pid1 = t.spawn(&n1, runner, &[&f_again], true)?;
    let restart_total_s = t1.elapsed().as_secs_f64();
    // Keep the connection going a while on the restarted dataplane.
    std::thread::sleep(Duration::from_secs(1));
    let held = finish_hold(&mut hold)?;
    let after = read_json(&again_report)?;
    t.stop(pid1);
    // Node 2's runner goes with its pins (`unpin`) and the testbed.
    t.unpin(&pin1);
    t.unpin(&pin2);

    let flows_kept =
        after["flows"].as_u64() >= before["flows"].as_u64().map(|f| f.min(FLOWS as u64));
    let survived = held["error"].is_null() && held["round_trips"].as_u64().unwrap_or(0) > 0;
    Ok(json!({
        "fresh_start": before,
        "fresh_start_with_prefill_s": first_total_s,
        "restart": after,
        "restart_until_ready_s": restart_total_s,
        "established_connection": held,
        "established_survived": survived,
        "flows_kept": flows_kept,
    }))
}

fn read_json(path: &str) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {path}"))
}

/// c1 holding a connection to the remote service through the overlay.
fn hold_client(t: &Topology, pingpong: &str) -> Result<Child> {
    let mut cmd = t.c1.ns.command(pingpong)?;
    cmd.args(["hold", "10.30.55.56", &latency::PORT.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    cmd.spawn().context("starting the ping-pong hold client")
}

fn finish_hold(child: &mut Child) -> Result<Value> {
    drop(child.stdin.take());
    let status = child.wait().context("waiting for the hold client")?;
    let mut out = String::new();
    if let Some(mut o) = child.stdout.take() {
        o.read_to_string(&mut out)?;
    }
    if !status.success() {
        bail!("the hold client failed ({status}): {out}");
    }
    serde_json::from_str(out.trim()).context("parsing the hold client's result")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn maps(flows_bytes: u64, entries: u64) -> Value {
        json!({"maps": [
            {"map": "FLOWS", "max_entries": entries, "bytes_memlock": flows_bytes},
            {"map": "REVERSE_FLOWS", "max_entries": entries, "bytes_memlock": flows_bytes},
            {"map": "SERVICES", "max_entries": 4096, "bytes_memlock": 999_999},
        ]})
    }

    #[test]
    fn per_10k_flows_is_the_slope_of_both_flow_maps() {
        // 2 maps x 100 bytes per entry more -> 2 MB per 10k entries.
        let v = per_10k_flows(&maps(1_000_000, 10_000), &maps(2_000_000, 20_000));
        assert_eq!(v, json!(2_000_000.0 / 1024.0));
        assert_eq!(
            per_10k_flows(&maps(1, 10), &maps(1, 10)),
            Value::Null,
            "one size is no slope"
        );
    }
}
