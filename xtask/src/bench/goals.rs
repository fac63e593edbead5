//! The goals of issue 14 that a run's medians decide: small packets and
//! latency against the direct path and VXLAN (point 3), and the per-packet
//! budget against the floor on the same hook (point 2) -- met, not met, or
//! not measured.

use std::fmt::Write as _;

use serde_json::{Value, json};

use super::rows::{self, FAMILIES, HOOKS};
use super::run_stats::{SMALL, TCP};

enum Test {
    /// median(row) / median(base) >= the bound
    RatioAtLeast(f64),
    /// median(row) / median(base) <= the bound
    RatioAtMost(f64),
    /// median(row) - median(base) <= the bound
    AddedAtMost(f64),
}

/// What a figure is held against.
enum Base {
    /// The same figure of another path's row (same family).
    Path(&'static str),
    /// Another figure of the same row.
    Figure(&'static str),
}

impl Test {
    /// The figure the bound applies to, from the row's and the base's medians.
    fn value(&self, a: f64, b: f64) -> f64 {
        match self {
            Test::RatioAtLeast(_) | Test::RatioAtMost(_) => a / b,
            Test::AddedAtMost(_) => a - b,
        }
    }

    fn holds(&self, v: f64) -> bool {
        match *self {
            Test::RatioAtLeast(min) => v >= min,
            Test::RatioAtMost(max) => v <= max,
            Test::AddedAtMost(max) => v <= max,
        }
    }

    fn target(&self) -> String {
        match self {
            Test::RatioAtLeast(min) => format!(">= {min:.2}x"),
            Test::RatioAtMost(max) => format!("<= {max:.2}x"),
            Test::AddedAtMost(max) => format!("<= {max} us"),
        }
    }
}

struct Goal {
    what: &'static str,
    figure: &'static str,
    base: Base,
    test: Test,
}

/// The per-packet budget: egress <= 3x, ingress <= 2.5x the floor.
const EGRESS_BUDGET: f64 = 3.0;
const INGRESS_BUDGET: f64 = 2.5;

const GOALS: [Goal; 7] = [
    Goal {
        what: "64-byte UDP pps vs direct",
        figure: "small_rx_kpps",
        base: Base::Path("direct"),
        test: Test::RatioAtLeast(0.9),
    },
    Goal {
        what: "64-byte UDP pps vs VXLAN",
        figure: "small_rx_kpps",
        base: Base::Path("vxlan"),
        test: Test::RatioAtLeast(1.0),
    },
    Goal {
        what: "request/response p50 added over direct",
        figure: "rr_p50_us",
        base: Base::Path("direct"),
        test: Test::AddedAtMost(5.0),
    },
    Goal {
        what: "egress ns/packet vs floor, TCP",
        figure: TCP[0],
        base: Base::Figure(TCP[1]),
        test: Test::RatioAtMost(EGRESS_BUDGET),
    },
    Goal {
        what: "ingress ns/packet vs floor, TCP",
        figure: TCP[2],
        base: Base::Figure(TCP[3]),
        test: Test::RatioAtMost(INGRESS_BUDGET),
    },
    Goal {
        what: "egress ns/packet vs floor, 64 B UDP",
        figure: SMALL[0],
        base: Base::Figure(SMALL[1]),
        test: Test::RatioAtMost(EGRESS_BUDGET),
    },
    Goal {
        what: "ingress ns/packet vs floor, 64 B UDP",
        figure: SMALL[2],
        base: Base::Figure(SMALL[3]),
        test: Test::RatioAtMost(INGRESS_BUDGET),
    },
];

/// Every goal for every overlay row (family x hook).
pub fn evaluate(results: &Value) -> Value {
    let mut out = Vec::new();
    for family in FAMILIES {
        for hook in HOOKS {
            let row = rows::key("overlay", family, Some(hook));
            for g in &GOALS {
                let a = rows::median(results, &row, g.figure);
                let (base, b) = match g.base {
                    Base::Path(p) => {
                        let base = rows::key(p, family, None);
                        let b = rows::median(results, &base, g.figure);
                        (base, b)
                    }
                    Base::Figure(f) => (format!("{row} {f}"), rows::median(results, &row, f)),
                };
                let value = a.zip(b).map(|(a, b)| g.test.value(a, b));
                let (target, met) = (g.test.target(), value.map(|v| g.test.holds(v)));
                out.push(json!({
                    "goal": g.what, "row": row, "base": base, "value": value,
                    "target": target, "met": met,
                }));
            }
        }
    }
    Value::Array(out)
}

pub fn render(goals: &Value) -> String {
    let mut s = String::new();
    for g in goals.as_array().into_iter().flatten() {
        let value = match g["value"].as_f64() {
            None => "-".to_string(),
            Some(v) if g["target"].as_str().is_some_and(|t| t.ends_with('x')) => {
                format!("{v:.2}x")
            }
            Some(v) => format!("{v:+.1} us"),
        };
        let verdict = match g["met"].as_bool() {
            Some(true) => "met",
            Some(false) => "NOT MET",
            None => "not measured",
        };
        let _ = writeln!(
            s,
            "  {:<18} {:<40} {:>9}  goal {:<9} {verdict}",
            g["row"].as_str().unwrap_or("?"),
            g["goal"].as_str().unwrap_or("?"),
            value,
            g["target"].as_str().unwrap_or("?"),
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(key: &str, kpps: f64, p50: f64) -> Value {
        json!({"key": key, "figures": {
            "small_rx_kpps": {"median": kpps}, "rr_p50_us": {"median": p50},
            "egress_ns_tcp": {"median": 480.0}, "egress_floor_ns_tcp": {"median": 80.0},
            "ingress_ns_tcp": {"median": 180.0}, "ingress_floor_ns_tcp": {"median": 80.0}}})
    }

    #[test]
    fn goals_are_met_missed_or_not_measured() {
        let results = json!({"rows": [
            row("direct/ipv4", 100.0, 40.0),
            row("vxlan/ipv4", 80.0, 45.0),
            row("overlay/ipv4/tc", 85.0, 47.0),
        ]});
        let goals = evaluate(&results);
        let tc: Vec<&Value> = goals
            .as_array()
            .unwrap()
            .iter()
            .filter(|g| g["row"] == "overlay/ipv4/tc")
            .collect();
        assert_eq!(tc[0]["met"], json!(false), "0.85x direct");
        assert_eq!(tc[1]["met"], json!(true), "1.06x VXLAN");
        assert_eq!(tc[2]["value"], json!(7.0));
        assert_eq!(tc[2]["met"], json!(false), "7 us added");
        let xdp = goals
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["row"] == "overlay/ipv4/xdp")
            .unwrap();
        assert_eq!(xdp["met"], Value::Null);
        assert_eq!(goals.as_array().unwrap().len(), 42);
        // The budget against the floor of the same row.
        assert_eq!(tc[3]["value"], json!(6.0));
        assert_eq!(tc[3]["met"], json!(false), "egress 6x the floor");
        assert_eq!(tc[3]["base"], json!("overlay/ipv4/tc egress_floor_ns_tcp"));
        assert_eq!(tc[4]["value"], json!(2.25));
        assert_eq!(tc[4]["met"], json!(true), "ingress 2.25x the floor");
        assert_eq!(tc[5]["met"], Value::Null, "no small-packet cost run");
        let text = render(&json!(tc[..3]));
        assert_eq!(
            text,
            "  overlay/ipv4/tc    64-byte UDP pps vs direct                    0.85x  goal >= 0.90x  NOT MET\n\
             \x20 overlay/ipv4/tc    64-byte UDP pps vs VXLAN                     1.06x  goal >= 1.00x  met\n\
             \x20 overlay/ipv4/tc    request/response p50 added over direct     +7.0 us  goal <= 5 us   NOT MET\n"
        );
    }
}
