//! `cargo xtask package`: the Debian packages `oakestra-netmanager` and
//! `oakestra-nodeengine` for amd64 and arm64 (cross-built), checked with
//! lintian, against Ubuntu 22.04's glibc, and (arm64) under qemu-user.
//! `cargo xtask man`: only the generated man pages and completions.
//!
//! cargo-deb reads `[package.metadata.deb]` of netmanager and nodeengine;
//! the generated assets come from `package-assets` (run as a binary: xtask
//! must build before the nightly toolchain netmanager's build script needs
//! is installed, so it cannot link netmanager itself). docs/operations.md
//! describes the packages.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::ebpf::{run, workspace_root};

/// The packages, by the crate cargo-deb builds them from.
pub const PACKAGES: &[(&str, &str)] = &[
    ("netmanager", "oakestra-netmanager"),
    ("nodeengine", "oakestra-nodeengine"),
];

/// Binaries in the packages, for the glibc and qemu checks.
const BINARIES: &[&str] = &["NetManager", "NodeEngine", "nodeengined"];

/// Ubuntu 22.04's glibc: no binary may need a newer symbol version.
pub const MAX_GLIBC: (u32, u32) = (2, 35);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    Amd64,
    Arm64,
}

impl Arch {
    pub fn triple(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64-unknown-linux-gnu",
            Arch::Arm64 => "aarch64-unknown-linux-gnu",
        }
    }

    pub fn deb(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }

    /// The Debian cross toolchain (linker, C compiler for ring) when this is
    /// not the build machine's architecture.
    fn cross_gcc(self) -> Option<&'static str> {
        match (self, std::env::consts::ARCH) {
            (Arch::Arm64, "aarch64") | (Arch::Amd64, "x86_64") => None,
            (Arch::Arm64, _) => Some("aarch64-linux-gnu-gcc"),
            (Arch::Amd64, _) => Some("x86_64-linux-gnu-gcc"),
        }
    }
}

/// What `cargo xtask package` made.
pub struct Built {
    pub arch: Arch,
    pub debs: Vec<PathBuf>,
}

/// Where packages go: `target/packages/`.
pub fn out_dir() -> PathBuf {
    target_dir().join("packages")
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// `cargo xtask man`: man pages, completions and the default conf.json into
/// `packaging/generated/` (git-ignored; the paths the package metadata
/// names, outside target/, where cargo-deb expects only build outputs).
pub fn assets() -> Result<PathBuf> {
    let out = workspace_root().join("packaging/generated");
    if out.exists() {
        std::fs::remove_dir_all(&out).with_context(|| format!("clearing {}", out.display()))?;
    }
    run(
        Command::new("cargo")
            .current_dir(workspace_root())
            .args(["run", "--quiet", "-p", "oakestra-package-assets", "--"])
            .arg(&out),
        "generating man pages, completions and conf.json",
    )?;
    Ok(out)
}

/// Builds, checks and smoke-tests the packages for `arches`.
pub fn package(arches: &[Arch]) -> Result<Vec<Built>> {
    crate::setup::package_tools()?;
    need_tool("cargo-deb", &["cargo", "deb", "--version"])?;
    need_tool("lintian", &["lintian", "--version"])?;
    assets()?;
    let out = out_dir();
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut built = Vec::new();
    for &arch in arches {
        let debs = build_arch(arch, &out)?;
        check_glibc(arch, &debs)?;
        lintian(&debs)?;
        if arch == Arch::Arm64 && std::env::consts::ARCH != "aarch64" {
            smoke_under_qemu(&debs)?;
        }
        built.push(Built { arch, debs });
    }
    println!("\npackages in {}:", out.display());
    for b in &built {
        for d in &b.debs {
            let size = std::fs::metadata(d).map(|m| m.len()).unwrap_or(0);
            println!("  {:>6} KiB  {}", size / 1024, d.display());
        }
    }
    Ok(built)
}

fn need_tool(name: &str, probe: &[&str]) -> Result<()> {
    let ok = Command::new(probe[0])
        .args(&probe[1..])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        bail!("{name} is missing: run `cargo xtask setup`");
    }
    Ok(())
}

fn build_arch(arch: Arch, out: &Path) -> Result<Vec<PathBuf>> {
    let mut debs = Vec::new();
    for (krate, name) in PACKAGES {
        println!("==> {name} for {}", arch.deb());
        let mut cmd = Command::new("cargo");
        cmd.current_dir(workspace_root())
            // --strip: release builds keep line tables for backtraces
            // (profile.release debug = 1); the packages need none.
            .args([
                "deb",
                "--strip",
                "-p",
                krate,
                "--target",
                arch.triple(),
                "--output",
            ])
            .arg(out);
        if let Some(gcc) = arch.cross_gcc() {
            need_tool(gcc, &[gcc, "--version"])?;
            let env_triple = arch.triple().replace('-', "_");
            cmd.env(
                format!("CARGO_TARGET_{}_LINKER", env_triple.to_uppercase()),
                gcc,
            )
            .env(format!("CC_{env_triple}"), gcc);
        }
        run(
            &mut cmd,
            &format!("cargo deb -p {krate} --target {}", arch.triple()),
        )?;
        debs.push(find_deb(out, name, arch)?);
    }
    Ok(debs)
}

/// The newest `<name>_<version>_<arch>.deb` in `dir`.
fn find_deb(dir: &Path, name: &str, arch: Arch) -> Result<PathBuf> {
    let suffix = format!("_{}.deb", arch.deb());
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(dir)?
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with(&format!("{name}_")) && n.ends_with(&suffix)
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, p)| p)
        .with_context(|| format!("cargo deb wrote no {name}*{suffix} into {}", dir.display()))
}

/// The package's files, unpacked into a fresh directory under target/.
fn unpack(deb: &Path) -> Result<PathBuf> {
    let stem = deb
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = target_dir().join("package-unpacked").join(stem);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    run(
        Command::new("dpkg-deb").arg("-x").arg(deb).arg(&dir),
        "dpkg-deb -x",
    )?;
    Ok(dir)
}

/// Every binary runs on Ubuntu 22.04: no symbol needs a glibc newer than
/// [`MAX_GLIBC`].
fn check_glibc(arch: Arch, debs: &[PathBuf]) -> Result<()> {
    for deb in debs {
        let dir = unpack(deb)?;
        for bin in BINARIES {
            let path = dir.join("usr/bin").join(bin);
            if !path.exists() {
                continue;
            }
            let out = Command::new("readelf")
                .args(["-W", "-V"])
                .arg(&path)
                .output()
                .context("running readelf (apt install binutils)")?;
            let text = String::from_utf8_lossy(&out.stdout);
            let newest = newest_glibc(&text)
                .with_context(|| format!("{} names no GLIBC version", path.display()))?;
            if newest > MAX_GLIBC {
                bail!(
                    "{bin} ({}) needs GLIBC_{}.{}, newer than Ubuntu 22.04's {}.{}",
                    arch.deb(),
                    newest.0,
                    newest.1,
                    MAX_GLIBC.0,
                    MAX_GLIBC.1
                );
            }
            println!(
                "ok: {bin} ({}) needs at most GLIBC_{}.{}",
                arch.deb(),
                newest.0,
                newest.1
            );
        }
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}

/// The newest `GLIBC_x.y` in `readelf -V` output (the version needs).
pub fn newest_glibc(readelf: &str) -> Option<(u32, u32)> {
    readelf
        .split(|c: char| c.is_whitespace())
        .filter_map(|w| w.strip_prefix("GLIBC_"))
        .filter_map(|v| {
            let mut parts = v.split('.');
            let major = parts.next()?.parse().ok()?;
            let minor = parts.next().map_or(Some(0), |m| m.parse().ok())?;
            Some((major, minor))
        })
        .max()
}

/// lintian with the project's overrides (shipped in the packages); any
/// error or warning fails.
fn lintian(debs: &[PathBuf]) -> Result<()> {
    let out = Command::new("lintian")
        .args([
            "--fail-on",
            "error,warning",
            "--display-info",
            "--no-tag-display-limit",
        ])
        .args(debs)
        .output()
        .context("running lintian")?;
    let text = String::from_utf8_lossy(&out.stdout);
    print!("{text}");
    if !out.status.success() {
        bail!(
            "lintian found problems ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    println!("ok: lintian clean ({} packages)", debs.len());
    Ok(())
}

/// The arm64 binaries start under qemu-user with the cross libc.
fn smoke_under_qemu(debs: &[PathBuf]) -> Result<()> {
    need_tool("qemu-aarch64-static", &["qemu-aarch64-static", "--version"])?;
    for deb in debs {
        let dir = unpack(deb)?;
        for (bin, arg, expect) in [
            ("NetManager", "--version", "NetManager "),
            ("NodeEngine", "--help", "Usage: NodeEngine"),
            ("nodeengined", "--version", "nodeengined "),
        ] {
            let path = dir.join("usr/bin").join(bin);
            if !path.exists() {
                continue;
            }
            let out = Command::new("qemu-aarch64-static")
                .args(["-L", "/usr/aarch64-linux-gnu"])
                .arg(&path)
                .arg(arg)
                .output()
                .context("running qemu-aarch64-static")?;
            let text = String::from_utf8_lossy(&out.stdout);
            if !out.status.success() || !text.contains(expect) {
                bail!(
                    "arm64 {bin} {arg} under qemu: {} {text}{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            println!(
                "ok: arm64 {bin} {arg} under qemu: {}",
                text.lines().next().unwrap_or_default()
            );
        }
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_glibc_of_readelf_output() {
        let readelf = "Version needs section '.gnu.version_r' contains 2 entries:\n \
            Addr: 0x0  Offset: 0x000 Link: 7 (.dynstr)\n  \
            000000: Version: 1  File: libgcc_s.so.1  Cnt: 1\n  \
            0x0010:   Name: GCC_3.0  Flags: none  Version: 9\n  \
            0x0020: Version: 1  File: libc.so.6  Cnt: 4\n  \
            0x0030:   Name: GLIBC_2.34  Flags: none  Version: 8\n  \
            0x0040:   Name: GLIBC_2.3.4  Flags: none  Version: 7\n  \
            0x0050:   Name: GLIBC_2.17  Flags: none  Version: 6\n  \
            0x0060:   Name: GLIBC_PRIVATE  Flags: none  Version: 5\n";
        assert_eq!(newest_glibc(readelf), Some((2, 34)));
        assert_eq!(newest_glibc("Name: GLIBC_2.36"), Some((2, 36)));
        assert!(newest_glibc("Name: GLIBC_2.36").unwrap() > MAX_GLIBC);
        assert_eq!(newest_glibc("nothing"), None);
    }
}
