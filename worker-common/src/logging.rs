//! The daemons' logs: one setup of `tracing` (stderr, optionally a file,
//! plain text or JSON lines) and the `logs` command that follows a log file.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::prelude::*;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (colours only on a terminal).
    #[default]
    Plain,
    /// One JSON object per event, for log collectors.
    Json,
}

/// How a daemon logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogOptions {
    /// A filter in `RUST_LOG` syntax (the daemons take it from `RUST_LOG`
    /// on their command line); it wins over `debug`.
    pub filter: Option<String>,
    /// Without a filter: `debug` instead of `info`.
    pub debug: bool,
    /// Also append to this file (created with its directory).
    pub file: Option<PathBuf>,
    pub format: LogFormat,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("creating log directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("opening log file {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Installs the global subscriber. A second call in the same process (tests)
/// keeps the first one.
pub fn init(opts: &LogOptions) -> Result<(), LogError> {
    let default = if opts.debug { "debug" } else { "info" };
    let mut bad_filter = None;
    let filter = match opts.filter.as_deref().filter(|f| !f.trim().is_empty()) {
        Some(f) => EnvFilter::try_new(f).unwrap_or_else(|e| {
            bad_filter = Some((f.to_string(), e));
            EnvFilter::new(default)
        }),
        None => EnvFilter::new(default),
    };
    let file = opts.file.as_deref().map(open_append).transpose()?;
    use std::io::IsTerminal;
    // journald and log files get no colour codes.
    let ansi = std::io::stderr().is_terminal();
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match opts.format {
        LogFormat::Plain => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(std::io::stderr),
            )
            .with(file.map(|f| {
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(Arc::new(f))
            }))
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .with(file.map(|f| {
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(Arc::new(f))
            }))
            .try_init(),
    };
    if let Some((f, e)) = bad_filter {
        tracing::warn!("log filter {f:?} is not valid ({e}); logging at {default}");
    }
    Ok(())
}

fn open_append(path: &Path) -> Result<File, LogError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| LogError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| LogError::File {
            path: path.to_path_buf(),
            source,
        })
}

#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing the log out: {0}")]
    Write(std::io::Error),
}

/// How often a followed file is checked for new lines.
pub const FOLLOW_POLL: Duration = Duration::from_millis(500);

/// `tail -F` to stdout: the whole file, then what is appended, across
/// truncation and rotation, until the process is interrupted.
pub fn follow(path: &Path) -> Result<(), FollowError> {
    follow_into(path, &mut std::io::stdout(), FOLLOW_POLL, || true)
}

/// [`follow`] into `out`, polling every `poll`, while `keep_going()` holds
/// (asked after every idle poll).
pub fn follow_into(
    path: &Path,
    out: &mut impl Write,
    poll: Duration,
    mut keep_going: impl FnMut() -> bool,
) -> Result<(), FollowError> {
    let open = |path: &Path| {
        File::open(path).map_err(|source| FollowError::Open {
            path: path.to_path_buf(),
            source,
        })
    };
    let read_err = |source| FollowError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = open(path)?;
    let mut inode = file.metadata().map_err(read_err)?.ino();
    let mut pos = 0u64;
    let mut buf = Vec::new();
    loop {
        // The path, not the open file: after a rotation the path names a
        // new file, which is read from its start. While the path is missing
        // (between rename and re-create) the old file is still read.
        if let Ok(meta) = std::fs::metadata(path)
            && (meta.ino() != inode || meta.len() < pos)
            && let Ok(f) = File::open(path)
        {
            file = f;
            inode = meta.ino();
            pos = 0;
        }
        file.seek(SeekFrom::Start(pos)).map_err(read_err)?;
        buf.clear();
        Read::by_ref(&mut file)
            .take(1 << 20)
            .read_to_end(&mut buf)
            .map_err(read_err)?;
        if buf.is_empty() {
            if !keep_going() {
                return Ok(());
            }
            std::thread::sleep(poll);
            continue;
        }
        pos += buf.len() as u64;
        out.write_all(&buf).map_err(FollowError::Write)?;
        out.flush().map_err(FollowError::Write)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_appends_truncation_and_rotation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("d.log");
        std::fs::write(&log, "one\n").expect("write");
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let writer_log = log.clone();
        let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
        let reader_out = out.clone();
        let reader_log = log.clone();
        let reader = std::thread::spawn(move || {
            struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
            impl Write for Sink {
                fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                    self.0.lock().expect("lock").extend_from_slice(b);
                    Ok(b.len())
                }
                fn flush(&mut self) -> std::io::Result<()> {
                    Ok(())
                }
            }
            follow_into(
                &reader_log,
                &mut Sink(reader_out),
                Duration::from_millis(10),
                || rx.try_recv().is_err(),
            )
        });
        let printed = |out: &std::sync::Arc<std::sync::Mutex<Vec<u8>>>| {
            String::from_utf8_lossy(&out.lock().expect("lock")).into_owned()
        };
        let wait_for = |text: &str| {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while !printed(&out).ends_with(text) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "never printed {text:?}; got {:?}",
                    printed(&out)
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        wait_for("one\n");
        let append = |text: &str| {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&writer_log)
                .expect("open");
            f.write_all(text.as_bytes()).expect("append");
        };
        append("two\n");
        wait_for("one\ntwo\n");
        // Truncated in place (copytruncate): read again from the start.
        std::fs::write(&log, "3\n").expect("truncate");
        wait_for("one\ntwo\n3\n");
        // Rotated (rename + new file): the new file from its start.
        std::fs::rename(&log, dir.path().join("d.log.1")).expect("rotate");
        std::fs::write(&log, "four\n").expect("new file");
        wait_for("one\ntwo\n3\nfour\n");
        tx.send(()).expect("stop");
        reader.join().expect("join").expect("follow");
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = follow_into(
            Path::new("/nonexistent/x.log"),
            &mut Vec::new(),
            Duration::from_millis(1),
            || false,
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/x.log"), "{err}");
    }

    #[test]
    fn log_file_is_created_with_its_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("sub/dir/d.log");
        init(&LogOptions {
            file: Some(file.clone()),
            ..LogOptions::default()
        })
        .expect("init");
        assert!(file.is_file());
    }
}
