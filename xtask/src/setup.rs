//! The one bootstrap a new machine needs (Debian, as root). Every step
//! checks first and does nothing when its result is already there, so a
//! second run is quick and changes nothing.

use std::path::Path;
use std::process::Command;

use anyhow::Result;

use worker_common::privileges::require_root;

use crate::ebpf::{BPF_LINKER_VERSION, run as run_cmd};

/// Debian packages the worker and its tests run against.
const PACKAGES: &[&str] = &[
    "mosquitto",
    "containerd",
    "runc",
    "bpftool",
    "iperf3",
    "iproute2",
    "busybox-static",
    "nftables",
    // FORWARD DROP as Docker sets it, through iptables-nft and
    // iptables-legacy (netmanager/tests/docker_host.rs); NetManager itself
    // needs iptables-legacy only on hosts that use it.
    "iptables",
    "tcpdump",
    // containerd-client generates its gRPC code with protoc at build time.
    "protobuf-compiler",
    // Test prerequisites (testkit's `Need`): traffic programs inside
    // namespaces, test certificates for the MQTTS test.
    "python3",
    "openssl",
    // `cargo xtask test --full`: Debian 12's kernel under qemu (TCG), with
    // stripped test binaries in the guest.
    "qemu-system-x86",
    "binutils",
    // The unit tests (systemd-analyze verify/security) and the man page test.
    "systemd",
    "man-db",
    // `cargo xtask package`: arm64 cross build (linker, C for ring), lintian,
    // the arm64 smoke run, the Debian 12 root of the install test.
    "gcc-aarch64-linux-gnu",
    "libc6-dev-arm64-cross",
    "lintian",
    "qemu-user-static",
    "debootstrap",
];

/// cargo-deb for `cargo xtask package` (3.8 builds on rustc 1.85+).
const CARGO_DEB_VERSION: &str = "3.8.0";
/// The arm64 package is cross-built.
const CROSS_TARGETS: &[&str] = &["aarch64-unknown-linux-gnu"];

pub fn run() -> Result<()> {
    require_root(
        "`cargo xtask setup`",
        "it installs packages and mounts bpffs",
    )?;
    rust_src()?;
    bpf_linker()?;
    packages()?;
    python_packages()?;
    bpffs()?;
    println!("setup complete");
    Ok(())
}

fn rust_src() -> Result<()> {
    let out = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()?;
    if String::from_utf8_lossy(&out.stdout).contains("rust-src") {
        println!("ok: rust-src for nightly");
        return Ok(());
    }
    run_cmd(
        Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
        "rustup component add rust-src",
    )
}

fn bpf_linker() -> Result<()> {
    if let Ok(out) = Command::new("bpf-linker").arg("--version").output()
        && String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION)
    {
        println!("ok: bpf-linker {BPF_LINKER_VERSION}");
        return Ok(());
    }
    // 0.10.2 uses nightly's own LLVM; newer ones want a system LLVM.
    run_cmd(
        Command::new("cargo").args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
        ]),
        "cargo install bpf-linker",
    )
}

/// What only `cargo xtask package` needs (the arm64 target, cargo-deb):
/// installed when packages are built, so the bootstrap CI runs stays short
/// (cargo-deb alone is minutes of compiling).
pub fn package_tools() -> Result<()> {
    cross_targets()?;
    cargo_deb()
}

fn cross_targets() -> Result<()> {
    let out = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()?;
    let installed = String::from_utf8_lossy(&out.stdout).into_owned();
    for target in CROSS_TARGETS {
        if installed.lines().any(|l| l.trim() == *target) {
            println!("ok: rust target {target}");
            continue;
        }
        run_cmd(
            Command::new("rustup").args(["target", "add", target]),
            "rustup target add",
        )?;
    }
    Ok(())
}

fn cargo_deb() -> Result<()> {
    if let Ok(out) = Command::new("cargo").args(["deb", "--version"]).output()
        && String::from_utf8_lossy(&out.stdout).contains(CARGO_DEB_VERSION)
    {
        println!("ok: cargo-deb {CARGO_DEB_VERSION}");
        return Ok(());
    }
    run_cmd(
        Command::new("cargo").args([
            "install",
            "cargo-deb",
            "--version",
            CARGO_DEB_VERSION,
            "--locked",
        ]),
        "cargo install cargo-deb",
    )
}

fn packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        println!("ok: Debian packages");
        return Ok(());
    }
    run_cmd(Command::new("apt-get").arg("update"), "apt-get update")?;
    run_cmd(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing),
        "apt-get install",
    )
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Python modules the tests use: the Prometheus project's own parser checks
/// that our /metrics output is valid OpenMetrics.
const PYTHON_PACKAGES: &[(&str, &str)] = &[("prometheus_client", "prometheus-client")];

fn python_packages() -> Result<()> {
    for (module, package) in PYTHON_PACKAGES {
        let have = Command::new("python3")
            .args(["-c", &format!("import {module}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if have {
            println!("ok: python module {module}");
            continue;
        }
        run_cmd(
            Command::new("python3").args(["-m", "pip", "install", "--quiet", package]),
            "pip install",
        )?;
    }
    Ok(())
}

fn bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        println!("ok: bpffs on /sys/fs/bpf");
        return Ok(());
    }
    if !Path::new("/sys/fs/bpf").exists() {
        std::fs::create_dir_all("/sys/fs/bpf")?;
    }
    run_cmd(
        Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]),
        "mounting bpffs",
    )
}
