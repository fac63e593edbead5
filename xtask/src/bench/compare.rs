//! `cargo xtask bench --compare OLD.json`: every figure present in both
//! runs (a row's median, or a single-valued figure of `scalars`), its
//! change and whether that is better or worse.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::Value;

use super::rows::{Better, figure};

/// figure name -> (value, better)
pub fn flatten(results: &Value) -> BTreeMap<String, (f64, Better)> {
    let mut out = BTreeMap::new();
    for row in results["rows"].as_array().into_iter().flatten() {
        let Some(key) = row["key"].as_str() else {
            continue;
        };
        for (name, s) in row["figures"].as_object().into_iter().flatten() {
            if let (Some(f), Some(m)) = (figure(name), s["median"].as_f64()) {
                out.insert(format!("{key} {name}"), (m, f.better));
            }
        }
    }
    for (name, s) in results["scalars"].as_object().into_iter().flatten() {
        let better = s["better"].as_str().and_then(Better::parse);
        if let (Some(v), Some(b)) = (s["value"].as_f64(), better) {
            out.insert(name.clone(), (v, b));
        }
    }
    out
}

#[derive(Debug, PartialEq)]
pub struct Change {
    pub figure: String,
    pub old: f64,
    pub new: f64,
    /// (new - old) / old, in percent; None when old is 0
    pub percent: Option<f64>,
    pub verdict: &'static str,
}

/// Changes of every figure in both documents, by name.
pub fn compare(old: &Value, new: &Value) -> Vec<Change> {
    let old = flatten(old);
    let new = flatten(new);
    let mut out = Vec::new();
    for (name, (o, _)) in &old {
        let Some((n, better)) = new.get(name) else {
            continue;
        };
        let percent = (*o != 0.0).then(|| (n - o) / o.abs() * 100.0);
        let verdict = if n == o {
            "same"
        } else if (n > o) == (*better == Better::Higher) {
            "better"
        } else {
            "worse"
        };
        out.push(Change {
            figure: name.clone(),
            old: *o,
            new: *n,
            percent,
            verdict,
        });
    }
    out
}

pub fn render(changes: &[Change], old_name: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\nChange against {old_name} (medians; percent of the old value)"
    );
    let _ = writeln!(
        s,
        "{:<42} {:>10} {:>10} {:>9}",
        "figure", "old", "new", "change"
    );
    for c in changes {
        let pct = c.percent.map_or("-".to_string(), |p| format!("{p:+.1} %"));
        let _ = writeln!(
            s,
            "{:<42} {:>10} {:>10} {:>9}  {}",
            c.figure,
            num(c.old),
            num(c.new),
            pct,
            c.verdict
        );
    }
    let (b, w) = changes.iter().fold((0, 0), |(b, w), c| match c.verdict {
        "better" => (b + 1, w),
        "worse" => (b, w + 1),
        _ => (b, w),
    });
    let _ = writeln!(
        s,
        "{} figures: {b} better, {w} worse, {} unchanged",
        changes.len(),
        changes.len() - b - w
    );
    s
}

fn num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc(tcp1: f64, p50: f64, mem: f64) -> Value {
        json!({
            "rows": [
                {"key": "overlay/ipv4/tc", "figures": {
                    "tcp1_gbps": {"median": tcp1, "min": 0.0, "max": 99.0},
                    "rr_p50_us": {"median": p50}}},
                {"key": "overlay/ipv4/xdp", "unavailable": "not in this runner"},
            ],
            "scalars": {"footprint map_memory_default_mib":
                {"value": mem, "unit": "MiB", "better": "lower"}},
        })
    }

    #[test]
    fn direction_decides_better_or_worse() {
        let changes = compare(&doc(10.0, 50.0, 28.0), &doc(12.0, 55.0, 28.0));
        assert_eq!(
            changes,
            vec![
                Change {
                    figure: "footprint map_memory_default_mib".into(),
                    old: 28.0,
                    new: 28.0,
                    percent: Some(0.0),
                    verdict: "same"
                },
                Change {
                    figure: "overlay/ipv4/tc rr_p50_us".into(),
                    old: 50.0,
                    new: 55.0,
                    percent: Some(10.0),
                    verdict: "worse"
                },
                Change {
                    figure: "overlay/ipv4/tc tcp1_gbps".into(),
                    old: 10.0,
                    new: 12.0,
                    percent: Some(20.0),
                    verdict: "better"
                },
            ]
        );
    }

    #[test]
    fn figures_missing_on_either_side_are_skipped() {
        let mut old = doc(10.0, 50.0, 28.0);
        old["rows"][0]["figures"]
            .as_object_mut()
            .unwrap()
            .remove("rr_p50_us");
        old["scalars"] = json!({});
        let changes = compare(&old, &doc(8.0, 40.0, 7.0));
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].verdict, "worse");
        assert_eq!(changes[0].percent, Some(-20.0));
    }

    #[test]
    fn rendered_table() {
        let changes = compare(&doc(10.0, 50.0, 28.0), &doc(12.0, 55.0, 7.0));
        assert_eq!(
            render(&changes, "old.json"),
            "\nChange against old.json (medians; percent of the old value)\n\
             figure                                            old        new    change\n\
             footprint map_memory_default_mib                28.00       7.00   -75.0 %  better\n\
             overlay/ipv4/tc rr_p50_us                       50.00      55.00   +10.0 %  worse\n\
             overlay/ipv4/tc tcp1_gbps                       10.00      12.00   +20.0 %  better\n\
             3 figures: 2 better, 1 worse, 0 unchanged\n"
        );
    }
}
