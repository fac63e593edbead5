//! What the resolver did, for `NetManager status` and the metrics.

use std::time::Duration;

/// What the resolver did, for status and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResolverStats {
    pub resolved: u64,
    pub failed: u64,
    /// Misses refused because too many lookups were in flight.
    pub refused_busy: u64,
    /// Misses refused because the query rate to the cluster was exhausted.
    pub refused_rate: u64,
    /// Misses dropped inside the negative-cache window of a failed lookup,
    /// or of a tunnel sender the cluster just refused.
    pub refused_recent_failure: u64,
    /// Held tunnel datagrams dropped because the cluster names another
    /// node as the one running their inner source.
    #[serde(default)]
    pub refused_wrong_node: u64,
    /// Negative entries dropped early because a table result answered
    /// them (a new instance, a moved one).
    #[serde(default)]
    pub negative_cleared: u64,
    /// Container frames parked on a failed lookup and sent through when a
    /// table result answered it.
    #[serde(default)]
    pub parked_reinjected: u64,
    /// How long lookups took, miss to outcome.
    pub latency: Latency,
}

/// Upper bounds of the lookup-latency buckets, in seconds.
pub const LATENCY_BOUNDS: [f64; 12] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 10.0,
];

/// A fixed-bucket histogram (cumulative counts per upper bound).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Latency {
    pub buckets: [u64; LATENCY_BOUNDS.len()],
    pub count: u64,
    pub sum_micros: u64,
}

impl Latency {
    pub(super) fn record(&mut self, d: Duration) {
        let secs = d.as_secs_f64();
        for (bound, n) in LATENCY_BOUNDS.iter().zip(self.buckets.iter_mut()) {
            if secs <= *bound {
                *n += 1;
            }
        }
        self.count += 1;
        self.sum_micros += u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_are_cumulative() {
        let mut l = Latency::default();
        l.record(Duration::from_micros(1500));
        l.record(Duration::from_millis(30));
        assert_eq!(l.count, 2);
        assert_eq!(l.buckets[0], 0); // <= 1 ms
        assert_eq!(l.buckets[1], 1); // <= 2 ms
        assert_eq!(l.buckets[5], 2); // <= 50 ms
        assert_eq!(l.sum_micros, 31_500);
    }
}
