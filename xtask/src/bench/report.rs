//! The summary on stdout, bench-results/latest.json and the SVG.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::rows::{self, FAMILIES};
use super::{goals, run_stats, svg};

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// Ratios of the medians of each inter-node path to the direct ceiling
/// and to VXLAN (and of same-node overlay traffic to the plain bridge),
/// per family; latency as microseconds added.
fn ratios(r: &Value) -> Value {
    let mut out = json!({});
    for family in FAMILIES {
        let mut pairs: Vec<(String, String)> = Vec::new();
        for hook in rows::HOOKS {
            let o = rows::key("overlay", family, Some(hook));
            pairs.push((o.clone(), rows::key("direct", family, None)));
            pairs.push((o, rows::key("vxlan", family, None)));
        }
        for p in ["tunproxy", "vxlan"] {
            pairs.push((
                rows::key(p, family, None),
                rows::key("direct", family, None),
            ));
        }
        pairs.push((
            rows::key("overlay_local", family, None),
            rows::key("bridge", family, None),
        ));
        for (a, b) in pairs {
            let m = |k: &str, fig: &str| rows::median(r, k, fig);
            let ratio = |fig: &str| match (m(&a, fig), m(&b, fig)) {
                (Some(x), Some(y)) => json!(x / y),
                _ => Value::Null,
            };
            let added = match (m(&a, "rr_p50_us"), m(&b, "rr_p50_us")) {
                (Some(x), Some(y)) => json!(x - y),
                _ => Value::Null,
            };
            let v = json!({
                "tcp1": ratio("tcp1_gbps"), "tcp4": ratio("tcp4_gbps"),
                "small_pps": ratio("small_rx_kpps"), "rr_p50_added_us": added,
            });
            if v.as_object()
                .is_some_and(|o| o.values().any(|x| !x.is_null()))
            {
                out[format!("{a} vs {b}")] = v;
            }
        }
    }
    out
}

/// Single-valued figures of the non-traffic sections, for `--compare`:
/// name -> {"value", "unit", "better"}.
pub fn scalars(r: &Value) -> Value {
    let mut out = json!({});
    let mut put = |name: String, v: &Value, unit: &str, better: &str| {
        if let Some(x) = v.as_f64() {
            out[name] = json!({"value": x, "unit": unit, "better": better});
        }
    };
    let sc = &r["scale"];
    for profile in ["default", "edge"] {
        put(
            format!("scale map_memory_{profile}_mib"),
            &json!(f(&sc["map_memory"][profile]["total_bytes"]) / 1048576.0),
            "MiB",
            "lower",
        );
    }
    put(
        "scale flow_table_kib_per_10k_flows".into(),
        &sc["flow_table_kib_per_10k_flows"],
        "KiB",
        "lower",
    );
    for (mode, v) in sc["restart"].as_object().into_iter().flatten() {
        put(
            format!("scale restart_{mode}_ready_s"),
            &v["restart"]["ready_s"],
            "s",
            "lower",
        );
        put(
            format!("scale restart_{mode}_longest_wait_ms"),
            &v["established_connection"]["max_wait_ms"],
            "ms",
            "lower",
        );
    }
    for p in r["prog_cost"]["paths"].as_array().into_iter().flatten() {
        put(
            format!(
                "prog_cost {} {} {}",
                p["path"].as_str().unwrap_or("?"),
                p["method"].as_str().unwrap_or("?"),
                p["tables"].as_str().unwrap_or("?")
            ),
            &p["ns_per_packet"],
            "ns",
            "lower",
        );
    }
    put(
        "control_plane upsert_service_p50_us".into(),
        &r["control_plane"]["upsert_service_us"]["all"]["p50"],
        "us",
        "lower",
    );
    put(
        "control_plane first_packet_never_seen_p50_us".into(),
        &r["control_plane"]["first_packet_connect_us"]["never_seen_service"]["p50_us"],
        "us",
        "lower",
    );
    out
}

pub fn finish(out_dir: &Path, root: &Path, results: &mut Value) -> Result<()> {
    results["ratios"] = ratios(results);
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

/// A figure's median, with [min-max] when there was more than one sample.
pub fn cell(s: &Value, decimals: usize) -> String {
    let Some(m) = s["median"].as_f64() else {
        return "-".into();
    };
    let n = s["samples"].as_array().map_or(1, Vec::len);
    if n > 1 {
        format!(
            "{m:.decimals$} [{:.decimals$}-{:.decimals$}]",
            f(&s["min"]),
            f(&s["max"])
        )
    } else {
        format!("{m:.decimals$}")
    }
}

/// One table over the rows that have any of its figures: `cols` are
/// (heading, figure, decimals).
pub fn traffic_table(r: &Value, cols: &[(&str, &str, usize)]) -> String {
    let mut s = String::new();
    let _ = write!(s, "{:<20}", "row");
    for (h, _, _) in cols {
        let _ = write!(s, " {h:>20}");
    }
    let _ = writeln!(s);
    for row in r["rows"].as_array().into_iter().flatten() {
        if cols
            .iter()
            .all(|(_, fig, _)| row["figures"][*fig].is_null())
        {
            continue;
        }
        let _ = write!(s, "{:<20}", row["key"].as_str().unwrap_or("?"));
        for (_, fig, d) in cols {
            let _ = write!(s, " {:>20}", cell(&row["figures"][*fig], *d));
        }
        let _ = writeln!(s);
    }
    s
}

fn ratio_lines(s: &mut String, r: &Value) {
    let x = |v: &Value| v.as_f64().map_or("-".to_string(), |v| format!("{v:.2}x"));
    for (pair, v) in r["ratios"].as_object().into_iter().flatten() {
        let added = v["rr_p50_added_us"]
            .as_f64()
            .map_or("-".to_string(), |v| format!("{v:+.1} us"));
        let _ = writeln!(
            s,
            "  {pair:<38} TCP1 {:>6}  TCP4 {:>6}  64B pps {:>6}  p50 {added}",
            x(&v["tcp1"]),
            x(&v["tcp4"]),
            x(&v["small_pps"]),
        );
    }
}

pub fn table(r: &Value) -> String {
    let mut s = String::new();
    let m = &r["machine"];
    let _ = writeln!(
        s,
        "\nMachine: {} ({} CPUs), kernel {}; {} pass(es), iperf3 {} s per run, UDP {} Mbit/s offered, \
         small packets {} bytes x {} flows unthrottled, {} round trips",
        m["cpu"].as_str().unwrap_or("?"),
        m["cpus"],
        m["kernel"].as_str().unwrap_or("?"),
        r["passes"],
        r["iperf_seconds"],
        r["udp_offered_mbps"],
        r["small_packets"]["payload_bytes"],
        r["small_packets"]["flows"],
        r["latency_round_trips"],
    );
    let _ = writeln!(s, "Medians, [min-max] over the passes.\n");
    s.push_str(&traffic_table(
        r,
        &[
            ("TCP1 Gb/s", "tcp1_gbps", 2),
            ("TCP4 Gb/s", "tcp4_gbps", 2),
            ("UDP rx Mb/s", "udp_rx_mbps", 0),
            ("UDP loss %", "udp_loss_pct", 2),
            ("64B rx kpps", "small_rx_kpps", 0),
            ("64B loss %", "small_loss_pct", 1),
        ],
    ));
    let _ = writeln!(
        s,
        "\nCost and latency (CPUs = busy CPUs of the whole machine, i.e. both nodes, per unit of traffic)"
    );
    s.push_str(&traffic_table(
        r,
        &[
            ("CPUs/Gb/s TCP1", "tcp1_cpu_per_gbps", 2),
            ("CPUs/Gb/s TCP4", "tcp4_cpu_per_gbps", 2),
            ("CPUs/Mpps 64B", "small_cpu_per_mpps", 2),
            ("RR p50 us", "rr_p50_us", 1),
            ("RR p99 us", "rr_p99_us", 1),
        ],
    ));
    for row in r["rows"].as_array().into_iter().flatten() {
        if let Some(why) = row["unavailable"].as_str() {
            let _ = writeln!(
                s,
                "{:<20} not available: {why}",
                row["key"].as_str().unwrap_or("?")
            );
        }
    }
    let _ = writeln!(
        s,
        "\nPer-packet cost in real traffic (kernel BPF statistics, ns/packet; floor = a do-nothing \
         program first on the same TC hook, same packets; egress = node 1 container_egress, \
         ingress = node 2 uplink programs)"
    );
    let [e, ef, i, inf] = run_stats::TCP;
    let [se, sef, si, sif] = run_stats::SMALL;
    s.push_str(&traffic_table(
        r,
        &[
            ("TCP egress", e, 0),
            ("floor", ef, 0),
            ("TCP ingress", i, 0),
            ("floor", inf, 0),
            ("64B egress", se, 0),
            ("floor", sef, 0),
            ("64B ingress", si, 0),
            ("floor", sif, 0),
        ],
    ));
    let _ = writeln!(s, "\nRatios of the medians");
    ratio_lines(&mut s, r);
    let _ = writeln!(
        s,
        "\nGoals (issue 14: small packets, latency, per-packet budget)"
    );
    s.push_str(&goals::render(&r["goals"]));

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
    scale(&mut s, &r["scale"]);
    s
}

/// Map memory per table profile and the restart with 1M flows
/// (`bench/restart.rs`).
fn scale(s: &mut String, sc: &Value) {
    if sc.is_null() {
        return;
    }
    let _ = writeln!(
        s,
        "\nFootprint and scale (NetManager's table sizes, bytes_memlock of every map)"
    );
    for (profile, m) in sc["map_memory"].as_object().into_iter().flatten() {
        let parts: Vec<String> = m["maps"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|x| f(&x["bytes_memlock"]) >= 0.05 * 1048576.0)
            .map(|x| {
                format!(
                    "{} {:.1}",
                    x["map"].as_str().unwrap_or("?"),
                    f(&x["bytes_memlock"]) / 1048576.0
                )
            })
            .collect();
        let _ = writeln!(
            s,
            "  map memory, {profile:<9} {:>6.1} MiB  (netcfg {}; {} MiB)",
            f(&m["total_bytes"]) / 1048576.0,
            m["netcfg"],
            parts.join(", ")
        );
    }
    let _ = writeln!(
        s,
        "  flow table room: {:.0} KiB per 10,000 flows (FLOWS + REVERSE_FLOWS)",
        f(&sc["flow_table_kib_per_10k_flows"])
    );
    for (mode, v) in sc["restart"].as_object().into_iter().flatten() {
        let fresh = &v["fresh_start"];
        let again = &v["restart"];
        let held = &v["established_connection"];
        let _ = writeln!(
            s,
            "  {mode:<8} fresh start {:.2} s (open {:.2} s); {} flows created in {:.1} s; \
             restart with them pinned: ready in {:.2} s (open {:.2} s), {} flows kept; \
             established connection: {} round trips, longest wait {:.1} ms, {}",
            f(&fresh["ready_s"]),
            f(&fresh["open_s"]),
            fresh["flows"],
            f(&fresh["prefill_s"]),
            f(&again["ready_s"]),
            f(&again["open_s"]),
            again["flows"],
            held["round_trips"],
            f(&held["max_wait_ms"]),
            if v["established_survived"] == json!(true) {
                "survived".to_string()
            } else {
                format!("BROKEN ({})", held["error"])
            }
        );
    }
}

/// The real-daemon section (sandbox workers; `bench/daemons.rs`).
fn daemons(s: &mut String, d: &Value) {
    super::daemons::table(s, d);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_show_min_max_only_for_repetitions() {
        assert_eq!(
            cell(
                &json!({"median": 12.345, "min": 11.0, "max": 13.0, "samples": [11.0, 12.345, 13.0]}),
                2
            ),
            "12.35 [11.00-13.00]"
        );
        assert_eq!(
            cell(
                &json!({"median": 9.0, "min": 9.0, "max": 9.0, "samples": [9.0]}),
                1
            ),
            "9.0"
        );
        assert_eq!(cell(&Value::Null, 1), "-");
    }

    #[test]
    fn traffic_table_skips_unavailable_rows() {
        let r = json!({"rows": [
            {"key": "direct/ipv4", "figures": {"tcp1_gbps": {"median": 10.0, "samples": [10.0]}}},
            {"key": "overlay/ipv4/xdp", "unavailable": "no"},
        ]});
        assert_eq!(
            traffic_table(&r, &[("TCP1", "tcp1_gbps", 1), ("p50", "rr_p50_us", 1)]),
            format!(
                "{:<20} {:>20} {:>20}\n{:<20} {:>20} {:>20}\n",
                "row", "TCP1", "p50", "direct/ipv4", "10.0", "-"
            )
        );
    }

    #[test]
    fn ratios_of_medians_and_added_latency() {
        let row = |k: &str, tcp1: f64, p50: f64| {
            json!({"key": k, "figures": {
                "tcp1_gbps": {"median": tcp1}, "rr_p50_us": {"median": p50}}})
        };
        let r = json!({"rows": [
            row("direct/ipv4", 10.0, 40.0),
            row("overlay/ipv4/tc", 12.0, 43.0),
        ]});
        let v = ratios(&r);
        assert_eq!(
            v,
            json!({"overlay/ipv4/tc vs direct/ipv4": {
                "tcp1": 1.2, "tcp4": null, "small_pps": null, "rr_p50_added_us": 3.0}})
        );
    }

    #[test]
    fn scalars_are_the_comparable_single_figures() {
        let r = json!({
            "scale": {"map_memory": {"default": {"total_bytes": 2097152}},
                      "flow_table_kib_per_10k_flows": 1400.0,
                      "restart": {"tcx": {"restart": {"ready_s": 0.5},
                                          "established_connection": {"max_wait_ms": 3.0}}}},
            "control_plane": {"upsert_service_us": {"all": {"p50": 3.3}}},
        });
        assert_eq!(
            scalars(&r),
            json!({
                "scale map_memory_default_mib": {"value": 2.0, "unit": "MiB", "better": "lower"},
                "scale flow_table_kib_per_10k_flows": {"value": 1400.0, "unit": "KiB", "better": "lower"},
                "scale restart_tcx_ready_s": {"value": 0.5, "unit": "s", "better": "lower"},
                "scale restart_tcx_longest_wait_ms": {"value": 3.0, "unit": "ms", "better": "lower"},
                "control_plane upsert_service_p50_us": {"value": 3.3, "unit": "us", "better": "lower"},
            })
        );
    }
}
