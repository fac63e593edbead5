//! Bench-only (not part of the product): per-packet cost of each program
//! path through BPF_PROG_TEST_RUN, with the flow tables empty and filled,
//! and the cost of writing table entries into the maps. Prints one JSON
//! object on stdout, progress on stderr. Needs root and bpffs.
//!
//! Usage: `oak-bench-progcost PIN_DIR [FLOWS] [SERVICES]`.
//!
//! Why one run per call instead of the `repeat` count: the kernel runs a
//! repeated TC program on the *same* skb, and our programs rewrite it (the
//! first run encapsulates or translates, the next ones see an already
//! translated packet and take the pass-through path). So every path is timed
//! as the average of many single runs, using the kernel's own in-program
//! timing (syscall and copy overhead excluded); `repeat` is used only for
//! paths that leave the packet unchanged, as a cross-check.
//!
//! The bench runs in a network namespace of its own with a known underlay
//! (the packet fixtures' `FibNetns`): the send path asks the FIB for every
//! tunnelled packet, and BPF_PROG_TEST_RUN answers from the caller's
//! namespace.

#[path = "../../../netmanager/tests/packet_support/mod.rs"]
mod packet_support;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use aya::programs::TestRunOptions;
use netmanager::dataplane::{
    CONTAINER_PROGRAM, Dataplane, DataplaneConfig, InstanceEntry, LocalPort, MapSizes, ServiceKind,
    UPLINK_PROGRAM,
};
use oakestra_worker_tests::floor::Floor;
use packet_support::*;
use serde_json::{Value, json};

const NODE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const PEER_NODE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const NODE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const PEER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
const BACKEND_MAC: [u8; 6] = [0x02, 0, 0x0a, 0x12, 0, 0x03];
/// Single runs per measured path.
const RUNS: u32 = 20_000;
/// Distinct unknown addresses for the first-packet miss path.
const MISS_RUNS: u32 = 500;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("literal address")
}

/// Removes the pin directory even when the bench fails half way.
struct PinGuard(PathBuf);
impl Drop for PinGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let pin_dir = PathBuf::from(
        args.next()
            .context("usage: oak-bench-progcost PIN_DIR [FLOWS] [SERVICES]")?,
    );
    let flows: u32 = args
        .next()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let services: u32 = args
        .next()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(100_000);
    let netns = FibNetns::enter("progcost");
    let _ = std::fs::remove_dir_all(&pin_dir);
    let _guard = PinGuard(pin_dir.clone());
    let cfg = DataplaneConfig {
        pin_dir: pin_dir.clone(),
        uplink: String::new(),
        node_ip: IpAddr::V4(NODE),
        tunnel_port: 50103,
        tunnel_mtu: 1450,
        // 10.64.0.0/10 holds the bulk services: 10.30.0.0/16 is too small for 100k.
        // fdff::/16: the IPv6-inner rows (the packet fixtures' addresses).
        service_ranges: vec![
            (ip("10.30.0.0"), 16),
            (ip("10.64.0.0"), 10),
            (ip("fdff::"), 16),
        ],
        sizes: MapSizes {
            // LRU maps evict early when filled to the brim; headroom keeps the
            // filled state close to `flows` live entries.
            flows: flows + flows / 8,
            services: services + 1024,
            backends: 2 * (services + 1024),
            ..MapSizes::default()
        },
        miss_hold: 2,
        attach_mode: netmanager::dataplane::AttachMode::Auto,
        uplink_hook: Default::default(),
        xdp_mode: Default::default(),
        container_bridge: String::new(),
        trusted_peers: Vec::new(),
        // One container opens every flow here.
        flows_per_container: flows + flows / 8,
    };
    let t = Instant::now();
    let dp = Dataplane::open(&cfg).context("opening the dataplane")?;
    let open_ms = t.elapsed().as_secs_f64() * 1e3;
    dp.set_node_addresses(&[
        (IpAddr::V4(NODE), netns.ifindex("under0")),
        (IpAddr::V6(NODE_V6), netns.ifindex("under0")),
    ])?;
    let local = |ifindex, mac| Some(LocalPort { ifindex, mac });
    for (ns, inst, node, local) in [
        // ifindex 1: BPF_PROG_TEST_RUN runs the program on the loopback
        // device, so that is the veth the client's packets arrive on.
        (
            "10.18.0.2",
            "10.30.0.3",
            IpAddr::V4(NODE),
            local(1, CLIENT_MAC),
        ),
        (
            "10.18.0.3",
            "10.30.0.4",
            IpAddr::V4(NODE),
            local(8, BACKEND_MAC),
        ),
        ("10.18.0.130", "10.30.0.5", IpAddr::V4(PEER_NODE), None),
        // On a node reached over an IPv6 underlay (our extension).
        ("10.18.0.131", "10.30.0.6", IpAddr::V6(PEER_V6), None),
        // IPv6 inside, over the IPv4 underlay: the client and a remote
        // backend with IPv6 addresses.
        ("fc00::2", "fdff::3", IpAddr::V4(NODE), local(1, CLIENT_MAC)),
        ("fc00::82", "fdff::5", IpAddr::V4(PEER_NODE), None),
    ] {
        dp.upsert_instance(
            ip(ns),
            InstanceEntry {
                instance_ip: Some(ip(inst)),
                node_ip: node,
                node_port: 50103,
                local,
            },
        )?;
    }
    dp.upsert_service(
        ip("10.30.55.56"),
        ServiceKind::RoundRobin,
        &[ip("10.18.0.130")],
    )?;
    dp.upsert_service(
        ip("10.30.55.57"),
        ServiceKind::Closest,
        &[ip("10.18.0.3"), ip("10.18.0.130")],
    )?;
    dp.upsert_service(ip("10.30.0.5"), ServiceKind::Instance, &[ip("10.18.0.130")])?;
    dp.upsert_service(
        ip("10.30.55.58"),
        ServiceKind::RoundRobin,
        &[ip("10.18.0.131")],
    )?;
    dp.upsert_service(
        ip("fdff:2000::55:56"),
        ServiceKind::RoundRobin,
        &[ip("fc00::82")],
    )?;

    let mut paths = Vec::new();
    eprintln!("prog_cost: empty tables");
    measure_all(&dp, "empty", 0, &mut paths)?;

    // Control plane: each upsert is the full map write of one service
    // (backend slice, then the service entry), timed as the caller sees it.
    eprintln!("prog_cost: writing {services} services");
    let backend = [ip("10.18.0.130")];
    let mut upsert_us = Vec::with_capacity(services as usize);
    for i in 0..services {
        let svc = IpAddr::V4(bulk_service(i));
        let t = Instant::now();
        dp.upsert_service(svc, ServiceKind::RoundRobin, &backend)?;
        upsert_us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let upsert_all = stats(&mut upsert_us.clone());
    let upsert_first = stats(&mut upsert_us[..1000.min(upsert_us.len())].to_vec());
    let upsert_last = stats(&mut upsert_us[upsert_us.len().saturating_sub(1000)..].to_vec());

    // Fill the flow tables the way traffic does: one new flow per run.
    eprintln!("prog_cost: creating {flows} flows");
    let t = Instant::now();
    let mut shot = 0u32;
    for i in 0..flows {
        let sport = 1024 + (i % 60_000) as u16;
        let svc = bulk_service(i / 60_000);
        // Distinct destination ports too: the reverse key has no service
        // address, so only (port pair) variety fills REVERSE_FLOWS.
        let dport = 1000 + (i / 60_000) as u16;
        let frame = from_container(&Ip::new("10.18.0.2", &svc.to_string(), tcp(sport, dport)));
        if run_once(&dp, CONTAINER_PROGRAM, &frame)?.0 != 7 {
            shot += 1;
        }
        if i % 200_000 == 199_999 {
            eprintln!("prog_cost:   {} flows", i + 1);
        }
    }
    let fill_s = t.elapsed().as_secs_f64();
    let status = dp.status()?;
    let fill: Vec<Value> = status
        .maps
        .iter()
        .map(|(n, e, m)| json!({"map": n, "entries": e, "max_entries": m}))
        .collect();

    eprintln!("prog_cost: filled tables");
    measure_all(&dp, "filled", 1, &mut paths)?;

    let out = json!({
        "runs_per_path": RUNS,
        "open_ms": open_ms,
        "paths": paths,
        "fill": {
            "flows_requested": flows,
            "services": services,
            "seconds": fill_s,
            "not_redirected": shot,
            "maps": fill,
        },
        "upsert_service_us": {
            "all": upsert_all,
            "first_1000": upsert_first,
            "last_1000": upsert_last,
        },
    });
    println!("{out}");
    Ok(())
}

/// 10.64.0.0 + i: the bulk service addresses.
fn bulk_service(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 0)) + i)
}

fn tcp(sport: u16, dport: u16) -> L4 {
    L4::Tcp {
        sport,
        dport,
        flags: 0x10,
        payload: vec![0x42; 64],
    }
}

/// 64 bytes of UDP payload, as the real-traffic bench sends.
fn udp64(sport: u16) -> L4 {
    L4::Udp {
        sport,
        dport: 5201,
        payload: vec![0x42; 64],
    }
}

fn tunnel(inner: &Ip) -> Vec<u8> {
    eth(
        [0xaa; 6],
        [0xbb; 6],
        0x0800,
        &tunnel_datagram(PEER_NODE, NODE, 50103, 50103, &inner.bytes()),
    )
}

fn run_once(dp: &Dataplane, program: &str, frame: &[u8]) -> Result<(u32, u64)> {
    run(dp, program, frame, 1)
}

/// (verdict, kernel-measured ns per run)
fn run(dp: &Dataplane, program: &str, frame: &[u8], repeat: u32) -> Result<(u32, u64)> {
    let mut out = vec![0u8; 4096];
    let r = dp.test_run(
        program,
        TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat,
            ..Default::default()
        },
    )?;
    Ok((r.return_value, r.duration.as_nanos() as u64))
}

/// Average kernel time of `RUNS` single runs of `frame(i)`.
fn single_runs(
    dp: &Dataplane,
    program: &str,
    runs: u32,
    frame: impl Fn(u32) -> Vec<u8>,
) -> Result<(f64, u32)> {
    let mut total = 0u64;
    let mut verdict = 0;
    for i in 0..runs {
        let (v, ns) = run_once(dp, program, &frame(i))?;
        total += ns;
        verdict = v;
    }
    Ok((total as f64 / runs as f64, verdict))
}

fn measure_all(dp: &Dataplane, tables: &str, phase: u32, paths: &mut Vec<Value>) -> Result<()> {
    let mut record = |path: &str, method: &str, ns: f64, verdict: u32| {
        eprintln!("prog_cost:   {path:<28} {tables:<6} {ns:>7.1} ns/packet ({method})");
        paths.push(json!({"path": path, "tables": tables, "method": method,
            "ns_per_packet": ns, "verdict": verdict}));
    };
    let remote = from_container(&Ip::new("10.18.0.2", "10.30.55.56", tcp(40000, 80)));
    // The floor: a program that does nothing, run the same way on the same
    // frame; the paths below are compared with it.
    let floor = Floor::load()?;
    let mut total = 0u64;
    for _ in 0..RUNS {
        total += floor.test_run_ns(&remote)?;
    }
    record(
        "floor_do_nothing",
        "single",
        total as f64 / RUNS as f64,
        u32::MAX,
    );
    run_once(dp, CONTAINER_PROGRAM, &remote)?; // creates the flow
    let (ns, v) = single_runs(dp, CONTAINER_PROGRAM, RUNS, |_| remote.clone())?;
    record("egress_remote_cached_flow", "single", ns, v);

    // The same flow's first packet after any INSTANCES change (a new
    // INSTANCE_EPOCH): its sender and backend are looked up again and
    // their copies in the flow entry refreshed. The change, made between
    // the runs, is the local backend's MAC flipping.
    let mut total = 0u64;
    let mut verdict = 0;
    for i in 0..2000u32 {
        let mut mac = BACKEND_MAC;
        mac[5] ^= (i & 1) as u8;
        dp.upsert_instance(
            ip("10.18.0.3"),
            InstanceEntry {
                instance_ip: Some(ip("10.30.0.4")),
                node_ip: IpAddr::V4(NODE),
                node_port: 50103,
                local: Some(LocalPort { ifindex: 8, mac }),
            },
        )?;
        let (v, ns) = run_once(dp, CONTAINER_PROGRAM, &remote)?;
        total += ns;
        verdict = v;
    }
    record(
        "egress_remote_cached_flow_new_epoch",
        "single",
        total as f64 / 2000.0,
        verdict,
    );

    // New flows: fresh source ports the fill never used (it stops at 61023).
    let base = 61_100 + phase as u16 * 2000;
    let (ns, v) = single_runs(dp, CONTAINER_PROGRAM, 2000, |i| {
        from_container(&Ip::new(
            "10.18.0.2",
            "10.30.55.56",
            tcp(base + i as u16, 81),
        ))
    })?;
    record("egress_remote_new_flow", "single", ns, v);

    let local = from_container(&Ip::new("10.18.0.2", "10.30.55.57", tcp(40001, 80)));
    run_once(dp, CONTAINER_PROGRAM, &local)?;
    let (ns, v) = single_runs(dp, CONTAINER_PROGRAM, RUNS, |_| local.clone())?;
    record("egress_local_cached_flow", "single", ns, v);

    // The reply to the remote flow above: this node owns it.
    let owned = tunnel(&Ip::new("10.30.0.5", "10.18.0.2", tcp(80, 40000)));
    let (ns, v) = single_runs(dp, UPLINK_PROGRAM, RUNS, |_| owned.clone())?;
    record("ingress_owned_flow", "single", ns, v);

    let unowned = tunnel(&Ip::new("10.30.0.5", "10.18.0.2", tcp(5555, 80)));
    let (ns, v) = single_runs(dp, UPLINK_PROGRAM, RUNS, |_| unowned.clone())?;
    record("ingress_unowned_flow", "single", ns, v);

    // The same two over an IPv6 underlay: outer IPv6 with its UDP checksum.
    let remote6 = from_container(&Ip::new("10.18.0.2", "10.30.55.58", tcp(40005, 80)));
    run_once(dp, CONTAINER_PROGRAM, &remote6)?;
    let (ns, v) = single_runs(dp, CONTAINER_PROGRAM, RUNS, |_| remote6.clone())?;
    record("egress_remote_v6_underlay_cached_flow", "single", ns, v);
    let owned6 = eth(
        [0xaa; 6],
        [0xbb; 6],
        0x86dd,
        &tunnel_datagram_v6(
            PEER_V6,
            NODE_V6,
            40000,
            50103,
            &Ip::new("10.30.0.6", "10.18.0.2", tcp(80, 40005)).bytes(),
        ),
    );
    let (ns, v) = single_runs(dp, UPLINK_PROGRAM, RUNS, |_| owned6.clone())?;
    record("ingress_v6_underlay_owned_flow", "single", ns, v);

    // IPv6 inside (IPv4 underlay): the same two paths with the IPv6
    // translation, and 64-byte UDP both ways in, the bench's small-packet
    // case, so the programs' share of the IPv6 gap can be told from noise.
    let remote_v6 = from_container(&Ip::new("fc00::2", "fdff:2000::55:56", tcp(40006, 80)));
    run_once(dp, CONTAINER_PROGRAM, &remote_v6)?;
    let (ns, v) = single_runs(dp, CONTAINER_PROGRAM, RUNS, |_| remote_v6.clone())?;
    record("egress_remote_v6_inner_cached_flow", "single", ns, v);
    let owned_v6 = tunnel(&Ip::new("fdff::5", "fc00::2", tcp(80, 40006)));
    let (ns, v) = single_runs(dp, UPLINK_PROGRAM, RUNS, |_| owned_v6.clone())?;
    record("ingress_v6_inner_owned_flow", "single", ns, v);
    for (path, src, dst) in [
        (
            "egress_remote_udp64_cached_flow",
            "10.18.0.2",
            "10.30.55.56",
        ),
        (
            "egress_remote_v6_inner_udp64_cached_flow",
            "fc00::2",
            "fdff:2000::55:56",
        ),
    ] {
        let frame = from_container(&Ip::new(src, dst, udp64(40007)));
        run_once(dp, CONTAINER_PROGRAM, &frame)?;
        let (ns, v) = single_runs(dp, CONTAINER_PROGRAM, RUNS, |_| frame.clone())?;
        record(path, "single", ns, v);
    }

    // First packet to an unknown service: held in PENDING and reported
    // through the ring buffer (nobody resolves it here).
    let (ns, v) = single_runs(dp, CONTAINER_PROGRAM, MISS_RUNS, |i| {
        let a = Ipv4Addr::new(
            10,
            30,
            200 + (phase * 4 + i / 250) as u8,
            (i % 250) as u8 + 1,
        );
        from_container(&Ip::new("10.18.0.2", &a.to_string(), tcp(40002, 80)))
    })?;
    record("miss_first_packet_held", "single", ns, v);

    // Unknown service beyond the hold limit: dropped, packet unchanged, so
    // `repeat` is valid here.
    let over = from_container(&Ip::new("10.18.0.2", "10.30.199.1", tcp(40003, 80)));
    for _ in 0..3 {
        run_once(dp, CONTAINER_PROGRAM, &over)?;
    }
    let (ns, v) = single_runs(dp, CONTAINER_PROGRAM, RUNS, |_| over.clone())?;
    record("miss_over_hold_limit_drop", "single", ns, v);
    let (v, ns) = run(dp, CONTAINER_PROGRAM, &over, RUNS * 10)?;
    record("miss_over_hold_limit_drop", "repeat", ns as f64, v);

    // Not service traffic: handed to the stack untouched.
    let plain = from_container(&Ip::new("10.18.0.2", "192.0.2.9", tcp(40004, 80)));
    let (ns, v) = single_runs(dp, CONTAINER_PROGRAM, RUNS, |_| plain.clone())?;
    record("pass_non_service", "single", ns, v);
    let (v, ns) = run(dp, CONTAINER_PROGRAM, &plain, RUNS * 10)?;
    record("pass_non_service", "repeat", ns as f64, v);
    Ok(())
}

fn stats(v: &mut [f64]) -> Value {
    v.sort_by(f64::total_cmp);
    let pct = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    json!({"count": v.len(), "mean": v.iter().sum::<f64>() / v.len() as f64,
        "p50": pct(0.5), "p99": pct(0.99), "max": pct(1.0)})
}
