//! `cargo xtask bench`: overlay performance against its baselines, in one
//! run, as root, on namespace nodes (docs/performance.md).
//!
//! xtask deliberately does not link netmanager or the tests crate:
//! netmanager's build script embeds the eBPF object that `cargo xtask
//! build-ebpf` produces, so linking it here would make xtask unbuildable on
//! a fresh checkout. Everything that needs the library runs as a bench-only
//! binary of the tests crate (oak-bench-*, never shipped), built and started
//! from here.

mod compare;
mod control_plane;
mod cpu;
mod daemons;
mod footprint;
mod goals;
mod iperf;
mod latency;
mod prog_cost;
mod report;
mod restart;
mod rows;
mod run_stats;
mod stats;
mod svg;
mod topology;
mod traffic;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use worker_common::privileges::require_root;

use testkit::sh;

use crate::ebpf;

#[derive(clap::Args)]
pub struct Args {
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Three interleaved passes over every traffic row (median, min, max)
    /// instead of one.
    #[arg(long)]
    full: bool,
    /// Passes over the traffic rows (overrides --full's three).
    #[arg(long)]
    passes: Option<u32>,
    /// Print the change of every figure against an earlier latest.json.
    #[arg(long, value_name = "OLD.json")]
    compare: Option<PathBuf>,
    /// With --compare: compare against this file instead of running the
    /// bench (no root needed).
    #[arg(long, value_name = "NEW.json", requires = "compare")]
    against: Option<PathBuf>,
    /// Output directory for latest.json and throughput.svg (relative to the workspace).
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// Skip the BPF_PROG_TEST_RUN section (1M flows, ~30 s).
    #[arg(long)]
    no_prog_cost: bool,
    /// Skip the real-daemon section (sandbox: NetManager, nodeengined, containerd; ~1 min).
    #[arg(long)]
    no_daemons: bool,
    /// Skip the footprint section (map memory per profile, restart with 1M flows; ~1 min).
    #[arg(long)]
    no_footprint: bool,
    /// Run one section alone; its results go to `<out>/<section>.json`.
    #[arg(long, value_enum)]
    only: Option<Section>,
}

/// What `--only` can run on its own.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    /// The real-daemon control plane (sandbox, mosquitto and rumqttd):
    /// first connect, deploy -> reachable, deploy -> CREATED.
    ControlPlane,
}

fn read_results(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn print_comparison(old_path: &Path, new: &Value) -> Result<()> {
    let old = read_results(old_path)?;
    let changes = compare::compare(&old, new);
    print!(
        "{}",
        compare::render(&changes, &old_path.display().to_string())
    );
    Ok(())
}

pub fn run(args: Args) -> Result<()> {
    if let (Some(old), Some(new)) = (&args.compare, &args.against) {
        return print_comparison(old, &read_results(new)?);
    }
    require_root(
        "`cargo xtask bench`",
        "it creates network namespaces and loads eBPF",
    )?;
    for tool in ["iperf3", "bpftool"] {
        testkit::harness::which(tool)
            .with_context(|| format!("{tool} is required (cargo xtask setup)"))?;
    }
    // Read before the run: a missing file should not cost a whole run.
    if let Some(old) = &args.compare {
        read_results(old)?;
    }
    let started = Instant::now();
    let root = ebpf::workspace_root();
    progress(started, "building the eBPF object and the bench binaries");
    ebpf::build(true)?;
    let mut packages = vec!["-p", "oakestra-worker-tests"];
    if args.only == Some(Section::ControlPlane) {
        packages.clear();
    }
    if !args.no_daemons || args.only.is_some() {
        // The real daemons the sandbox runs (NetManager, nodeengined).
        packages.extend(["-p", "netmanager", "-p", "nodeengine"]);
    }
    ebpf::run(
        std::process::Command::new("cargo")
            .current_dir(&root)
            .args(["build", "--release", "--bins"])
            .args(&packages),
        "building the bench binaries",
    )?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let target = if target.is_relative() {
        root.join(target)
    } else {
        target
    };
    let bins = target.join("release");
    if args.only == Some(Section::ControlPlane) {
        return daemons::run_only(&bins, &root.join(&args.out), started);
    }

    let passes = args.passes.unwrap_or(if args.full { 3 } else { 1 }).max(1);
    let plan = traffic::Plan {
        bins: &bins,
        seconds: args.seconds,
        passes,
        hooks: runner_hooks(&bins)?,
    };
    let mut results = json!({
        "machine": machine()?,
        "iperf_seconds": args.seconds,
        "passes": passes,
        "udp_offered_mbps": iperf::UDP_OFFERED_MBPS,
        "small_packets": {"payload_bytes": iperf::SMALL_LEN, "flows": iperf::SMALL_FLOWS},
        "latency_round_trips": latency::ROUND_TRIPS,
        "uplink_hooks": plan.hooks,
        "figures": rows::describe(),
        "footprint": [],
    });
    let rows = traffic::run(&plan, started, &mut results)?;
    results["rows"] = rows.rows();
    results["goals"] = goals::evaluate(&results);

    if !args.no_footprint {
        progress(
            started,
            "footprint: map memory per table profile, restart with 1M flows per attach mode",
        );
        results["scale"] = restart::run(&bins, started)?;
    }

    if !args.no_daemons {
        progress(
            started,
            "real daemons: sandbox with 2 workers (containerd, NetManager, nodeengined)",
        );
        results["daemons"] = daemons::run(&bins, started)?;
    }

    if !args.no_prog_cost {
        progress(
            started,
            "per-packet program cost (BPF_PROG_TEST_RUN, 1M flows)",
        );
        let prefix = format!("oakb{}", std::process::id() % 100000);
        let pc = prog_cost::run(&bins, &prefix)?;
        results["control_plane"]["upsert_service_us"] = pc["upsert_service_us"].clone();
        results["prog_cost"] = pc;
    }
    results["scalars"] = report::scalars(&results);
    results["total_seconds"] = json!(started.elapsed().as_secs_f64());
    report::finish(&root.join(&args.out), &root, &mut results)?;
    if let Some(old) = &args.compare {
        print_comparison(old, &results)?;
    }
    progress(started, "done");
    Ok(())
}

/// The uplink hooks `oak-static-dataplane --hooks` says it can attach.
fn runner_hooks(bins: &Path) -> Result<Vec<String>> {
    let out = std::process::Command::new(bins.join("oak-static-dataplane"))
        .arg("--hooks")
        .output()
        .context("asking oak-static-dataplane for its hooks")?;
    anyhow::ensure!(
        out.status.success(),
        "oak-static-dataplane --hooks failed ({})",
        out.status
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect())
}

/// `bpftool -j ARGS`, parsed: how the bench reads what an operator sees.
pub(crate) fn bpftool(args: &[&str]) -> Result<Value> {
    let out = std::process::Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .context("running bpftool")?;
    if !out.status.success() {
        anyhow::bail!(
            "bpftool {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("parsing bpftool {}", args.join(" ")))
}

pub fn progress(started: Instant, what: &str) {
    eprintln!("[bench {:>5.0}s] {what}", started.elapsed().as_secs_f64());
}

fn machine() -> Result<Value> {
    let cpu = sh("lscpu | sed -n 's/^Model name: *//p' | head -1")?;
    Ok(json!({
        "kernel": sh("uname -r")?.trim(),
        "cpu": cpu.trim(),
        "cpus": sh("nproc")?.trim().parse::<u32>().unwrap_or(0),
        "iperf3": sh("iperf3 --version | head -1")?.trim(),
    }))
}
