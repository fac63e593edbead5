//! Debian 12's stock kernel for tests that boot a guest: the newest bookworm
//! `linux-image-6.1.0-N-amd64` package, fetched once with `apt-get download`
//! into a cache directory (`target/old-kernel/`), with `vmlinuz` and the
//! modules a test asks for extracted next to it. Used by `cargo xtask test
//! --full` (eBPF suites on 6.1) and the unikernel test (a Linux guest
//! standing in for a unikernel).

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Debian 12's kernel packages are `linux-image-6.1.0-<ABI>-amd64`.
const PACKAGE_PREFIX: &str = "linux-image-6.1.0-";
const PACKAGE_SUFFIX: &str = "-amd64";

pub struct Kernel {
    pub package: String,
    pub deb: PathBuf,
    pub vmlinuz: PathBuf,
    /// The requested modules, extracted, in the order asked.
    pub modules: Vec<PathBuf>,
}

/// The newest bookworm 6.1 kernel package, downloaded once into `cache`, with
/// `vmlinuz` and `modules` (paths under `lib/modules/<version>/`, e.g.
/// `kernel/drivers/net/veth.ko`) extracted under `cache/<package>/`.
pub fn kernel_image(cache: &Path, modules: &[&str]) -> Result<Kernel> {
    fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
    let package = match newest_kernel_package()? {
        Some(p) => p,
        None => cached_package(cache)?.context(
            "apt knows no linux-image-6.1.0-*-amd64 package and none is cached: \
             run `apt-get update` (Debian 12 sources) or `cargo xtask setup`",
        )?,
    };
    let deb = match find_deb(cache, &package)? {
        Some(d) => d,
        None => {
            let status = Command::new("apt-get")
                .current_dir(cache)
                .args(["download", &package])
                .status()
                .context("running apt-get")?;
            if !status.success() {
                bail!("apt-get download {package} failed ({status})");
            }
            find_deb(cache, &package)?
                .with_context(|| format!("apt-get download left no {package} .deb"))?
        }
    };
    let dir = cache.join(&package);
    let vmlinuz = dir.join("vmlinuz");
    let module_paths: Vec<PathBuf> = modules
        .iter()
        .map(|m| dir.join(Path::new(m).file_name().unwrap_or_default()))
        .collect();
    let missing: Vec<&str> = modules
        .iter()
        .zip(&module_paths)
        .filter(|(_, p)| !p.exists())
        .map(|(m, _)| *m)
        .collect();
    if !vmlinuz.exists() || !missing.is_empty() {
        fs::create_dir_all(&dir)?;
        extract(&deb, &dir, &missing)?;
    }
    Ok(Kernel {
        package,
        deb,
        vmlinuz,
        modules: module_paths,
    })
}

/// ABI number of a `linux-image-6.1.0-<ABI>-amd64` name.
fn abi(name: &str) -> Option<u32> {
    name.strip_prefix(PACKAGE_PREFIX)?
        .strip_suffix(PACKAGE_SUFFIX)?
        .parse()
        .ok()
}

fn newest_kernel_package() -> Result<Option<String>> {
    let out = Command::new("apt-cache")
        .args(["pkgnames", PACKAGE_PREFIX])
        .output()
        .context("running apt-cache")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| abi(l.trim()).map(|n| (n, l.trim().to_string())))
        .max()
        .map(|(_, name)| name))
}

fn cached_package(cache: &Path) -> Result<Option<String>> {
    let mut best: Option<(u32, String)> = None;
    for e in fs::read_dir(cache)? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if let Some(pkg) = name.split('_').next()
            && name.ends_with(".deb")
            && let Some(n) = abi(pkg)
            && best.as_ref().is_none_or(|(b, _)| n > *b)
        {
            best = Some((n, pkg.to_string()));
        }
    }
    Ok(best.map(|(_, p)| p))
}

fn find_deb(cache: &Path, package: &str) -> Result<Option<PathBuf>> {
    let prefix = format!("{package}_");
    for e in fs::read_dir(cache)? {
        let p = e?.path();
        let name = p.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            return Ok(Some(p));
        }
    }
    Ok(None)
}

/// Takes /boot/vmlinuz-* (as `vmlinuz`) and `modules` out of the package's
/// data archive into `dir`.
fn extract(deb: &Path, dir: &Path, modules: &[&str]) -> Result<()> {
    let mut child = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdout(Stdio::piped())
        .spawn()
        .context("running dpkg-deb")?;
    let stdout = child.stdout.take().context("dpkg-deb stdout")?;
    let mut archive = tar::Archive::new(stdout);
    let mut missing = modules.len() + 1;
    for entry in archive.entries().context("reading the kernel package")? {
        let mut entry = entry?;
        let path = entry.path()?.to_string_lossy().into_owned();
        let path = path.trim_start_matches("./");
        let dest = if path.starts_with("boot/vmlinuz-") {
            dir.join("vmlinuz")
        } else if let Some(m) = modules
            .iter()
            .find(|m| path.starts_with("lib/modules/") && path.ends_with(*m))
        {
            dir.join(Path::new(m).file_name().unwrap_or_default())
        } else {
            continue;
        };
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes)?;
        fs::write(&dest, bytes).with_context(|| format!("writing {}", dest.display()))?;
        missing -= 1;
        if missing == 0 {
            break;
        }
    }
    // We may stop reading early: dpkg-deb then dies of SIGPIPE, which is fine.
    let _ = child.kill();
    let _ = child.wait();
    if missing != 0 {
        bail!(
            "{} lacks boot/vmlinuz-* or one of {modules:?}",
            deb.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_package_names_give_their_abi() {
        assert_eq!(abi("linux-image-6.1.0-57-amd64"), Some(57));
        assert_eq!(abi("linux-image-6.1.0-57-cloud-amd64"), None);
        assert_eq!(abi("linux-image-6.12.1-amd64"), None);
    }
}
