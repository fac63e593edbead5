//! The benchmark's testbed, built with the test kit: two nodes on one
//! underlay -- node n1 (198.51.100.1, containers 10.18.0.0/26) with the
//! client c1 and the same-node server c3, node n2 (198.51.100.2,
//! 10.18.0.64/26) with c2 -- plus the programs, pin directories and files
//! the scenarios add. Container MTU 1450 everywhere (the overlay's tunnel
//! MTU), so all paths carry the same segment sizes.
//!
//! IPv6: containers fc00::/122 on n1 and fc00::40/122 on n2 (distinct, so
//! the direct and VXLAN paths can route between them), and the nodes carry
//! 2001:db8:100::<host>/64 on the underlay for the direct IPv6 path.

use std::path::PathBuf;
use std::process::Stdio;

use anyhow::{Context, Result};
use tempfile::TempDir;
use testkit::{Container, Node, NsPath, PinDir, Proc, Underlay};

/// Field order is drop order: programs first (unpinning then detaches the
/// overlay), the namespaces last.
pub struct Topology {
    procs: Vec<Proc>,
    pins: Vec<PinDir>,
    files: TempDir,
    pub c1: Container,
    pub c2: Container,
    pub c3: Container,
    pub n1: Node,
    pub n2: Node,
    _underlay: Underlay,
}

/// Node `host`'s IPv6 underlay address, with prefix.
pub fn node_ip6(host: u8) -> String {
    format!("2001:db8:100::{host}/64")
}

impl Topology {
    pub fn build() -> Result<Topology> {
        // Each guard owns its namespace as soon as it exists, so a
        // half-built testbed is cleaned up too.
        let underlay = Underlay::new()?;
        let n1 = underlay.node(1)?;
        let n2 = underlay.node(2)?;
        for (n, host) in [(&n1, 1), (&n2, 2)] {
            // No duplicate address detection: the addresses are usable at
            // once instead of tentative for a second or two.
            for dev in ["all", "default", "eth0"] {
                n.ns.sysctl(&format!("net/ipv6/conf/{dev}/accept_dad"), "0")?;
            }
            n.ns.add_address("eth0", &node_ip6(host))?.keep();
        }
        n1.container_bridge("10.18.0.1/26", "fc00::1/122")?;
        n2.container_bridge("10.18.0.65/26", "fc00::41/122")?;
        let c1 = n1.container(
            "c1",
            ["10.18.0.2/26", "fc00::2/122", "10.18.0.1", "fc00::1"],
        )?;
        let c3 = n1.container(
            "c3",
            ["10.18.0.3/26", "fc00::3/122", "10.18.0.1", "fc00::1"],
        )?;
        let c2 = n2.container(
            "c2",
            ["10.18.0.66/26", "fc00::42/122", "10.18.0.65", "fc00::41"],
        )?;
        Ok(Topology {
            procs: Vec::new(),
            pins: Vec::new(),
            files: tempfile::Builder::new()
                .prefix("oak-bench-")
                .tempdir()
                .context("a directory for the scenario tables")?,
            c1,
            c2,
            c3,
            n1,
            n2,
            _underlay: underlay,
        })
    }

    /// Removes a pin directory now (detaching what is pinned in it).
    pub fn unpin(&mut self, path: &std::path::Path) {
        self.pins.retain(|p| p.path() != path);
    }

    /// A pin directory, removed with the testbed.
    pub fn pin_dir(&mut self, name: &str) -> PathBuf {
        let pins = PinDir::new(&format!("b{name}"));
        let path = pins.to_path_buf();
        self.pins.push(pins);
        path
    }

    /// A scratch file (configuration tables), removed with the testbed.
    pub fn file(&mut self, name: &str, content: &str) -> Result<String> {
        let p = self.files.path().join(name);
        std::fs::write(&p, content).with_context(|| format!("writing {}", p.display()))?;
        Ok(p.to_string_lossy().into_owned())
    }

    /// Starts a long-running program inside `ns` and returns its pid; it
    /// stops with the testbed. With `ready`, waits until it prints `ready`.
    pub fn spawn(&mut self, ns: &NsPath, program: &str, args: &[&str], ready: bool) -> Result<u32> {
        let mut cmd = ns.command(program)?;
        cmd.args(args).stdin(Stdio::null()).stdout(if ready {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        let mut p = Proc::spawn(program, cmd)?;
        if ready {
            p.wait_ready()?;
        }
        let pid = p.pid();
        self.procs.push(p);
        Ok(pid)
    }

    /// Stops one program this testbed started.
    pub fn stop(&mut self, pid: u32) {
        self.procs.retain(|p| p.pid() != pid);
    }
}
