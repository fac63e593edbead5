//! `cargo xtask sandbox [--workers N] [--external-mosquitto]`, `cargo
//! xtask sandbox down`, and the workbench commands that talk to a running
//! sandbox: `deploy SLA.json`, `ps`, `logs`, `scale`, `undeploy`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use testkit::cluster::REGISTRATION_PORT;
use testkit::netns::{delete_named, list_named};
use testkit::runners::containerd::cleanup_leftovers;
use testkit::topology::UNDERLAY_GATEWAY;
use worker_common::privileges::require_root;

use super::broker::MQTT_PORT;
use super::control::{ControlClient, ControlServer, SOCKET};
use super::sample_services::{CLIENT_JOB, SERVER_JOB, client, echo_server};
use super::workbench::Workbench;
use super::workers::Binaries;
use super::{Options, Sandbox, sla};

pub const RUN_DIR: &str = "/run/oak-sandbox";
pub const PREFIX: &str = "oaksb";
pub const BPF_PREFIX: &str = "/sys/fs/bpf/oak-sandbox-";

#[derive(clap::Args, Debug)]
pub struct SandboxArgs {
    #[command(subcommand)]
    pub action: Option<Action>,
    /// Number of workers.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=50))]
    pub workers: u8,
    /// Run mosquitto as the broker instead of the embedded rumqttd.
    #[arg(long)]
    pub external_mosquitto: bool,
}

#[derive(clap::Subcommand, Debug)]
pub enum Action {
    /// Remove what a crashed sandbox left behind (namespaces, pins, processes, mounts).
    Down,
    /// Deploy the microservices of an upstream Oakestra SLA (JSON) on the
    /// running sandbox; `code` may name a local OCI archive.
    Deploy {
        sla: PathBuf,
        /// Instances of each microservice.
        #[arg(long, default_value_t = 1)]
        instances: u64,
    },
    /// List services, their instances, placement, status and addresses.
    Ps {
        /// Print the sandbox's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Print an instance's output.
    Logs {
        /// app.appns.service.servicens
        service: String,
        #[arg(long, default_value_t = 0)]
        instance: u64,
    },
    /// Change a service's instance count (up or down).
    Scale {
        /// app.appns.service.servicens
        service: String,
        instances: u64,
    },
    /// Remove a service: every instance, and its service addresses.
    Undeploy {
        /// app.appns.service.servicens
        service: String,
    },
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Entry point; `build_ebpf` builds the eBPF object NetManager embeds.
pub fn run(args: SandboxArgs, build_ebpf: impl FnOnce() -> Result<()>) -> Result<()> {
    require_root(
        "`cargo xtask sandbox`",
        "it creates network namespaces and loads eBPF",
    )?;
    match args.action {
        Some(Action::Down) => down(),
        None => up(&args, build_ebpf),
        Some(other) => workbench_command(other, &Path::new(RUN_DIR).join(SOCKET)),
    }
}

/// One workbench command against the sandbox listening on `socket`.
pub fn workbench_command(action: Action, socket: &Path) -> Result<()> {
    let client = ControlClient::new(socket)?;
    let text = match action {
        Action::Deploy {
            sla: file,
            instances,
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let mut doc: Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", file.display()))?;
            let base = file.parent().unwrap_or(Path::new("."));
            sla::resolve_archives(&mut doc, base);
            services_text(&client.deploy(&doc, instances)?)
        }
        Action::Ps { json: true } => format!("{:#}\n", client.ps()?),
        Action::Ps { json: false } => services_text(&client.ps()?),
        Action::Logs { service, instance } => {
            let v = client.logs(&service, instance)?;
            v["log"].as_str().unwrap_or("").to_string()
        }
        Action::Scale { service, instances } => {
            services_text(&Value::Array(vec![client.scale(&service, instances)?]))
        }
        Action::Undeploy { service } => {
            let v = client.undeploy(&service)?;
            format!(
                "undeployed {service}: instances {}\n",
                v["removed_instances"]
            )
        }
        Action::Down => bail!("`down` is not a workbench command"),
    };
    emit(&text)
}

/// Writes `text` to stdout; a reader that went away (`ps | head`) is fine.
fn emit(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing to stdout"),
        _ => Ok(()),
    }
}

/// `ps` as text: one line per service, one per instance.
fn services_text(services: &Value) -> String {
    use std::fmt::Write;
    let s = |v: &Value| v.as_str().unwrap_or("-").to_string();
    let mut out = String::new();
    for svc in services.as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{}  image {}  RR {} {}  Closest {} {}",
            s(&svc["service"]),
            s(&svc["image"]),
            s(&svc["rr_ip"]),
            s(&svc["rr_ip_v6"]),
            s(&svc["closest_ip"]),
            s(&svc["closest_ip_v6"])
        );
        for i in svc["instances"].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "  instance {}  worker {} ({})  {}  instance_ip {} {}  namespace {} {}",
                i["instance"],
                i["worker"],
                s(&i["node"]),
                s(&i["status"]),
                s(&i["instance_ip"]),
                s(&i["instance_ip_v6"]),
                s(&i["namespace_ip"]),
                s(&i["namespace_ip_v6"])
            );
        }
    }
    out
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Builds NetManager and nodeengined (release) and says where they are.
fn build(build_ebpf: impl FnOnce() -> Result<()>) -> Result<Binaries> {
    println!("==> building the eBPF programs");
    build_ebpf()?;
    println!("==> cargo build --release -p netmanager -p nodeengine");
    let root = workspace_root();
    let status = Command::new("cargo")
        .current_dir(&root)
        .args(["build", "--release", "-p", "netmanager", "-p", "nodeengine"])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build failed ({status})");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(Binaries::in_dir(&target.join("release")))
}

fn up(args: &SandboxArgs, build_ebpf: impl FnOnce() -> Result<()>) -> Result<()> {
    let bins = build(build_ebpf)?;
    // NetManager pins its dataplane on bpffs.
    testkit::bpffs::ensure_mounted()?;
    if Path::new(RUN_DIR).exists() {
        println!("==> removing leftovers of an earlier sandbox");
        down()?;
    }
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let options = Options {
        prefix: PREFIX.into(),
        workers: args.workers,
        external_mosquitto: args.external_mosquitto,
        run_dir: PathBuf::from(RUN_DIR),
        bpf_prefix: BPF_PREFIX.into(),
        bins,
    };
    let started = Instant::now();
    let sb = Sandbox::start(&options, &mut |step| println!("==> {step}"))?;
    write_state(&sb)?;
    let mut bench = Workbench::default();
    deploy_samples(&sb, &mut bench)?;
    let control = ControlServer::start(&Path::new(RUN_DIR).join(SOCKET))?;
    print_summary(&sb, started.elapsed());
    monitor(&sb, &mut bench, &control);
    println!("\n==> stopping: workers, containers, namespaces, pins");
    drop(control);
    drop(sb);
    let _ = std::fs::remove_dir_all(RUN_DIR);
    println!("==> sandbox stopped");
    Ok(())
}

/// Two echo instances on different workers, one client on worker 1; the
/// workbench knows them as if deployed through it.
fn deploy_samples(sb: &Sandbox, bench: &mut Workbench) -> Result<()> {
    let c = &sb.cluster;
    let first = sb.worker(1)?;
    let second = sb.workers.get(1).unwrap_or(first);
    println!(
        "==> deploying {SERVER_JOB}: instance 0 on worker 1, instance 1 on worker {}",
        second.index
    );
    for (n, w) in [(0, first), (1, second)] {
        c.deploy(&w.id, &echo_server(&w.ns), n)?;
    }
    bench.adopt(&echo_server("any"), &[(0, first.index), (1, second.index)]);
    c.wait_instances(SERVER_JOB, 2)
        .context("the echo instances did not come up")?;
    let (rr, _) = c.service_ips(SERVER_JOB);
    println!(
        "==> deploying {CLIENT_JOB} on worker 1 (wget http://{}/ every second)",
        rr.0
    );
    c.deploy(&first.id, &client(&rr.0), 0)?;
    bench.adopt(&client(&rr.0), &[(0, first.index)]);
    c.wait_status(CLIENT_JOB, 0, "CREATED", 1)
}

fn write_state(sb: &Sandbox) -> Result<()> {
    let workers: Vec<Value> = sb
        .workers
        .iter()
        .map(|w| {
            json!({"index": w.index, "namespace": w.ns, "address": w.ip, "node_id": w.id,
                   "dir": w.dir, "bpf_dir": w.bpf_dir, "containerd_namespace": w.containerd_ns})
        })
        .collect();
    let state = json!({"pid": std::process::id(), "underlay": sb.underlay.ns.name(),
                       "broker_pid": sb.broker.pid(), "workers": workers});
    let path = Path::new(RUN_DIR).join("state.json");
    std::fs::write(&path, state.to_string()).with_context(|| format!("writing {}", path.display()))
}

fn print_summary(sb: &Sandbox, took: Duration) {
    let c = &sb.cluster;
    println!(
        "\nsandbox up in {:.0?} (demo/test fixture; production clusters are upstream Oakestra's)",
        took
    );
    println!(
        "cluster double: HTTP {UNDERLAY_GATEWAY}:{REGISTRATION_PORT}, MQTT {UNDERLAY_GATEWAY}:{MQTT_PORT} in netns {}",
        sb.underlay.ns.name()
    );
    for w in &sb.workers {
        println!(
            "worker {}: id {}  netns {}  address {}  bpf {}",
            w.index,
            w.id,
            w.ns,
            w.ip,
            w.bpf_dir.display()
        );
        println!(
            "   logs {}/{{nodeengine,netmanager,containerd/containerd}}.log, apps {}/applogs/",
            w.dir.display(),
            w.dir.display()
        );
        println!(
            "   status: NETMANAGER_SOCKET={} NetManager status",
            w.socket.display()
        );
        println!(
            "   metrics: ip netns exec {ns} curl -s 127.0.0.1:9102/metrics (NetManager), \
             127.0.0.1:9103/metrics (NodeEngine); /readyz for health",
            ns = w.ns
        );
    }
    for job in [SERVER_JOB, CLIENT_JOB] {
        let (rr, closest) = c.service_ips(job);
        println!(
            "service {job}: RR {} / {}  Closest {} / {}",
            rr.0, rr.1, closest.0, closest.1
        );
        for (n, i) in c.instances(job) {
            let (v4, v6) = c.instance_ip(job, n);
            println!(
                "   instance {n}: ns {} {} on {}  instance_ip {v4} {v6}",
                i.ns_ip, i.ns_ip6, i.host_ip
            );
        }
    }
    println!(
        "\nworkbench (another shell): cargo xtask sandbox deploy SLA.json [--instances N] | ps | \
         logs SERVICE [--instance N] | scale SERVICE N | undeploy SERVICE"
    );
    println!("\nCtrl-C stops everything.\n");
}

/// Prints counters and the client's latest answer every 3 s and answers
/// workbench calls, until Ctrl-C.
fn monitor(sb: &Sandbox, bench: &mut Workbench, control: &ControlServer) {
    while !STOP.load(Ordering::SeqCst) {
        let client_log = sb.workers.first().map(|w| w.app_log(CLIENT_JOB, 0));
        let last = client_log
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|t| t.lines().last().map(str::to_string))
            .unwrap_or_default();
        println!("client: {last}");
        for w in &sb.workers {
            println!(
                "  worker {} counters: {}",
                w.index,
                counters(w.status().ok())
            );
        }
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            if STOP.load(Ordering::SeqCst) {
                return;
            }
            control.answer(Duration::from_millis(100), |op| {
                println!("==> workbench: {}", op.describe());
                let answer = bench.handle(sb, op);
                if let Err(e) = &answer {
                    println!("==> workbench: {e:#}");
                }
                answer
            });
        }
    }
}

/// Non-zero dataplane counters as `name=packets/bytes`.
fn counters(status: Option<Value>) -> String {
    let Some(v) = status else {
        return "(NetManager not answering)".into();
    };
    let list: Vec<String> = v["dataplane"]["counters"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c[1].as_u64().unwrap_or(0) > 0)
        .map(|c| format!("{}={}/{}B", c[0].as_str().unwrap_or("?"), c[1], c[2]))
        .collect();
    if list.is_empty() {
        "(all zero)".into()
    } else {
        list.join(" ")
    }
}

/// Removes everything a sandbox may have left: the namespaces (and every
/// process inside them, daemons and shims alike), container processes in
/// the workers' cgroups, containerd mounts, bpffs pins, the run directory.
pub fn down() -> Result<()> {
    let mut namespaces: Vec<String> = list_named()
        .into_iter()
        .filter(|n| n.starts_with(&format!("{PREFIX}-")))
        .collect();
    namespaces.sort();
    for dir in testkit::subdirs(Path::new(RUN_DIR)) {
        let n = dir.file_name().and_then(|f| f.to_str()).unwrap_or("");
        let containerd_ns = format!("oak-{PREFIX}w{n}");
        cleanup_leftovers(&dir.join("containerd"), &containerd_ns);
    }
    for ns in namespaces.iter().rev() {
        println!("removing namespace {ns}");
        delete_named(ns);
    }
    remove_pins(BPF_PREFIX);
    testkit::mounts::unmount_below(Path::new(RUN_DIR));
    let _ = std::fs::remove_dir_all(RUN_DIR);
    println!("sandbox leftovers removed");
    Ok(())
}

/// Removes the pin directories whose path starts with `prefix`.
fn remove_pins(prefix: &str) {
    let (dir, start) = prefix.rsplit_once('/').unwrap_or(("/sys/fs/bpf", prefix));
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with(start) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}
