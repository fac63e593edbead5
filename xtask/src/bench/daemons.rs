//! Control plane and footprint with the real daemons: a sandbox (the test kit's
//! cluster double, MQTT broker, two workers each running containerd, NetManager
//! and nodeengined in a namespace; `xtask::sandbox`) and busybox services
//! deployed through the cluster double, as the end-to-end tests do.
//!
//! - deploy -> CREATED: publishing `nodes/<id>/control/deploy` to the
//!   worker's `nodes/<id>/job` CREATED report (cluster double receive times);
//!   also deploy -> NetManager's `service/deployed` (its `/container/deploy`
//!   done).
//! - deploy -> reachable: from the same publish to the first successful TCP
//!   connect from a client container on the other worker to the new job's
//!   RR service IP (the client retries every 10 ms, 250 ms connect timeout).
//! - first packet through the real miss path: services already running on
//!   worker 2, the client on worker 1 dials their RR IPs that its node never
//!   resolved (NetManager: miss -> table query to the cluster double -> maps ->
//!   reinject); TCP connect time, then a second connect to the now known IP.
//! - idle RSS and CPU of NetManager, nodeengined and containerd on worker 1.

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
const DEPLOYS: usize = 5;
/// Never-resolved services for the first-packet connects.
const FRESH: usize = 5;
/// The echo server's port (busybox httpd).
const PORT: u16 = 80;

/// Removes the run directory after the sandbox is gone.
struct RunDir(PathBuf);

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn run(bins: &Path, started: Instant) -> Result<Value> {
    let prefix = format!("oakbd{}", std::process::id() % 100000);
    let run_dir = RunDir(PathBuf::from(format!("/run/oak-bench/{prefix}")));
    let options = Options {
        prefix: prefix.clone(),
        workers: 2,
        // Stoppable with the sandbox (rumqttd's thread would outlive it).
        external_mosquitto: testkit::harness::which("mosquitto").is_some(),
        run_dir: run_dir.0.clone(),
        bpf_prefix: format!("/sys/fs/bpf/{prefix}-"),
        bins: Binaries::in_dir(bins),
    };
    let t0 = Instant::now();
    let sb = Sandbox::start(&options, &mut |step| {
        progress(started, &format!("daemons: {step}"))
    })?;
    let sandbox_up_s = t0.elapsed().as_secs_f64();
    let out = measure(&sb, &prefix, started);
    progress(
        started,
        "daemons: tearing the sandbox down (workers, containers, namespaces, pins)",
    );
    drop(sb);
    drop(run_dir);
    let mut out = out?;
    out["sandbox_start_s"] = json!(sandbox_up_s);
    Ok(out)
}

fn job(prefix: &str, service: &str) -> String {
    format!("{prefix}.bench.{service}.b")
}

fn measure(sb: &Sandbox, prefix: &str, started: Instant) -> Result<Value> {
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
        progress(
            started,
            &format!("daemons: deploy {}/{DEPLOYS} -> CREATED, reachable", i + 1),
        );
        let name = job(prefix, &format!("web{i}"));
        let spec = server(&name, &w2.ns);
        let (rr, _) = c.service_ips(&name);
        let addr: SocketAddr = format!("{}:{PORT}", rr.0).parse()?;
        let probe = in_netns(client_pid, move || {
            probe_until(addr, Duration::from_secs(30))
        })?;
        let t0 = Instant::now();
        c.deploy(&w2.id, &spec, 0)?;
        c.wait_status(&name, 0, "CREATED", 1)?;
        let ok = probe
            .join()
            .map_err(|_| anyhow!("the probe thread panicked"))??;
        let ok = ok.with_context(|| format!("{} never answered on port {PORT}", rr.0))?;
        let ms = |t: Instant| t.duration_since(t0).as_secs_f64() * 1000.0;
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
    progress(
        started,
        &format!("daemons: first packet through the miss path ({FRESH} fresh services)"),
    );
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
    let connects = in_netns(client_pid, move || -> Result<(Vec<f64>, Vec<f64>)> {
        let mut fresh = Vec::new();
        let mut known = Vec::new();
        for a in &addrs {
            fresh.push(connect_us(a)?);
        }
        for _ in 0..4 {
            for a in &addrs {
                known.push(connect_us(a)?);
            }
        }
        Ok((fresh, known))
    })?
    .join()
    .map_err(|_| anyhow!("the connect thread panicked"))???;

    // 4: idle footprint on worker 1 (one container, the client).
    progress(
        started,
        "daemons: idle RSS/CPU of NetManager, nodeengined, containerd (3 s)",
    );
    std::thread::sleep(Duration::from_secs(1));
    let pids = w1.daemon_pids();
    let footprints = std::thread::scope(|s| {
        let handles: Vec<_> = pids
            .iter()
            .map(|(name, pid)| s.spawn(move || footprint::idle(name, *pid, Duration::from_secs(3))))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("footprint thread panicked"))?)
            .collect::<Result<Vec<Value>>>()
    })?;

    Ok(json!({
        "deploys": DEPLOYS,
        "deploy_to_created_ms": stats(&created),
        "deploy_to_netmanager_deployed_ms": stats(&nm_deployed),
        "deploy_to_reachable_ms": stats(&reachable),
        "first_packet_connect_us": {
            "never_resolved_service": stats(&connects.0),
            "known_service": stats(&connects.1),
        },
        "footprint_worker1_idle": footprints,
    }))
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
    let q = |p: f64| s[((s.len() - 1) as f64 * p).round() as usize];
    json!({"p50": q(0.5), "min": s[0], "max": s[s.len() - 1], "count": s.len(), "samples": v})
}
