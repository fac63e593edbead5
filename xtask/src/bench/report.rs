//! The summary table on stdout, bench-results/latest.json and the SVG.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::{PATHS, svg};

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// Ratios of each inter-node path to the direct ceiling and to VXLAN, and of
/// same-node overlay traffic to the plain bridge.
fn ratios(paths: &Value) -> Value {
    let r = |a: &str, b: &str| {
        let (x, y) = (&paths[a], &paths[b]);
        if x.is_null() || y.is_null() {
            return Value::Null;
        }
        json!({
            "tcp1": f(&x["tcp1"]["gbps"]) / f(&y["tcp1"]["gbps"]),
            "tcp4": f(&x["tcp4"]["gbps"]) / f(&y["tcp4"]["gbps"]),
            "udp_received": f(&x["udp"]["received_mbps"]) / f(&y["udp"]["received_mbps"]),
            "latency_p50": f(&x["latency_us"]["p50_us"]) / f(&y["latency_us"]["p50_us"]),
            "latency_p99": f(&x["latency_us"]["p99_us"]) / f(&y["latency_us"]["p99_us"]),
        })
    };
    let mut out = json!({});
    for p in ["overlay", "tunproxy", "vxlan"] {
        out[format!("{p}_vs_direct")] = r(p, "direct");
    }
    for p in ["overlay", "tunproxy"] {
        out[format!("{p}_vs_vxlan")] = r(p, "vxlan");
    }
    out["overlay_local_vs_bridge"] = r("overlay_local", "bridge");
    out
}

pub fn finish(out_dir: &Path, root: &Path, results: &mut Value) -> Result<()> {
    results["ratios"] = ratios(&results["paths"]);
    let table = table(results);
    println!("{table}");
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let json_path = out_dir.join("latest.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(results)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    let svg_path = out_dir.join("throughput.svg");
    std::fs::write(&svg_path, svg::render(results))
        .with_context(|| format!("writing {}", svg_path.display()))?;
    let rel = |p: &Path| p.strip_prefix(root).unwrap_or(p).display().to_string();
    eprintln!("wrote {} and {}", rel(&json_path), rel(&svg_path));
    Ok(())
}

pub fn table(r: &Value) -> String {
    let mut s = String::new();
    let m = &r["machine"];
    let _ = writeln!(
        s,
        "\nMachine: {} ({} CPUs), kernel {}; iperf3 {} s per run, UDP {} Mbit/s offered, {} round trips",
        m["cpu"].as_str().unwrap_or("?"),
        m["cpus"],
        m["kernel"].as_str().unwrap_or("?"),
        r["iperf_seconds"],
        r["udp_offered_mbps"],
        r["latency_round_trips"],
    );
    let _ = writeln!(
        s,
        "\n{:<28} {:>9} {:>9} {:>10} {:>7} {:>8} {:>8} {:>10} {:>10}",
        "path",
        "TCP1 Gb/s",
        "TCP4 Gb/s",
        "UDP rx Mb/s",
        "loss %",
        "p50 us",
        "p99 us",
        "TCP1/dir",
        "TCP1/vxlan"
    );
    for p in PATHS.iter() {
        let v = &r["paths"][p.name];
        if v.is_null() {
            continue;
        }
        let ratio = |base: &str| {
            let b = f(&r["paths"][base]["tcp1"]["gbps"]);
            if p.same_node {
                let b = f(&r["paths"]["bridge"]["tcp1"]["gbps"]);
                return if base == "direct" {
                    format!("{:.2}*", f(&v["tcp1"]["gbps"]) / b)
                } else {
                    "-".into()
                };
            }
            format!("{:.2}", f(&v["tcp1"]["gbps"]) / b)
        };
        let _ = writeln!(
            s,
            "{:<28} {:>9.2} {:>9.2} {:>10.0} {:>7.2} {:>8.1} {:>8.1} {:>10} {:>10}",
            p.label,
            f(&v["tcp1"]["gbps"]),
            f(&v["tcp4"]["gbps"]),
            f(&v["udp"]["received_mbps"]),
            f(&v["udp"]["loss_pct"]),
            f(&v["latency_us"]["p50_us"]),
            f(&v["latency_us"]["p99_us"]),
            ratio("direct"),
            ratio("vxlan"),
        );
    }
    let _ = writeln!(s, "(* same-node rows: ratio to the same-node bridge path)");

    if let Some(paths) = r["prog_cost"]["paths"].as_array() {
        let _ = writeln!(
            s,
            "\nPer-packet program cost (BPF_PROG_TEST_RUN, kernel-timed ns/packet; filled = {} flows requested, {} services)",
            r["prog_cost"]["fill"]["flows_requested"], r["prog_cost"]["fill"]["services"]
        );
        let _ = writeln!(
            s,
            "{:<28} {:<7} {:>8} {:>8}",
            "path", "method", "empty", "filled"
        );
        for e in paths.iter().filter(|e| e["tables"] == "empty") {
            let filled = paths
                .iter()
                .find(|x| {
                    x["tables"] == "filled" && x["path"] == e["path"] && x["method"] == e["method"]
                })
                .map(|x| f(&x["ns_per_packet"]))
                .unwrap_or(f64::NAN);
            let _ = writeln!(
                s,
                "{:<28} {:<7} {:>8.0} {:>8.0}",
                e["path"].as_str().unwrap_or("?"),
                e["method"].as_str().unwrap_or("?"),
                f(&e["ns_per_packet"]),
                filled
            );
        }
    }
    let cp = &r["control_plane"];
    if !cp.is_null() {
        let _ = writeln!(s, "\nControl plane");
        let u = &cp["upsert_service_us"]["all"];
        if !u.is_null() {
            let _ = writeln!(
                s,
                "  upsert_service -> maps written: p50 {:.1} us, p99 {:.1} us over {} services",
                f(&u["p50"]),
                f(&u["p99"]),
                u["count"]
            );
        }
        let fp = &cp["first_packet_connect_us"];
        if !fp.is_null() {
            for (k, label) in [
                ("never_seen_service", "never-seen service"),
                ("known_service", "known service"),
            ] {
                let _ = writeln!(
                    s,
                    "  TCP connect, {label:<19}: p50 {:.0} us, p99 {:.0} us, max {:.0} us (n={})",
                    f(&fp[k]["p50_us"]),
                    f(&fp[k]["p99_us"]),
                    f(&fp[k]["max_us"]),
                    fp[k]["count"]
                );
            }
        }
    }
    daemons(&mut s, &r["daemons"]);
    let _ = writeln!(s, "\nFootprint (idle)");
    for d in r["footprint"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "  {:<34} RSS {:>6} KiB, CPU {:.2} %",
            d["daemon"].as_str().unwrap_or("?"),
            d["rss_kib"],
            f(&d["cpu_pct"])
        );
    }
    let mm = &r["map_memory_default_sizes"];
    if !mm.is_null() {
        let _ = write!(
            s,
            "  map memory at default sizes: {:.1} MiB (",
            f(&mm["total_bytes"]) / 1048576.0
        );
        let parts: Vec<String> = mm["maps"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| {
                format!(
                    "{} {:.1}",
                    m["map"].as_str().unwrap_or("?"),
                    f(&m["bytes_memlock"]) / 1048576.0
                )
            })
            .collect();
        let _ = writeln!(s, "{} MiB)", parts.join(", "));
    }
    s
}

/// The real-daemon section (sandbox workers; `bench/daemons.rs`).
fn daemons(s: &mut String, d: &Value) {
    super::daemons::table(s, d);
}
