//! Embeds the git revision for `--version` (`worker_common::version`).
//!
//! From a checkout: `git rev-parse`, re-run when HEAD moves. From a tarball
//! without `.git`: `OAKESTRA_GIT_REVISION` if the packager sets it, else
//! "unknown" -- the build never fails for want of git.

use std::path::{Path, PathBuf};
use std::process::Command;

const REVISION_ENV: &str = "OAKESTRA_GIT_REVISION";

fn main() {
    println!("cargo:rerun-if-env-changed={REVISION_ENV}");
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let revision = std::env::var(REVISION_ENV)
        .ok()
        .filter(|r| !r.trim().is_empty())
        .or_else(|| git_revision(&dir))
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env={REVISION_ENV}={}", revision.trim());
}

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

fn git_revision(dir: &Path) -> Option<String> {
    let revision = git(dir, &["rev-parse", "--short=12", "HEAD"])?;
    // Build again when HEAD moves: HEAD itself (checkouts, worktrees) and
    // the branch it names, loose or packed.
    let abs = |p: String| {
        let p = PathBuf::from(p);
        if p.is_absolute() { p } else { dir.join(p) }
    };
    if let Some(git_dir) = git(dir, &["rev-parse", "--git-dir"]).map(abs) {
        println!("cargo:rerun-if-changed={}", git_dir.join("HEAD").display());
    }
    if let Some(common) = git(dir, &["rev-parse", "--git-common-dir"]).map(abs) {
        println!(
            "cargo:rerun-if-changed={}",
            common.join("packed-refs").display()
        );
        if let Some(branch) = git(dir, &["symbolic-ref", "-q", "HEAD"]) {
            println!("cargo:rerun-if-changed={}", common.join(branch).display());
        }
    }
    Some(revision)
}
