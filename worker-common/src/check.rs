//! `config check` for both daemons: a list of findings, each with what is
//! wrong and how to fix it, printed for a person and summed up in an exit
//! code for scripts (0: nothing failed; warnings do not fail).

use std::fmt::Write as _;
use std::net::ToSocketAddrs;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    /// Works, but probably not as the operator wants (or could not be checked).
    Warn,
    /// The daemon will not start or not do its job.
    Fail,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub level: Level,
    /// What was checked, e.g. "configuration /etc/netmanager/netcfg.json".
    pub subject: String,
    /// The result, e.g. "valid" or the parse error.
    pub detail: String,
    /// How to fix it, for warnings and failures.
    pub fix: Option<String>,
}

/// The findings of one `config check`, in the order they were made.
#[derive(Debug, Default)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    pub fn ok(&mut self, subject: impl Into<String>, detail: impl Into<String>) {
        self.push(Level::Ok, subject, detail, None::<String>);
    }

    pub fn warn(
        &mut self,
        subject: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.push(Level::Warn, subject, detail, Some(fix));
    }

    pub fn fail(
        &mut self,
        subject: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.push(Level::Fail, subject, detail, Some(fix));
    }

    fn push(
        &mut self,
        level: Level,
        subject: impl Into<String>,
        detail: impl Into<String>,
        fix: Option<impl Into<String>>,
    ) {
        self.findings.push(Finding {
            level,
            subject: subject.into(),
            detail: detail.into(),
            fix: fix.map(Into::into),
        });
    }

    pub fn failures(&self) -> usize {
        self.count(Level::Fail)
    }

    fn count(&self, level: Level) -> usize {
        self.findings.iter().filter(|f| f.level == level).count()
    }

    /// One line per finding (`ok`, `WARN`, `FAIL`), the fix indented below
    /// it, and a summary line.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for f in &self.findings {
            let tag = match f.level {
                Level::Ok => "ok  ",
                Level::Warn => "WARN",
                Level::Fail => "FAIL",
            };
            let _ = writeln!(out, "{tag}  {}: {}", f.subject, f.detail);
            if let Some(fix) = &f.fix {
                for line in fix.lines() {
                    let _ = writeln!(out, "      fix: {line}");
                }
            }
        }
        let _ = writeln!(
            out,
            "{} failed, {} warnings, {} ok",
            self.failures(),
            self.count(Level::Warn),
            self.count(Level::Ok)
        );
        out
    }

    /// Prints the report; an error (for the exit code) when anything failed.
    pub fn finish(self) -> Result<(), CheckFailed> {
        print!("{}", self.render());
        match self.failures() {
            0 => Ok(()),
            n => Err(CheckFailed(n)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the check found {0} problem(s)")]
pub struct CheckFailed(pub usize);

/// Whether a TCP connection to `host:port` opens within `timeout` (the
/// first address that answers wins). The error says what failed.
pub fn tcp_reachable(host: &str, port: u16, timeout: Duration) -> Result<(), String> {
    let addrs: Vec<_> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("{host} has no address"));
    }
    let mut errors = Vec::new();
    for a in &addrs {
        match std::net::TcpStream::connect_timeout(a, timeout) {
            Ok(_) => return Ok(()),
            Err(e) => errors.push(format!("{a}: {e}")),
        }
    }
    Err(errors.join("; "))
}

/// Adds a finding for a file the configuration names: it must be a readable
/// file. `what` names the setting, e.g. "MqttCert".
pub fn readable_file(report: &mut Report, what: &str, path: &std::path::Path, fix: &str) {
    let subject = format!("{what} {}", path.display());
    match std::fs::File::open(path) {
        Ok(f) if f.metadata().is_ok_and(|m| m.is_file()) => report.ok(subject, "readable"),
        Ok(_) => report.fail(subject, "not a regular file", fix),
        Err(e) => report.fail(subject, e.to_string(), fix),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_fixes_and_counts_failures() {
        let mut r = Report::default();
        r.ok("configuration /x.json", "valid");
        r.warn("kernel", "not probed", "run as root");
        r.fail(
            "bpffs /sys/fs/bpf",
            "not mounted",
            "mount -t bpf bpf /sys/fs/bpf\nand add it to /etc/fstab",
        );
        assert_eq!(
            r.render(),
            "ok    configuration /x.json: valid\n\
             WARN  kernel: not probed\n      fix: run as root\n\
             FAIL  bpffs /sys/fs/bpf: not mounted\n      fix: mount -t bpf bpf /sys/fs/bpf\n      fix: and add it to /etc/fstab\n\
             1 failed, 1 warnings, 1 ok\n"
        );
        assert_eq!(r.failures(), 1);
    }

    #[test]
    fn reachability_names_what_failed() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        assert_eq!(
            tcp_reachable("127.0.0.1", port, Duration::from_secs(5)),
            Ok(())
        );
        drop(listener);
        // The port is closed now: refused, and the error names the address.
        let err = tcp_reachable("127.0.0.1", port, Duration::from_secs(5)).unwrap_err();
        assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
        let err = tcp_reachable("no-such-host.invalid", 1, Duration::from_secs(5)).unwrap_err();
        assert!(err.contains("cannot resolve no-such-host.invalid"), "{err}");
    }
}
