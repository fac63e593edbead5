//! The eBPF object, for `cargo xtask build-ebpf` and the commands that want
//! it built before anything else (sandbox, bench).
//!
//! netmanager's build script builds it too, through the same crate
//! (netmanager-ebpf-build) into the same target directory, so whichever runs
//! second finds it up to date.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use netmanager_ebpf_build::{Output, Profile};

pub use netmanager_ebpf_build::BPF_LINKER_VERSION;

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Builds the programs and returns the object's path.
pub fn build(release: bool) -> Result<PathBuf> {
    let profile = if release {
        Profile::Release
    } else {
        Profile::Debug
    };
    netmanager_ebpf_build::build(profile, Output::Inherit)
}

/// Runs a command, turning a failure into an error that names it.
pub fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("{what}: could not start {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}
