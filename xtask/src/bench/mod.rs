//! `cargo xtask bench`: overlay performance against its baselines, in one
//! run, as root, on namespace nodes (docs/performance.md).
//!
//! xtask deliberately does not link netmanager or the tests crate:
//! netmanager's build script embeds the eBPF object that `cargo xtask
//! build-ebpf` produces, so linking it here would make xtask unbuildable on
//! a fresh checkout. Everything that needs the library runs as a bench-only
//! binary of the tests crate (oak-bench-*, never shipped), built and started
//! from here.

mod control_plane;
mod daemons;
mod footprint;
mod iperf;
mod latency;
mod prog_cost;
mod report;
mod svg;
mod topology;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use worker_common::privileges::require_root;

use std::net::{IpAddr, Ipv4Addr};

use testkit::netlink::{LinkSettings, Route, Vxlan};
use testkit::{NsPath, sh};

use crate::ebpf;
use topology::Topology;

#[derive(clap::Args)]
pub struct Args {
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Output directory for latest.json and throughput.svg (relative to the workspace).
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// Skip the BPF_PROG_TEST_RUN section (1M flows, ~30 s).
    #[arg(long)]
    no_prog_cost: bool,
    /// Skip the real-daemon section (sandbox: NetManager, nodeengined, containerd; ~1 min).
    #[arg(long)]
    no_daemons: bool,
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

/// One traffic path between two containers, in report order.
pub struct Scenario {
    pub name: &'static str,
    pub label: &'static str,
    pub same_node: bool,
}

pub const PATHS: [Scenario; 6] = [
    Scenario {
        name: "direct",
        label: "direct routed (ceiling)",
        same_node: false,
    },
    Scenario {
        name: "vxlan",
        label: "kernel VXLAN",
        same_node: false,
    },
    Scenario {
        name: "tunproxy",
        label: "userspace TUN+UDP proxy",
        same_node: false,
    },
    Scenario {
        name: "overlay",
        label: "eBPF overlay (service IP)",
        same_node: false,
    },
    Scenario {
        name: "bridge",
        label: "same node: bridge direct",
        same_node: true,
    },
    Scenario {
        name: "overlay_local",
        label: "same node: eBPF overlay",
        same_node: true,
    },
];

pub fn run(args: Args) -> Result<()> {
    require_root(
        "`cargo xtask bench`",
        "it creates network namespaces and loads eBPF",
    )?;
    for tool in ["iperf3", "bpftool"] {
        testkit::harness::which(tool)
            .with_context(|| format!("{tool} is required (cargo xtask setup)"))?;
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

    let mut results = json!({
        "machine": machine()?,
        "iperf_seconds": args.seconds,
        "udp_offered_mbps": iperf::UDP_OFFERED_MBPS,
        "latency_round_trips": latency::ROUND_TRIPS,
        "paths": {},
        "footprint": [],
    });
    traffic(&bins, &args, started, &mut results)?;

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
    results["total_seconds"] = json!(started.elapsed().as_secs_f64());
    report::finish(&root.join(&args.out), &root, &mut results)?;
    progress(started, "done");
    Ok(())
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

/// Every namespace scenario on one testbed, one after the other so that
/// they never share the CPUs. The overlay comes last: its programs stay on
/// the container veths until the testbed goes.
fn traffic(bins: &Path, args: &Args, started: Instant, results: &mut Value) -> Result<()> {
    progress(started, "building the namespace testbed");
    let mut t = Topology::build()?;
    let pingpong = bins.join("oak-bench-pingpong");
    let pingpong = pingpong.to_string_lossy().into_owned();
    let port = latency::PORT.to_string();
    for ns in [NsPath::clone(&t.c2.ns), NsPath::clone(&t.c3.ns)] {
        t.spawn(&ns, "iperf3", &["-s"], false)?;
        t.spawn(&ns, &pingpong, &["server", &port], true)?;
    }
    std::thread::sleep(Duration::from_millis(300));
    let (n1, n2, c1) = (
        NsPath::clone(&t.n1.ns),
        NsPath::clone(&t.n2.ns),
        NsPath::clone(&t.c1.ns),
    );
    let (remote, local) = (t.c2.ip4.clone(), t.c3.ip4.clone());
    let node = |h: u8| IpAddr::V4(Ipv4Addr::new(198, 51, 100, h));

    {
        // Removed when the guards go.
        let _routes = [
            n1.add_route(&Route::to("10.18.0.64/26")?.via(node(2)))?,
            n2.add_route(&Route::to("10.18.0.0/26")?.via(node(1)))?,
        ];
        measure(bins, args, started, results, "direct", &c1, &remote)?;
    }
    measure(bins, args, started, results, "bridge", &c1, &local)?;

    {
        // Flannel's vxlan backend: kernel VXLAN device per node, container
        // subnets routed over it. A point-to-point `remote` stands in for
        // flannel's per-peer FDB/neighbour entries; the data path is the same.
        // Deleting vx0 (when its guard goes) takes its address and route along.
        let vx = |ns: &NsPath, (local, remote): (u8, u8), addr: &str, peer: &str, subnet: &str| {
            let link = ns.add_vxlan(
                "vx0",
                &Vxlan {
                    vni: 1,
                    local: Ipv4Addr::new(198, 51, 100, local),
                    remote: Ipv4Addr::new(198, 51, 100, remote),
                    port: 8472,
                    dev: "eth0",
                },
            )?;
            ns.set_link(
                "vx0",
                &LinkSettings {
                    up: true,
                    mtu: Some(1450),
                    ..Default::default()
                },
            )?;
            ns.add_address("vx0", &format!("{addr}/30"))?.keep();
            ns.add_route(&Route::to(subnet)?.via(peer.parse()?).dev("vx0"))?
                .keep();
            anyhow::Ok(link)
        };
        let _vxlan = [
            vx(&n1, (1, 2), "172.31.0.1", "172.31.0.2", "10.18.0.64/26")?,
            vx(&n2, (2, 1), "172.31.0.2", "172.31.0.1", "10.18.0.0/26")?,
        ];
        measure(bins, args, started, results, "vxlan", &c1, &remote)?;
    }

    {
        progress(started, "starting the userspace TUN proxies");
        let proxy = bins
            .join("oak-bench-tunproxy")
            .to_string_lossy()
            .into_owned();
        let mut pids = Vec::new();
        for (ns, host) in [(&n1, 1), (&n2, 2)] {
            let cfg = json!({
                "tun": "oaktun0",
                "listen": format!("198.51.100.{host}:50104"),
                "instances": [
                    {"ns_ip": "10.18.0.2", "instance_ip": "10.30.0.3", "node": "198.51.100.1:50104"},
                    {"ns_ip": "10.18.0.3", "instance_ip": "10.30.0.4", "node": "198.51.100.1:50104"},
                    {"ns_ip": "10.18.0.66", "instance_ip": "10.30.0.5", "node": "198.51.100.2:50104"},
                ],
                "services": [["10.30.55.56", "10.18.0.66"]],
            });
            let file = t.file(&format!("tunproxy-n{host}.json"), &cfg.to_string())?;
            pids.push(t.spawn(ns, &proxy, &[&file], true)?);
        }
        // As upstream: the service range is routed into the TUN device
        // (which goes, with its route, when its proxy stops).
        for ns in [&n1, &n2] {
            ns.set_link(
                "oaktun0",
                &LinkSettings {
                    up: true,
                    mtu: Some(1450),
                    ..Default::default()
                },
            )?;
            ns.add_route(&Route::to("10.30.0.0/16")?.dev("oaktun0"))?
                .keep();
        }
        push_footprint(
            results,
            footprint::idle(
                "oak-bench-tunproxy (per node)",
                pids[0],
                Duration::from_secs(3),
            )?,
        );
        measure(bins, args, started, results, "tunproxy", &c1, "10.30.55.56")?;
        for pid in pids {
            t.stop(pid);
        }
    }

    progress(
        started,
        "starting the eBPF overlay (oak-static-dataplane on both nodes)",
    );
    let runner = bins
        .join("oak-static-dataplane")
        .to_string_lossy()
        .into_owned();
    let pin1 = t.pin_dir("n1");
    let pin2 = t.pin_dir("n2");
    let inst = |c: &testkit::Container, inst: &str, node: &str, local: bool| {
        if local {
            json!({"ns_ip": c.ip4, "instance_ip": inst, "node_ip": node, "veth": c.veth, "mac": c.mac})
        } else {
            json!({"ns_ip": c.ip4, "instance_ip": inst, "node_ip": node})
        }
    };
    let services = json!([
        {"ip": "10.30.55.56", "kind": "RR", "backends": ["10.18.0.66"]},
        {"ip": "10.30.55.57", "kind": "RR", "backends": ["10.18.0.3"]},
        {"ip": "10.30.0.3", "kind": "instance_ip", "backends": ["10.18.0.2"]},
        {"ip": "10.30.0.4", "kind": "instance_ip", "backends": ["10.18.0.3"]},
        {"ip": "10.30.0.5", "kind": "instance_ip", "backends": ["10.18.0.66"]},
    ]);
    let deferred: Vec<Value> = control_plane::deferred_addresses()
        .iter()
        .map(|a| json!({"ip": a, "kind": "RR", "backends": ["10.18.0.66"]}))
        .collect();
    let (a, b) = ("198.51.100.1", "198.51.100.2");
    let table1 = json!({
        "pin_dir": pin1, "uplink": "eth0", "node_ip": a,
        "service_ranges": [["10.30.0.0", 16]],
        "instances": [inst(&t.c1, "10.30.0.3", a, true), inst(&t.c3, "10.30.0.4", a, true),
                      inst(&t.c2, "10.30.0.5", b, false)],
        "services": services, "deferred_services": deferred,
    });
    let table2 = json!({
        "pin_dir": pin2, "uplink": "eth0", "node_ip": b,
        "service_ranges": [["10.30.0.0", 16]],
        "instances": [inst(&t.c1, "10.30.0.3", a, false), inst(&t.c3, "10.30.0.4", a, false),
                      inst(&t.c2, "10.30.0.5", b, true)],
        "services": services,
    });
    let f1 = t.file("overlay-n1.json", &table1.to_string())?;
    let f2 = t.file("overlay-n2.json", &table2.to_string())?;
    let pid1 = t.spawn(&n1, &runner, &[&f1], true)?;
    t.spawn(&n2, &runner, &[&f2], true)?;
    push_footprint(
        results,
        footprint::idle(
            "oak-static-dataplane (per node)",
            pid1,
            Duration::from_secs(3),
        )?,
    );
    results["map_memory_default_sizes"] = footprint::maps(&pin1, &netmanager_common::MAP_NAMES)?;
    measure(bins, args, started, results, "overlay", &c1, "10.30.55.56")?;
    measure(
        bins,
        args,
        started,
        results,
        "overlay_local",
        &c1,
        "10.30.55.57",
    )?;
    progress(
        started,
        "first-packet latency (connect to never-seen service IPs)",
    );
    results["control_plane"]["first_packet_connect_us"] =
        control_plane::first_packet(bins, &c1, "10.30.55.56")?;
    Ok(())
}

fn push_footprint(results: &mut Value, v: Value) {
    if let Some(a) = results["footprint"].as_array_mut() {
        a.push(v);
    }
}

fn measure(
    bins: &Path,
    args: &Args,
    started: Instant,
    results: &mut Value,
    name: &str,
    client: &NsPath,
    target: &str,
) -> Result<()> {
    let s = args.seconds;
    let step = |what: &str| progress(started, &format!("{name}: {what} -> {target}"));
    step("reachability");
    client
        .sh(&format!("busybox ping -c 2 -W 2 {target} >/dev/null"))
        .with_context(|| format!("{name}: {target} is not reachable"))?;
    step(&format!("TCP 1 stream, {s} s"));
    let tcp1 = iperf::tcp(client, target, 1, s)?;
    step(&format!("TCP 4 streams, {s} s"));
    let tcp4 = iperf::tcp(client, target, 4, s)?;
    step(&format!(
        "UDP {} Mbit/s offered, {s} s",
        iperf::UDP_OFFERED_MBPS
    ));
    let udp = iperf::udp(client, target, s)?;
    step(&format!("{} round trips", latency::ROUND_TRIPS));
    let rr = latency::round_trips(bins, client, target)?;
    results["paths"][name] =
        json!({"target": target, "tcp1": tcp1, "tcp4": tcp4, "udp": udp, "latency_us": rr});
    Ok(())
}
