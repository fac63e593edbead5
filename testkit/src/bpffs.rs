//! bpffs: directories where dataplanes pin maps and links, removed on drop
//! (unpinning the links detaches the programs once no process holds them).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::harness::bpffs_mounted;
use crate::netns::unique;

pub const BPFFS: &str = "/sys/fs/bpf";

/// A pin directory under /sys/fs/bpf, removed with everything in it on drop.
pub struct PinDir(PathBuf);

impl PinDir {
    /// `/sys/fs/bpf/oak<tag><pid>-<n>` (not created: the dataplane does).
    pub fn new(tag: &str) -> PinDir {
        PinDir::at(Path::new(BPFFS).join(unique(&format!("oak{tag}"))))
    }

    /// A fixed directory (the sandbox's); a leftover is removed first.
    pub fn at(path: impl Into<PathBuf>) -> PinDir {
        let p = path.into();
        let _ = std::fs::remove_dir_all(&p);
        PinDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl std::ops::Deref for PinDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Mounts bpffs on /sys/fs/bpf unless it is there.
pub fn ensure_mounted() -> Result<()> {
    if bpffs_mounted() {
        return Ok(());
    }
    std::fs::create_dir_all(BPFFS).with_context(|| format!("creating {BPFFS}"))?;
    nix::mount::mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("mounting bpffs on {BPFFS}"))
}
