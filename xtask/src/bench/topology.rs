//! The benchmark's testbed: the shared namespace `Lab` wired as two nodes
//! on one underlay -- node n1 (198.51.100.1, containers 10.18.0.0/26) with
//! the client c1 and the same-node server c3, node n2 (198.51.100.2,
//! 10.18.0.64/26) with c2 -- plus per-scenario route/device setups that
//! undo themselves. Container MTU 1450 everywhere (the overlay's tunnel
//! MTU), so all paths carry the same segment sizes.

use std::ops::{Deref, DerefMut};

use anyhow::Result;

pub use xtask::sandbox::procs::{ns_sh, sh};
pub use xtask::testbed::Container;
use xtask::testbed::Lab;

pub struct Topology {
    lab: Lab,
    pub n1: String,
    pub n2: String,
    pub c1: Container,
    pub c2: Container,
    pub c3: Container,
}

impl Topology {
    pub fn build() -> Result<Topology> {
        // The lab owns every namespace as soon as it exists, so a half-built
        // testbed is cleaned up too.
        let mut lab = Lab::new("b");
        let under = lab.underlay()?;
        let n1 = lab.node("n1", &under, 1, "10.18.0.1/26", "fc00::1/120")?;
        let n2 = lab.node("n2", &under, 2, "10.18.0.65/26", "fc00::41/120")?;
        let c1 = lab.container(
            &n1,
            "c1",
            ["10.18.0.2/26", "fc00::2/120", "10.18.0.1", "fc00::1"],
        )?;
        let c3 = lab.container(
            &n1,
            "c3",
            ["10.18.0.3/26", "fc00::3/120", "10.18.0.1", "fc00::1"],
        )?;
        let c2 = lab.container(
            &n2,
            "c2",
            ["10.18.0.66/26", "fc00::42/120", "10.18.0.65", "fc00::41"],
        )?;
        Ok(Topology {
            lab,
            n1,
            n2,
            c1,
            c2,
            c3,
        })
    }
}

impl Deref for Topology {
    type Target = Lab;
    fn deref(&self) -> &Lab {
        &self.lab
    }
}

impl DerefMut for Topology {
    fn deref_mut(&mut self) -> &mut Lab {
        &mut self.lab
    }
}

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
