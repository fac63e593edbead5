//! iperf3 runs between containers: TCP one stream, TCP four streams, UDP at
//! a fixed offered rate, and small packets (64-byte UDP payloads over many
//! flows, as fast as the sender goes). Results come from iperf3's JSON
//! (receiver side).

use anyhow::{Context, Result};
use serde_json::{Value, json};

use testkit::NsPath;

/// UDP offered load: below what the kernel paths carry, above what a
/// userspace proxy usually does, so loss separates them.
pub const UDP_OFFERED_MBPS: u32 = 1000;
/// 1400-byte datagrams fit the 1450-byte container MTU unfragmented.
const UDP_LEN: u32 = 1400;
/// Small-packet scenario: UDP payload bytes and concurrent flows (iperf3
/// streams, each its own source port, so the overlay sees that many flows).
pub const SMALL_LEN: u32 = 64;
pub const SMALL_FLOWS: u32 = 16;

fn run(client_ns: &NsPath, args: &str) -> Result<Value> {
    let out = client_ns
        .sh(&format!("iperf3 -J {args}"))
        // iperf3 prints its JSON (with an "error" field) even when it fails.
        .or_else(|e| {
            let s = e.to_string();
            match s.find('{') {
                Some(i) => Ok(s[i..].to_string()),
                None => Err(e),
            }
        })?;
    let v: Value = serde_json::from_str(&out).context("parsing iperf3 JSON")?;
    if let Some(err) = v.get("error") {
        anyhow::bail!("iperf3 {args}: {err}");
    }
    Ok(v)
}

pub fn tcp(client_ns: &NsPath, target: &str, streams: u32, secs: u32) -> Result<Value> {
    let v = run(client_ns, &format!("-c {target} -t {secs} -P {streams}"))?;
    let end = &v["end"];
    Ok(json!({
        "gbps": end["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9,
        "retransmits": end["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
    }))
}

/// Received packets per second (thousands) and loss of 64-byte datagrams
/// sent unthrottled (`-b 0`) over SMALL_FLOWS flows.
pub fn small(client_ns: &NsPath, target: &str, secs: u32) -> Result<Value> {
    let v = run(
        client_ns,
        &format!("-c {target} -t {secs} -u -b 0 -l {SMALL_LEN} -P {SMALL_FLOWS}"),
    )?;
    let sum = &v["end"]["sum"];
    let packets = sum["packets"].as_f64().unwrap_or(0.0);
    let lost = sum["lost_packets"].as_f64().unwrap_or(0.0);
    let seconds = sum["seconds"].as_f64().unwrap_or(f64::NAN);
    Ok(json!({
        "rx_kpps": (packets - lost) / seconds / 1e3,
        "loss_pct": sum["lost_percent"].as_f64().unwrap_or(0.0),
    }))
}

pub fn udp(client_ns: &NsPath, target: &str, secs: u32) -> Result<Value> {
    let v = run(
        client_ns,
        &format!("-c {target} -t {secs} -u -b {UDP_OFFERED_MBPS}M -l {UDP_LEN}"),
    )?;
    let end = &v["end"];
    // Newer iperf3 reports the receiver in sum_received; 3.12 folds the
    // server's loss count into `sum`.
    let sum = end.get("sum_received").unwrap_or(&end["sum"]);
    let loss = end["sum"]["lost_percent"].as_f64().unwrap_or(0.0);
    let sent = end["sum"]["bits_per_second"].as_f64().unwrap_or(0.0);
    let received = if end.get("sum_received").is_some() {
        sum["bits_per_second"].as_f64().unwrap_or(0.0)
    } else {
        sent * (1.0 - loss / 100.0)
    };
    Ok(json!({
        "offered_mbps": UDP_OFFERED_MBPS,
        "sent_mbps": sent / 1e6,
        "received_mbps": received / 1e6,
        "loss_pct": loss,
    }))
}
