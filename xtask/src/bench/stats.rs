//! Median, min and max of a figure's repetitions: what every row of the
//! report shows, and what `--compare` compares (the median).

use serde_json::{Value, json};

/// A figure over its repetitions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

/// None for no samples. NaN samples (a figure that could not be computed,
/// e.g. CPU per Gbit/s of a run that moved nothing) are left out.
pub fn summarize(samples: &[f64]) -> Option<Summary> {
    let mut s: Vec<f64> = samples.iter().copied().filter(|v| !v.is_nan()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    Some(Summary {
        median,
        min: s[0],
        max: s[n - 1],
        n,
    })
}

/// `{"median", "min", "max", "samples"}` (samples in run order), or null.
pub fn to_json(samples: &[f64]) -> Value {
    match summarize(samples) {
        None => Value::Null,
        Some(s) => json!({"median": s.median, "min": s.min, "max": s.max, "samples": samples}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_count_takes_the_middle_value() {
        let s = summarize(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!(
            s,
            Summary {
                median: 2.0,
                min: 1.0,
                max: 3.0,
                n: 3
            }
        );
    }

    #[test]
    fn even_count_averages_the_two_middle_values() {
        let s = summarize(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.5, 1.0, 4.0, 4));
    }

    #[test]
    fn nan_samples_are_left_out_and_none_left_is_none() {
        let s = summarize(&[f64::NAN, 5.0]).unwrap();
        assert_eq!((s.median, s.n), (5.0, 1));
        assert_eq!(summarize(&[]), None);
        assert_eq!(summarize(&[f64::NAN]), None);
        assert_eq!(to_json(&[]), Value::Null);
    }

    #[test]
    fn json_keeps_the_samples_in_run_order() {
        assert_eq!(
            to_json(&[2.0, 1.0, 3.0]),
            json!({"median": 2.0, "min": 1.0, "max": 3.0, "samples": [2.0, 1.0, 3.0]})
        );
    }
}
