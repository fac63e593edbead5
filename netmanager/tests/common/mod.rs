//! Test harness: root check, network namespaces with Drop guards, a real
//! mosquitto per test, a double of the cluster service manager, and a
//! NetManager process.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use serde_json::{Value, json};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Unique per test process and call.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// True when running as root; otherwise prints why the test is skipped.
pub fn require_root(test: &str) -> bool {
    if worker_common::privileges::is_root() {
        return true;
    }
    eprintln!("SKIP {test}: needs root (network namespaces, netlink, nftables)");
    false
}

/// One test per attach mode: `attach_mode_tests!(a, b)` makes the tests
/// `tcx::a`, `netlink::a`, ... calling `a("tcx")`, `a("netlink")`, ...
#[allow(unused_macros)]
macro_rules! attach_mode_tests {
    ($($name:ident),+ $(,)?) => {
        mod tcx {
            $(
                #[test]
                fn $name() {
                    if crate::common::attach_mode_ready(stringify!($name), "tcx") {
                        super::$name("tcx");
                    }
                }
            )+
        }
        mod netlink {
            $(
                #[test]
                fn $name() {
                    if crate::common::attach_mode_ready(stringify!($name), "netlink") {
                        super::$name("netlink");
                    }
                }
            )+
        }
    };
}
#[allow(unused_imports)]
pub(crate) use attach_mode_tests;

/// Whether `mode` can run here (TCX needs Linux 6.6); says why not.
pub fn attach_mode_ready(test: &str, mode: &str) -> bool {
    if mode == "tcx" && is_root() && !netmanager::kernel_support::probe().tcx {
        eprintln!("SKIP {test} (tcx): this kernel has no TCX links");
        return false;
    }
    true
}

fn is_root() -> bool {
    worker_common::privileges::is_root()
}

/// Runs `f` on a thread inside `ns` (setns affects only that thread).
pub fn in_netns<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = File::open(ns.path()).expect("namespace file");
            // SAFETY: a valid namespace descriptor; affects this thread only.
            let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("namespace thread")
    })
}

/// (hook, program, program id) of every program on the ingress of
/// `ifname` in `ns`: TCX links as the kernel lists them ("tcx/ingress"),
/// clsact filters as `bpftool net show` lists them ("clsact/ingress").
pub fn ingress_programs(ns: &Netns, ifname: &str) -> Vec<(String, String, u32)> {
    use aya::programs::{SchedClassifier, TcAttachType};
    let mut out: Vec<(String, String, u32)> = in_netns(ns, || {
        if !netmanager::kernel_support::probe().tcx {
            return Vec::new();
        }
        let (_, progs) = SchedClassifier::query_tcx(ifname, TcAttachType::Ingress)
            .unwrap_or_else(|e| panic!("querying TCX programs of {ifname}: {e}"));
        progs
            .iter()
            .map(|p| {
                (
                    "tcx/ingress".to_string(),
                    p.name_as_str().unwrap_or_default().to_string(),
                    p.id(),
                )
            })
            .collect()
    });
    let mut cmd = Command::new("bpftool");
    cmd.args(["-j", "net", "show", "dev", ifname]);
    ns.enter(&mut cmd);
    let res = cmd.output().expect("running bpftool");
    assert!(
        res.status.success(),
        "bpftool net show dev {ifname}: {}",
        String::from_utf8_lossy(&res.stderr)
    );
    let json: Value = serde_json::from_slice(&res.stdout).expect("bpftool's JSON");
    for entry in json.as_array().into_iter().flatten() {
        for f in entry["tc"].as_array().into_iter().flatten() {
            let kind = f["kind"].as_str().unwrap_or_default();
            // Newer bpftool lists TCX links here too; they were counted above.
            if kind.starts_with("clsact/") {
                out.push((
                    kind.to_string(),
                    f["name"].as_str().unwrap_or_default().to_string(),
                    f["id"].as_u64().unwrap_or_default() as u32,
                ));
            }
        }
    }
    out
}

/// The daemon's dataplane runs in `mode` (so a test run "in netlink mode"
/// really did).
pub fn assert_attach_mode(nm: &Daemon, mode: &str) {
    let (_, st) = nm.get("/status");
    assert_eq!(st["dataplane"]["attach_mode"], json!(mode), "{st}");
}

/// The hook `ingress_programs` reports for an attach mode.
pub fn hook_of(mode: &str) -> &'static str {
    match mode {
        "netlink" => "clsact/ingress",
        _ => "tcx/ingress",
    }
}

pub fn run(cmd: &[&str]) -> String {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn try_run(cmd: &[&str]) -> Option<String> {
    let out = Command::new(cmd[0]).args(&cmd[1..]).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let p = std::env::temp_dir().join(unique("nmt"));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Netns {
        let name = unique("nmt");
        run(&["ip", "netns", "add", &name]);
        run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Netns { name }
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// A node namespace: an uplink (a veth whose peer stays in the same
    /// namespace; no dummy module needed) with 198.51.100.<host>/24 and a
    /// default route, so the daemon can infer its address.
    pub fn node(host: u8) -> Netns {
        let ns = Netns::new();
        let n = ns.name.as_str();
        run(&[
            "ip", "-n", n, "link", "add", "uplink0", "type", "veth", "peer", "name", "uplinkp",
        ]);
        run(&["ip", "-n", n, "link", "set", "uplinkp", "up"]);
        run(&[
            "ip",
            "-n",
            n,
            "addr",
            "add",
            &format!("198.51.100.{host}/24"),
            "dev",
            "uplink0",
        ]);
        run(&["ip", "-n", n, "link", "set", "uplink0", "up"]);
        run(&[
            "ip",
            "-n",
            n,
            "route",
            "add",
            "default",
            "via",
            "198.51.100.254",
        ]);
        ns
    }

    pub fn ip(&self, args: &[&str]) -> Option<String> {
        let mut cmd = vec!["ip", "-n", &self.name];
        cmd.extend_from_slice(args);
        try_run(&cmd)
    }

    /// Configure `cmd` to start inside this namespace (without a new mount
    /// namespace, unlike `ip netns exec`, so the child's mounts are visible).
    pub fn enter(&self, cmd: &mut Command) {
        let f = File::open(self.path()).unwrap();
        // SAFETY: setns is async-signal-safe; the fd stays open in the closure.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Underlay namespace with a bridge at 198.51.100.254 and node namespaces
/// plugged into it.
pub struct Underlay {
    pub ns: Netns,
}

impl Underlay {
    pub fn new() -> Underlay {
        let ns = Netns::new();
        let n = ns.name.as_str();
        run(&["ip", "-n", n, "link", "add", "ubr", "type", "bridge"]);
        run(&[
            "ip",
            "-n",
            n,
            "addr",
            "add",
            "198.51.100.254/24",
            "dev",
            "ubr",
        ]);
        run(&["ip", "-n", n, "link", "set", "ubr", "up"]);
        Underlay { ns }
    }

    pub fn node(&self, host: u8) -> Netns {
        let node = Netns::new();
        let peer = format!("up{host}");
        run(&[
            "ip",
            "-n",
            &node.name,
            "link",
            "add",
            "uplink0",
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            &self.ns.name,
        ]);
        run(&[
            "ip",
            "-n",
            &node.name,
            "addr",
            "add",
            &format!("198.51.100.{host}/24"),
            "dev",
            "uplink0",
        ]);
        run(&["ip", "-n", &node.name, "link", "set", "uplink0", "up"]);
        run(&[
            "ip",
            "-n",
            &node.name,
            "route",
            "add",
            "default",
            "via",
            "198.51.100.254",
        ]);
        run(&[
            "ip",
            "-n",
            &self.ns.name,
            "link",
            "set",
            &peer,
            "master",
            "ubr",
            "up",
        ]);
        node
    }
}

impl Underlay {
    /// Another way out for `node`: interface `name` into the underlay with
    /// 198.51.100.<host>/24 and a default route of `metric` (a second
    /// uplink, less preferred than the first while that one is up).
    pub fn add_uplink(&self, node: &Netns, name: &str, host: u8, metric: u32) {
        // Both uplinks sit on one segment here (unlike Wi-Fi and LTE): each
        // must answer ARP for its own address only, or peers would send to
        // one address through the other interface.
        for (key, value) in [("arp_ignore", "1"), ("arp_announce", "2")] {
            run(&[
                "ip",
                "netns",
                "exec",
                &node.name,
                "sysctl",
                "-qw",
                &format!("net.ipv4.conf.all.{key}={value}"),
            ]);
        }
        let peer = format!("up{host}");
        run(&[
            "ip",
            "-n",
            &node.name,
            "link",
            "add",
            name,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            &self.ns.name,
        ]);
        run(&[
            "ip",
            "-n",
            &node.name,
            "addr",
            "add",
            &format!("198.51.100.{host}/24"),
            "dev",
            name,
        ]);
        run(&["ip", "-n", &node.name, "link", "set", name, "up"]);
        run(&[
            "ip",
            "-n",
            &self.ns.name,
            "link",
            "set",
            &peer,
            "master",
            "ubr",
            "up",
        ]);
        run(&[
            "ip",
            "-n",
            &node.name,
            "route",
            "add",
            "default",
            "via",
            "198.51.100.254",
            "dev",
            name,
            "metric",
            &metric.to_string(),
        ]);
    }
}

/// A child process killed on drop.
pub struct Proc(pub Child);

impl Proc {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
    pub fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A "container": `sleep` in its own network namespace.
pub fn container() -> Proc {
    let child = Command::new("unshare")
        .args(["-n", "sleep", "1000"])
        .stdin(Stdio::null())
        .spawn()
        .expect("unshare");
    let pid = child.id();
    // unshare execs sleep in the same process once the namespace exists.
    wait_until("container namespace", Duration::from_secs(5), || {
        let mine = std::fs::read_link("/proc/self/ns/net").ok();
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok();
        theirs.is_some()
            && theirs != mine
            && std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "sleep")
    });
    Proc(child)
}

/// Run a command inside the namespace of `pid`.
pub fn in_pid_ns(pid: u32, args: &[&str]) -> Option<String> {
    let p = pid.to_string();
    let mut cmd = vec!["nsenter", "-t", &p, "-n"];
    cmd.extend_from_slice(args);
    try_run(&cmd)
}

/// mosquitto on 127.0.0.1:<port> (in `netns` if given).
pub struct Broker {
    pub port: u16,
    conf: PathBuf,
    netns: Option<PathBuf>,
    proc: Option<Proc>,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Broker {
    pub fn start(dir: &TempDir, netns: Option<&Netns>) -> Broker {
        Self::start_at(dir, netns, "127.0.0.1")
    }

    pub fn start_at(dir: &TempDir, netns: Option<&Netns>, addr: &str) -> Broker {
        let port = if netns.is_some() { 1883 } else { free_port() };
        let conf = dir.path(&format!("mosquitto-{port}.conf"));
        std::fs::write(
            &conf,
            format!("listener {port} {addr}\nallow_anonymous true\npersistence false\n"),
        )
        .unwrap();
        let mut b = Broker {
            port,
            conf,
            netns: netns.map(|n| n.path()),
            proc: None,
        };
        b.restart();
        b
    }

    pub fn stop(&mut self) {
        self.proc = None;
    }

    pub fn restart(&mut self) {
        self.proc = None;
        let mut cmd = Command::new("/usr/sbin/mosquitto");
        cmd.arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(path) = &self.netns {
            let f = File::open(path).unwrap();
            // SAFETY: see Netns::enter.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        self.proc = Some(Proc(cmd.spawn().expect("mosquitto")));
        if self.netns.is_none() {
            let port = self.port;
            wait_until("mosquitto", Duration::from_secs(5), || {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            });
        } else {
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

/// What the double saw.
#[derive(Default)]
pub struct Seen {
    /// (topic, payload) of everything under nodes/+/net/.
    pub messages: Vec<(String, Value)>,
}

impl Seen {
    pub fn on(&self, suffix: &str) -> Vec<Value> {
        self.messages
            .iter()
            .filter(|(t, _)| t.ends_with(suffix))
            .map(|(_, v)| v.clone())
            .collect()
    }
}

enum Cmd {
    Publish(String, Vec<u8>),
}

/// Double of the cluster service manager: answers subnet requests and table
/// queries from `tables` (by job name or by any service address), records
/// what nodes publish, and can publish `updates_available`.
pub struct ClusterDouble {
    /// Subnet per node id; nodes not listed get the default one.
    pub subnets: Arc<Mutex<HashMap<String, (String, String)>>>,
    pub seen: Arc<Mutex<Seen>>,
    pub tables: Arc<Mutex<HashMap<String, Value>>>,
    /// When true, table queries go unanswered.
    pub silent: Arc<std::sync::atomic::AtomicBool>,
    /// When true, subnet requests go unanswered.
    pub subnet_silent: Arc<std::sync::atomic::AtomicBool>,
    cmds: tokio::sync::mpsc::UnboundedSender<Cmd>,
    _thread: std::thread::JoinHandle<()>,
}

impl ClusterDouble {
    pub fn start(port: u16, netns: Option<&Netns>, subnet: (&str, &str)) -> ClusterDouble {
        Self::start_at("127.0.0.1", port, netns, subnet)
    }

    pub fn start_at(
        host: &str,
        port: u16,
        netns: Option<&Netns>,
        subnet: (&str, &str),
    ) -> ClusterDouble {
        let host = host.to_string();
        let subnets = Arc::new(Mutex::new(HashMap::new()));
        let sn = subnets.clone();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let tables = Arc::new(Mutex::new(HashMap::new()));
        let silent = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let subnet_silent = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let ns_file = netns.map(|n| File::open(n.path()).unwrap());
        let subnet = (subnet.0.to_string(), subnet.1.to_string());
        let (s, t, q, qs) = (
            seen.clone(),
            tables.clone(),
            silent.clone(),
            subnet_silent.clone(),
        );
        let thread = std::thread::spawn(move || {
            if let Some(f) = ns_file {
                // SAFETY: only this thread changes namespace; its sockets live there.
                assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(double_loop(
                &host, port, subnet, sn, s, t, q, qs, rx, ready_tx,
            ));
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("cluster double did not connect");
        ClusterDouble {
            subnets,
            seen,
            tables,
            silent,
            subnet_silent,
            cmds: tx,
            _thread: thread,
        }
    }

    pub fn set_table(&self, job: &str, table: Value) {
        self.tables.lock().unwrap().insert(job.to_string(), table);
    }

    pub fn publish_update(&self, job: &str) {
        let _ = self.cmds.send(Cmd::Publish(
            format!("jobs/{job}/updates_available"),
            b"{}".to_vec(),
        ));
    }

    /// Publish anything as the cluster (e.g. a probe on `nodes/<x>/net/...`,
    /// which the double itself records).
    pub fn publish(&self, topic: &str, body: &str) {
        let _ = self
            .cmds
            .send(Cmd::Publish(topic.to_string(), body.as_bytes().to_vec()));
    }

    /// Wait until the double is (again) connected and subscribed: publish a
    /// probe to a topic it subscribes to until it records one.
    pub fn wait_subscribed(&self, timeout: Duration) {
        let probe = unique("probe");
        let suffix = format!("{probe}/net/ping");
        let deadline = Instant::now() + timeout;
        while self.seen_on(&suffix).is_empty() {
            assert!(
                Instant::now() < deadline,
                "cluster double not subscribed within {timeout:?}"
            );
            self.publish(&format!("nodes/{probe}/net/ping"), "{}");
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    pub fn seen_on(&self, suffix: &str) -> Vec<Value> {
        self.seen.lock().unwrap().on(suffix)
    }

    pub fn wait_for(&self, suffix: &str, count: usize, timeout: Duration) -> Vec<Value> {
        wait_until(&format!("{count} message(s) on {suffix}"), timeout, || {
            self.seen_on(suffix).len() >= count
        });
        self.seen_on(suffix)
    }
}

#[allow(clippy::too_many_arguments)]
async fn double_loop(
    host: &str,
    port: u16,
    subnet: (String, String),
    subnets: Arc<Mutex<HashMap<String, (String, String)>>>,
    seen: Arc<Mutex<Seen>>,
    tables: Arc<Mutex<HashMap<String, Value>>>,
    silent: Arc<std::sync::atomic::AtomicBool>,
    subnet_silent: Arc<std::sync::atomic::AtomicBool>,
    mut cmds: tokio::sync::mpsc::UnboundedReceiver<Cmd>,
    ready: std::sync::mpsc::Sender<()>,
) {
    let mut opts = MqttOptions::new(unique("csm"), host, port);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut el) = AsyncClient::new(opts, 100);
    loop {
        tokio::select! {
            ev = el.poll() => match ev {
                Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                    let _ = client.subscribe("nodes/+/net/#", QoS::AtLeastOnce).await;
                }
                Ok(Event::Incoming(Incoming::SubAck(_))) => { let _ = ready.send(()); }
                Ok(Event::Incoming(Incoming::Publish(p))) => {
                    let payload: Value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                    seen.lock().unwrap().messages.push((p.topic.clone(), payload.clone()));
                    let parts: Vec<&str> = p.topic.split('/').collect();
                    if parts.len() < 4 { continue; }
                    let node = parts[1];
                    let rest = parts[3..].join("/");
                    if rest == "subnet" && !subnet_silent.load(Ordering::SeqCst) {
                        let (v4, v6) = subnets.lock().unwrap().get(node).cloned().unwrap_or_else(|| subnet.clone());
                        let body = json!({"address": v4, "addressv6": v6});
                        let _ = client.publish(format!("nodes/{node}/net/subnetwork/result"), QoS::AtLeastOnce, false, body.to_string()).await;
                    } else if rest == "service/address-changed" {
                        // As the cluster does: the instance's new place, then
                        // "query this job again" to whoever follows it.
                        let changed = follow_address_change(&mut tables.lock().unwrap(), &payload);
                        if let Some(job) = changed {
                            let _ = client.publish(format!("jobs/{job}/updates_available"), QoS::AtLeastOnce, false, b"{}".to_vec()).await;
                        }
                    } else if rest == "tablequery/request" && !silent.load(Ordering::SeqCst) {
                        let answer = answer_query(&tables.lock().unwrap(), &payload);
                        let _ = client.publish(format!("nodes/{node}/net/tablequery/result"), QoS::AtLeastOnce, false, answer.to_string()).await;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            },
            cmd = cmds.recv() => match cmd {
                Some(Cmd::Publish(topic, body)) => { let _ = client.publish(topic, QoS::AtLeastOnce, false, body).await; }
                None => return,
            }
        }
    }
}

/// `service/address-changed` `{appname, instance_number, host_ip,
/// host_port}`: moves that instance in its job's table; the job, if known.
fn follow_address_change(tables: &mut HashMap<String, Value>, msg: &Value) -> Option<String> {
    let job = msg["appname"].as_str()?;
    let n = msg["instance_number"].as_u64()?;
    let list = tables.get_mut(job)?["instance_list"].as_array_mut()?;
    let inst = list.iter_mut().find(|i| i["instance_number"] == n)?;
    inst["host_ip"] = msg["host_ip"].clone();
    if let Some(port) = msg["host_port"]
        .as_u64()
        .or_else(|| msg["host_port"].as_str()?.parse().ok())
    {
        inst["host_port"] = json!(port);
    }
    Some(job.to_string())
}

fn answer_query(tables: &HashMap<String, Value>, req: &Value) -> Value {
    let sname = req["sname"].as_str().unwrap_or("");
    let sip = req["sip"].as_str().unwrap_or("");
    let key = if sip.is_empty() { sname } else { sip };
    let found = tables.iter().find(|(job, t)| {
        (!sname.is_empty() && job.as_str() == sname)
            || (!sip.is_empty()
                && t["instance_list"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|i| {
                        i["service_ip"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .any(|s| s["Address"] == sip || s["Address_v6"] == sip)
                    }))
    });
    match found {
        Some((job, t)) => {
            let mut t = t.clone();
            t["app_name"] = json!(job);
            t["query_key"] = json!(key);
            t
        }
        None => json!({"app_name": sname, "query_key": key, "instance_list": []}),
    }
}

/// A NetManager daemon in a node namespace.
pub struct Daemon {
    /// Some: run with the eBPF dataplane pinned here (removed on drop).
    pub bpf_dir: Option<PathBuf>,
    pub socket: PathBuf,
    pub state: PathBuf,
    pub log: PathBuf,
    config: PathBuf,
    /// Upstream's tuncfg.json, read if a test wrote it before the start
    /// (never the machine's /etc/netmanager/tuncfg.json).
    pub tun_config: PathBuf,
    netns: PathBuf,
    /// Environment on top of the harness's own (wins over it); kept for
    /// restarts.
    pub env: Vec<(String, String)>,
    proc: Option<Proc>,
}

/// How `Daemon::start_ebpf_with` runs NetManager.
#[derive(Debug, Clone, Default)]
pub struct EbpfOptions {
    /// `--attach-mode` ("tcx", "netlink"); None: the daemon's default.
    pub attach_mode: Option<&'static str>,
    /// More environment (e.g. NETMANAGER_ADDRESS_CHECK_SECS).
    pub env: Vec<(String, String)>,
    /// netcfg.json fields on top of the harness's.
    pub netcfg: Value,
    /// The contents of upstream's tuncfg.json, if any.
    pub tuncfg: Option<Value>,
}

impl Daemon {
    pub fn start(dir: &TempDir, node: &Netns, mqtt_port: u16) -> Daemon {
        Self::start_with(dir, node, mqtt_port, json!({}))
    }

    /// Like `start`, with `extra` netcfg.json fields on top of upstream's defaults.
    pub fn start_with(dir: &TempDir, node: &Netns, mqtt_port: u16, extra: Value) -> Daemon {
        let config = dir.path("netcfg.json");
        let mut cfg = json!({
            "NodePublicAddress": "0.0.0.0", "NodePublicPort": "50103", "ClusterUrl": "0.0.0.0",
            "ClusterMqttPort": mqtt_port.to_string(), "DefaultInterface": "", "Debug": true,
            "PublicIPNetworking": false, "MqttCert": "", "MqttKey": ""
        });
        if let (Some(cfg), Some(extra)) = (cfg.as_object_mut(), extra.as_object()) {
            cfg.extend(extra.clone());
        }
        std::fs::write(&config, cfg.to_string()).unwrap();
        let mut d = Daemon {
            bpf_dir: None,
            socket: dir.path("nm.sock"),
            state: dir.path("state.json"),
            log: dir.path("netmanager.log"),
            config,
            tun_config: dir.path("tuncfg.json"),
            netns: node.path(),
            env: Vec::new(),
            proc: None,
        };
        d.restart();
        d
    }

    /// A daemon with the real eBPF dataplane, files named after `tag`.
    pub fn start_ebpf(dir: &TempDir, node: &Netns, mqtt_port: u16, tag: &str) -> Daemon {
        Self::start_ebpf_with(dir, node, mqtt_port, tag, EbpfOptions::default())
    }

    /// Like `start_ebpf`, with an attach mode and more environment.
    pub fn start_ebpf_with(
        dir: &TempDir,
        node: &Netns,
        mqtt_port: u16,
        tag: &str,
        opts: EbpfOptions,
    ) -> Daemon {
        let config = dir.path(&format!("netcfg-{tag}.json"));
        let mut cfg = json!({"ClusterMqttPort": mqtt_port.to_string(), "Debug": true});
        if let (Some(cfg), Some(extra)) = (cfg.as_object_mut(), opts.netcfg.as_object()) {
            cfg.extend(extra.clone());
        }
        std::fs::write(&config, cfg.to_string()).unwrap();
        let tun_config = dir.path(&format!("tuncfg-{tag}.json"));
        if let Some(t) = &opts.tuncfg {
            std::fs::write(&tun_config, t.to_string()).unwrap();
        }
        let mut d = Daemon {
            bpf_dir: Some(PathBuf::from(format!("/sys/fs/bpf/{}", unique("nmt")))),
            socket: dir.path(&format!("nm-{tag}.sock")),
            state: dir.path(&format!("state-{tag}.json")),
            log: dir.path(&format!("netmanager-{tag}.log")),
            config,
            tun_config,
            netns: node.path(),
            env: opts.env,
            proc: None,
        };
        if let Some(mode) = opts.attach_mode {
            d.env
                .push(("NETMANAGER_ATTACH_MODE".into(), mode.to_string()));
        }
        d.restart();
        d
    }

    /// (Re)start the process and wait for its socket.
    pub fn restart(&mut self) {
        self.proc = None;
        let _ = std::fs::remove_file(&self.socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_NetManager"));
        match &self.bpf_dir {
            None => cmd
                .arg("--no-dataplane")
                .env("NETMANAGER_BPF_DIR", "/nonexistent"),
            Some(dir) => cmd.env("NETMANAGER_BPF_DIR", dir),
        };
        cmd.env("NETMANAGER_CONFIG", &self.config)
            .env("NETMANAGER_TUN_CONFIG", &self.tun_config)
            .env("NETMANAGER_SOCKET", &self.socket)
            .env("NETMANAGER_STATE", &self.state)
            .env_remove("INVOCATION_ID")
            .env("NETMANAGER_ADDRESS_CHECK_SECS", "1")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let f = File::open(&self.netns).unwrap();
        // SAFETY: see Netns::enter.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        self.proc = Some(Proc(cmd.spawn().expect("NetManager")));
        let sock = self.socket.clone();
        wait_until("NetManager socket", Duration::from_secs(15), || {
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
        });
    }

    pub fn kill9(&mut self) {
        if let Some(p) = self.proc.as_mut() {
            p.kill9();
        }
        self.proc = None;
    }

    pub fn alive(&mut self) -> bool {
        self.proc
            .as_mut()
            .is_some_and(|p| p.0.try_wait().ok().flatten().is_none())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Resident memory of the running process, in bytes.
    pub fn rss_bytes(&self) -> u64 {
        let pid = self.proc.as_ref().expect("NetManager running").pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|kb| kb.trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
    }

    pub fn post(&self, path: &str, body: &str) -> (u16, Value) {
        http(&self.socket, "POST", path, body)
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        http(&self.socket, "GET", path, "")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "---- NetManager log {} ----\n{}",
                self.log.display(),
                self.log_text()
            );
        }
        if let Some(dir) = &self.bpf_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// One request to NetManager's API through the shared client: status and JSON body.
pub fn http(socket: &Path, method: &str, path: &str, body: &str) -> (u16, Value) {
    use worker_common::http::{Method, blocking::Client};
    let client = Client::unix(socket).expect("HTTP client runtime");
    let resp = match method {
        "GET" => client.get(path),
        _ => client.send(
            Method::POST,
            path,
            Some(("application/json", body.to_string().into())),
        ),
    }
    .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let value = serde_json::from_slice(&resp.body)
        .unwrap_or_else(|e| panic!("non-JSON answer {:?}: {e}", resp.text()));
    (resp.status.as_u16(), value)
}
