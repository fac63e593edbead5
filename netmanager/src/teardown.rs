//! `NetManager teardown`: removes the dataplane for good, for package
//! removal and for operators who leave the overlay (docs/operations.md).
//!
//! A restart or an upgrade never needs this: pinned links and maps keep the
//! programs attached while NetManager is away and the next one adopts them.
//! Removing the pins is what detaches the programs (a pinned TCX link lives
//! until its last reference goes), so this runs only while no NetManager
//! holds them.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::cli::Cli;
use crate::dataplane::INJECT_DEVICE;
use crate::plumbing::{BRIDGE, Plumbing, nft};

/// One thing teardown removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A classic tc filter (netlink attach mode) running `program` on the
    /// ingress of `interface`: it outlives the pins, unlike a TCX link.
    TcFilter { program: String, interface: String },
    /// The pin directory: maps and links (the programs detach with them).
    Pins(PathBuf),
    /// NetManager's nft table `inet oakestra` (NAT and forwarding rules).
    NftTable,
    /// A network interface: the bridge or the reinjection veth pair.
    Link(&'static str),
    /// The state file that would make the next start adopt deployments.
    StateFile(PathBuf),
}

impl std::fmt::Display for Item {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Item::TcFilter { program, interface } => {
                write!(f, "tc filter of {program} on {interface}")
            }
            Item::Pins(d) => write!(f, "pinned maps and links in {}", d.display()),
            Item::NftTable => write!(f, "nft table inet {}", nft::TABLE),
            Item::Link(name) => write!(f, "interface {name}"),
            Item::StateFile(p) => write!(f, "state file {}", p.display()),
        }
    }
}

/// Removes (or with `dry_run` only lists) what is there of the dataplane in
/// this network namespace.
pub async fn run(cli: &Cli, dry_run: bool) -> Result<()> {
    worker_common::privileges::require_root(
        "`NetManager teardown`",
        "it removes interfaces, nft rules and BPF pins",
    )?;
    if daemon_answers(&cli.socket_path()).await {
        bail!(
            "a NetManager answers on {}: stop it first (systemctl stop netmanager), \
             or it would keep the programs attached",
            cli.socket_path().display()
        );
    }
    let plumbing = Plumbing::new(crate::config::DEFAULT_TUNNEL_MTU)?;
    let found = present(&plumbing, &cli.bpf_dir(), &cli.state_path()).await?;
    if found.is_empty() {
        println!("nothing to remove: no NetManager dataplane in this network namespace");
        return Ok(());
    }
    for item in &found {
        if dry_run {
            println!("would remove {item}");
        } else {
            remove(&plumbing, &cli.bpf_dir(), item)
                .await
                .with_context(|| format!("removing {item}"))?;
            println!("removed {item}");
        }
    }
    Ok(())
}

async fn daemon_answers(socket: &Path) -> bool {
    socket.exists() && crate::api::probe(socket.to_path_buf()).await.is_ok()
}

/// What of the dataplane exists here, in the order it is removed: the tc
/// filters and pins first (traffic stops being rewritten), then the rules and
/// interfaces.
pub async fn present(plumbing: &Plumbing, bpf_dir: &Path, state: &Path) -> Result<Vec<Item>> {
    let mut found = Vec::new();
    for (program, interface) in crate::dataplane::recorded_filters(bpf_dir)? {
        found.push(Item::TcFilter { program, interface });
    }
    if bpf_dir.exists() {
        found.push(Item::Pins(bpf_dir.to_path_buf()));
    }
    if nft_table_exists()? {
        found.push(Item::NftTable);
    }
    for name in [BRIDGE, INJECT_DEVICE] {
        if plumbing.link_by_name(name).await?.is_some() {
            found.push(Item::Link(name));
        }
    }
    if state.exists() {
        found.push(Item::StateFile(state.to_path_buf()));
    }
    Ok(found)
}

fn nft_table_exists() -> Result<bool> {
    let out = std::process::Command::new("nft")
        .args(["list", "table", "inet", nft::TABLE])
        .output()
        .context("running nft (is nftables installed?)")?;
    Ok(out.status.success())
}

async fn remove(plumbing: &Plumbing, bpf_dir: &Path, item: &Item) -> Result<()> {
    match item {
        Item::TcFilter { program, interface } => {
            crate::dataplane::remove_recorded_filter(bpf_dir, program, interface)
                .map_err(Into::into)
        }
        Item::Pins(dir) => std::fs::remove_dir_all(dir).map_err(Into::into),
        Item::NftTable => tokio::task::spawn_blocking(nft::remove).await?,
        // Deleting one end of the reinjection pair removes both.
        Item::Link(name) => plumbing.delete_link(name).await,
        Item::StateFile(p) => std::fs::remove_file(p).map_err(Into::into),
    }
}
