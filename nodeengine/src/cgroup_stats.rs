//! CPU and memory use of one container, read from its cgroup.
//!
//! containerd's Metrics API returns cgroup-version-specific protobufs that the
//! client crate does not define; the cgroup files are simpler and cheaper.

use std::path::{Path, PathBuf};
use std::time::Instant;

const ROOT: &str = "/sys/fs/cgroup";

/// One reading.
#[derive(Debug, Clone, Copy)]
pub struct Reading {
    pub cpu_ns: u64,
    pub mem_bytes: u64,
    pub mem_limit: Option<u64>,
    pub at: Instant,
}

fn read_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

fn is_v2() -> bool {
    Path::new(ROOT).join("cgroup.controllers").exists()
}

/// `cgroups_path` is the spec's `linux.cgroupsPath` (e.g. `/oakestra/<id>`).
pub fn read(cgroups_path: &str) -> Option<Reading> {
    let rel = cgroups_path.trim_start_matches('/');
    let at = Instant::now();
    if is_v2() {
        let dir = PathBuf::from(ROOT).join(rel);
        let stat = std::fs::read_to_string(dir.join("cpu.stat")).ok()?;
        let usec = stat
            .lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .and_then(|v| v.trim().parse::<u64>().ok())?;
        let limit = std::fs::read_to_string(dir.join("memory.max"))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        Some(Reading {
            cpu_ns: usec.saturating_mul(1000),
            mem_bytes: read_u64(&dir.join("memory.current")).unwrap_or(0),
            mem_limit: limit,
            at,
        })
    } else {
        let cpu = read_u64(
            &PathBuf::from(ROOT)
                .join("cpuacct")
                .join(rel)
                .join("cpuacct.usage"),
        )?;
        let mem_dir = PathBuf::from(ROOT).join("memory").join(rel);
        Some(Reading {
            cpu_ns: cpu,
            mem_bytes: read_u64(&mem_dir.join("memory.usage_in_bytes")).unwrap_or(0),
            // v1 reports "no limit" as a huge number; filtered by the caller.
            mem_limit: read_u64(&mem_dir.join("memory.limit_in_bytes")),
            at,
        })
    }
}

/// CPU use between two readings in percent of the whole machine (100 = all
/// `cores` busy), as upstream divides a container's CPU share by the cores.
pub fn cpu_percent(prev: &Reading, now: &Reading, cores: u64) -> f64 {
    let wall = now.at.saturating_duration_since(prev.at).as_nanos() as f64;
    if wall <= 0.0 {
        return 0.0;
    }
    now.cpu_ns.saturating_sub(prev.cpu_ns) as f64 * 100.0 / wall / cores.max(1) as f64
}

/// Upstream's service `memory_percent`: the container's memory in bytes over
/// the node's available memory (`memory` of the node report, MiB), a
/// fraction despite its name; 100 when the node reports no memory.
pub fn memory_share(r: &Reading, available_mib: u64) -> f64 {
    if available_mib == 0 {
        return 100.0;
    }
    r.mem_bytes as f64 / (available_mib as f64 * 1024.0 * 1024.0)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn values_as_upstream_computes_them() {
        let at = Instant::now();
        let prev = Reading {
            cpu_ns: 0,
            mem_bytes: 0,
            mem_limit: None,
            at,
        };
        let now = Reading {
            cpu_ns: 1_000_000_000,
            mem_bytes: 512 << 20,
            mem_limit: Some(64 << 20),
            at: at + Duration::from_secs(1),
        };
        // One core busy on a 4-core machine.
        assert_eq!(cpu_percent(&prev, &now, 4), 25.0);
        // 512 MiB used of 2048 MiB available, whatever the limit.
        assert_eq!(memory_share(&now, 2048), 0.25);
        assert_eq!(memory_share(&now, 0), 100.0);
    }
}
