//! What the traffic section measures: rows (a path, an address family and,
//! for the overlay's inter-node path, the uplink hook) and the figures of
//! each row, with the direction that counts as better.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::{run_stats, stats};

/// One traffic path between two containers, in report order.
pub struct Path {
    pub name: &'static str,
    pub label: &'static str,
}

pub static PATHS: [Path; 6] = [
    Path {
        name: "direct",
        label: "direct routed (ceiling)",
    },
    Path {
        name: "vxlan",
        label: "kernel VXLAN",
    },
    Path {
        name: "tunproxy",
        label: "userspace TUN+UDP proxy",
    },
    Path {
        name: "overlay",
        label: "eBPF overlay (service IP)",
    },
    Path {
        name: "bridge",
        label: "same node: bridge direct",
    },
    Path {
        name: "overlay_local",
        label: "same node: eBPF overlay",
    },
];

pub const FAMILIES: [&str; 2] = ["ipv4", "ipv6"];

/// Where the overlay's uplink program runs. Only the inter-node overlay
/// path crosses the uplink, so only its rows have a hook.
pub const HOOKS: [&str; 3] = ["tc", "xdp", "xdp-redirect"];

/// `path/family` or `path/family/hook`: the row's name in the report, the
/// JSON and `--compare`.
pub fn key(path: &str, family: &str, hook: Option<&str>) -> String {
    match hook {
        Some(h) => format!("{path}/{family}/{h}"),
        None => format!("{path}/{family}"),
    }
}

/// Every row, in report order.
pub fn all() -> Vec<(&'static Path, &'static str, Option<&'static str>)> {
    let mut out = Vec::new();
    for family in FAMILIES {
        for p in &PATHS {
            if p.name == "overlay" {
                for h in HOOKS {
                    out.push((p, family, Some(h)));
                }
            } else {
                out.push((p, family, None));
            }
        }
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

impl Better {
    pub fn as_str(self) -> &'static str {
        match self {
            Better::Higher => "higher",
            Better::Lower => "lower",
        }
    }

    pub fn parse(s: &str) -> Option<Better> {
        match s {
            "higher" => Some(Better::Higher),
            "lower" => Some(Better::Lower),
            _ => None,
        }
    }
}

/// A figure of every row: (name in the JSON, unit, better).
pub struct Figure {
    pub name: &'static str,
    pub unit: &'static str,
    pub better: Better,
}

const fn fig(name: &'static str, unit: &'static str, better: Better) -> Figure {
    Figure { name, unit, better }
}

pub static FIGURES: [Figure; 20] = [
    fig("tcp1_gbps", "Gbit/s", Better::Higher),
    fig("tcp1_cpu_per_gbps", "CPUs per Gbit/s", Better::Lower),
    fig("tcp4_gbps", "Gbit/s", Better::Higher),
    fig("tcp4_cpu_per_gbps", "CPUs per Gbit/s", Better::Lower),
    fig("udp_rx_mbps", "Mbit/s", Better::Higher),
    fig("udp_loss_pct", "%", Better::Lower),
    fig("small_rx_kpps", "kpps", Better::Higher),
    fig("small_loss_pct", "%", Better::Lower),
    fig("small_cpu_per_mpps", "CPUs per Mpps", Better::Lower),
    fig("rr_p50_us", "us", Better::Lower),
    fig("rr_p99_us", "us", Better::Lower),
    fig("tcp1_retransmits", "segments", Better::Lower),
    // Overlay rows only: per-packet cost in real traffic (run_stats).
    fig(run_stats::TCP[0], "ns/packet", Better::Lower),
    fig(run_stats::TCP[1], "ns/packet", Better::Lower),
    fig(run_stats::TCP[2], "ns/packet", Better::Lower),
    fig(run_stats::TCP[3], "ns/packet", Better::Lower),
    fig(run_stats::SMALL[0], "ns/packet", Better::Lower),
    fig(run_stats::SMALL[1], "ns/packet", Better::Lower),
    fig(run_stats::SMALL[2], "ns/packet", Better::Lower),
    fig(run_stats::SMALL[3], "ns/packet", Better::Lower),
];

/// `{name: {"unit", "better"}}` of every figure, for readers of the JSON.
pub fn describe() -> Value {
    let mut out = json!({});
    for f in FIGURES.iter() {
        out[f.name] = json!({"unit": f.unit, "better": f.better.as_str()});
    }
    out
}

pub fn figure(name: &str) -> Option<&'static Figure> {
    FIGURES.iter().find(|f| f.name == name)
}

/// Collects each row's samples over the passes and turns them into
/// median/min/max per figure.
#[derive(Default)]
pub struct Collector {
    /// row key -> figure -> samples in run order
    samples: BTreeMap<String, BTreeMap<String, Vec<f64>>>,
    /// row key -> why it was not measured
    unavailable: BTreeMap<String, String>,
    /// row key -> target address
    targets: BTreeMap<String, String>,
}

impl Collector {
    /// One repetition of a row: `sample` maps figure names to numbers.
    pub fn add(&mut self, key: &str, target: &str, sample: &Value) {
        self.targets.insert(key.to_string(), target.to_string());
        let row = self.samples.entry(key.to_string()).or_default();
        for f in FIGURES.iter() {
            if let Some(v) = sample[f.name].as_f64() {
                row.entry(f.name.to_string()).or_default().push(v);
            }
        }
    }

    pub fn unavailable(&mut self, key: &str, reason: &str) {
        self.unavailable.insert(key.to_string(), reason.to_string());
    }

    /// `[{"key", "path", "family", "hook", "label", "target", "figures": {name: summary}}
    /// | {..., "unavailable": reason}]` in report order.
    pub fn rows(&self) -> Value {
        let mut out = Vec::new();
        for (p, family, hook) in all() {
            let key = key(p.name, family, hook);
            let mut row = json!({
                "key": key, "path": p.name, "family": family, "hook": hook, "label": p.label,
            });
            if let Some(figs) = self.samples.get(&key) {
                let mut f = json!({});
                for (name, s) in figs {
                    f[name] = stats::to_json(s);
                }
                row["target"] = json!(self.targets.get(&key));
                row["figures"] = f;
            } else if let Some(reason) = self.unavailable.get(&key) {
                row["unavailable"] = json!(reason);
            } else {
                continue;
            }
            out.push(row);
        }
        Value::Array(out)
    }
}

/// The median of `figure` in row `key` of a results document.
pub fn median(results: &Value, key: &str, figure: &str) -> Option<f64> {
    results["rows"]
        .as_array()?
        .iter()
        .find(|r| r["key"] == key)?["figures"][figure]["median"]
        .as_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_family_major_and_only_the_overlay_has_hooks() {
        let keys: Vec<String> = all().iter().map(|(p, f, h)| key(p.name, f, *h)).collect();
        assert_eq!(
            keys[..8],
            [
                "direct/ipv4",
                "vxlan/ipv4",
                "tunproxy/ipv4",
                "overlay/ipv4/tc",
                "overlay/ipv4/xdp",
                "overlay/ipv4/xdp-redirect",
                "bridge/ipv4",
                "overlay_local/ipv4",
            ]
        );
        assert_eq!(keys.len(), 16);
    }

    #[test]
    fn collector_summarises_repetitions_and_keeps_unavailable_rows() {
        let mut c = Collector::default();
        c.add(
            "direct/ipv4",
            "10.18.0.66",
            &json!({"tcp1_gbps": 10.0, "rr_p50_us": 50.0}),
        );
        c.add("direct/ipv4", "10.18.0.66", &json!({"tcp1_gbps": 12.0}));
        c.add("direct/ipv4", "10.18.0.66", &json!({"tcp1_gbps": 11.0}));
        c.unavailable("overlay/ipv4/xdp", "no XDP in the runner");
        let rows = c.rows();
        assert_eq!(
            rows,
            json!([
                {"key": "direct/ipv4", "path": "direct", "family": "ipv4", "hook": null,
                 "label": "direct routed (ceiling)", "target": "10.18.0.66",
                 "figures": {
                     "rr_p50_us": {"median": 50.0, "min": 50.0, "max": 50.0, "samples": [50.0]},
                     "tcp1_gbps": {"median": 11.0, "min": 10.0, "max": 12.0,
                                   "samples": [10.0, 12.0, 11.0]}}},
                {"key": "overlay/ipv4/xdp", "path": "overlay", "family": "ipv4", "hook": "xdp",
                 "label": "eBPF overlay (service IP)", "unavailable": "no XDP in the runner"}
            ])
        );
        let doc = json!({ "rows": rows });
        assert_eq!(median(&doc, "direct/ipv4", "tcp1_gbps"), Some(11.0));
        assert_eq!(median(&doc, "direct/ipv4", "udp_rx_mbps"), None);
        assert_eq!(median(&doc, "overlay/ipv4/xdp", "tcp1_gbps"), None);
    }
}
