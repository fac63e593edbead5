//! The goals of the small-packet and latency work (issue 14, point 3),
//! checked against the medians of a run: met, not met, or not measured.

use std::fmt::Write as _;

use serde_json::{Value, json};

use super::rows::{self, FAMILIES, HOOKS};

enum Test {
    /// median(row) / median(base) >= the bound
    RatioAtLeast(f64),
    /// median(row) - median(base) <= the bound
    AddedAtMost(f64),
}

struct Goal {
    what: &'static str,
    figure: &'static str,
    base: &'static str,
    test: Test,
}

const GOALS: [Goal; 3] = [
    Goal {
        what: "64-byte UDP pps vs direct",
        figure: "small_rx_kpps",
        base: "direct",
        test: Test::RatioAtLeast(0.9),
    },
    Goal {
        what: "64-byte UDP pps vs VXLAN",
        figure: "small_rx_kpps",
        base: "vxlan",
        test: Test::RatioAtLeast(1.0),
    },
    Goal {
        what: "request/response p50 added over direct",
        figure: "rr_p50_us",
        base: "direct",
        test: Test::AddedAtMost(5.0),
    },
];

/// Every goal for every overlay row (family x hook).
pub fn evaluate(results: &Value) -> Value {
    let mut out = Vec::new();
    for family in FAMILIES {
        for hook in HOOKS {
            let row = rows::key("overlay", family, Some(hook));
            for g in &GOALS {
                let base = rows::key(g.base, family, None);
                let a = rows::median(results, &row, g.figure);
                let b = rows::median(results, &base, g.figure);
                let (value, target, met) = match (&g.test, a, b) {
                    (Test::RatioAtLeast(min), Some(a), Some(b)) => {
                        let r = a / b;
                        (json!(r), format!(">= {min:.2}x"), json!(r >= *min))
                    }
                    (Test::AddedAtMost(max), Some(a), Some(b)) => {
                        let d = a - b;
                        (json!(d), format!("<= {max} us"), json!(d <= *max))
                    }
                    (Test::RatioAtLeast(min), ..) => {
                        (Value::Null, format!(">= {min:.2}x"), Value::Null)
                    }
                    (Test::AddedAtMost(max), ..) => {
                        (Value::Null, format!("<= {max} us"), Value::Null)
                    }
                };
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
            "small_rx_kpps": {"median": kpps}, "rr_p50_us": {"median": p50}}})
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
        assert_eq!(goals.as_array().unwrap().len(), 12);
        let text = render(&json!(tc));
        assert_eq!(
            text,
            "  overlay/ipv4/tc    64-byte UDP pps vs direct                    0.85x  goal >= 0.90x  NOT MET\n\
             \x20 overlay/ipv4/tc    64-byte UDP pps vs VXLAN                     1.06x  goal >= 1.00x  met\n\
             \x20 overlay/ipv4/tc    request/response p50 added over direct     +7.0 us  goal <= 5 us   NOT MET\n"
        );
    }
}
