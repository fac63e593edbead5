//! Network namespaces standing in for nodes and containers, wired like an
//! Oakestra worker (bridge `goProxyBridge`, veths, an uplink into a shared
//! underlay on 198.51.100.0/24), removed on drop. Used by the namespace
//! tests and the benchmarks. Nothing is added to the root namespace.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::sandbox::procs::{ns_sh, sh};

/// Namespaces (and bpffs directories) this test created; removed on drop,
/// also when the test fails.
pub struct Lab {
    pub prefix: String,
    namespaces: Vec<String>,
    pin_dirs: Vec<PathBuf>,
    files: Vec<PathBuf>,
    children: Vec<Child>,
}

/// A container: its namespace, host-side veth name, addresses and MAC.
#[derive(Clone, Debug)]
pub struct Container {
    pub ns: String,
    pub veth: String,
    pub ip4: String,
    pub ip6: String,
    pub mac: [u8; 6],
}

impl Lab {
    pub fn new(tag: &str) -> Lab {
        Lab {
            prefix: format!("oak{}{}", tag, std::process::id() % 100000),
            namespaces: Vec::new(),
            pin_dirs: Vec::new(),
            files: Vec::new(),
            children: Vec::new(),
        }
    }

    pub fn ns(&mut self, name: &str) -> Result<String> {
        let full = format!("{}-{name}", self.prefix);
        let _ = sh(&format!("ip netns del {full} 2>/dev/null"));
        sh(&format!("ip netns add {full}"))?;
        ns_sh(&full, "ip link set lo up")?;
        self.namespaces.push(full.clone());
        Ok(full)
    }

    pub fn pin_dir(&mut self, name: &str) -> PathBuf {
        let p = PathBuf::from(format!("/sys/fs/bpf/{}-{name}", self.prefix));
        let _ = std::fs::remove_dir_all(&p);
        self.pin_dirs.push(p.clone());
        p
    }

    /// The shared underlay: one namespace with a bridge.
    pub fn underlay(&mut self) -> Result<String> {
        let u = self.ns("under")?;
        ns_sh(&u, "ip link add br0 type bridge && ip link set br0 up")?;
        Ok(u)
    }

    /// A node namespace with uplink `eth0` (198.51.100.`host`/24) into the
    /// underlay, forwarding on, and the container bridge with `gw4`/`gw6`.
    pub fn node(
        &mut self,
        name: &str,
        underlay: &str,
        host: u8,
        gw4: &str,
        gw6: &str,
    ) -> Result<String> {
        let n = self.bare_node(name, gw4, gw6)?;
        self.uplink(&n, "eth0", underlay, &format!("198.51.100.{host}/24"))?;
        Ok(n)
    }

    /// A node namespace without any uplink: forwarding on, and the
    /// container bridge with `gw4`/`gw6`. [`Lab::uplink`] and [`Lab::link`]
    /// wire it.
    pub fn bare_node(&mut self, name: &str, gw4: &str, gw6: &str) -> Result<String> {
        let n = self.ns(name)?;
        ns_sh(
            &n,
            &format!(
                "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 && \
                 ip link add goProxyBridge type bridge && ip link set goProxyBridge up && \
                 ip addr add {gw4} dev goProxyBridge && ip -6 addr add {gw6} dev goProxyBridge nodad"
            ),
        )?;
        Ok(n)
    }

    /// Interface `ifname` of `node` into the underlay's bridge, carrying
    /// `address` (with prefix, IPv4 or IPv6; several separated by spaces).
    /// Its far end in the underlay is `u-<node>` for `eth0`, else
    /// `u-<node>-<ifname>` (`<node>` without the lab prefix).
    pub fn uplink(
        &mut self,
        node: &str,
        ifname: &str,
        underlay: &str,
        address: &str,
    ) -> Result<()> {
        let short = node.rsplit('-').next().unwrap_or(node);
        let peer = if ifname == "eth0" {
            format!("u-{short}")
        } else {
            format!("u-{short}-{ifname}")
        };
        self.link(node, ifname, underlay, &peer)?;
        ns_sh(underlay, &format!("ip link set {peer} master br0"))?;
        for a in address.split_whitespace() {
            let family = if a.contains(':') { "-6" } else { "-4" };
            let nodad = if a.contains(':') { " nodad" } else { "" };
            ns_sh(
                node,
                &format!("ip {family} addr add {a} dev {ifname}{nodad}"),
            )?;
        }
        Ok(())
    }

    /// A veth pair between two namespaces, both ends up: `a_if` in `a`,
    /// `b_if` in `b`.
    pub fn link(&mut self, a: &str, a_if: &str, b: &str, b_if: &str) -> Result<()> {
        sh(&format!(
            "ip link add {a_if} netns {a} type veth peer name {b_if} netns {b}"
        ))?;
        ns_sh(a, &format!("ip link set {a_if} up"))?;
        ns_sh(b, &format!("ip link set {b_if} up"))?;
        Ok(())
    }

    /// A container behind `node`'s bridge with addresses `ip4`/`ip6` (with
    /// prefix) and default routes via `gw4`/`gw6`; its MAC is derived from
    /// the last IPv4 octet.
    pub fn container(&mut self, node: &str, name: &str, net: [&str; 4]) -> Result<Container> {
        let [ip4, ip6, gw4, gw6] = net;
        let c = self.ns(name)?;
        let veth = format!("veth-{name}");
        let strip = |s: &str| s.split('/').next().unwrap_or(s).to_string();
        let last: u8 = strip(ip4)
            .rsplit('.')
            .next()
            .and_then(|o| o.parse().ok())
            .unwrap_or(0);
        let mac = [0x02, 0x00, 0x0a, 0x12, 0x00, last];
        let mac_s = mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
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
                 ip addr add {ip4} dev eth0 && ip -6 addr add {ip6} dev eth0 nodad && \
                 ip route add default via {gw4} && ip -6 route add default via {gw6}"
            ),
        )?;
        Ok(Container {
            ns: c,
            veth,
            ip4: strip(ip4),
            ip6: strip(ip6),
            mac,
        })
    }

    /// A scratch file (configuration tables), removed on drop.
    pub fn file(&mut self, name: &str, content: &str) -> Result<String> {
        let p = std::env::temp_dir().join(format!("{}-{name}", self.prefix));
        std::fs::write(&p, content).with_context(|| format!("writing {}", p.display()))?;
        self.files.push(p.clone());
        Ok(p.to_string_lossy().into_owned())
    }

    /// Starts a long-running process inside a namespace and returns its pid;
    /// killed on drop. With `ready`, waits until it prints `ready` on stdout.
    /// `nsenter` rather than `ip netns exec`: the latter remounts /sys and so
    /// hides bpffs, where the dataplane pins its maps and links; nsenter also
    /// execs the program, so the pid is the program's.
    pub fn spawn(&mut self, ns: &str, program: &str, args: &[&str], ready: bool) -> Result<u32> {
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(if ready { Stdio::piped() } else { Stdio::null() })
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

    /// Stops one process this lab started.
    pub fn stop(&mut self, pid: u32) {
        if let Some(i) = self.children.iter().position(|c| c.id() == pid) {
            let mut c = self.children.remove(i);
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Debugging aid: leave everything in place for inspection.
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
