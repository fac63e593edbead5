//! Builds the eBPF programs (nightly, in their own workspace and target
//! directory; see netmanager-ebpf-build) and embeds the object, so the
//! NetManager binary is self-contained and plain `cargo build` works.
//! `NETMANAGER_EBPF_OBJECT` points at a prebuilt object instead.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use netmanager_ebpf_build::{MissingToolchain, Output, Profile};

const OVERRIDE: &str = "NETMANAGER_EBPF_OBJECT";

fn main() -> ExitCode {
    println!("cargo::rerun-if-env-changed={OVERRIDE}");
    let object = match std::env::var_os(OVERRIDE) {
        Some(path) => {
            let path = PathBuf::from(path);
            println!("cargo::rerun-if-changed={}", path.display());
            path
        }
        None => match build() {
            Ok(path) => path,
            Err(e) => {
                for line in format!("{e:#}").lines() {
                    println!("cargo::error={line}");
                }
                // cargo::error alone fails the build; a non-zero exit adds
                // our stderr, i.e. the compiler's messages, which only a
                // failed compilation has.
                return match e.downcast_ref::<MissingToolchain>() {
                    Some(_) => ExitCode::SUCCESS,
                    None => ExitCode::FAILURE,
                };
            }
        },
    };
    match embed(&object) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("cargo::error={e}");
            ExitCode::FAILURE
        }
    }
}

/// Builds the release object and tells cargo which files it came from.
fn build() -> anyhow::Result<PathBuf> {
    let object = netmanager_ebpf_build::build(Profile::Release, Output::Stderr)?;
    for input in netmanager_ebpf_build::inputs(Profile::Release)? {
        println!("cargo::rerun-if-changed={}", input.display());
    }
    Ok(object)
}

fn embed(object: &Path) -> Result<(), String> {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").ok_or("cargo did not set OUT_DIR")?);
    std::fs::copy(object, out.join("netmanager.bpf.o"))
        .map(drop)
        .map_err(|e| format!("copying the eBPF object {}: {e}", object.display()))
}
