//! Mount points the daemons under test leave (containerd's overlays).

use std::path::{Path, PathBuf};

use nix::mount::MntFlags;

/// Mount points at or below `dir`, deepest first.
pub fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = text
        .lines()
        // Field 5 is the mount point (octal escapes for spaces and the like,
        // which paths the kit makes never contain).
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// Lazily unmounts everything at or below `dir` (otherwise it could not be
/// deleted).
pub fn unmount_below(dir: &Path) {
    for m in mounts_below(dir) {
        let _ = nix::mount::umount2(&m, MntFlags::MNT_DETACH);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_is_a_mount_point() {
        assert!(mounts_below(Path::new("/proc")).contains(&PathBuf::from("/proc")));
        assert!(mounts_below(Path::new("/no/such/dir/oak")).is_empty());
    }
}
