//! When the last `jobs/resources` report went out, kept across restarts.
//!
//! The cluster marks a node's instances FAILED and places replacements
//! elsewhere once it has heard nothing for about 30 s. A restarted daemon
//! therefore adopts the containers it finds only when its last report is
//! younger than that window; after a longer outage they are duplicates of
//! the replacements, and are removed, as upstream removes everything at
//! every start (docs/contract.md §1.5).
//!
//! The time is written at most every few seconds (small devices write to SD
//! cards) and at shutdown; an older time on disk can only make the daemon
//! remove containers, never adopt ones it should not.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

/// The cluster's window, as upstream's cluster manager uses it.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(30);
/// How often the time is written while reports go out.
const WRITE_EVERY: Duration = Duration::from_secs(5);
const FILE: &str = "last-report";

#[derive(Debug)]
pub struct LastReport {
    path: PathBuf,
    /// The newest report time, written or not.
    sent: Option<SystemTime>,
    written: Option<SystemTime>,
}

fn millis(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

impl LastReport {
    pub fn new(state_dir: &Path) -> LastReport {
        LastReport {
            path: state_dir.join(FILE),
            sent: None,
            written: None,
        }
    }

    /// When the last report of an earlier run went out, if one is known.
    pub fn stored(&self) -> Option<SystemTime> {
        let text = std::fs::read_to_string(&self.path).ok()?;
        let ms: u64 = text.trim().parse().ok()?;
        Some(UNIX_EPOCH + Duration::from_millis(ms))
    }

    /// Whether containers found at start may be adopted: the last report went
    /// out no longer than `window` before `now`. Unknown means no.
    pub fn within(&self, window: Duration, now: SystemTime) -> bool {
        let Some(at) = self.stored() else {
            return false;
        };
        // A clock stepped backwards makes the report look newer than it is;
        // a report "from the future" is not trusted either.
        match now.duration_since(at) {
            Ok(age) => age <= window,
            Err(_) => false,
        }
    }

    /// A report went out at `at`; written when due.
    pub fn record(&mut self, at: SystemTime) -> Result<()> {
        self.sent = Some(at);
        let due = self
            .written
            .is_none_or(|w| at.duration_since(w).map_or(true, |d| d >= WRITE_EVERY));
        if due { self.write(at) } else { Ok(()) }
    }

    /// Writes the newest report time (at shutdown).
    pub fn flush(&mut self) -> Result<()> {
        match self.sent {
            Some(at) if self.written != Some(at) => self.write(at),
            _ => Ok(()),
        }
    }

    fn write(&mut self, at: SystemTime) -> Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let tmp = self
            .path
            .with_extension(format!("tmp.{}", std::process::id()));
        (|| -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(millis(at).to_string().as_bytes())?;
            std::fs::rename(&tmp, &self.path)
        })()
        .with_context(|| format!("writing {}", self.path.display()))?;
        self.written = Some(at);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adoption_only_within_the_window() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut r = LastReport::new(dir.path());
        let t0 = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert!(!r.within(DEFAULT_WINDOW, t0), "nothing known: no adoption");
        r.record(t0).expect("record");
        assert!(r.within(DEFAULT_WINDOW, t0 + Duration::from_secs(30)));
        assert!(!r.within(DEFAULT_WINDOW, t0 + Duration::from_secs(31)));
        assert!(!r.within(DEFAULT_WINDOW, t0 - Duration::from_secs(1)));
        // Written at most every few seconds, and at shutdown.
        r.record(t0 + Duration::from_secs(2)).expect("record");
        assert_eq!(r.stored(), Some(t0));
        r.flush().expect("flush");
        assert_eq!(r.stored(), Some(t0 + Duration::from_secs(2)));
        r.record(t0 + Duration::from_secs(8)).expect("record");
        assert_eq!(r.stored(), Some(t0 + Duration::from_secs(8)));
        // A new run reads what the last one wrote.
        assert_eq!(LastReport::new(dir.path()).stored(), r.stored());
    }

    #[test]
    fn garbage_means_unknown() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(FILE), "yesterday").expect("w");
        assert!(!LastReport::new(dir.path()).within(DEFAULT_WINDOW, SystemTime::now()));
    }
}
