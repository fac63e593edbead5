//! Wire documents exchanged with the cluster about jobs (contract 1.4, 1.5).
//!
//! The cluster sends its whole job document; we read only what a worker needs,
//! match keys case-insensitively (as upstream's Go decoder does) and accept numbers
//! sent as strings. Everything a peer controls is validated before it is used as a
//! container id, a file name or a cgroup limit.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Status values the cluster understands. Nothing else is ever published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum JobStatus {
    Created,
    Failed,
    Dead,
    Completed,
    Undeployed,
}

/// `nodes/<id>/job` payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub sname: String,
    pub status: JobStatus,
    pub status_detail: String,
    pub instance: u32,
    pub publicip: String,
}

/// One entry of `nodes/<id>/jobs/resources`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceResources {
    pub cpu_percent: String,
    pub memory_percent: String,
    pub disk: String,
    pub logs: String,
    pub job_name: String,
    pub virtualization: String,
    pub instance: u32,
}

/// `nodes/<id>/jobs/resources` payload; `services` is never null.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ResourcesReport {
    pub services: Vec<ServiceResources>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum JobError {
    #[error("payload is not a JSON object")]
    NotAnObject,
    #[error("field `{0}` is missing")]
    Missing(&'static str),
    #[error("field `{field}` is invalid: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// What a deploy request asks for, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct DeployRequest {
    pub job_name: String,
    pub instance: u32,
    pub image: String,
    pub cmd: Vec<String>,
    pub environment: Vec<String>,
    pub port: String,
    pub virtualization: String,
    pub platform: String,
    pub vcpus: f64,
    pub vgpus: u64,
    pub memory_mib: u64,
    pub arch: Vec<String>,
    pub one_shot: bool,
    pub privileged: bool,
}

impl DeployRequest {
    /// `<job_name>.instance.<n>`: container id, netns name and log file name.
    pub fn task_id(&self) -> String {
        task_id(&self.job_name, self.instance)
    }
}

/// What a delete request names.
#[derive(Debug, Clone, PartialEq)]
pub struct DeleteRequest {
    pub job_name: String,
    pub instance: u32,
    pub virtualization: String,
}

pub use worker_common::task_id::{parse_task_id, task_id};

/// Lower-cases the top-level keys so `Job_Name` and `job_name` are the same field.
fn lowercase_keys(v: Value) -> Result<Map<String, Value>, JobError> {
    match v {
        Value::Object(m) => Ok(m
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect()),
        _ => Err(JobError::NotAnObject),
    }
}

/// The shared job-name rule (`worker_common::task_id`), as a field error.
pub fn validate_job_name(name: &str) -> Result<(), JobError> {
    worker_common::task_id::validate_job_name(name).map_err(|e| JobError::Invalid {
        field: "job_name",
        reason: e.to_string(),
    })
}

fn get_str(m: &Map<String, Value>, key: &'static str) -> Result<Option<String>, JobError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(other) => Err(JobError::Invalid {
            field: key,
            reason: format!("expected a string, got {other}"),
        }),
    }
}

fn get_u64(m: &Map<String, Value>, key: &'static str) -> Result<Option<u64>, JobError> {
    let bad = |v: &Value| JobError::Invalid {
        field: key,
        reason: format!("expected a non-negative integer, got {v}"),
    };
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v @ Value::Number(n)) => match (n.as_u64(), n.as_f64()) {
            (Some(u), _) => Ok(Some(u)),
            (None, Some(f)) if f >= 0.0 && f.fract() == 0.0 && f < u64::MAX as f64 => {
                Ok(Some(f as u64))
            }
            _ => Err(bad(v)),
        },
        Some(v @ Value::String(s)) => s.trim().parse().map(Some).map_err(|_| bad(v)),
        Some(v) => Err(bad(v)),
    }
}

fn get_f64(m: &Map<String, Value>, key: &'static str) -> Result<Option<f64>, JobError> {
    let bad = |v: &Value| JobError::Invalid {
        field: key,
        reason: format!("expected a non-negative number, got {v}"),
    };
    let f = match m.get(key) {
        None | Some(Value::Null) => return Ok(None),
        Some(v @ Value::Number(n)) => n.as_f64().ok_or_else(|| bad(v))?,
        Some(v @ Value::String(s)) => s.trim().parse::<f64>().map_err(|_| bad(v))?,
        Some(v) => return Err(bad(v)),
    };
    if f.is_finite() && f >= 0.0 {
        Ok(Some(f))
    } else {
        Err(bad(&Value::from(f)))
    }
}

fn get_bool(m: &Map<String, Value>, key: &'static str) -> Result<bool, JobError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(true),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("false") || s.is_empty() => Ok(false),
        Some(other) => Err(JobError::Invalid {
            field: key,
            reason: format!("expected a boolean, got {other}"),
        }),
    }
}

fn get_str_list(m: &Map<String, Value>, key: &'static str) -> Result<Vec<String>, JobError> {
    let bad = |reason: String| JobError::Invalid { field: key, reason };
    match m.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => Ok(s.clone()),
                other => Err(bad(format!("expected strings, found {other}"))),
            })
            .collect(),
        // A single string is taken as a one-element list (seen from hand-written SLAs).
        Some(Value::String(s)) if !s.is_empty() => Ok(vec![s.clone()]),
        Some(Value::String(_)) => Ok(Vec::new()),
        Some(other) => Err(bad(format!("expected a list of strings, got {other}"))),
    }
}

fn instance_of(m: &Map<String, Value>) -> Result<u32, JobError> {
    let n = get_u64(m, "instance_number")?.ok_or(JobError::Missing("instance_number"))?;
    u32::try_from(n).map_err(|_| JobError::Invalid {
        field: "instance_number",
        reason: format!("{n} is out of range"),
    })
}

/// Best-effort identification of a payload, used to address a FAILED report when
/// the payload as a whole is unusable.
pub fn identify(payload: &[u8]) -> Option<(String, u32)> {
    let m = lowercase_keys(serde_json::from_slice(payload).ok()?).ok()?;
    let name = get_str(&m, "job_name").ok()??;
    validate_job_name(&name).ok()?;
    let instance = instance_of(&m).ok()?;
    Some((name, instance))
}

/// Parses and validates a `control/deploy` payload.
pub fn parse_deploy(payload: &[u8]) -> Result<DeployRequest, JobError> {
    let v: Value = serde_json::from_slice(payload).map_err(|_| JobError::NotAnObject)?;
    let m = lowercase_keys(v)?;
    let job_name = get_str(&m, "job_name")?.ok_or(JobError::Missing("job_name"))?;
    validate_job_name(&job_name)?;
    let instance = instance_of(&m)?;
    let image = get_str(&m, "image")?
        .or(get_str(&m, "code")?)
        .unwrap_or_default();
    let environment = get_str_list(&m, "environment")?;
    if let Some(bad) = environment
        .iter()
        .find(|e| !e.contains('=') || e.contains('\0'))
    {
        return Err(JobError::Invalid {
            field: "environment",
            reason: format!("entry {bad:?} is not K=V"),
        });
    }
    let cmd = get_str_list(&m, "cmd")?;
    if cmd.iter().any(|c| c.contains('\0')) {
        return Err(JobError::Invalid {
            field: "cmd",
            reason: "contains a NUL byte".into(),
        });
    }
    let virtualization = get_str(&m, "virtualization")?.unwrap_or_else(|| "docker".into());
    let memory_mib = get_u64(&m, "memory")?.unwrap_or(0);
    // More than 1 TiB or 1024 CPUs is certainly a broken document, not a real request.
    if memory_mib > 1 << 20 {
        return Err(JobError::Invalid {
            field: "memory",
            reason: format!("{memory_mib} MiB is not plausible"),
        });
    }
    let vcpus = get_f64(&m, "vcpus")?.unwrap_or(0.0);
    if vcpus > 1024.0 {
        return Err(JobError::Invalid {
            field: "vcpus",
            reason: format!("{vcpus} is not plausible"),
        });
    }
    Ok(DeployRequest {
        job_name,
        instance,
        image,
        cmd,
        environment,
        port: get_str(&m, "port")?.unwrap_or_default(),
        virtualization,
        platform: get_str(&m, "platform")?.unwrap_or_default(),
        vcpus,
        vgpus: get_u64(&m, "vgpus")?.unwrap_or(0),
        memory_mib,
        arch: get_str_list(&m, "arch")?,
        one_shot: get_bool(&m, "one_shot")?,
        privileged: get_bool(&m, "privileged")?,
    })
}

/// Parses a `control/delete` payload.
pub fn parse_delete(payload: &[u8]) -> Result<DeleteRequest, JobError> {
    let v: Value = serde_json::from_slice(payload).map_err(|_| JobError::NotAnObject)?;
    let m = lowercase_keys(v)?;
    let job_name = get_str(&m, "job_name")?.ok_or(JobError::Missing("job_name"))?;
    validate_job_name(&job_name)?;
    Ok(DeleteRequest {
        job_name,
        instance: instance_of(&m)?,
        virtualization: get_str(&m, "virtualization")?.unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = include_str!("../tests/fixtures/deploy-job.json");

    #[test]
    fn parses_upstream_fixture() {
        let d = parse_deploy(FIXTURE.as_bytes()).expect("fixture parses");
        assert_eq!(d.job_name, "clientsrvr.test.curl.test");
        assert_eq!(d.instance, 0);
        assert_eq!(d.task_id(), "clientsrvr.test.curl.test.instance.0");
        assert_eq!(d.cmd, ["sh", "-c", "curl 10.30.55.55 ; sleep 5"]);
        assert_eq!(d.environment, ["GREETING=hello"]);
        assert_eq!(d.memory_mib, 100);
        assert_eq!(d.vcpus, 1.0);
        assert_eq!(d.port, "9080:80/tcp;9081");
        assert!(!d.one_shot);
    }

    #[test]
    fn keys_are_case_insensitive_and_numbers_may_be_strings() {
        let d = parse_deploy(
            br#"{"Job_Name":"a.b.c.d","INSTANCE_NUMBER":"3","Image":"x","memory":"64","vcpus":"0.5"}"#,
        )
        .expect("parses");
        assert_eq!(d.instance, 3);
        assert_eq!(d.memory_mib, 64);
        assert_eq!(d.vcpus, 0.5);
    }

    #[test]
    fn hostile_names_are_rejected() {
        for name in [
            "../../etc.a.b.c",
            "a.b.c",
            "a.b.c.d.e",
            "a.b..d",
            "a.b.c.d/x",
            "",
        ] {
            let p = format!(r#"{{"job_name":"{name}","instance_number":0}}"#);
            assert!(parse_deploy(p.as_bytes()).is_err(), "{name} accepted");
        }
    }

    #[test]
    fn bad_types_are_errors_not_panics() {
        for p in [
            &b"null"[..],
            b"[]",
            b"\"x\"",
            br#"{"job_name":"a.b.c.d","instance_number":-1}"#,
            br#"{"job_name":"a.b.c.d","instance_number":0,"memory":-5}"#,
            br#"{"job_name":"a.b.c.d","instance_number":0,"cmd":{"x":1}}"#,
            br#"{"job_name":"a.b.c.d","instance_number":0,"environment":["NOEQUALS"]}"#,
            br#"{"job_name":5,"instance_number":0}"#,
        ] {
            assert!(parse_deploy(p).is_err());
        }
    }

    #[test]
    fn status_serialises_as_contract() {
        let s = StatusReport {
            sname: "a.b.c.d".into(),
            status: JobStatus::Undeployed,
            status_detail: String::new(),
            instance: 1,
            publicip: String::new(),
        };
        let v = serde_json::to_value(&s).expect("serialise");
        assert_eq!(v["status"], "UNDEPLOYED");
        assert_eq!(v["instance"], 1);
    }
}
