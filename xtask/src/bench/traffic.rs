//! The traffic rows: every path of `rows::PATHS` in IPv4 and IPv6 (and per
//! uplink hook for the overlay), repeated in interleaved passes. Each pass
//! builds a fresh testbed and measures every row once, one after the
//! other, so no two scenarios share the CPUs and a slow period of the
//! (shared) machine spreads over all paths instead of hitting one.
//! The overlay comes last in a pass: its programs stay on the container
//! veths until the pass's testbed goes.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use testkit::netlink::{LinkSettings, Route, Vxlan};
use testkit::{Container, NsPath};

use super::rows::{self, Collector};
use super::run_stats;
use super::topology::Topology;
use super::{control_plane, cpu, footprint, iperf, latency, progress};

/// What a pass needs to know besides the testbed.
pub struct Plan<'a> {
    pub bins: &'a Path,
    pub seconds: u32,
    pub passes: u32,
    /// Uplink hooks the static dataplane runner can attach.
    pub hooks: Vec<String>,
}

/// Why a row is not measured, or None when it is.
pub fn unavailable(plan: &Plan, path: &str, family: &str, hook: Option<&str>) -> Option<String> {
    if path == "tunproxy" && family == "ipv6" {
        return Some(
            "the TUN proxy stand-in carries IPv4 only (as upstream's proxy table here)".into(),
        );
    }
    match hook {
        Some(h) if !plan.hooks.iter().any(|x| x == h) => Some(format!(
            "oak-static-dataplane cannot attach the uplink program at {h} on this build \
             (`oak-static-dataplane --hooks` lists {})",
            plan.hooks.join(", ")
        )),
        _ => None,
    }
}

/// Rows a pass measures.
fn measured(plan: &Plan) -> usize {
    rows::all()
        .iter()
        .filter(|(p, f, h)| unavailable(plan, p.name, f, *h).is_none())
        .count()
}

/// Progress lines with the position in the run and an estimate of the
/// time left for the traffic rows.
pub struct Progress {
    started: Instant,
    traffic_started: Instant,
    total: usize,
    done: usize,
    /// Seconds a row takes before any has finished (the iperf3 runs).
    prior: f64,
}

impl Progress {
    fn step(&self, key: &str, what: &str) {
        let eta = eta(
            self.traffic_started.elapsed().as_secs_f64(),
            self.done,
            self.total,
            self.prior,
        );
        progress(
            self.started,
            &format!(
                "[row {}/{}, traffic ETA {}] {key}: {what}",
                (self.done + 1).min(self.total),
                self.total,
                duration(eta)
            ),
        );
    }
}

/// Seconds left: the mean time of the rows done so far (or `prior` before
/// the first) times the rows left.
pub fn eta(elapsed: f64, done: usize, total: usize, prior: f64) -> f64 {
    let per_row = if done == 0 {
        prior
    } else {
        elapsed / done as f64
    };
    per_row * total.saturating_sub(done) as f64
}

/// 75 -> "1m15s", 8 -> "8s".
pub fn duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// All passes; returns the rows. `results` gets the idle footprint of the
/// runners, the map memory and the first-packet figures (first pass).
pub fn run(plan: &Plan, started: Instant, results: &mut Value) -> Result<Collector> {
    let mut rows = Collector::default();
    for (p, family, hook) in rows::all() {
        if let Some(reason) = unavailable(plan, p.name, family, hook) {
            rows.unavailable(&rows::key(p.name, family, hook), &reason);
        }
    }
    let mut prog = Progress {
        started,
        traffic_started: Instant::now(),
        total: measured(plan) * plan.passes as usize,
        done: 0,
        prior: f64::from(4 * plan.seconds + 3),
    };
    for pass in 0..plan.passes {
        progress(
            started,
            &format!(
                "pass {}/{}: building the namespace testbed",
                pass + 1,
                plan.passes
            ),
        );
        let mut p = Pass {
            plan,
            t: Topology::build()?,
            rows: &mut rows,
            prog: &mut prog,
            first: pass == 0,
            cost_site: None,
        };
        p.run(results)?;
    }
    Ok(rows)
}

struct Pass<'a> {
    plan: &'a Plan<'a>,
    t: Topology,
    rows: &'a mut Collector,
    prog: &'a mut Progress,
    first: bool,
    /// While the inter-node overlay rows run: where their programs are,
    /// for the per-packet cost runs.
    cost_site: Option<run_stats::Site>,
}

/// Service and instance addresses of the static overlay, per family:
/// (remote service -> c2, local service -> c3).
const SERVICES: [(&str, &str, &str); 2] = [
    ("ipv4", "10.30.55.56", "10.30.55.57"),
    ("ipv6", "fdff:2000::55:56", "fdff:2000::55:57"),
];

fn v6(c: &Container) -> String {
    c.ip6.clone()
}

impl Pass<'_> {
    fn run(&mut self, results: &mut Value) -> Result<()> {
        let pingpong = self.bin("oak-bench-pingpong");
        let port = latency::PORT.to_string();
        for ns in [NsPath::clone(&self.t.c2.ns), NsPath::clone(&self.t.c3.ns)] {
            self.t.spawn(&ns, "iperf3", &["-s"], false)?;
            self.t.spawn(&ns, &pingpong, &["server", &port], true)?;
        }
        std::thread::sleep(Duration::from_millis(300));
        let (n1, n2) = (NsPath::clone(&self.t.n1.ns), NsPath::clone(&self.t.n2.ns));
        let remote = [self.t.c2.ip4.clone(), v6(&self.t.c2)];
        let local = [self.t.c3.ip4.clone(), v6(&self.t.c3)];
        let node = |h: u8| IpAddr::V4(Ipv4Addr::new(198, 51, 100, h));
        let node6 = |h: u8| -> Result<IpAddr> { Ok(format!("2001:db8:100::{h}").parse()?) };

        {
            // Removed when the guards go.
            let _routes = [
                n1.add_route(&Route::to("10.18.0.64/26")?.via(node(2)))?,
                n2.add_route(&Route::to("10.18.0.0/26")?.via(node(1)))?,
                n1.add_route(&Route::to("fc00::40/122")?.via(node6(2)?))?,
                n2.add_route(&Route::to("fc00::/122")?.via(node6(1)?))?,
            ];
            self.both("direct", &remote)?;
        }
        self.both("bridge", &local)?;

        {
            // Flannel's vxlan backend: kernel VXLAN device per node, container
            // subnets routed over it. A point-to-point `remote` stands in for
            // flannel's per-peer FDB/neighbour entries; the data path is the same.
            // Deleting vx0 (when its guard goes) takes its addresses and routes along.
            let _vxlan = [
                vxlan(
                    &n1,
                    (1, 2),
                    ("172.31.0.1", "172.31.0.2", "10.18.0.64/26"),
                    ("fd31::1", "fd31::2", "fc00::40/122"),
                )?,
                vxlan(
                    &n2,
                    (2, 1),
                    ("172.31.0.2", "172.31.0.1", "10.18.0.0/26"),
                    ("fd31::2", "fd31::1", "fc00::/122"),
                )?,
            ];
            self.both("vxlan", &remote)?;
        }

        self.tunproxy(results, &n1, &n2)?;

        let hooks: Vec<String> = self.plan.hooks.clone();
        for (i, hook) in hooks.iter().enumerate() {
            self.overlay(results, hook, i == 0)?;
        }
        Ok(())
    }

    fn bin(&self, name: &str) -> String {
        self.plan.bins.join(name).to_string_lossy().into_owned()
    }

    /// The IPv4 and the IPv6 row of a path without hooks.
    fn both(&mut self, path: &str, targets: &[String; 2]) -> Result<()> {
        for (family, target) in rows::FAMILIES.iter().zip(targets) {
            self.row(path, family, None, target)?;
        }
        Ok(())
    }

    fn row(&mut self, path: &str, family: &str, hook: Option<&str>, target: &str) -> Result<()> {
        if unavailable(self.plan, path, family, hook).is_some() {
            return Ok(());
        }
        let key = rows::key(path, family, hook);
        let client = NsPath::clone(&self.t.c1.ns);
        let mut sample = measure(self.plan, self.prog, &key, &client, target)?;
        if let Some(site) = &self.cost_site {
            merge(
                &mut sample,
                &cost(self.plan, self.prog, &key, &client, target, site)?,
            );
        }
        self.rows.add(&key, target, &sample);
        self.prog.done += 1;
        Ok(())
    }

    fn tunproxy(&mut self, results: &mut Value, n1: &NsPath, n2: &NsPath) -> Result<()> {
        progress(self.prog.started, "starting the userspace TUN proxies");
        let proxy = self.bin("oak-bench-tunproxy");
        let mut pids = Vec::new();
        for (ns, host) in [(n1, 1), (n2, 2)] {
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
            let file = self
                .t
                .file(&format!("tunproxy-n{host}.json"), &cfg.to_string())?;
            pids.push(self.t.spawn(ns, &proxy, &[&file], true)?);
        }
        // As upstream: the service range is routed into the TUN device
        // (which goes, with its route, when its proxy stops).
        for ns in [n1, n2] {
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
        if self.first {
            push_footprint(
                results,
                footprint::idle(
                    "oak-bench-tunproxy (per node)",
                    pids[0],
                    Duration::from_secs(3),
                )?,
            );
        }
        self.row("tunproxy", "ipv4", None, "10.30.55.56")?;
        for pid in pids {
            self.t.stop(pid);
        }
        Ok(())
    }

    /// Both nodes' static dataplanes with the uplink program at `hook`,
    /// the overlay rows of that hook, and (with the first hook) the
    /// same-node rows and, in the first pass, the runner's footprint and
    /// first-packet figures. The pins go at the end, detaching everything.
    fn overlay(&mut self, results: &mut Value, hook: &str, first_hook: bool) -> Result<()> {
        progress(
            self.prog.started,
            &format!(
                "starting the eBPF overlay (oak-static-dataplane on both nodes, uplink at {hook})"
            ),
        );
        let (n1, n2) = (NsPath::clone(&self.t.n1.ns), NsPath::clone(&self.t.n2.ns));
        let pin1 = self.t.pin_dir("n1");
        let pin2 = self.t.pin_dir("n2");
        let mut extra = json!({});
        if hook != "tc" {
            extra["uplink_hook"] = json!(hook);
        }
        let deferred: Vec<Value> = if self.first && first_hook {
            control_plane::deferred_addresses()
                .iter()
                .map(|a| json!({"ip": a, "kind": "RR", "backends": ["10.18.0.66"]}))
                .collect()
        } else {
            Vec::new()
        };
        let mut table1 = overlay_table(&self.t, 1, &pin1.to_string_lossy());
        table1["deferred_services"] = json!(deferred);
        let mut table2 = overlay_table(&self.t, 2, &pin2.to_string_lossy());
        for t in [&mut table1, &mut table2] {
            merge(t, &extra);
        }
        let runner = self.bin("oak-static-dataplane");
        let f1 = self
            .t
            .file(&format!("overlay-n1-{hook}.json"), &table1.to_string())?;
        let f2 = self
            .t
            .file(&format!("overlay-n2-{hook}.json"), &table2.to_string())?;
        let pid1 = self.t.spawn(&n1, &runner, &[&f1], true)?;
        let pid2 = self.t.spawn(&n2, &runner, &[&f2], true)?;
        if self.first && first_hook {
            push_footprint(
                results,
                footprint::idle(
                    "oak-static-dataplane (per node)",
                    pid1,
                    Duration::from_secs(3),
                )?,
            );
        }
        self.cost_site = Some(run_stats::Site {
            floor_bin: self.plan.bins.join("oak-bench-floor"),
            n1: (NsPath::clone(&n1), pin1.clone()),
            n2: (NsPath::clone(&n2), pin2.clone()),
            container_veth: self.t.c1.veth.clone(),
        });
        let remote_rows = SERVICES
            .iter()
            .try_for_each(|(family, remote, _)| self.row("overlay", family, Some(hook), remote));
        self.cost_site = None;
        remote_rows?;
        if first_hook {
            for (family, _, local) in SERVICES {
                self.row("overlay_local", family, None, local)?;
            }
        }
        if self.first && first_hook {
            progress(
                self.prog.started,
                "first-packet latency (connect to never-seen service IPs)",
            );
            let c1 = NsPath::clone(&self.t.c1.ns);
            results["control_plane"]["first_packet_connect_us"] =
                control_plane::first_packet(self.plan.bins, &c1, SERVICES[0].1)?;
        }
        self.t.stop(pid1);
        self.t.stop(pid2);
        self.t.unpin(&pin1);
        self.t.unpin(&pin2);
        Ok(())
    }
}

fn merge(into: &mut Value, from: &Value) {
    for (k, v) in from.as_object().into_iter().flatten() {
        into[k] = v.clone();
    }
}

/// The static overlay's table for node `host` (1 or 2): c1 and c3 on node
/// 1, c2 on node 2, in both families; services 10.30.55.56 and
/// fdff:2000::55:56 lead to c2, 10.30.55.57 and fdff:2000::55:57 to c3.
pub fn overlay_table(t: &Topology, host: u8, pin_dir: &str) -> Value {
    let (a, b) = ("198.51.100.1", "198.51.100.2");
    let me = if host == 1 { a } else { b };
    let mut instances = Vec::new();
    for (c, inst4, inst6, node) in [
        (&t.c1, "10.30.0.3", "fdff::3", a),
        (&t.c3, "10.30.0.4", "fdff::4", a),
        (&t.c2, "10.30.0.5", "fdff::5", b),
    ] {
        for (ns_ip, inst) in [(c.ip4.clone(), inst4), (c.ip6.clone(), inst6)] {
            let mut i = json!({"ns_ip": ns_ip, "instance_ip": inst, "node_ip": node});
            if node == me {
                i["veth"] = json!(c.veth);
                i["mac"] = json!(c.mac);
            }
            instances.push(i);
        }
    }
    json!({
        "pin_dir": pin_dir, "uplink": "eth0", "node_ip": me,
        "service_ranges": [["10.30.0.0", 16], ["fdff::", 16]],
        "instances": instances,
        "services": [
            {"ip": "10.30.55.56", "kind": "RR", "backends": [t.c2.ip4]},
            {"ip": "10.30.55.57", "kind": "RR", "backends": [t.c3.ip4]},
            {"ip": "fdff:2000::55:56", "kind": "RR", "backends": [t.c2.ip6]},
            {"ip": "fdff:2000::55:57", "kind": "RR", "backends": [t.c3.ip6]},
            {"ip": "10.30.0.3", "kind": "instance_ip", "backends": [t.c1.ip4]},
            {"ip": "10.30.0.4", "kind": "instance_ip", "backends": [t.c3.ip4]},
            {"ip": "10.30.0.5", "kind": "instance_ip", "backends": [t.c2.ip4]},
            {"ip": "fdff::3", "kind": "instance_ip", "backends": [t.c1.ip6]},
            {"ip": "fdff::4", "kind": "instance_ip", "backends": [t.c3.ip6]},
            {"ip": "fdff::5", "kind": "instance_ip", "backends": [t.c2.ip6]},
        ],
    })
}

/// A VXLAN device `vx0` in `ns` with point-to-point addresses and a route
/// to the other node's container subnet, per family: (local, peer, subnet).
fn vxlan(
    ns: &NsPath,
    (local, remote): (u8, u8),
    v4: (&str, &str, &str),
    v6: (&str, &str, &str),
) -> Result<testkit::netlink::LinkGuard> {
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
    for ((addr, peer, subnet), len) in [(v4, 30), (v6, 126)] {
        ns.add_address("vx0", &format!("{addr}/{len}"))?.keep();
        ns.add_route(&Route::to(subnet)?.via(peer.parse()?).dev("vx0"))?
            .keep();
    }
    Ok(link)
}

fn push_footprint(results: &mut Value, v: Value) {
    if let Some(a) = results["footprint"].as_array_mut() {
        a.push(v);
    }
}

/// Runs `f` and returns its result with the CPUs the machine kept busy
/// meanwhile.
fn with_cpu<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    let before = cpu::now()?;
    let v = f()?;
    let after = cpu::now()?;
    Ok((v, cpu::busy_cpus(before, after, cpu::count())))
}

/// One repetition of one row: every figure of `rows::FIGURES`.
fn measure(
    plan: &Plan,
    prog: &Progress,
    key: &str,
    client: &NsPath,
    target: &str,
) -> Result<Value> {
    let s = plan.seconds;
    let step = |what: &str| prog.step(key, &format!("{what} -> {target}"));
    step("reachability");
    reachable(client, target).with_context(|| format!("{key}: {target} is not reachable"))?;
    step(&format!("TCP 1 stream, {s} s"));
    let (tcp1, cpu1) = with_cpu(|| iperf::tcp(client, target, 1, s))?;
    step(&format!("TCP 4 streams, {s} s"));
    let (tcp4, cpu4) = with_cpu(|| iperf::tcp(client, target, 4, s))?;
    step(&format!(
        "UDP {} Mbit/s offered, {s} s",
        iperf::UDP_OFFERED_MBPS
    ));
    let udp = iperf::udp(client, target, s)?;
    step(&format!(
        "UDP {}-byte datagrams, {} flows, unthrottled, {s} s",
        iperf::SMALL_LEN,
        iperf::SMALL_FLOWS
    ));
    let (small, cpu_small) = with_cpu(|| iperf::small(client, target, s))?;
    step(&format!("{} round trips", latency::ROUND_TRIPS));
    let rr = latency::round_trips(plan.bins, client, target)?;
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let per = |cpus: f64, rate: f64| if rate > 0.0 { cpus / rate } else { f64::NAN };
    let num = |v: f64| if v.is_finite() { json!(v) } else { Value::Null };
    Ok(json!({
        "tcp1_gbps": f(&tcp1["gbps"]),
        "tcp1_retransmits": f(&tcp1["retransmits"]),
        "tcp1_cpu_per_gbps": num(per(cpu1, f(&tcp1["gbps"]))),
        "tcp4_gbps": f(&tcp4["gbps"]),
        "tcp4_cpu_per_gbps": num(per(cpu4, f(&tcp4["gbps"]))),
        "udp_rx_mbps": f(&udp["received_mbps"]),
        "udp_loss_pct": f(&udp["loss_pct"]),
        "small_rx_kpps": num(f(&small["rx_kpps"])),
        "small_loss_pct": f(&small["loss_pct"]),
        "small_cpu_per_mpps": num(per(cpu_small, f(&small["rx_kpps"]) / 1e3)),
        "rr_p50_us": f(&rr["p50_us"]),
        "rr_p99_us": f(&rr["p99_us"]),
    }))
}

/// The per-packet cost runs of an inter-node overlay row (`run_stats`):
/// one TCP stream and the small-packet run again, with the kernel's BPF
/// statistics on and the floors attached.
fn cost(
    plan: &Plan,
    prog: &Progress,
    key: &str,
    client: &NsPath,
    target: &str,
    site: &run_stats::Site,
) -> Result<Value> {
    let s = plan.seconds;
    let probes =
        run_stats::Probes::attach(site).with_context(|| format!("{key}: the cost probes"))?;
    let _stats = run_stats::StatsSwitch::on()?;
    let mut out = json!({});
    prog.step(
        key,
        &format!("per-packet cost: TCP 1 stream, BPF statistics on, {s} s -> {target}"),
    );
    let before = probes.snapshot()?;
    iperf::tcp(client, target, 1, s)?;
    merge(
        &mut out,
        &probes.per_packet(&run_stats::TCP, &before, &probes.snapshot()?),
    );
    prog.step(
        key,
        &format!("per-packet cost: small packets, BPF statistics on, {s} s -> {target}"),
    );
    let before = probes.snapshot()?;
    iperf::small(client, target, s)?;
    merge(
        &mut out,
        &probes.per_packet(&run_stats::SMALL, &before, &probes.snapshot()?),
    );
    Ok(out)
}

/// A few pings: IPv6 addresses may still be settling when a pass starts.
fn reachable(client: &NsPath, target: &str) -> Result<()> {
    let six = if target.contains(':') { "-6 " } else { "" };
    let mut last = None;
    for _ in 0..5 {
        match client.sh(&format!("busybox ping {six}-c 1 -W 1 {target} >/dev/null")) {
            Ok(_) => return Ok(()),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no ping")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eta_uses_the_prior_until_a_row_is_done() {
        assert_eq!(eta(0.0, 0, 10, 23.0), 230.0);
        assert_eq!(eta(60.0, 3, 10, 23.0), 140.0);
        assert_eq!(eta(60.0, 10, 10, 23.0), 0.0);
    }

    #[test]
    fn durations_read_as_minutes_and_seconds() {
        assert_eq!(duration(8.4), "8s");
        assert_eq!(duration(75.0), "1m15s");
        assert_eq!(duration(-3.0), "0s");
    }
}
