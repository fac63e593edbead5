//! Per-packet cost in real traffic, per overlay row: the kernel's BPF
//! run-time statistics (`run_time_ns` / `run_cnt`, read with bpftool as an
//! operator would) of the data direction's programs -- node 1's
//! `container_egress` (translate + encapsulate + redirect) and node 2's
//! uplink programs (decapsulate + checks + reverse translation + redirect;
//! with the uplink at XDP, `uplink_xdp` and whatever it leaves to
//! `uplink_ingress`) -- over an iperf3 TCP run and a 64-byte UDP run.
//!
//! Beside them, the floor: a program that does nothing
//! (`oak-bench-floor`), attached first on the same TC hooks, so it sees the
//! same packets in the same run and the ratio needs no second run. XDP
//! takes one program per interface, so the XDP rows' floor is TC's.
//!
//! The statistics cost a little per program run, so these are runs of
//! their own, after the row's throughput figures: the figures of every path
//! are taken with the statistics off.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use testkit::NsPath;

use super::bpftool;

/// Figure names of a phase: egress, its floor, ingress, its floor (ns
/// per packet). `rows::FIGURES` lists them.
pub type Names = [&'static str; 4];
/// During one TCP stream.
pub const TCP: Names = [
    "egress_ns_tcp",
    "egress_floor_ns_tcp",
    "ingress_ns_tcp",
    "ingress_floor_ns_tcp",
];
/// During the small-packet run (64-byte UDP, many flows).
pub const SMALL: Names = [
    "egress_ns_small",
    "egress_floor_ns_small",
    "ingress_ns_small",
    "ingress_floor_ns_small",
];

/// Turns `kernel.bpf_stats_enabled` on and back to what it was when
/// dropped (it is global: a leftover would tax every program on the host).
pub struct StatsSwitch {
    before: String,
}

const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl StatsSwitch {
    pub fn on() -> Result<StatsSwitch> {
        let before = std::fs::read_to_string(STATS_SYSCTL)
            .with_context(|| format!("reading {STATS_SYSCTL}"))?
            .trim()
            .to_string();
        std::fs::write(STATS_SYSCTL, "1").with_context(|| format!("writing {STATS_SYSCTL}"))?;
        Ok(StatsSwitch { before })
    }
}

impl Drop for StatsSwitch {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(STATS_SYSCTL, &self.before) {
            eprintln!("restoring {STATS_SYSCTL} to {}: {e}", self.before);
        }
    }
}

/// Program ids of one direction: the programs whose time counts (the
/// first one sees every packet, its run count is the packet count) and
/// the floor on the same hook.
#[derive(Clone, Debug, PartialEq)]
pub struct Hook {
    pub programs: Vec<u32>,
    pub floor: u32,
}

/// Where an overlay row's programs run: the nodes, their pin directories
/// and the sending container's veth on node 1.
pub struct Site {
    pub floor_bin: PathBuf,
    pub n1: (NsPath, PathBuf),
    pub n2: (NsPath, PathBuf),
    pub container_veth: String,
}

/// What one overlay row's cost runs read. The floors are attached for
/// these runs only (they would tax the row's throughput runs too) and go
/// when this is dropped.
#[derive(Debug, PartialEq)]
pub struct Probes {
    pub egress: Hook,
    pub ingress: Hook,
    floor_pins: Vec<PathBuf>,
}

impl Drop for Probes {
    fn drop(&mut self) {
        for pin in &self.floor_pins {
            // Removing the pinned link detaches the floor.
            let _ = std::fs::remove_file(pin);
        }
    }
}

/// (run_time_ns, run_cnt) of every program of a [`Probes`], in order.
pub type Snapshot = Vec<(u64, u64)>;

impl Probes {
    /// Attaches the floors and finds the overlay's programs by their
    /// pinned links (`<pin dir>/links/<program>@<interface>`).
    pub fn attach(site: &Site) -> Result<Probes> {
        let ((n1, pin1), (n2, pin2)) = (&site.n1, &site.n2);
        let veth = &site.container_veth;
        let mut probes = Probes {
            egress: Hook {
                programs: vec![link_prog(pin1, &format!("container_egress@{veth}"))?],
                floor: 0,
            },
            ingress: Hook {
                programs: Vec::new(),
                floor: 0,
            },
            floor_pins: Vec::new(),
        };
        // With the uplink at XDP, its program comes first and counts the
        // packets; TC's sees what XDP passed on.
        if let Some(xdp) = find_link(pin2, "uplink_xdp", "@eth0")? {
            probes.ingress.programs.push(link_prog_at(&xdp)?);
        }
        probes
            .ingress
            .programs
            .push(link_prog(pin2, "uplink_ingress@eth0")?);
        probes.egress.floor = probes.floor(&site.floor_bin, n1, veth, pin1)?;
        probes.ingress.floor = probes.floor(&site.floor_bin, n2, "eth0", pin2)?;
        Ok(probes)
    }

    /// Loads the floor first on `ifname`'s TC ingress in `ns`; its id.
    fn floor(&mut self, bin: &Path, ns: &NsPath, ifname: &str, pin_dir: &Path) -> Result<u32> {
        let pin = pin_dir.join(format!("floor@{ifname}"));
        let out = ns
            .run(&[bin.as_os_str(), ifname.as_ref(), pin.as_os_str()])
            .with_context(|| format!("attaching the floor on {ifname}"))?;
        self.floor_pins.push(pin);
        out.trim()
            .parse()
            .with_context(|| format!("oak-bench-floor printed {out:?}, not a program id"))
    }

    fn ids(&self) -> Vec<u32> {
        let mut ids = self.egress.programs.clone();
        ids.push(self.egress.floor);
        ids.extend(&self.ingress.programs);
        ids.push(self.ingress.floor);
        ids
    }

    pub fn snapshot(&self) -> Result<Snapshot> {
        self.ids().into_iter().map(prog_stats).collect()
    }

    /// The phase's four figures (ns per packet) from two snapshots;
    /// a direction that saw no packet has none.
    pub fn per_packet(&self, names: &Names, before: &Snapshot, after: &Snapshot) -> Value {
        let delta: Vec<(u64, u64)> = before
            .iter()
            .zip(after)
            .map(|(b, a)| (a.0.saturating_sub(b.0), a.1.saturating_sub(b.1)))
            .collect();
        let e = self.egress.programs.len();
        let i = self.ingress.programs.len();
        let (egress, rest) = delta.split_at(e);
        let (egress_floor, rest) = rest.split_at(1);
        let (ingress, ingress_floor) = rest.split_at(i);
        let mut out = json!({});
        for (name, d) in names
            .iter()
            .zip([egress, egress_floor, ingress, ingress_floor])
        {
            if let Some(ns) = ns_per_packet(d) {
                out[*name] = json!(ns);
            }
        }
        // A floor only compares when it ran on the direction's packets: a
        // TC floor behind an XDP program that delivers datagrams itself
        // sees only the few it passes on, at a cost that says nothing
        // about a do-nothing program on that traffic.
        for (floor, programs, name) in [
            (egress_floor, egress, names[1]),
            (ingress_floor, ingress, names[3]),
        ] {
            if !same_packets(floor, programs)
                && let Some(o) = out.as_object_mut()
            {
                o.remove(name);
            }
        }
        out
    }
}

/// Whether a floor saw at least 90 % of the packets the direction's first
/// program saw.
pub fn same_packets(floor: &[(u64, u64)], programs: &[(u64, u64)]) -> bool {
    match (floor.first(), programs.first()) {
        (Some(f), Some(p)) => f.1 * 10 >= p.1 * 9,
        _ => false,
    }
}

/// Time of every program over the packet count of the first.
pub fn ns_per_packet(delta: &[(u64, u64)]) -> Option<f64> {
    let packets = delta.first()?.1;
    if packets == 0 {
        return None;
    }
    let time: u64 = delta.iter().map(|d| d.0).sum();
    Some(time as f64 / packets as f64)
}

fn link_prog(pin_dir: &Path, name: &str) -> Result<u32> {
    link_prog_at(&pin_dir.join("links").join(name))
}

/// The first pinned link in `<pin dir>/links` named `<prefix>...<suffix>`.
fn find_link(pin_dir: &Path, prefix: &str, suffix: &str) -> Result<Option<PathBuf>> {
    let dir = pin_dir.join("links");
    let entries = std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?;
    for e in entries {
        let name = e?.file_name().to_string_lossy().into_owned();
        if name.starts_with(prefix) && name.ends_with(suffix) {
            return Ok(Some(dir.join(name)));
        }
    }
    Ok(None)
}

fn link_prog_at(pin: &Path) -> Result<u32> {
    let v = bpftool(&["link", "show", "pinned", &pin.to_string_lossy()])?;
    match v["prog_id"].as_u64() {
        Some(id) => Ok(id as u32),
        None => bail!("no prog_id for the link pinned at {}: {v}", pin.display()),
    }
}

fn prog_stats(id: u32) -> Result<(u64, u64)> {
    let v = bpftool(&["prog", "show", "id", &id.to_string()])?;
    Ok((
        v["run_time_ns"].as_u64().unwrap_or(0),
        v["run_cnt"].as_u64().unwrap_or(0),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probes(ingress_programs: usize) -> Probes {
        Probes {
            egress: Hook {
                programs: vec![10],
                floor: 11,
            },
            ingress: Hook {
                programs: (20..20 + ingress_programs as u32).collect(),
                floor: 30,
            },
            floor_pins: Vec::new(),
        }
    }

    #[test]
    fn time_of_every_program_over_the_first_ones_packets() {
        // XDP saw 100 packets in 30 us, TC the 10 it passed on in 5 us.
        assert_eq!(ns_per_packet(&[(30_000, 100), (5_000, 10)]), Some(350.0));
        assert_eq!(ns_per_packet(&[(0, 0)]), None);
        assert_eq!(ns_per_packet(&[]), None);
    }

    #[test]
    fn figures_per_direction_beside_their_floors() {
        let p = probes(2);
        let before = vec![(0, 0), (0, 0), (0, 0), (0, 0), (0, 0)];
        let after = vec![
            (50_000, 100),
            (9_000, 100),
            (30_000, 100),
            (0, 0),
            (8_000, 100),
        ];
        assert_eq!(
            p.per_packet(&TCP, &before, &after),
            json!({"egress_ns_tcp": 500.0, "egress_floor_ns_tcp": 90.0,
                   "ingress_ns_tcp": 300.0, "ingress_floor_ns_tcp": 80.0})
        );
        // An XDP program that delivers most datagrams itself leaves the TC
        // floor behind it a few packets: no floor, so no ratio.
        let redirected = vec![
            (50_000, 100),
            (9_000, 100),
            (20_000, 100),
            (500, 2),
            (800, 2),
        ];
        assert_eq!(
            p.per_packet(&TCP, &before, &redirected),
            json!({"egress_ns_tcp": 500.0, "egress_floor_ns_tcp": 90.0, "ingress_ns_tcp": 205.0})
        );
        // A direction without packets has no figure, rather than 0 ns.
        let idle = vec![(50_000, 100), (9_000, 100), (0, 0), (0, 0), (0, 0)];
        assert_eq!(
            p.per_packet(&SMALL, &before, &idle),
            json!({"egress_ns_small": 500.0, "egress_floor_ns_small": 90.0})
        );
    }
}
