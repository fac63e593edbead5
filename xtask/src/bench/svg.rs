//! A hand-written SVG: grouped bars of throughput (TCP 1 and 4 streams) and
//! of latency (p50, p99) per IPv4 row (medians). No plotting crate: a few
//! rectangles.

use std::fmt::Write as _;

use serde_json::Value;

const W: f64 = 980.0;
const H: f64 = 440.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 130.0;
const COLORS: [&str; 2] = ["#3b6ea5", "#e08a2c"];

/// One panel: `series` (legend label, key path into each path's results).
fn panel(
    s: &mut String,
    r: &Value,
    x0: f64,
    width: f64,
    title: &str,
    unit: &str,
    series: [(&str, &str); 2],
) {
    let rows: Vec<&Value> = r["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|row| row["family"] == "ipv4" && !row["figures"].is_null())
        .collect();
    let vals: Vec<[f64; 2]> = rows
        .iter()
        .map(|row| series.map(|(_, k)| row["figures"][k]["median"].as_f64().unwrap_or(0.0)))
        .collect();
    let max = vals.iter().flatten().cloned().fold(0.0, f64::max).max(1e-9) * 1.15;
    let plot_h = H - TOP - BOTTOM;
    let base = H - BOTTOM;
    let _ = writeln!(
        s,
        r#"<text x="{:.0}" y="24" font-size="15" font-weight="bold">{title}</text>"#,
        x0
    );
    let _ = writeln!(
        s,
        r##"<line x1="{x0:.0}" y1="{base:.0}" x2="{:.0}" y2="{base:.0}" stroke="#333"/>"##,
        x0 + width
    );
    for (i, (label, _)) in series.iter().enumerate() {
        let lx = x0 + 200.0 + i as f64 * 90.0;
        let _ = writeln!(
            s,
            r#"<rect x="{lx:.0}" y="14" width="12" height="12" fill="{}"/><text x="{:.0}" y="25" font-size="12">{label}</text>"#,
            COLORS[i],
            lx + 16.0
        );
    }
    let group = width / rows.len().max(1) as f64;
    let bar = group * 0.32;
    for (i, (row, v)) in rows.iter().zip(&vals).enumerate() {
        let label = row["key"].as_str().unwrap_or("?");
        let gx = x0 + i as f64 * group + group * 0.15;
        for (j, val) in v.iter().enumerate() {
            let h = val / max * plot_h;
            let x = gx + j as f64 * bar;
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="{}"><title>{} {}: {val:.2} {unit}</title></rect>"#,
                base - h,
                bar - 2.0,
                COLORS[j],
                label,
                series[j].0
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="middle">{}</text>"#,
                x + bar / 2.0 - 1.0,
                base - h - 4.0,
                if *val >= 100.0 {
                    format!("{val:.0}")
                } else {
                    format!("{val:.1}")
                }
            );
        }
        let lx = gx + bar;
        let _ = writeln!(
            s,
            r#"<text transform="translate({lx:.1},{:.0}) rotate(35)" font-size="11">{}</text>"#,
            base + 14.0,
            label
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{x0:.0}" y="{:.0}" font-size="11" fill="#555">{unit}</text>"##,
        TOP - 6.0
    );
}

pub fn render(r: &Value) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" viewBox="0 0 {W} {H}">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    panel(
        &mut s,
        r,
        20.0,
        450.0,
        "Throughput (iperf3 TCP)",
        "Gbit/s",
        [("1 stream", "tcp1_gbps"), ("4 streams", "tcp4_gbps")],
    );
    panel(
        &mut s,
        r,
        510.0,
        450.0,
        "Request/response latency",
        "microseconds",
        [("p50", "rr_p50_us"), ("p99", "rr_p99_us")],
    );
    let m = &r["machine"];
    let _ = writeln!(
        s,
        r##"<text x="20" y="{:.0}" font-size="10" fill="#555">{} ({} CPUs), kernel {}</text>"##,
        H - 8.0,
        m["cpu"].as_str().unwrap_or("?"),
        m["cpus"],
        m["kernel"].as_str().unwrap_or("?")
    );
    s.push_str("</svg>\n");
    s
}
