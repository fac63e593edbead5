//! The node's NAT table for the deployments' port mappings, written one
//! writer at a time and skipped when a deploy changes nothing in it.

use anyhow::{Context, Result};

use crate::addresses::{Subnet, V4_PREFIX, V6_PREFIX};
use crate::local::LocalState;
use crate::plumbing::{self, nft};

/// Writes the node's NAT table and the host's FORWARD accepts, one writer
/// at a time, and remembers the table last written: a deploy that changes
/// no port mapping then does not wait for `nft` (three runs of it, tens of
/// milliseconds on a busy node; deploy -> CREATED is a measured goal,
/// docs/performance.md).
#[derive(Default)]
pub struct NatWriter {
    /// The script last applied; held while writing.
    written: std::sync::Mutex<Option<String>>,
}

impl NatWriter {
    /// Whether `rules` is what the table already holds (false while a
    /// write is in progress).
    pub(super) fn unchanged(&self, rules: &nft::Ruleset) -> bool {
        self.written
            .try_lock()
            .is_ok_and(|w| w.as_deref() == Some(rules.render().as_str()))
    }

    /// Writes the rules of the deployments as they are now (blocking).
    pub(super) fn write(&self, local: &LocalState, subnet: &Subnet) -> Result<()> {
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        let rules = nat_rules(local, subnet);
        // Forget first: a failed write must be retried, not trusted.
        *written = None;
        nft::apply(&rules)?;
        // Then make sure the host's own FORWARD chain (Docker's DROP policy)
        // lets the bridge's traffic through (see `plumbing::forward`).
        plumbing::forward::ensure(&rules.bridge)
            .context("accepting the bridge's traffic in the host's FORWARD chain")?;
        *written = Some(rules.render());
        Ok(())
    }
}

/// The NAT table for the deployments' port mappings.
pub(super) fn nat_rules(local: &LocalState, subnet: &Subnet) -> nft::Ruleset {
    let containers = local
        .list()
        .into_iter()
        .filter(|d| !d.ports.is_empty())
        .map(|d| nft::ContainerPorts {
            v4: d.addresses.v4,
            v6: d.addresses.v6,
            mappings: d.ports,
        })
        .collect();
    nft::Ruleset {
        bridge: plumbing::BRIDGE.to_string(),
        subnet_v4: (subnet.v4_network(), V4_PREFIX),
        subnet_v6: (subnet.v6_network(), V6_PREFIX),
        containers,
    }
}
