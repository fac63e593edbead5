//! Application logs (`<app_logs>` of the configuration), created safely
//! wherever the operator points them (docs/security.md):
//!
//! - The files live in a directory only root can write: the configured
//!   directory itself when it is root's and not group/world-writable, else a
//!   private subdirectory `oakestra-applogs` (mode 0700). Upstream's default
//!   `/tmp` thus keeps working without a local user being able to plant a
//!   symlink that makes the root daemon write elsewhere.
//! - A log file is always created new (`O_EXCL | O_NOFOLLOW`, mode 0600)
//!   after removing an old one of the same name, through a directory handle,
//!   so no path can be swapped underneath.
//! - Each file is capped: past `max_bytes` it is cut to its newest half
//!   (copy-truncate, as logrotate does; the shim keeps appending).

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rustix::fs::{AtFlags, Mode, OFlags};

/// The private subdirectory used when the configured one is shared.
pub const PRIVATE_SUBDIR: &str = "oakestra-applogs";
/// Default cap of one application's log.
pub const DEFAULT_MAX_BYTES: u64 = 16 << 20;

/// The directory application logs go to.
#[derive(Debug, Clone)]
pub struct AppLogs {
    dir: PathBuf,
    max_bytes: u64,
}

fn open_dir(path: &Path) -> rustix::io::Result<OwnedFd> {
    rustix::fs::open(
        path,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Whether only root can change entries of this directory.
fn is_private(st: &rustix::fs::Stat) -> bool {
    st.st_uid == 0 && st.st_mode & 0o022 == 0
}

impl AppLogs {
    /// Prepares the directory for `configured` (created when missing).
    pub fn open(configured: &Path, max_bytes: u64) -> Result<AppLogs> {
        std::fs::create_dir_all(configured)
            .with_context(|| format!("creating the app log directory {}", configured.display()))?;
        // The operator's own path may be a symlink; what it points to decides.
        let meta = rustix::fs::stat(configured)
            .with_context(|| format!("app log directory {}", configured.display()))?;
        let dir = if is_private(&meta) {
            configured.to_path_buf()
        } else {
            let private = configured.join(PRIVATE_SUBDIR);
            ensure_private_dir(&private)?;
            private
        };
        Ok(AppLogs {
            dir,
            max_bytes: max_bytes.max(4096),
        })
    }

    /// Where the log of `task_id` is.
    pub fn path(&self, task_id: &str) -> PathBuf {
        self.dir.join(task_id)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates a new, empty log for `task_id` (an old one is replaced).
    pub fn create(&self, task_id: &str) -> Result<PathBuf> {
        check_name(task_id)?;
        let dir = open_dir(&self.dir)
            .with_context(|| format!("opening the app log directory {}", self.dir.display()))?;
        match rustix::fs::unlinkat(&dir, task_id, AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => {}
            Err(e) => bail!("removing the old log {}: {e}", self.path(task_id).display()),
        }
        rustix::fs::openat(
            &dir,
            task_id,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .with_context(|| format!("creating the log {}", self.path(task_id).display()))?;
        Ok(self.path(task_id))
    }

    fn open_existing(&self, task_id: &str, flags: OFlags) -> Option<std::fs::File> {
        check_name(task_id).ok()?;
        let dir = open_dir(&self.dir).ok()?;
        rustix::fs::openat(
            &dir,
            task_id,
            flags | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY,
            Mode::empty(),
        )
        .ok()
        .map(std::fs::File::from)
    }

    /// The last `n` bytes (lossy UTF-8); empty when there is no log.
    pub fn tail(&self, task_id: &str, n: u64) -> String {
        let Some(mut f) = self.open_existing(task_id, OFlags::RDONLY) else {
            return String::new();
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if f.seek(SeekFrom::Start(len.saturating_sub(n))).is_err() {
            return String::new();
        }
        let mut buf = Vec::with_capacity(n as usize);
        let _ = f.take(n).read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// Cuts the log to its newest half when it grew past the cap; returns
    /// whether it did.
    pub fn enforce_cap(&self, task_id: &str) -> bool {
        let Some(mut f) = self.open_existing(task_id, OFlags::RDWR) else {
            return false;
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len <= self.max_bytes {
            return false;
        }
        let keep = self.max_bytes / 2;
        let mut tail = Vec::with_capacity(keep as usize);
        let cut = f
            .seek(SeekFrom::Start(len - keep))
            .and_then(|_| Read::by_ref(&mut f).take(keep).read_to_end(&mut tail))
            .and_then(|_| f.set_len(0))
            .and_then(|_| f.seek(SeekFrom::Start(0)))
            .and_then(|_| f.write_all(&tail));
        if let Err(e) = cut {
            tracing::warn!(task = task_id, "capping the application log: {e}");
            return false;
        }
        tracing::info!(
            task = task_id,
            bytes = len,
            "application log cut to its newest {keep} bytes"
        );
        true
    }
}

/// A file name of the directory: task ids are validated upstream of here,
/// this keeps a bug from ever reaching another directory.
fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        bail!("{name:?} is not a log file name");
    }
    Ok(())
}

/// `path` as a directory of root's that only root can enter; whatever
/// else is there (a local user's file, directory or symlink planted in a
/// shared `/tmp`) is moved aside, never followed.
fn ensure_private_dir(path: &Path) -> Result<()> {
    match rustix::fs::lstat(path) {
        Ok(st)
            if rustix::fs::FileType::from_raw_mode(st.st_mode)
                == rustix::fs::FileType::Directory
                && st.st_uid == rustix::process::geteuid().as_raw()
                && st.st_mode & 0o077 == 0 =>
        {
            return Ok(());
        }
        Ok(_) => {
            let aside = path.with_extension(format!(
                "untrusted.{}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0)
            ));
            tracing::warn!(
                "{} is not a private directory of ours; moving it to {} and creating our own",
                path.display(),
                aside.display()
            );
            std::fs::rename(path, &aside)
                .with_context(|| format!("moving {} aside", path.display()))?;
        }
        Err(rustix::io::Errno::NOENT) => {}
        Err(e) => bail!("app log directory {}: {e}", path.display()),
    }
    rustix::fs::mkdir(path, Mode::from_raw_mode(0o700))
        .with_context(|| format!("creating {}", path.display()))?;
    // mkdir obeys the umask; make the mode exact.
    let fd = open_dir(path).with_context(|| format!("opening {}", path.display()))?;
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o700))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_shared_directory_gets_a_private_subdirectory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let shared = dir.path().join("tmp");
        std::fs::create_dir(&shared).expect("mkdir");
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
        // A local user planted a symlink where our directory goes.
        let victim = dir.path().join("victim");
        std::fs::create_dir(&victim).expect("mkdir");
        std::os::unix::fs::symlink(&victim, shared.join(PRIVATE_SUBDIR)).expect("symlink");

        let logs = AppLogs::open(&shared, DEFAULT_MAX_BYTES).expect("open");
        assert_eq!(logs.dir(), shared.join(PRIVATE_SUBDIR));
        let meta = std::fs::symlink_metadata(logs.dir()).expect("stat");
        assert!(meta.is_dir(), "the symlink was followed or kept");
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
        let p = logs.create("a.b.c.d.instance.0").expect("create");
        assert!(p.starts_with(shared.join(PRIVATE_SUBDIR)));
        assert_eq!(std::fs::read_dir(&victim).expect("ls").count(), 0);
    }

    #[test]
    fn logs_are_new_files_never_followed_links() {
        let dir = tempfile::tempdir().expect("tempdir");
        let logs = AppLogs::open(dir.path(), DEFAULT_MAX_BYTES).expect("open");
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, "precious").expect("w");
        std::os::unix::fs::symlink(&target, logs.path("x.y.z.w.instance.1")).expect("symlink");
        let p = logs.create("x.y.z.w.instance.1").expect("create");
        assert!(std::fs::symlink_metadata(&p).expect("stat").is_file());
        assert_eq!(std::fs::read_to_string(&target).expect("r"), "precious");
        let mode = std::fs::metadata(&p).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(logs.create("../x").is_err());
    }

    #[test]
    fn logs_are_capped_to_their_newest_half() {
        let dir = tempfile::tempdir().expect("tempdir");
        let logs = AppLogs::open(dir.path(), 4096).expect("open");
        let p = logs.create("a.b.c.d.instance.0").expect("create");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .expect("open");
        let text: String = (0..2000).map(|i| format!("{i:05}\n")).collect();
        f.write_all(text.as_bytes()).expect("write");
        assert!(logs.enforce_cap("a.b.c.d.instance.0"));
        let kept = std::fs::read_to_string(&p).expect("read");
        assert_eq!(kept.len(), 2048);
        assert!(text.ends_with(&kept));
        // The writer's next append lands after the kept part.
        f.write_all(b"next\n").expect("append");
        assert!(
            std::fs::read_to_string(&p)
                .expect("read")
                .ends_with("01999\nnext\n")
        );
        assert!(!logs.enforce_cap("a.b.c.d.instance.0"));
        assert!(logs.tail("a.b.c.d.instance.0", 5).ends_with("next\n"));
    }
}
