//! CPU spent during a run, system-wide from /proc/stat. The two "nodes"
//! are namespaces on one kernel, and most of the work of a packet is
//! softirq time on whichever CPU takes it, so no per-process or per-
//! namespace count would see it: the whole machine's busy time during the
//! run is the cost of both nodes together (plus whatever else runs -- the
//! machine is shared, see docs/performance.md).

use anyhow::{Context, Result};

/// (busy, total) jiffies summed over all CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Jiffies {
    pub busy: u64,
    pub total: u64,
}

/// The aggregate `cpu ` line of /proc/stat: user nice system idle iowait
/// irq softirq steal (guest time is already in user). Idle and iowait are
/// not busy.
pub fn parse(stat: &str) -> Option<Jiffies> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    if v.len() < 5 {
        return None;
    }
    let total: u64 = v.iter().sum();
    Some(Jiffies {
        busy: total - v[3] - v[4],
        total,
    })
}

pub fn now() -> Result<Jiffies> {
    let s = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    parse(&s).context("no cpu line in /proc/stat")
}

/// CPUs kept busy on average between two samples (0..=cpus).
pub fn busy_cpus(before: Jiffies, after: Jiffies, cpus: u32) -> f64 {
    let total = after.total.saturating_sub(before.total);
    if total == 0 {
        return f64::NAN;
    }
    after.busy.saturating_sub(before.busy) as f64 / total as f64 * f64::from(cpus)
}

/// Number of CPUs /proc/stat sums over.
pub fn count() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_excludes_idle_and_iowait() {
        let stat = "cpu  100 5 50 800 20 3 7 0 0 0\ncpu0 50 2 25 400 10 1 3 0 0 0\n";
        assert_eq!(
            parse(stat),
            Some(Jiffies {
                busy: 165,
                total: 985
            })
        );
        assert_eq!(parse("intr 1 2 3\n"), None);
    }

    #[test]
    fn busy_cpus_scales_the_busy_share_by_the_cpu_count() {
        let a = Jiffies {
            busy: 100,
            total: 1000,
        };
        let b = Jiffies {
            busy: 250,
            total: 1200,
        };
        assert_eq!(busy_cpus(a, b, 2), 1.5);
        assert!(busy_cpus(a, a, 2).is_nan());
    }
}
