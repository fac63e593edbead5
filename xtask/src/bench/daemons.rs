//! Control plane and footprint with the real daemons: a sandbox (the test kit's
//! cluster double, MQTT broker, two workers each running containerd, NetManager
//! and nodeengined in a namespace; `xtask::sandbox`) and busybox services
//! deployed through the cluster double, as the end-to-end tests do. Everything
//! runs twice: with mosquitto (when installed) and with the embedded rumqttd,
//! both with TCP_NODELAY on the broker side.
//!
//! - deploy -> CREATED: publishing `nodes/<id>/control/deploy` to the
//!   worker's `nodes/<id>/job` CREATED report (cluster double receive times);
//!   also deploy -> NetManager's `service/deployed` (its `/container/deploy`
//!   done).
//! - deploy -> reachable: from the same publish to the first successful TCP
//!   connect from a client container on the other worker to the new job's
//!   RR service IP. The client is already dialing when the deploy goes out
//!   (`PROBE_LEAD`; a new connect every 10 ms after a 250 ms connect
//!   timeout), so its first lookups fail and are negatively cached.
//! - first packet through the real miss path: services already running on
//!   worker 2, the client on worker 1 dials their RR IPs that its node never
//!   resolved (NetManager: miss -> table query to the cluster double -> maps ->
//!   reinject); TCP connect time, then a second connect to the now known IP,
//!   and NetManager's own lookup count and mean time on both workers.
//! - idle RSS and CPU of NetManager, nodeengined and containerd on worker 1.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use serde_json::{Value, json};
use testkit::{JobSpec, NsPath};
use xtask::sandbox::sample_services::{echo_server, idle};
use xtask::sandbox::workers::Binaries;
use xtask::sandbox::{Options, Sandbox};

use super::{footprint, progress};

/// Deploy/undeploy rounds for deploy -> CREATED / reachable.
const DEPLOYS: usize = 10;
/// Never-resolved services for the first-packet connects.
const FRESH: usize = 20;
/// The echo server's port (busybox httpd).
const PORT: u16 = 80;

/// The cluster's broker in one measurement round.
#[derive(Clone, Copy, PartialEq, Eq)]
enum BrokerKind {
    /// mosquitto with the kit's settings (`set_tcp_nodelay true`).
    Mosquitto,
    /// rumqttd in the bench process (`xtask::sandbox::broker`).
    Embedded,
}

impl BrokerKind {
    fn key(self) -> &'static str {
        match self {
            BrokerKind::Mosquitto => "mosquitto",
            BrokerKind::Embedded => "rumqttd",
        }
    }
}

/// Removes the run directory after the sandbox is gone.
struct RunDir(PathBuf);

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Every measurement once per broker: mosquitto (when installed) first,
/// then the embedded rumqttd, whose threads outlive their sandbox (so it
/// goes last). The idle footprint is taken in the first round only.
pub fn run(bins: &Path, started: Instant) -> Result<Value> {
    let mut kinds = Vec::new();
    if testkit::harness::which("mosquitto").is_some() {
        kinds.push(BrokerKind::Mosquitto);
    }
    kinds.push(BrokerKind::Embedded);
    let mut out = json!({"brokers": {}});
    for (i, kind) in kinds.into_iter().enumerate() {
        let round = run_with(bins, started, kind, i == 0)?;
        if let Some(fp) = round.get("footprint_worker1_idle") {
            out["footprint_worker1_idle"] = fp.clone();
        }
        out["brokers"][kind.key()] = round;
    }
    Ok(out)
}

/// `cargo xtask bench --only control-plane`: this section alone, printed
/// and written to `<out>/control-plane.json` (latest.json stays as the last
/// full run left it).
pub fn run_only(bins: &Path, out_dir: &Path, started: Instant) -> Result<()> {
    let d = run(bins, started)?;
    let mut s = String::new();
    table(&mut s, &d);
    println!("{s}");
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let path = out_dir.join("control-plane.json");
    std::fs::write(&path, serde_json::to_string_pretty(&d)?)
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

fn run_with(bins: &Path, started: Instant, kind: BrokerKind, footprint: bool) -> Result<Value> {
    let tag = match kind {
        BrokerKind::Mosquitto => "oakbm",
        BrokerKind::Embedded => "oakbe",
    };
    let prefix = format!("{tag}{}", std::process::id() % 100000);
    let run_dir = RunDir(PathBuf::from(format!("/run/oak-bench/{prefix}")));
    let options = Options {
        prefix: prefix.clone(),
        workers: 2,
        external_mosquitto: kind == BrokerKind::Mosquitto,
        run_dir: run_dir.0.clone(),
        bpf_prefix: format!("/sys/fs/bpf/{prefix}-"),
        bins: Binaries::in_dir(bins),
    };
    let say = |what: &str| progress(started, &format!("daemons ({}): {what}", kind.key()));
    let t0 = Instant::now();
    let sb = Sandbox::start(&options, &mut |step| say(step))?;
    let sandbox_up_s = t0.elapsed().as_secs_f64();
    let out = measure(&sb, &prefix, &say, footprint);
    say("tearing the sandbox down (workers, containers, namespaces, pins)");
    drop(sb);
    drop(run_dir);
    let mut out = out?;
    out["sandbox_start_s"] = json!(sandbox_up_s);
    Ok(out)
}

fn job(prefix: &str, service: &str) -> String {
    format!("{prefix}.bench.{service}.b")
}

fn measure(sb: &Sandbox, prefix: &str, say: &dyn Fn(&str), footprint: bool) -> Result<Value> {
    let c = &sb.cluster;
    let (w1, w2) = (sb.worker(1)?, sb.worker(2)?);
    let client = job(prefix, "client");
    c.deploy(&w1.id, &idle(&client), 0)?;
    c.wait_status(&client, 0, "CREATED", 1)?;
    let client_pid = w1
        .task_pid(&client, 0)
        .context("the client container is not running")?;

    // 1 + 2: deploy on worker 2, the client on worker 1 dials the new RR IP.
    let mut created = Vec::new();
    let mut nm_deployed = Vec::new();
    let mut reachable = Vec::new();
    for i in 0..DEPLOYS {
        say(&format!("deploy {}/{DEPLOYS} -> CREATED, reachable", i + 1));
        let name = job(prefix, &format!("web{i}"));
        let spec = server(&name, &w2.ns);
        let (rr, _) = c.service_ips(&name);
        let addr: SocketAddr = format!("{}:{PORT}", rr.0).parse()?;
        let probe = in_netns(client_pid, move || {
            probe_until(addr, Duration::from_secs(30))
        })?;
        // The client is dialing (and being refused: no instance yet) before
        // the deploy goes out.
        std::thread::sleep(PROBE_LEAD);
        let t0 = Instant::now();
        c.deploy(&w2.id, &spec, 0)?;
        c.wait_status(&name, 0, "CREATED", 1)?;
        let ok = probe
            .join()
            .map_err(|_| anyhow!("the probe thread panicked"))??;
        let ok = ok.with_context(|| format!("{} never answered on port {PORT}", rr.0))?;
        let ms = |t: Instant| t.saturating_duration_since(t0).as_secs_f64() * 1000.0;
        created.push(ms(c.status_time(&name, 0, "CREATED").context("CREATED")?));
        if let Some(t) = c.deployed_time(&name, 0) {
            nm_deployed.push(ms(t));
        }
        reachable.push(ms(ok));
        c.undeploy(&w2.id, &name, 0)?;
        c.wait_status(&name, 0, "UNDEPLOYED", 1)?;
        c.wait_instances(&name, 0)?;
    }

    // 3: services already up on worker 2, never resolved on worker 1.
    say(&format!(
        "first packet through the miss path ({FRESH} fresh services)"
    ));
    let mut targets = Vec::new();
    for i in 0..FRESH {
        let name = job(prefix, &format!("fresh{i}"));
        c.deploy(&w2.id, &server(&name, &w2.ns), 0)?;
        targets.push(name);
    }
    for name in &targets {
        c.wait_instances(name, 1)?;
    }
    // Let the servers bind and NetManager settle.
    std::thread::sleep(Duration::from_millis(500));
    let addrs: Vec<SocketAddr> = targets
        .iter()
        .map(|n| format!("{}:{PORT}", c.service_ips(n).0.0).parse())
        .collect::<Result<_, _>>()?;
    let before = [lookups(w1)?, lookups(w2)?];
    let connects = in_netns(client_pid, move || -> Result<(Vec<f64>, Vec<f64>)> {
        let mut fresh = Vec::new();
        let mut known = Vec::new();
        for a in &addrs {
            fresh.push(connect_us(a)?);
        }
        for a in &addrs {
            known.push(connect_us(a)?);
        }
        Ok((fresh, known))
    })?
    .join()
    .map_err(|_| anyhow!("the connect thread panicked"))???;
    let after = [lookups(w1)?, lookups(w2)?];
    let lookups_during = |i: usize| {
        let (n, us) = (after[i].0 - before[i].0, after[i].1 - before[i].1);
        json!({"count": n, "mean_us": if n > 0 { us as f64 / n as f64 } else { f64::NAN }})
    };

    let mut out = json!({
        "deploys": DEPLOYS,
        "deploy_to_created_ms": stats(&created),
        "deploy_to_netmanager_deployed_ms": stats(&nm_deployed),
        "deploy_to_reachable_ms": stats(&reachable),
        "first_packet_connect_us": {
            "never_resolved_service": stats(&connects.0),
            "known_service": stats(&connects.1),
            // NetManager's own lookups (miss -> table written) while the
            // first connects ran, by worker: where their time went.
            "lookups": {"worker1": lookups_during(0), "worker2": lookups_during(1)},
        },
    });
    out["deploy_steps_ms"] = deploy_steps(&w2.log("nodeengine"));
    if footprint {
        // 4: idle footprint on worker 1 (one container, the client).
        say("idle RSS/CPU of NetManager, nodeengined, containerd (3 s)");
        std::thread::sleep(Duration::from_secs(1));
        out["footprint_worker1_idle"] = idle_footprint(w1)?;
    }
    Ok(out)
}

/// Where nodeengined's one-at-a-time container deploys (the deploy ->
/// CREATED rounds, not the fresh services deployed all at once) went, mean
/// ms per step, from its `container running ... took=T ms (step ms, ...)`
/// log lines.
fn deploy_steps(log: &Path) -> Value {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut sums: Vec<(String, f64)> = Vec::new();
    let mut n = 0;
    let rounds = text
        .lines()
        .filter(|l| l.contains("container running") && l.contains(".bench.web"));
    for line in rounds {
        let Some(steps) = line
            .split_once("took=")
            .and_then(|(_, t)| t.split_once('('))
            .and_then(|(_, t)| t.split_once(')'))
            .map(|(t, _)| t)
        else {
            continue;
        };
        n += 1;
        for part in steps.split(", ") {
            let Some((name, ms)) = part.rsplit_once(' ') else {
                continue;
            };
            let ms: f64 = ms.parse().unwrap_or(f64::NAN);
            match sums.iter_mut().find(|(s, _)| s == name) {
                Some((_, sum)) => *sum += ms,
                None => sums.push((name.to_string(), ms)),
            }
        }
    }
    let steps: serde_json::Map<String, Value> = sums
        .into_iter()
        .map(|(name, sum)| (name, json!(sum / n as f64)))
        .collect();
    json!({"deploys": n, "mean_ms": steps})
}

/// (lookups finished, their summed time in us) from NetManager's status.
fn lookups(w: &xtask::sandbox::workers::Worker) -> Result<(u64, u64)> {
    let st = w.status().context("NetManager status")?;
    let l = &st["resolver"]["latency"];
    Ok((
        l["count"].as_u64().unwrap_or(0),
        l["sum_micros"].as_u64().unwrap_or(0),
    ))
}

/// How long the client dials before the deploy is published.
const PROBE_LEAD: Duration = Duration::from_millis(300);

fn idle_footprint(w: &xtask::sandbox::workers::Worker) -> Result<Value> {
    let pids = w.daemon_pids();
    let all = std::thread::scope(|s| {
        let handles: Vec<_> = pids
            .iter()
            .map(|(name, pid)| s.spawn(move || footprint::idle(name, *pid, Duration::from_secs(3))))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("footprint thread panicked"))?)
            .collect::<Result<Vec<Value>>>()
    })?;
    Ok(Value::Array(all))
}

/// The echo server under another job name, labelled with its node.
fn server(name: &str, node: &str) -> JobSpec {
    let mut s = echo_server(node);
    s.job_name = name.into();
    s
}

/// Runs `f` on a thread inside the network namespace of `pid`.
fn in_netns<T: Send + 'static>(
    pid: u32,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<std::thread::JoinHandle<Result<T>>> {
    NsPath::of_pid(pid)
        .spawn_within(f)
        .with_context(|| format!("entering the network namespace of {pid}"))
}

/// When a TCP connect to `addr` first succeeded (tries every 10 ms).
fn probe_until(addr: SocketAddr, timeout: Duration) -> Option<Instant> {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(250)).is_ok() {
            return Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

fn connect_us(a: &SocketAddr) -> Result<f64> {
    let t = Instant::now();
    let s = TcpStream::connect_timeout(a, Duration::from_secs(5))
        .with_context(|| format!("connecting to {a}"))?;
    let us = t.elapsed().as_secs_f64() * 1e6;
    drop(s);
    Ok(us)
}

fn stats(v: &[f64]) -> Value {
    if v.is_empty() {
        return Value::Null;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    // Nearest rank: with fewer than 100 samples p99 is the maximum.
    let q = |p: f64| s[((s.len() as f64 * p).ceil() as usize).clamp(1, s.len()) - 1];
    json!({"p50": q(0.5), "p99": q(0.99), "min": s[0], "max": s[s.len() - 1], "count": s.len(), "samples": v})
}

/// Goals of issue 14 (docs/performance.md, "Control plane").
const GOAL_FIRST_CONNECT_P50_MS: f64 = 5.0;
const GOAL_REACHABLE_P99_MS: f64 = 300.0;
const GOAL_CREATED_P50_MS: f64 = 100.0;

/// The section's lines of the bench summary, one block per broker.
pub fn table(s: &mut String, d: &Value) {
    let Some(brokers) = d["brokers"].as_object() else {
        return;
    };
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let _ = writeln!(
        s,
        "\nReal daemons (sandbox: cluster double + 2 workers with containerd, NetManager, nodeengined)"
    );
    for (broker, r) in brokers {
        let _ = writeln!(
            s,
            "  broker {broker} (sandbox up in {:.1} s)",
            f(&r["sandbox_start_s"])
        );
        let line = |s: &mut String, label: &str, v: &Value, scale: f64, goal: &str| {
            if v.is_null() {
                return;
            }
            let _ = writeln!(
                s,
                "    {label:<46}: p50 {:>8.1} ms, p99 {:>8.1}, min {:>8.1}, max {:>8.1} (n={}){goal}",
                f(&v["p50"]) * scale,
                f(&v["p99"]) * scale,
                f(&v["min"]) * scale,
                f(&v["max"]) * scale,
                v["count"]
            );
        };
        let fp = &r["first_packet_connect_us"];
        line(
            s,
            "first connect, never-resolved service (miss)",
            &fp["never_resolved_service"],
            1e-3,
            &format!("  goal p50 <= {GOAL_FIRST_CONNECT_P50_MS} ms"),
        );
        line(s, "connect, known service", &fp["known_service"], 1e-3, "");
        for w in ["worker1", "worker2"] {
            let l = &fp["lookups"][w];
            if !l.is_null() {
                let _ = writeln!(
                    s,
                    "      NetManager lookups on {w} meanwhile: {} (mean {:.2} ms miss -> table written)",
                    l["count"],
                    f(&l["mean_us"]) / 1e3
                );
            }
        }
        line(
            s,
            "deploy -> reachable (client already dialing)",
            &r["deploy_to_reachable_ms"],
            1.0,
            &format!("  goal p99 <= {GOAL_REACHABLE_P99_MS} ms"),
        );
        line(
            s,
            "deploy -> CREATED (local image)",
            &r["deploy_to_created_ms"],
            1.0,
            &format!("  goal p50 <= {GOAL_CREATED_P50_MS} ms"),
        );
        line(
            s,
            "deploy -> NetManager service/deployed",
            &r["deploy_to_netmanager_deployed_ms"],
            1.0,
            "",
        );
        let st = &r["deploy_steps_ms"];
        if let Some(steps) = st["mean_ms"].as_object().filter(|m| !m.is_empty()) {
            let parts: Vec<String> = steps
                .iter()
                .map(|(k, v)| format!("{k} {:.1}", f(v)))
                .collect();
            let _ = writeln!(
                s,
                "      nodeengined, mean of {} deploys (ms): {}",
                st["deploys"],
                parts.join(", ")
            );
        }
    }
    for p in d["footprint_worker1_idle"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "  idle {:<39} RSS {:>6} KiB, CPU {:.2} % over {:.1} s",
            p["daemon"].as_str().unwrap_or("?"),
            p["rss_kib"],
            f(&p["cpu_pct"]),
            f(&p["window_s"])
        );
    }
}
