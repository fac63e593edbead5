//! Builds the eBPF programs (`netmanager-ebpf/`) into the object NetManager
//! embeds. One implementation for netmanager's build script, so that a
//! plain `cargo build` works on a fresh clone, and for `cargo xtask build-ebpf`.
//!
//! The programs are a workspace of their own, built for bpfel-unknown-none
//! by the nightly toolchain (`-Z build-std=core`, bpf-linker as linker). We
//! run `rustup run nightly cargo build` in that directory with the calling
//! cargo's settings removed from the environment (its rustc, wrappers such as
//! clippy-driver, rustflags, target directory), so only the eBPF workspace's
//! own configuration applies. The output goes to the eBPF workspace's own
//! target directory: never the calling cargo's, so neither waits for the
//! other's lock, and one incremental build serves every caller (dev, release,
//! clippy, xtask): when nothing changed the inner cargo finishes at once.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

pub const TARGET: &str = "bpfel-unknown-none";
pub const BPF_LINKER_VERSION: &str = "0.10.2";
/// The eBPF crate's binary, i.e. the object file.
const BINARY: &str = "netmanager";

/// Set by a stable cargo for whatever it runs; meaningless or harmful for
/// the nightly build of another workspace.
const CALLER_ENV: &[&str] = &[
    "RUSTUP_TOOLCHAIN",
    "RUSTC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTDOC",
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_RUSTC",
    "CARGO_BUILD_RUSTC_WRAPPER",
    "CARGO_BUILD_RUSTC_WORKSPACE_WRAPPER",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_BUILD_TARGET",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET_DIR",
    "CARGO_BUILD_BUILD_DIR",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// What NetManager embeds.
    Release,
    Debug,
}

impl Profile {
    fn dir(self) -> &'static str {
        match self {
            Profile::Release => "release",
            Profile::Debug => "debug",
        }
    }
}

/// Where the inner cargo's messages go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// The caller's terminal (xtask).
    Inherit,
    /// Stderr only: a build script's stdout carries directives to cargo.
    Stderr,
}

/// The eBPF workspace, next to this crate in the repository.
pub fn ebpf_dir() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).join("netmanager-ebpf")
}

/// Where [`build`] leaves the object.
pub fn object(profile: Profile) -> PathBuf {
    ebpf_dir()
        .join("target")
        .join(TARGET)
        .join(profile.dir())
        .join(BINARY)
}

/// Builds the programs (incrementally) and returns the object's path.
pub fn build(profile: Profile, output: Output) -> Result<PathBuf> {
    check_toolchain()?;
    let dir = ebpf_dir();
    let mut cmd = Command::new("rustup");
    cmd.current_dir(&dir)
        .args(["run", "nightly", "cargo", "build", "--target-dir"])
        .arg(dir.join("target"));
    if profile == Profile::Release {
        cmd.arg("--release");
    }
    for var in CALLER_ENV {
        cmd.env_remove(var);
    }
    if output == Output::Stderr {
        cmd.stdout(std::io::stderr());
    }
    let status = cmd
        .status()
        .context("building the eBPF programs: could not start rustup")?;
    if !status.success() {
        bail!(
            "building the eBPF programs in {} failed ({status}); see the compiler's messages",
            dir.display()
        );
    }
    let obj = object(profile);
    if !obj.exists() {
        bail!("the eBPF build succeeded but {} is missing", obj.display());
    }
    Ok(obj)
}

/// What the last build of `profile` read from this repository: its source
/// files (from the compiler's dep-info) and the manifests of their crates and
/// of the eBPF workspace. A build script watches these, so it runs the inner
/// build again exactly when the programs may have changed.
pub fn inputs(profile: Profile) -> Result<Vec<PathBuf>> {
    let dep_info = object(profile).with_extension("d");
    let text = std::fs::read_to_string(&dep_info)
        .with_context(|| format!("reading {}", dep_info.display()))?;
    let dir = ebpf_dir();
    let mut inputs: Vec<PathBuf> = ["Cargo.toml", "Cargo.lock", "rust-toolchain.toml"]
        .iter()
        .map(|f| dir.join(f))
        .chain([dir.join(".cargo").join("config.toml")])
        .collect();
    for source in dep_info_sources(&text) {
        if let Some(manifest) = manifest_of(&source) {
            inputs.push(manifest);
        }
        inputs.push(source);
    }
    inputs.sort();
    inputs.dedup();
    Ok(inputs)
}

/// The prerequisites of the first rule of a Makefile-style dep-info file
/// (`target: a.rs b\ c.rs`).
fn dep_info_sources(text: &str) -> Vec<PathBuf> {
    let Some(line) = text.lines().next() else {
        return Vec::new();
    };
    let Some((_, deps)) = line.split_once(": ") else {
        return Vec::new();
    };
    let mut sources = Vec::new();
    let mut current = String::new();
    let mut chars = deps.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => current.extend(chars.next()),
            ' ' => {
                if !current.is_empty() {
                    sources.push(PathBuf::from(std::mem::take(&mut current)));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        sources.push(PathBuf::from(current));
    }
    sources
}

/// The Cargo.toml of the crate a source file belongs to.
fn manifest_of(source: &Path) -> Option<PathBuf> {
    source
        .ancestors()
        .skip(1)
        .map(|dir| dir.join("Cargo.toml"))
        .find(|m| m.exists())
}

/// The nightly toolchain, its rust-src or bpf-linker is not installed.
#[derive(Debug)]
pub struct MissingToolchain(Vec<String>);

impl std::fmt::Display for MissingToolchain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cannot build the eBPF programs; missing:\n  - {}\n`cargo xtask setup` installs all of it \
             (or point NETMANAGER_EBPF_OBJECT at a prebuilt object)",
            self.0.join("\n  - ")
        )
    }
}

impl std::error::Error for MissingToolchain {}

/// Says precisely what is missing and how to get it.
pub fn check_toolchain() -> std::result::Result<(), MissingToolchain> {
    let mut missing = Vec::new();
    match nightly_sysroot() {
        Ok(sysroot) => {
            if !sysroot.join("lib/rustlib/src/rust/library/core").exists() {
                missing.push(
                    "rust-src for nightly: rustup component add rust-src --toolchain nightly"
                        .to_string(),
                );
            }
        }
        Err(what) => missing.push(what),
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
        Ok(())
    } else {
        Err(MissingToolchain(missing))
    }
}

/// The nightly toolchain's sysroot, or what to install to get one.
fn nightly_sysroot() -> std::result::Result<PathBuf, String> {
    let out = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output();
    match out {
        Ok(o) if o.status.success() => Ok(PathBuf::from(
            String::from_utf8_lossy(&o.stdout).trim().to_string(),
        )),
        Ok(_) => Err("the nightly toolchain: rustup toolchain install nightly".to_string()),
        Err(_) => Err("rustup (https://rustup.rs), then: rustup toolchain install nightly".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dep_info_lists_the_first_rules_prerequisites() {
        let text = "/t/netmanager: /r/a.rs /r/dir\\ with\\ space/b.rs\n\n/r/a.rs:\n";
        assert_eq!(
            dep_info_sources(text),
            vec![
                PathBuf::from("/r/a.rs"),
                PathBuf::from("/r/dir with space/b.rs")
            ]
        );
        assert!(dep_info_sources("").is_empty());
    }

    #[test]
    fn sources_map_to_their_crates_manifest() {
        let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs");
        assert_eq!(
            manifest_of(&lib),
            Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        );
    }
}
