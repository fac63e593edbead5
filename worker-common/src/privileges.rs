//! The root check, with one error that says what needs root and why.

/// Whether the process runs with an effective user id of 0.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} needs root privileges ({why}): run it as root, e.g. with sudo")]
pub struct NotRoot {
    /// The command or program, e.g. "`NodeEngine stop`".
    pub what: String,
    /// What it does that needs root, e.g. "it stops the system services".
    pub why: String,
}

/// Ok as root; otherwise an error naming `what` and `why` it needs root.
pub fn require_root(what: &str, why: &str) -> Result<(), NotRoot> {
    if is_root() {
        return Ok(());
    }
    Err(NotRoot {
        what: what.to_string(),
        why: why.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agrees_with_the_kernel() {
        let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
        // "Uid:\treal\teffective\tsaved\tfs"
        let euid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .expect("Uid line");
        assert_eq!(is_root(), euid == "0");
        assert_eq!(require_root("x", "y").is_ok(), euid == "0");
    }

    #[test]
    fn message_names_what_and_why() {
        let e = NotRoot {
            what: "`NodeEngine stop`".into(),
            why: "it stops the system services".into(),
        };
        assert_eq!(
            e.to_string(),
            "`NodeEngine stop` needs root privileges (it stops the system services): \
             run it as root, e.g. with sudo"
        );
    }
}
