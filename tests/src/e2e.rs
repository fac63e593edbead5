//! Support for the end-to-end suite (`tests/e2e_*.rs`): a private sandbox
//! per test -- its own underlay, cluster double, mosquitto, workers,
//! containerd namespaces and bpffs pins, all named after a unique prefix
//! so tests run in parallel -- removed on drop. Its tests need root, bpffs,
//! mosquitto, containerd, busybox, nft and python3.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};
use testkit::{NsPath, Proc, wait_for};
use xtask::sandbox::sample_services::{echo_server, idle};
use xtask::sandbox::workers::{Binaries, Worker};
use xtask::sandbox::{Options, Sandbox};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A sandbox that removes its run directory after everything else (fields
/// drop in declaration order).
pub struct E2e {
    pub sb: Sandbox,
    /// Prefix for job names, unique to this test.
    pub app: String,
    _run_dir: RunDir,
}

impl Drop for E2e {
    /// What a failure needs explained: each daemon's log tail and the
    /// cluster double's transcript. Printed at once when panicking; kept
    /// for the harness otherwise, which shows it only if the test fails.
    fn drop(&mut self) {
        let report = self.diagnostics();
        if std::thread::panicking() {
            eprintln!("{report}");
        } else {
            testkit::harness::on_failure(report);
        }
    }
}

impl E2e {
    fn diagnostics(&self) -> String {
        let mut out = String::new();
        for w in &self.sb.workers {
            for d in ["nodeengine", "netmanager"] {
                let log = std::fs::read_to_string(w.log(d)).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                out.push_str(&format!("---- worker {} {d} (tail) ----\n", w.index));
                for l in tail.iter().rev() {
                    out.push_str(l);
                    out.push('\n');
                }
            }
        }
        out.push_str("---- cluster double (last messages) ----\n");
        let transcript = self.sb.cluster.transcript();
        let last: Vec<&str> = transcript.lines().rev().take(60).collect();
        for l in last.iter().rev() {
            out.push_str(l);
            out.push('\n');
        }
        out
    }
}

impl E2e {
    /// Starts `workers` workers.
    pub fn start(tag: &str, workers: u8) -> Result<E2e> {
        let prefix = format!(
            "oe{tag}{}{}",
            std::process::id() % 10000,
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let run_dir = PathBuf::from(format!("/run/oak-e2e/{prefix}"));
        let options = Options {
            prefix: prefix.clone(),
            workers,
            // Stoppable, and exits with the test (rumqttd would outlive it).
            external_mosquitto: true,
            run_dir: run_dir.clone(),
            bpf_prefix: format!("/sys/fs/bpf/{prefix}-"),
            bins: binaries()?,
        };
        let sb = Sandbox::start(&options, &mut |step| eprintln!("[{prefix}] {step}"))?;
        Ok(E2e {
            sb,
            app: prefix,
            _run_dir: RunDir(run_dir),
        })
    }

    /// A job name unique to this test.
    pub fn job(&self, service: &str) -> String {
        format!("{}.e2e.{service}.t", self.app)
    }

    pub fn worker(&self, n: u8) -> &Worker {
        &self.sb.workers[usize::from(n) - 1]
    }

    /// The usual starting point: an echo server (job "web", instance 0) on
    /// worker 1 and an idle client (job "client", instance 0) on worker 2,
    /// both running. Returns the two job names and the server's RR address.
    pub fn web_and_client(&self) -> Result<(String, String, String)> {
        let (job, client) = (self.job("web"), self.job("client"));
        let mut spec = echo_server("w1");
        spec.job_name = job.clone();
        let c = &self.sb.cluster;
        c.deploy(&self.worker(1).id, &spec, 0)?;
        c.deploy(&self.worker(2).id, &idle(&client), 0)?;
        c.wait_instances(&job, 1)?;
        c.wait_status(&client, 0, "CREATED", 1)?;
        let (rr, _) = c.service_ips(&job);
        Ok((job, client, rr.0))
    }
}

/// Removes a directory on drop.
pub struct RunDir(pub PathBuf);

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// NetManager and nodeengined: `OAK_E2E_BIN_DIR`, else next to the tests.
pub fn binaries() -> Result<Binaries> {
    let dir = std::env::var_os("OAK_E2E_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::binary("NetManager").with_file_name(""));
    let bins = Binaries::in_dir(&dir);
    for b in [&bins.netmanager, &bins.nodeengined] {
        if !b.exists() {
            bail!(
                "{} is missing: `cargo build -p netmanager -p nodeengine` (or set OAK_E2E_BIN_DIR)",
                b.display()
            );
        }
    }
    Ok(bins)
}

/// The network namespace of instance `n` of `job` on `w`.
pub fn instance_ns(w: &Worker, job: &str, n: u64) -> Result<NsPath> {
    let pid = w
        .task_pid(job, n)
        .with_context(|| format!("{job}.instance.{n} is not running on {}", w.ns))?;
    Ok(NsPath::of_pid(pid))
}

/// Runs `cmd` (sh) inside the network namespace of instance `n` of `job`.
pub fn in_instance(w: &Worker, job: &str, n: u64, cmd: &str) -> Result<String> {
    instance_ns(w, job, n)?.sh(cmd)
}

/// Starts a long-running program in instance `n`'s network namespace.
pub fn spawn_in_instance(w: &Worker, job: &str, n: u64, args: &[&str]) -> Result<Proc> {
    let (program, rest) = args.split_first().context("an empty command")?;
    let mut cmd = instance_ns(w, job, n)?.command(program)?;
    cmd.args(rest);
    Proc::spawn_logged(program, cmd, &w.dir.join("test-programs.log"))
}

/// The Python stream scripts.
pub fn script(name: &str) -> String {
    format!("{}/scripts/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Starts stream_server.py on port 8080 in each listed instance and waits
/// until it listens.
pub fn stream_servers(w: &Worker, job: &str, instances: &[u64]) -> Result<Vec<Proc>> {
    let mut procs = Vec::new();
    for &n in instances {
        procs.push(spawn_in_instance(
            w,
            job,
            n,
            &["python3", &script("stream_server.py"), "0.0.0.0", "8080"],
        )?);
        wait_for("stream server", std::time::Duration::from_secs(10), || {
            in_instance(w, job, n, "busybox netstat -ltn | grep -q :8080").is_ok()
        })?;
    }
    Ok(procs)
}

/// Sends `size` bytes to `ip:8080` from instance `n`; checks the hash.
pub fn stream(w: &Worker, job: &str, n: u64, ip: &str, size: usize) -> Result<()> {
    let out = in_instance(
        w,
        job,
        n,
        &format!(
            "timeout 60 python3 {} {ip} 8080 {size}",
            script("stream_client.py")
        ),
    )?;
    anyhow::ensure!(out.starts_with("ok"), "stream to {ip}: {out}");
    Ok(())
}

/// GET `http://ip/` from inside instance `n`'s network namespace with the
/// workers' shared HTTP client; returns the body's last line.
pub fn http_get(w: &Worker, job: &str, n: u64, ip: &str) -> Result<String> {
    // `ip` may come bracketed ([v6]); a URL wants it so.
    let bare = ip.trim_start_matches('[').trim_end_matches(']');
    let host = if bare.contains(':') {
        format!("[{bare}]")
    } else {
        bare.to_string()
    };
    let answer = instance_ns(w, job, n)?.http_get(
        &format!("http://{host}:80/"),
        std::time::Duration::from_secs(3),
    )?;
    let body = answer.text().into_owned();
    let last = body.lines().last().unwrap_or("").trim().to_string();
    anyhow::ensure!(
        answer.status.is_success() && last.starts_with("hello from"),
        "no answer from {ip}: {} {body:?}",
        answer.status
    );
    Ok(last)
}

/// Retries `f` for up to 20 s: the first packets of a flow to a service
/// can wait on a table query, and routes follow `updates_available`.
pub fn eventually<T>(what: &str, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if std::time::Instant::now() > deadline => {
                return Err(e.context(format!("{what} (gave up after 20 s)")));
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(300)),
        }
    }
}

/// `count` hashed streams of `size` bytes to `ip:8080`, one after the
/// other, from a background thread (so daemons can be restarted meanwhile).
pub fn stream_loop(
    w: &Worker,
    job: &str,
    n: u64,
    ip: &str,
    count: u32,
    size: usize,
) -> Result<std::thread::JoinHandle<Result<String>>> {
    let ns = instance_ns(w, job, n)?;
    let cmd = format!(
        "for i in $(seq {count}); do timeout 60 python3 {} {ip} 8080 {size} || exit 1; done",
        script("stream_client.py")
    );
    Ok(std::thread::spawn(move || ns.sh(&cmd)))
}
