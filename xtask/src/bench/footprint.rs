//! Idle footprint of a daemon (RSS, CPU over a quiet window) and the kernel
//! memory of pinned maps as bpftool reports it (bytes_memlock).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{Value, json};

/// utime + stime in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the parenthesised command name, which may contain spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    // utime/stime are fields 14/15 of stat; index 11/12 after the name.
    Ok(field(11) + field(12))
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}

pub fn idle(name: &str, pid: u32, window: Duration) -> Result<Value> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let t0 = Instant::now();
    let c0 = cpu_ticks(pid)?;
    std::thread::sleep(window);
    let c1 = cpu_ticks(pid)?;
    let secs = t0.elapsed().as_secs_f64();
    Ok(json!({
        "daemon": name,
        "rss_kib": rss_kib(pid)?,
        "cpu_pct": (c1 - c0) as f64 / hz / secs * 100.0,
        "window_s": secs,
    }))
}

/// bpftool's view of every map pinned in `pin_dir`.
pub fn maps(pin_dir: &std::path::Path, names: &[&str]) -> Result<Value> {
    let mut out = Vec::new();
    let mut total = 0u64;
    for n in names {
        let p = pin_dir.join(n);
        if !p.exists() {
            continue;
        }
        let v = super::bpftool(&["map", "show", "pinned", &p.to_string_lossy()])?;
        let mem = v["bytes_memlock"].as_u64().unwrap_or(0);
        total += mem;
        out.push(
            json!({"map": n, "type": v["type"], "max_entries": v["max_entries"],
            "bytes_memlock": mem}),
        );
    }
    Ok(json!({"maps": out, "total_bytes": total}))
}
