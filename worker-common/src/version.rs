//! What `--version` prints on every binary: the release and the git
//! revision it was built from (the build script finds it; from a tarball
//! without `.git`, `OAKESTRA_GIT_REVISION` at build time or "unknown").

/// The git revision, e.g. `4508261a1b2c`.
pub const GIT_REVISION: &str = env!("OAKESTRA_GIT_REVISION");

/// `0.1.0 (git 4508261a1b2c)`: for clap's `version` and the `version` verbs.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("OAKESTRA_GIT_REVISION"),
    ")"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_release_and_a_revision() {
        assert!(VERSION.starts_with(env!("CARGO_PKG_VERSION")), "{VERSION}");
        assert!(!GIT_REVISION.is_empty());
        // Built from this checkout, the revision is git's own.
        if let Ok(out) = std::process::Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            && out.status.success()
            && std::env::var_os("OAKESTRA_GIT_REVISION").is_none()
        {
            assert_eq!(GIT_REVISION, String::from_utf8_lossy(&out.stdout).trim());
        }
    }
}
