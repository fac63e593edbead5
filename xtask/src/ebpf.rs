//! Building the eBPF object.
//!
//! The programs live in their own workspace (`netmanager-ebpf/`) pinned to
//! the nightly toolchain by its rust-toolchain.toml; we build them with
//! `rustup run nightly cargo build` so that neither the caller's toolchain
//! nor its environment leaks in. NetManager's build script picks the object
//! up from the fixed output path below.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

pub const TARGET: &str = "bpfel-unknown-none";
pub const BPF_LINKER_VERSION: &str = "0.10.2";

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Builds the programs and returns the object's path.
pub fn build(release: bool) -> Result<PathBuf> {
    check_toolchain()?;
    let dir = workspace_root().join("netmanager-ebpf");
    let mut cmd = Command::new("rustup");
    cmd.current_dir(&dir)
        .args(["run", "nightly", "cargo", "build"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET");
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd, "building the eBPF programs")?;
    let profile = if release { "release" } else { "debug" };
    let obj = dir
        .join("target")
        .join(TARGET)
        .join(profile)
        .join("netmanager");
    if !obj.exists() {
        bail!("the build succeeded but {} is missing", obj.display());
    }
    // NetManager embeds the release object; keep that path current.
    Ok(obj)
}

/// Says precisely what is missing and how to get it.
fn check_toolchain() -> Result<()> {
    let mut missing = Vec::new();
    let nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output();
    match nightly {
        Ok(o) if o.status.success() => {
            let sysroot = Command::new("rustup")
                .args(["run", "nightly", "rustc", "--print", "sysroot"])
                .output()
                .context("asking nightly rustc for its sysroot")?;
            let sysroot = String::from_utf8_lossy(&sysroot.stdout).trim().to_string();
            let src = Path::new(&sysroot).join("lib/rustlib/src/rust/library/core");
            if !src.exists() {
                missing.push(
                    "rust-src for nightly: rustup component add rust-src --toolchain nightly"
                        .to_string(),
                );
            }
        }
        _ => missing.push("the nightly toolchain: rustup toolchain install nightly".to_string()),
    }
    if Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_err()
    {
        missing.push(format!(
            "bpf-linker: cargo install bpf-linker@{BPF_LINKER_VERSION} --locked"
        ));
    }
    if missing.is_empty() {
        return Ok(());
    }
    bail!(
        "cannot build the eBPF programs; missing:\n  - {}\n(`cargo xtask setup` installs all of it)",
        missing.join("\n  - ")
    )
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
