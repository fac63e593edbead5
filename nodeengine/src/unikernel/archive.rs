//! Unpacking a unikernel archive safely (the daemon runs as root).
//!
//! The image is a tar archive, gzip-compressed or not (upstream's format:
//! `kernel`, optionally `files/` or `files1/` for the 9p share and
//! `initramfs.cpio`), or a bare kernel. Entries are read one by one with the
//! `tar` crate and written by us: only regular files and directories (as
//! upstream), relative paths without `..`, no owners copied, permission bits
//! without setuid/setgid/sticky or group/other write, new files only, and
//! bounded total size and entry count against decompression bombs.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Most bytes an archive may unpack to.
const MAX_UNPACKED: u64 = 2 << 30;
/// Most entries an archive may hold.
const MAX_ENTRIES: usize = 10_000;

/// What an image file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    TarGz,
    Tar,
    /// Anything else: the kernel itself.
    Raw,
}

/// Recognises the format by content (magic numbers), not by URL suffix.
pub fn detect(path: &Path) -> Result<Format> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut head = [0u8; 512];
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..])? {
            0 => break,
            m => n += m,
        }
    }
    if n >= 2 && head[..2] == [0x1f, 0x8b] {
        return Ok(Format::TarGz);
    }
    // POSIX and GNU tar headers carry "ustar" at offset 257.
    if n >= 262 && &head[257..262] == b"ustar" {
        return Ok(Format::Tar);
    }
    Ok(Format::Raw)
}

/// Unpacks `archive` into the empty directory `dest` (blocking).
pub fn unpack(archive: &Path, format: Format, dest: &Path) -> Result<()> {
    let mut f = File::open(archive).with_context(|| format!("opening {}", archive.display()))?;
    f.seek(SeekFrom::Start(0))?;
    let reader: Box<dyn Read> = match format {
        Format::TarGz => Box::new(flate2::read::GzDecoder::new(BufReader::new(f))),
        Format::Tar => Box::new(BufReader::new(f)),
        Format::Raw => bail!("{} is not an archive", archive.display()),
    };
    let mut tar = tar::Archive::new(reader);
    let mut total: u64 = 0;
    for (count, entry) in tar.entries().context("reading the archive")?.enumerate() {
        if count >= MAX_ENTRIES {
            bail!("the archive has more than {MAX_ENTRIES} entries");
        }
        let mut entry = entry.context("reading the archive")?;
        let raw_path = entry.path().context("an entry's path")?.into_owned();
        let Some(rel) = safe_relative(&raw_path)? else {
            continue; // "." itself
        };
        let target = dest.join(&rel);
        let kind = entry.header().entry_type();
        let mode = entry.header().mode().unwrap_or(0o644);
        if kind.is_dir() {
            create_dirs(&target)?;
        } else if kind.is_file() {
            if let Some(parent) = target.parent() {
                create_dirs(parent)?;
            }
            let size = entry.header().size().unwrap_or(0);
            total = total.saturating_add(size);
            if total > MAX_UNPACKED {
                bail!("the archive unpacks to more than {MAX_UNPACKED} bytes");
            }
            write_file(&target, &mut entry, size, mode)
                .with_context(|| format!("unpacking {}", rel.display()))?;
        } else {
            bail!(
                "the archive entry {} is a {kind:?}: only regular files and directories are \
                 accepted",
                raw_path.display()
            );
        }
    }
    Ok(())
}

/// `path` as a relative path of normal components; None for the root entry,
/// an error for absolute paths and `..`.
fn safe_relative(path: &Path) -> Result<Option<PathBuf>> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                bail!(
                    "the archive entry {} leaves the archive (absolute or '..')",
                    path.display()
                )
            }
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

fn create_dirs(path: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
        .with_context(|| format!("creating {}", path.display()))
}

/// A new file (never an existing one, never through a symlink) with at most
/// `size` bytes of `from` and the entry's permission bits made harmless.
fn write_file(path: &Path, from: &mut impl Read, size: u64, mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(mode & 0o755)
        .open(path)?;
    let copied = std::io::copy(&mut from.take(size), &mut f)?;
    if copied != size {
        bail!("truncated: {copied} of {size} bytes");
    }
    // The umask may have narrowed the mode; set it as intended (still without
    // setuid/setgid/sticky).
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(std::fs::Permissions::from_mode(mode & 0o755))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn header(path: &str, kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        // set_path refuses '..' and absolute paths, which these tests need.
        let name = &mut h.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_cksum();
        h
    }

    fn archive(
        entries: &[(&str, tar::EntryType, &[u8], u32)],
        gz: bool,
    ) -> tempfile::NamedTempFile {
        let mut data = Vec::new();
        {
            let mut b = tar::Builder::new(&mut data);
            for (path, kind, body, mode) in entries {
                let h = header(path, *kind, body.len() as u64, *mode);
                b.append(&h, *body).expect("append");
            }
            b.finish().expect("finish");
        }
        let bytes = if gz {
            use std::io::Write;
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&data).expect("gz");
            e.finish().expect("gz")
        } else {
            data
        };
        let f = tempfile::NamedTempFile::new().expect("tmp");
        std::fs::write(f.path(), bytes).expect("write");
        f
    }

    #[test]
    fn upstream_layout_unpacks() {
        use tar::EntryType as E;
        for gz in [true, false] {
            let a = archive(
                &[
                    ("kernel", E::Regular, b"KERNEL", 0o4755),
                    ("files/", E::Directory, b"", 0o755),
                    ("files/config.txt", E::Regular, b"hello", 0o666),
                    ("./initramfs.cpio", E::Regular, b"CPIO", 0o644),
                ],
                gz,
            );
            let fmt = detect(a.path()).expect("detect");
            assert_eq!(fmt, if gz { Format::TarGz } else { Format::Tar });
            let dest = tempfile::tempdir().expect("dir");
            unpack(a.path(), fmt, dest.path()).expect("unpack");
            let kernel = dest.path().join("kernel");
            assert_eq!(std::fs::read(&kernel).expect("kernel"), b"KERNEL");
            // setuid dropped, group/other write dropped.
            let mode = std::fs::metadata(&kernel)
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o7777, 0o755);
            let cfg = dest.path().join("files/config.txt");
            assert_eq!(std::fs::read(&cfg).expect("cfg"), b"hello");
            assert_eq!(
                std::fs::metadata(&cfg).expect("m").permissions().mode() & 0o777,
                0o644
            );
            assert!(dest.path().join("initramfs.cpio").is_file());
        }
    }

    #[test]
    fn escapes_links_and_devices_are_refused() {
        use tar::EntryType as E;
        for (path, kind) in [
            ("../evil", E::Regular),
            ("a/../../evil", E::Regular),
            ("/etc/evil", E::Regular),
            ("link", E::Symlink),
            ("hard", E::Link),
            ("dev", E::Char),
            ("blk", E::Block),
            ("fifo", E::Fifo),
        ] {
            let a = archive(&[(path, kind, b"", 0o644)], true);
            let dest = tempfile::tempdir().expect("dir");
            let err = unpack(a.path(), Format::TarGz, dest.path());
            assert!(err.is_err(), "{path} ({kind:?}) accepted");
            assert!(
                std::fs::read_dir(dest.path()).expect("ls").next().is_none(),
                "{path} left something behind"
            );
        }
    }

    #[test]
    fn duplicate_entries_do_not_overwrite() {
        use tar::EntryType as E;
        let a = archive(
            &[
                ("kernel", E::Regular, b"one", 0o644),
                ("kernel", E::Regular, b"two", 0o644),
            ],
            false,
        );
        let dest = tempfile::tempdir().expect("dir");
        assert!(unpack(a.path(), Format::Tar, dest.path()).is_err());
        assert_eq!(
            std::fs::read(dest.path().join("kernel")).expect("k"),
            b"one"
        );
    }

    #[test]
    fn anything_else_is_a_raw_kernel() {
        let f = tempfile::NamedTempFile::new().expect("tmp");
        std::fs::write(f.path(), b"\x7fELF not an archive").expect("w");
        assert_eq!(detect(f.path()).expect("detect"), Format::Raw);
    }
}
