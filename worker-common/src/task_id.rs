//! Job names and task ids.
//!
//! A job name is `app.appns.service.servicens`; an instance of it is the task
//! `<job_name>.instance.<n>`, which names the container, its network
//! namespace and its log file. Both come from the cluster, so they are
//! checked before they reach a file name, a containerd id or an MQTT topic.

/// Longest job name accepted.
pub const MAX_JOB_NAME: usize = 200;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("job name {name:?} {reason}")]
pub struct JobNameError {
    pub name: String,
    pub reason: &'static str,
}

/// `app.appns.service.servicens`: exactly four non-empty parts of
/// `[A-Za-z0-9_-]`, each starting with a letter or digit. This is what makes
/// the task id safe as a containerd id, a file name and an MQTT topic level
/// (no `/`, `+`, `#`).
pub fn validate_job_name(name: &str) -> Result<(), JobNameError> {
    let invalid = |reason| {
        Err(JobNameError {
            name: name.to_string(),
            reason,
        })
    };
    if name.len() > MAX_JOB_NAME {
        return invalid("is longer than 200 characters");
    }
    let parts: Vec<&str> = name.split('.').collect();
    if parts.len() != 4 {
        return invalid("must have exactly four dot-separated parts");
    }
    for part in parts {
        if part.is_empty() {
            return invalid("has an empty part");
        }
        if !part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return invalid("may only contain letters, digits, '_' and '-'");
        }
        if !part.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            return invalid("must start each part with a letter or digit");
        }
    }
    Ok(())
}

/// `<job_name>.instance.<n>`.
pub fn task_id(job_name: &str, instance: u32) -> String {
    format!("{job_name}.instance.{instance}")
}

/// Splits a task id back into a valid job name and the instance number.
pub fn parse_task_id(id: &str) -> Option<(String, u32)> {
    let (job, n) = id.rsplit_once(".instance.")?;
    let n = n.parse().ok()?;
    validate_job_name(job).ok()?;
    Some((job.to_string(), n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_names() {
        assert!(validate_job_name("clientsrvr.test.curl.test").is_ok());
        assert!(validate_job_name("a-1.b_2.c.d").is_ok());
        for bad in [
            "",
            "a.b.c",
            "a.b.c.d.e",
            "a..c.d",
            "a.b.c.",
            "a b.c.d.e",
            "../../etc.a.b.c",
            "a.b.c.d/x",
            "a.+.c.d",
            "a.#.c.d",
            "_a.b.c.d",
        ] {
            assert!(validate_job_name(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_job_name(&format!("{}.b.c.d", "a".repeat(200))).is_err());
    }

    #[test]
    fn task_id_round_trip() {
        assert_eq!(task_id("a.b.c.d", 7), "a.b.c.d.instance.7");
        assert_eq!(
            parse_task_id("a.b.c.d.instance.7"),
            Some(("a.b.c.d".to_string(), 7))
        );
        assert_eq!(parse_task_id("foo"), None);
        assert_eq!(parse_task_id("a.b.c.instance.1"), None);
        assert_eq!(parse_task_id("a.b.c.d.instance.x"), None);
    }
}
