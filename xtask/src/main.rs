//! Project automation: `cargo xtask <command>`.
//!
//! - `setup`: one-time (idempotent) machine bootstrap.
//! - `build-ebpf`: builds the eBPF object NetManager embeds (netmanager's
//!   build script does so as well; this is for looking at the object).
//! - `test`: everything CI runs (format, lint, all tests, with every
//!   prerequisite required: `OAK_REQUIRE_ALL=1`);
//!   `--full` adds the long parser fuzzing run, the eBPF suites on
//!   Debian 12's kernel under qemu and the packages' build and install test.
//! - `package`: Debian packages for amd64 and arm64; `man`: only the man
//!   pages and completions (docs/operations.md).
//! - `sandbox`: a local cluster double with workers (see docs).
//! - `bench`: overlay performance against baselines (docs/performance.md).
//! - `fuzz`: the packet fuzzer at full length (docs/security.md).

mod bench;
mod ebpf;
mod kernel_vm;
mod package;
mod package_test;
mod setup;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "xtask",
    about = "Build, set up and test the Oakestra eBPF worker"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install toolchain pieces and Debian packages, mount bpffs (idempotent; needs root).
    Setup,
    /// Build the eBPF programs (nightly + rust-src + bpf-linker).
    BuildEbpf {
        /// Debug profile instead of release.
        #[arg(long)]
        debug: bool,
    },
    /// Run what CI runs: fmt, clippy and every test (needs root).
    Test {
        /// Also run the parser fuzz targets with the long case count, boot
        /// Debian 12's Linux 6.1 under qemu and run the eBPF suites there
        /// (result in docs/old-kernels.md), and build the packages and
        /// install them into a Debian 12 root (result in docs/operations.md).
        #[arg(long)]
        full: bool,
        /// Extra arguments passed to `cargo test`.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// A whole cluster on this machine: cluster double, N workers, sample services, and a
    /// workbench for your own SLAs (deploy, ps, logs, scale, undeploy); needs root.
    Sandbox(xtask::sandbox::cli::SandboxArgs),
    /// Overlay throughput, latency, per-packet cost and footprint against baselines (needs root).
    Bench(bench::Args),
    /// Build the Debian packages (cargo-deb), lintian and glibc checks, arm64 smoke run under qemu.
    Package {
        /// Architectures [default: amd64 and arm64].
        #[arg(long = "arch", value_enum)]
        arches: Vec<package::Arch>,
        /// Then install, upgrade and purge the amd64 packages in a Debian 12 root.
        #[arg(long = "install-test")]
        install_test: bool,
    },
    /// Generate the man pages, completions and default conf.json into packaging/generated.
    Man,
    /// Fuzz the eBPF programs with generated frames through BPF_PROG_TEST_RUN (needs root).
    Fuzz {
        /// Frames to run (`cargo xtask test` runs a fixed-seed 60,000).
        #[arg(long, default_value_t = 1_000_000)]
        frames: u64,
        /// Seed of the generator; a fresh one by default (printed, to rerun a failure).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Only the old-kernel part of `test --full`: the eBPF suites on Debian 12's Linux 6.1 under qemu.
    OldKernel,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::run(),
        Command::BuildEbpf { debug } => ebpf::build(!debug).map(|path| {
            println!("eBPF object: {}", path.display());
        }),
        Command::Test { full, args } => {
            test(&args)?;
            if full {
                parser_fuzz_long()?;
                kernel_vm::run_old_kernel_suites()?;
                let built = package::package(&[package::Arch::Amd64, package::Arch::Arm64])?;
                package_test::install_test(&built)?;
            }
            Ok(())
        }
        Command::Sandbox(args) => xtask::sandbox::cli::run(args, || ebpf::build(true).map(drop)),
        Command::Bench(args) => bench::run(args),
        Command::Package {
            arches,
            install_test,
        } => {
            let arches = if arches.is_empty() {
                vec![package::Arch::Amd64, package::Arch::Arm64]
            } else {
                arches
            };
            let built = package::package(&arches)?;
            if install_test {
                package_test::install_test(&built)?;
            }
            Ok(())
        }
        Command::Man => package::assets().map(|dir| {
            println!("man pages, completions and conf.json in {}", dir.display());
        }),
        Command::Fuzz { frames, seed } => fuzz(frames, seed),
        Command::OldKernel => kernel_vm::run_old_kernel_suites(),
    }
}

/// The parser fuzz targets with the long run's case count (CI's share runs
/// in `cargo test`); see netmanager/tests/fuzz_support.
fn parser_fuzz_long() -> Result<()> {
    let mut cmd = std::process::Command::new("cargo");
    cmd.current_dir(ebpf::workspace_root())
        .args(["test", "-p", "netmanager", "-p", "nodeengine"])
        .args(["--test", "parser_fuzz"])
        .env("OAK_FUZZ_CASES", PARSER_FUZZ_LONG_CASES.to_string());
    ebpf::run(&mut cmd, "parser fuzzing (long run)")
}

/// Cases per parser fuzz target in `cargo xtask test --full`.
const PARSER_FUZZ_LONG_CASES: u32 = 50_000;

/// Runs netmanager's packet fuzzer (tests/dataplane_fuzz.rs) with `frames`
/// frames; it prints its invariants' verdict, the counters it moved and,
/// on failure, the seed and frames to reproduce.
fn fuzz(frames: u64, seed: Option<u64>) -> Result<()> {
    worker_common::privileges::require_root("`cargo xtask fuzz`", "BPF_PROG_TEST_RUN needs it")?;
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    println!("fuzzing {frames} frames, seed {seed}");
    let started = std::time::Instant::now();
    ebpf::run(
        std::process::Command::new("cargo")
            .current_dir(ebpf::workspace_root())
            .args([
                "test",
                "-p",
                "netmanager",
                "--test",
                "dataplane_fuzz",
                "--",
                "--nocapture",
            ])
            .env("OAK_FUZZ_FRAMES", frames.to_string())
            .env("OAK_FUZZ_SEED", seed.to_string()),
        "the packet fuzzer",
    )?;
    println!(
        "{frames} frames passed in {:.0} s (seed {seed})",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The README's test command. The eBPF programs need no separate step:
/// netmanager's build script builds them (once; clippy and test share the
/// eBPF target directory). Every test runs: a missing prerequisite (root,
/// bpffs, mosquitto, containerd, ...) fails its test instead of leaving it
/// "ignored, not run" (testkit/README.md).
fn test(extra: &[String]) -> Result<()> {
    let root = ebpf::workspace_root();
    ebpf::run(
        std::process::Command::new("cargo")
            .current_dir(&root)
            .args(["fmt", "--all", "--", "--check"]),
        "cargo fmt --check (run `cargo fmt --all` to fix)",
    )?;
    ebpf::run(
        std::process::Command::new("cargo")
            .current_dir(&root)
            .args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]),
        "cargo clippy",
    )?;
    // Every suite appends the tests it could not run; listed at the end.
    let not_run_log = root.join("target").join("oak-not-run.log");
    let _ = std::fs::remove_file(&not_run_log);
    let mut cmd = std::process::Command::new("cargo");
    cmd.current_dir(&root)
        .env(testkit::harness::REQUIRE_ALL_ENV, "1")
        .env(testkit::harness::NOT_RUN_LOG_ENV, &not_run_log)
        .args(["test", "--workspace", "--no-fail-fast"])
        .args(extra);
    let result = ebpf::run(&mut cmd, "cargo test --workspace");
    let not_run = std::fs::read_to_string(&not_run_log).unwrap_or_default();
    if !not_run.is_empty() {
        eprintln!(
            "\nNOT RUN for a missing prerequisite (each one failed its test; \
             `cargo xtask setup` installs them):\n{not_run}"
        );
    }
    result
}
