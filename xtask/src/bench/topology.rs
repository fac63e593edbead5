//! The namespace testbed: an underlay bridge (198.51.100.0/24), two nodes
//! with container bridges, containers behind them. Same wiring as the tests
//! crate's `Lab` (which xtask cannot link: see mod.rs), plus per-scenario
//! route/device setups that undo themselves. Nothing touches the root
//! namespace except creating and deleting the namespaces themselves.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};

pub use xtask::sandbox::procs::{ns_sh, sh};

pub struct Container {
    pub ns: String,
    pub veth: String,
    pub ip: String,
    pub mac: [u8; 6],
}

/// Node n1 (198.51.100.1, containers 10.18.0.0/26) holds the client c1 and
/// the same-node server c3; node n2 (198.51.100.2, 10.18.0.64/26) holds c2.
pub struct Topology {
    pub prefix: String,
    pub under: String,
    pub n1: String,
    pub n2: String,
    pub c1: Container,
    pub c2: Container,
    pub c3: Container,
    namespaces: Vec<String>,
    pin_dirs: Vec<PathBuf>,
    files: Vec<PathBuf>,
    children: Vec<Child>,
}

impl Topology {
    pub fn build() -> Result<Topology> {
        let prefix = format!("oakb{}", std::process::id() % 100000);
        // Built empty first so that the Drop guard cleans up a half-built
        // testbed too.
        let empty = || Container {
            ns: String::new(),
            veth: String::new(),
            ip: String::new(),
            mac: [0; 6],
        };
        let mut t = Topology {
            prefix,
            under: String::new(),
            n1: String::new(),
            n2: String::new(),
            c1: empty(),
            c2: empty(),
            c3: empty(),
            namespaces: Vec::new(),
            pin_dirs: Vec::new(),
            files: Vec::new(),
            children: Vec::new(),
        };
        t.under = t.ns("under")?;
        ns_sh(
            &t.under,
            "ip link add br0 type bridge && ip link set br0 up",
        )?;
        t.n1 = t.node("n1", 1, "10.18.0.1/26")?;
        t.n2 = t.node("n2", 2, "10.18.0.65/26")?;
        let (n1, n2) = (t.n1.clone(), t.n2.clone());
        t.c1 = t.container(&n1, "c1", "10.18.0.2", "10.18.0.1")?;
        t.c3 = t.container(&n1, "c3", "10.18.0.3", "10.18.0.1")?;
        t.c2 = t.container(&n2, "c2", "10.18.0.66", "10.18.0.65")?;
        Ok(t)
    }

    fn ns(&mut self, name: &str) -> Result<String> {
        let full = format!("{}-{name}", self.prefix);
        let _ = sh(&format!("ip netns del {full} 2>/dev/null"));
        sh(&format!("ip netns add {full}"))?;
        self.namespaces.push(full.clone());
        ns_sh(&full, "ip link set lo up")?;
        Ok(full)
    }

    fn node(&mut self, name: &str, host: u8, gw: &str) -> Result<String> {
        let n = self.ns(name)?;
        let under = self.under.clone();
        sh(&format!(
            "ip link add eth0 netns {n} type veth peer name u-{name} netns {under}"
        ))?;
        ns_sh(
            &under,
            &format!("ip link set u-{name} master br0 && ip link set u-{name} up"),
        )?;
        ns_sh(
            &n,
            &format!(
                "ip addr add 198.51.100.{host}/24 dev eth0 && ip link set eth0 up && \
                 sysctl -qw net.ipv4.ip_forward=1 && \
                 ip link add goProxyBridge type bridge && ip link set goProxyBridge up && \
                 ip addr add {gw} dev goProxyBridge"
            ),
        )?;
        Ok(n)
    }

    /// Container MTU 1450 in every scenario (the overlay's tunnel MTU), so
    /// all paths carry the same segment sizes.
    fn container(&mut self, node: &str, name: &str, ip: &str, gw: &str) -> Result<Container> {
        let c = self.ns(name)?;
        let veth = format!("veth-{name}");
        let last: u8 = ip
            .rsplit('.')
            .next()
            .and_then(|o| o.parse().ok())
            .unwrap_or(0);
        let mac = [0x02, 0x00, 0x0a, 0x12, 0x00, last];
        let mac_s = mac.map(|b| format!("{b:02x}")).join(":");
        sh(&format!(
            "ip link add {veth} netns {node} type veth peer name eth0 netns {c}"
        ))?;
        ns_sh(
            node,
            &format!("ip link set {veth} master goProxyBridge && ip link set {veth} up"),
        )?;
        ns_sh(
            &c,
            &format!(
                "ip link set eth0 address {mac_s} mtu 1450 && ip link set eth0 up && \
                 ip addr add {ip}/26 dev eth0 && ip route add default via {gw}"
            ),
        )?;
        Ok(Container {
            ns: c,
            veth,
            ip: ip.to_string(),
            mac,
        })
    }

    /// A bpffs directory for a dataplane, removed on drop.
    pub fn pin_dir(&mut self, name: &str) -> PathBuf {
        let p = PathBuf::from(format!("/sys/fs/bpf/{}-{name}", self.prefix));
        let _ = std::fs::remove_dir_all(&p);
        self.pin_dirs.push(p.clone());
        p
    }

    /// A scratch file (configuration tables), removed on drop.
    pub fn file(&mut self, name: &str, content: &str) -> Result<String> {
        let p = std::env::temp_dir().join(format!("{}-{name}", self.prefix));
        std::fs::write(&p, content).with_context(|| format!("writing {}", p.display()))?;
        self.files.push(p.clone());
        Ok(p.to_string_lossy().into_owned())
    }

    /// Starts a long-running process in `ns` (through nsenter, which keeps
    /// bpffs visible and execs the program, so the pid is the program's);
    /// waits for it to print `ready` when `ready` is set. Killed on drop.
    pub fn spawn(&mut self, ns: &str, program: &str, args: &[&str], ready: bool) -> Result<u32> {
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(if ready { Stdio::piped() } else { Stdio::null() })
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {program} in {ns}"))?;
        let pid = child.id();
        let out = child.stdout.take();
        self.children.push(child);
        if let Some(out) = out {
            let mut line = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line)?;
            if line.trim() != "ready" {
                bail!("{program} in {ns} did not become ready (said {line:?})");
            }
        }
        Ok(pid)
    }

    /// Stops one process this testbed started.
    pub fn stop(&mut self, pid: u32) {
        if let Some(i) = self.children.iter().position(|c| c.id() == pid) {
            let mut c = self.children.remove(i);
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if std::env::var_os("OAK_LAB_KEEP").is_some() {
            eprintln!("OAK_LAB_KEEP: leaving namespaces {:?}", self.namespaces);
            return;
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Unpinning the links detaches the programs (no process holds them).
        for p in &self.pin_dirs {
            let _ = std::fs::remove_dir_all(p);
        }
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
        for n in self.namespaces.iter().rev() {
            let _ = sh(&format!("ip netns pids {n} | xargs -r kill -9"));
            let _ = sh(&format!("ip netns del {n}"));
        }
    }
}

/// Commands that undo a scenario's setup when dropped.
pub struct Undo(Vec<(String, String)>);

impl Undo {
    /// Runs `cmds` (namespace, command) now and `undo` (namespace, command)
    /// on drop.
    pub fn apply(cmds: &[(&str, String)], undo: &[(&str, String)]) -> Result<Undo> {
        let guard = Undo(
            undo.iter()
                .map(|(n, c)| (n.to_string(), c.clone()))
                .collect(),
        );
        for (ns, c) in cmds {
            ns_sh(ns, c)?;
        }
        Ok(guard)
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        for (ns, c) in &self.0 {
            let _ = ns_sh(ns, c);
        }
    }
}
