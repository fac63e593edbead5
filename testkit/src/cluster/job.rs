//! The deploy document the cluster manager sends on
//! `nodes/<id>/control/deploy` (docs/contract.md §1.5), from upstream's own
//! document with the fields that differ per job and instance replaced.

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::services::Pair;

/// A deploy document as upstream's cluster sends it (nodeengine's fixture).
pub const JOB_TEMPLATE: &str = include_str!("../../../nodeengine/tests/fixtures/deploy-job.json");

/// What to run: the parts of a job document a test or the sandbox varies.
#[derive(Clone, Debug)]
pub struct JobSpec {
    /// `app.appns.service.servicens`.
    pub job_name: String,
    pub image: String,
    pub cmd: Vec<String>,
    pub environment: Vec<String>,
}

/// The deploy document for instance `n` of `job`, whose round-robin
/// address is `rr`.
pub fn job_document(job: &JobSpec, n: u64, rr: &Pair) -> Result<Value> {
    let mut v: Value = serde_json::from_str(JOB_TEMPLATE).context("the job template")?;
    let parts: Vec<&str> = job.job_name.split('.').collect();
    let [app, app_ns, service, service_ns] = parts[..] else {
        bail!(
            "job name {:?} is not app.appns.service.servicens",
            job.job_name
        );
    };
    v["job_name"] = job.job_name.clone().into();
    for (k, val) in [
        ("app_name", app),
        ("app_ns", app_ns),
        ("service_name", service),
        ("service_ns", service_ns),
        ("microservice_name", service),
        ("microservice_namespace", service_ns),
    ] {
        v[k] = val.into();
    }
    v["instance_number"] = n.into();
    v["image"] = job.image.clone().into();
    v["code"] = job.image.clone().into();
    v["cmd"] = json!(job.cmd);
    v["environment"] = json!(job.environment);
    v["port"] = "".into();
    v["memory"] = 64.into();
    v["addresses"] = json!({"rr_ip": rr.0});
    v["RR_ip"] = rr.0.clone().into();
    v["RR_ip_v6"] = rr.1.clone().into();
    v["service_ip_list"] = json!([{"IpType": "RR", "Address": rr.0, "Address_v6": rr.1}]);
    v["instance_list"] = json!([{"instance_number": n, "status": "NODE_SCHEDULED"}]);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_names_the_job_and_instance() {
        let spec = JobSpec {
            job_name: "a.b.c.d".into(),
            image: "img".into(),
            cmd: vec!["sleep".into(), "1".into()],
            environment: vec!["X=1".into()],
        };
        let d = job_document(&spec, 3, &("10.30.0.2".into(), "fdff::2".into())).unwrap();
        assert_eq!(d["job_name"], "a.b.c.d");
        assert_eq!(d["service_name"], "c");
        assert_eq!(d["instance_number"], 3);
        assert_eq!(d["cmd"], json!(["sleep", "1"]));
        assert_eq!(d["RR_ip"], "10.30.0.2");
        let bad = JobSpec {
            job_name: "a.b".into(),
            ..spec
        };
        assert!(job_document(&bad, 0, &Default::default()).is_err());
    }
}
