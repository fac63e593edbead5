//! The daemons' logs: one setup of `tracing` and the `logs` commands.
//!
//! One copy of every line, in one place:
//! - under systemd (stderr is the journal, `JOURNAL_STREAM` says so) native
//!   journald records, with priorities and fields;
//! - with a log file (`NetManager --log-file`) that file only;
//! - otherwise stderr, plain text or JSON lines (`--log-format`).
//!
//! `logs` follows the journal under systemd and the log file otherwise.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::prelude::*;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (colours only on a terminal).
    #[default]
    Plain,
    /// One JSON object per event, for log collectors.
    Json,
}

/// The logging flags both daemons take (flattened into their command lines).
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct LogArgs {
    /// Format of log lines on stderr or in the log file [default: plain;
    /// under systemd the journal gets native records unless this is given]
    #[arg(
        long = "log-format",
        value_name = "FORMAT",
        value_enum,
        env = "OAKESTRA_LOG_FORMAT",
        global = true
    )]
    pub format: Option<LogFormat>,
    /// Set by systemd when stderr is connected to the journal
    /// (`<device>:<inode>` of that stream).
    #[arg(
        long = "journal-stream",
        env = "JOURNAL_STREAM",
        hide = true,
        global = true
    )]
    pub journal_stream: Option<String>,
}

/// How a daemon logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogOptions {
    /// A filter in `RUST_LOG` syntax (the daemons take it from `RUST_LOG`
    /// on their command line); it wins over `debug`.
    pub filter: Option<String>,
    /// Without a filter: `debug` instead of `info`.
    pub debug: bool,
    /// Write to this file (created with its directory) instead of stderr.
    pub file: Option<PathBuf>,
    pub args: LogArgs,
}

/// Where the lines go, decided once by [`init`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogSink {
    Journald,
    File(PathBuf, LogFormat),
    Stderr(LogFormat),
}

impl LogOptions {
    /// The journal when systemd connected stderr to it and no format or
    /// file was asked for; the file when one is given; stderr otherwise.
    pub fn sink(&self) -> LogSink {
        let format = self.args.format.unwrap_or_default();
        if let Some(file) = &self.file {
            return LogSink::File(file.clone(), format);
        }
        if self.args.format.is_none()
            && self
                .args
                .journal_stream
                .as_deref()
                .is_some_and(stderr_is_stream)
        {
            return LogSink::Journald;
        }
        LogSink::Stderr(format)
    }
}

/// Whether stderr is the stream `JOURNAL_STREAM` names (systemd.exec(5)):
/// a daemon whose stderr was redirected elsewhere must not use the journal
/// just because it inherited the variable.
fn stderr_is_stream(journal_stream: &str) -> bool {
    let Some((dev, ino)) = journal_stream.trim().split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    std::fs::metadata("/proc/self/fd/2").is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

/// A per-minute allowance of log lines for what a peer can cause at will
/// (dataplane misses, malformed cluster messages): the first `PER_MINUTE`
/// lines of a minute are logged, the rest counted and reported as one
/// number when the next minute starts. No flood at the default level, and
/// nothing silently lost.
#[derive(Debug, Default)]
pub struct LogBudget<const PER_MINUTE: u32> {
    window: Option<std::time::Instant>,
    used: u32,
    suppressed: u64,
}

impl<const PER_MINUTE: u32> LogBudget<PER_MINUTE> {
    pub const fn new() -> Self {
        LogBudget {
            window: None,
            used: 0,
            suppressed: 0,
        }
    }

    /// Whether to log now; returns the number suppressed in the previous
    /// window when a new one starts, so it can be reported once.
    pub fn allow(&mut self) -> (bool, u64) {
        let now = std::time::Instant::now();
        let mut reported = 0;
        if self
            .window
            .is_none_or(|w| now.duration_since(w) >= Duration::from_secs(60))
        {
            reported = std::mem::take(&mut self.suppressed);
            self.window = Some(now);
            self.used = 0;
        }
        if self.used < PER_MINUTE {
            self.used += 1;
            (true, reported)
        } else {
            self.suppressed += 1;
            (false, reported)
        }
    }

    /// Lines not logged in the current window so far.
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }
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

/// Installs the global subscriber and returns where it writes. A second
/// call in the same process (tests) keeps the first one.
pub fn init(opts: &LogOptions) -> Result<LogSink, LogError> {
    let default = if opts.debug { "debug" } else { "info" };
    let mut bad_filter = None;
    let filter = match opts.filter.as_deref().filter(|f| !f.trim().is_empty()) {
        Some(f) => EnvFilter::try_new(f).unwrap_or_else(|e| {
            bad_filter = Some((f.to_string(), e));
            EnvFilter::new(default)
        }),
        None => EnvFilter::new(default),
    };
    let mut sink = opts.sink();
    type Boxed = Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>;
    let mut journald_error = None;
    let mut layer: Option<Boxed> = None;
    if sink == LogSink::Journald {
        match tracing_journald::layer() {
            Ok(l) => layer = Some(Box::new(l)),
            Err(e) => {
                // The journal socket is missing (e.g. a container): stderr
                // still reaches the journal, as plain lines.
                journald_error = Some(e);
                sink = LogSink::Stderr(LogFormat::Plain);
            }
        }
    }
    let layer: Boxed = match (&sink, layer) {
        (_, Some(journald)) => journald,
        (LogSink::File(path, format), None) => {
            let file = Arc::new(open_append(path)?);
            match format {
                LogFormat::Plain => Box::new(
                    tracing_subscriber::fmt::layer()
                        .with_ansi(false)
                        .with_writer(file),
                ),
                LogFormat::Json => {
                    Box::new(tracing_subscriber::fmt::layer().json().with_writer(file))
                }
            }
        }
        (_, None) => {
            use std::io::IsTerminal;
            let format = match &sink {
                LogSink::Stderr(f) => *f,
                _ => LogFormat::Plain,
            };
            // Pipes and files get no colour codes.
            let ansi = std::io::stderr().is_terminal();
            match format {
                LogFormat::Plain => Box::new(
                    tracing_subscriber::fmt::layer()
                        .with_ansi(ansi)
                        .with_writer(std::io::stderr),
                ),
                LogFormat::Json => Box::new(
                    tracing_subscriber::fmt::layer()
                        .json()
                        .with_writer(std::io::stderr),
                ),
            }
        }
    };
    let _ = tracing_subscriber::registry()
        .with(layer)
        .with(filter)
        .try_init();
    if let Some(e) = journald_error {
        tracing::warn!("cannot write to the journal ({e}); logging plain lines to stderr");
    }
    if let Some((f, e)) = bad_filter {
        tracing::warn!("log filter {f:?} is not valid ({e}); logging at {default}");
    }
    Ok(sink)
}

/// Opens a log file for appending, creating it and its directory: for a
/// daemon's own log and for the output of a child a supervisor starts.
pub fn open_append(path: &Path) -> Result<File, LogError> {
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
    #[error("cannot run journalctl: {0}")]
    Journal(std::io::Error),
}

/// `logs`: under systemd the unit's journal (`journalctl -u UNIT -f`, which
/// replaces this process), else the log file. A log file the operator
/// named explicitly is followed either way.
pub fn follow_service(unit: &str, file: &Path, file_is_explicit: bool) -> Result<(), FollowError> {
    if !file_is_explicit && crate::systemd::booted() {
        use std::os::unix::process::CommandExt;
        let err = std::process::Command::new("journalctl")
            .args(["--unit", unit, "--follow", "--lines", "100"])
            .exec();
        return Err(FollowError::Journal(err));
    }
    follow(file)
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
    fn log_budget_sums_up_what_it_suppressed() {
        let mut b = LogBudget::<20>::new();
        let allowed = (0..100).filter(|_| b.allow().0).count();
        assert_eq!(allowed, 20);
        assert_eq!(b.suppressed(), 80);
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
        let sink = init(&LogOptions {
            file: Some(file.clone()),
            ..LogOptions::default()
        })
        .expect("init");
        assert_eq!(sink, LogSink::File(file.clone(), LogFormat::Plain));
        assert!(file.is_file());
    }

    #[test]
    fn the_journal_only_when_stderr_is_the_stream_systemd_named() {
        use std::os::unix::fs::MetadataExt;
        let stderr = std::fs::metadata("/proc/self/fd/2").expect("stderr");
        let ours = format!("{}:{}", stderr.dev(), stderr.ino());
        let opts = |journal_stream: Option<&str>, format: Option<LogFormat>| LogOptions {
            args: LogArgs {
                format,
                journal_stream: journal_stream.map(str::to_string),
            },
            ..LogOptions::default()
        };
        assert_eq!(opts(Some(&ours), None).sink(), LogSink::Journald);
        // Inherited by a process whose stderr goes elsewhere: not the journal.
        assert_eq!(
            opts(Some("1:2"), None).sink(),
            LogSink::Stderr(LogFormat::Plain)
        );
        assert_eq!(
            opts(Some("garbage"), None).sink(),
            LogSink::Stderr(LogFormat::Plain)
        );
        assert_eq!(opts(None, None).sink(), LogSink::Stderr(LogFormat::Plain));
        // An explicit format wins: JSON lines into the journal's stream.
        assert_eq!(
            opts(Some(&ours), Some(LogFormat::Json)).sink(),
            LogSink::Stderr(LogFormat::Json)
        );
        // A log file wins over everything: one copy of each line.
        let with_file = LogOptions {
            file: Some(PathBuf::from("/x.log")),
            ..opts(Some(&ours), Some(LogFormat::Json))
        };
        assert_eq!(
            with_file.sink(),
            LogSink::File(PathBuf::from("/x.log"), LogFormat::Json)
        );
    }
}
