//! Wire documents exchanged with the cluster about jobs (docs/contract.md §1.4, 1.5).
//!
//! The cluster sends its whole job document; we read only what a worker needs,
//! match keys case-insensitively (as upstream's Go decoder does) and accept numbers
//! sent as strings (`worker_common::lenient`). Everything a peer controls is validated before it is used as a
//! container id, a file name or a cgroup limit.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use worker_common::lenient;

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
    Invalid { field: String, reason: String },
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
    /// CSI volumes to mount (upstream's `volumes`).
    pub volumes: Vec<crate::csi::VolumeRequest>,
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

/// The instance a payload names; every job document carries these two.
/// Field names are the lower-cased keys (see [`document`]).
#[derive(Deserialize)]
struct InstanceRef {
    #[serde(default, deserialize_with = "lenient::opt_string")]
    job_name: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_u32")]
    instance_number: Option<u32>,
}

impl InstanceRef {
    /// The validated job name and instance, or the first problem.
    fn validated(self) -> Result<(String, u32), JobError> {
        let name = self.job_name.ok_or(JobError::Missing("job_name"))?;
        validate_job_name(&name)?;
        let instance = self
            .instance_number
            .ok_or(JobError::Missing("instance_number"))?;
        Ok((name, instance))
    }
}

/// The rest of a `control/deploy` document that a worker uses (the cluster
/// sends much more, which is ignored).
#[derive(Deserialize)]
struct DeployDocument {
    #[serde(default, deserialize_with = "lenient::opt_string")]
    image: Option<String>,
    /// Upstream's older name for `image`.
    #[serde(default, deserialize_with = "lenient::opt_string")]
    code: Option<String>,
    #[serde(default, deserialize_with = "lenient::string_list")]
    cmd: Vec<String>,
    #[serde(default, deserialize_with = "lenient::string_list")]
    environment: Vec<String>,
    #[serde(default, deserialize_with = "lenient::string")]
    port: String,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    virtualization: Option<String>,
    #[serde(default, deserialize_with = "lenient::string")]
    platform: String,
    #[serde(default, deserialize_with = "lenient::opt_f64")]
    vcpus: Option<f64>,
    #[serde(default, deserialize_with = "lenient::u64")]
    vgpus: u64,
    /// MiB.
    #[serde(default, deserialize_with = "lenient::u64")]
    memory: u64,
    #[serde(default, deserialize_with = "lenient::string_list")]
    arch: Vec<String>,
    #[serde(default, deserialize_with = "lenient::bool")]
    one_shot: bool,
    #[serde(default, deserialize_with = "lenient::bool")]
    privileged: bool,
    /// Checked by [`crate::csi::volumes::parse_volumes`].
    #[serde(default)]
    volumes: Value,
}

/// The rest of a `control/delete` document.
#[derive(Deserialize)]
struct DeleteDocument {
    #[serde(default, deserialize_with = "lenient::string")]
    virtualization: String,
}

/// A document from the cluster, with its keys lower-cased: keys match
/// case-insensitively (`Job_Name` is `job_name`), as upstream's Go decoder
/// reads them.
fn document(payload: &[u8]) -> Result<Value, JobError> {
    let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(payload) else {
        return Err(JobError::NotAnObject);
    };
    Ok(Value::Object(
        object
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect::<Map<String, Value>>(),
    ))
}

/// The fields `T` reads from `doc`; an invalid one is named in the error.
fn fields<T: DeserializeOwned>(doc: &Value) -> Result<T, JobError> {
    serde_path_to_error::deserialize(doc).map_err(|e| JobError::Invalid {
        field: e.path().to_string(),
        reason: e.into_inner().to_string(),
    })
}

/// The validated instance a document names.
fn instance_of(doc: &Value) -> Result<(String, u32), JobError> {
    fields::<InstanceRef>(doc)?.validated()
}

/// The shared job-name rule (`worker_common::task_id`), as a field error.
pub fn validate_job_name(name: &str) -> Result<(), JobError> {
    worker_common::task_id::validate_job_name(name).map_err(|e| JobError::Invalid {
        field: "job_name".into(),
        reason: e.to_string(),
    })
}

fn invalid(field: &str, reason: String) -> JobError {
    JobError::Invalid {
        field: field.into(),
        reason,
    }
}

/// Best-effort identification of a payload, used to address a FAILED report when
/// the payload as a whole is unusable.
pub fn identify(payload: &[u8]) -> Option<(String, u32)> {
    instance_of(&document(payload).ok()?).ok()
}

/// Parses and validates a `control/deploy` payload.
pub fn parse_deploy(payload: &[u8]) -> Result<DeployRequest, JobError> {
    let doc = document(payload)?;
    let (job_name, instance) = instance_of(&doc)?;
    let doc: DeployDocument = fields(&doc)?;
    // An entry without `=` is not an error: as in upstream's containerd, it
    // removes that variable (oci_spec::process_env).
    if let Some(bad) = doc
        .environment
        .iter()
        .find(|e| e.contains('\0') || e.starts_with('='))
    {
        return Err(invalid("environment", format!("entry {bad:?} has no name")));
    }
    if doc.cmd.iter().any(|c| c.contains('\0')) {
        return Err(invalid("cmd", "contains a NUL byte".into()));
    }
    // More than 1 TiB or 1024 CPUs is certainly a broken document, not a real request.
    if doc.memory > 1 << 20 {
        let reason = format!("{} MiB is not plausible", doc.memory);
        return Err(invalid("memory", reason));
    }
    let volumes =
        crate::csi::volumes::parse_volumes(&doc.volumes).map_err(|e| invalid("volumes", e))?;
    let vcpus = doc.vcpus.unwrap_or(0.0);
    if vcpus > 1024.0 {
        return Err(invalid("vcpus", format!("{vcpus} is not plausible")));
    }
    let (port, dropped) = lenient_ports(&doc.port);
    for d in dropped {
        tracing::warn!(job = %job_name, instance, "port mapping {:?} ignored: {}", d.item, d.why);
    }
    Ok(DeployRequest {
        job_name,
        instance,
        image: doc.image.or(doc.code).unwrap_or_default(),
        cmd: doc.cmd,
        environment: doc.environment,
        port,
        virtualization: doc.virtualization.unwrap_or_else(|| "docker".into()),
        platform: doc.platform,
        vcpus,
        vgpus: doc.vgpus,
        memory_mib: doc.memory,
        arch: doc.arch,
        one_shot: doc.one_shot,
        privileged: doc.privileged,
        volumes,
    })
}

/// A port mapping left out of a job's `port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DroppedPort {
    pub item: String,
    pub why: &'static str,
}

/// The job's `port` (docs/contract.md §2.2 syntax) without what upstream
/// runs anyway but NetManager's stricter reader refuses: a host port 0
/// (nothing to map) and a host port given again for the same protocol (the
/// first mapping is the one that works upstream). Everything else is passed
/// on for NetManager to judge.
pub fn lenient_ports(port: &str) -> (String, Vec<DroppedPort>) {
    let mut kept: Vec<&str> = Vec::new();
    let mut seen: Vec<(u16, &str)> = Vec::new();
    let mut dropped = Vec::new();
    for item in port.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        let (ports, proto) = item.split_once('/').unwrap_or((item, "tcp"));
        let host = ports.split(':').next().unwrap_or_default().trim();
        let Ok(host) = host.parse::<u16>() else {
            kept.push(item);
            continue;
        };
        let drop = |why| DroppedPort {
            item: item.to_string(),
            why,
        };
        if host == 0 {
            dropped.push(drop("host port 0"));
        } else if seen.contains(&(host, proto.trim())) {
            dropped.push(drop("host port given twice; the first mapping is kept"));
        } else {
            seen.push((host, proto.trim()));
            kept.push(item);
        }
    }
    (kept.join(";"), dropped)
}

/// Parses a `control/delete` payload.
pub fn parse_delete(payload: &[u8]) -> Result<DeleteRequest, JobError> {
    let doc = document(payload)?;
    let (job_name, instance) = instance_of(&doc)?;
    let doc: DeleteDocument = fields(&doc)?;
    Ok(DeleteRequest {
        job_name,
        instance,
        virtualization: doc.virtualization,
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
            br#"{"job_name":"a.b.c.d","instance_number":0,"environment":["=x"]}"#,
            br#"{"job_name":5,"instance_number":0}"#,
        ] {
            assert!(parse_deploy(p).is_err());
        }
    }

    #[test]
    fn errors_name_the_field() {
        let field = |p: &[u8]| match parse_deploy(p) {
            Err(JobError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            field(br#"{"job_name":"a.b.c.d","instance_number":0,"Memory":-5}"#),
            "memory"
        );
        assert_eq!(
            field(br#"{"job_name":"a.b.c.d","instance_number":0,"cmd":[1]}"#),
            "cmd"
        );
        assert_eq!(
            field(br#"{"job_name":"a.b.c.d","instance_number":"x"}"#),
            "instance_number"
        );
        assert_eq!(
            parse_deploy(br#"{"instance_number":0}"#),
            Err(JobError::Missing("job_name"))
        );
        assert_eq!(
            parse_delete(br#"{"job_name":"a.b.c.d","instance_number":null}"#),
            Err(JobError::Missing("instance_number"))
        );
    }

    #[test]
    fn a_bad_field_still_identifies_the_instance() {
        let p = br#"{"JOB_NAME":"a.b.c.d","instance_number":2,"vcpus":"lots"}"#;
        assert!(parse_deploy(p).is_err());
        assert_eq!(identify(p), Some(("a.b.c.d".to_string(), 2)));
        assert_eq!(identify(br#"{"job_name":"a/b","instance_number":2}"#), None);
    }

    #[test]
    fn python_floats_single_strings_and_defaults() {
        let d = parse_deploy(
            br#"{"job_name":"a.b.c.d","instance_number":1.0,"memory":100.0,"cmd":"sleep","code":"img","one_shot":"TRUE","virtualization":null}"#,
        )
        .expect("parses");
        assert_eq!((d.instance, d.memory_mib), (1, 100));
        assert_eq!(d.cmd, ["sleep"]);
        assert_eq!(d.image, "img");
        assert!(d.one_shot);
        assert_eq!(d.virtualization, "docker");
        let del = parse_delete(br#"{"job_name":"a.b.c.d","instance_number":"4"}"#).expect("delete");
        assert_eq!((del.instance, del.virtualization.as_str()), (4, ""));
    }

    #[test]
    fn volumes_are_read_and_checked() {
        let d = parse_deploy(
            br#"{"job_name":"a.b.c.d","instance_number":0,"Volumes":[{"volume_id":"v1","csi_driver":"csi.example.io","mount_path":"/data","config":{"k":"v"}}]}"#,
        )
        .expect("parses");
        assert_eq!(d.volumes.len(), 1);
        assert_eq!(d.volumes[0].csi_driver, "csi.example.io");
        assert_eq!(d.volumes[0].mount_path, "/data");
        let field = |p: &[u8]| match parse_deploy(p) {
            Err(JobError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            field(br#"{"job_name":"a.b.c.d","instance_number":0,"volumes":[{"volume_id":"v","csi_driver":"d","mount_path":"/../etc"}]}"#),
            "volumes"
        );
        assert!(
            parse_deploy(FIXTURE.as_bytes())
                .expect("fixture")
                .volumes
                .is_empty()
        );
    }

    #[test]
    fn leniency_as_upstream() {
        let d = parse_deploy(
            br#"{"job_name":"a.b.c.d","instance_number":0,"environment":["A=1","UNSET"],"port":"80:8080;80:9090;0:53/udp;80/udp;x"}"#,
        )
        .expect("upstream runs this job");
        assert_eq!(d.environment, ["A=1", "UNSET"]);
        assert_eq!(d.port, "80:8080;80/udp;x");
        let (_, dropped) = lenient_ports("80:8080;80:9090;0:53/udp");
        assert_eq!(dropped.len(), 2);
        assert_eq!(lenient_ports("9080:80/tcp;9081").0, "9080:80/tcp;9081");
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
