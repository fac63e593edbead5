//! Upstream Oakestra's deployment descriptor (the SLA a user posts to the
//! root orchestrator's `/api/application/`): `sla_version`, `customerID`,
//! `applications[]` with `microservices[]`. The sandbox reads the fields a
//! single cluster acts on and ignores the rest (`addresses`, `connectivity`,
//! `added_files`, ...), as upstream's cluster does for what it does not use.
//!
//! Upstream has no instance count in the SLA: each call of
//! `POST /api/service/<id>/instance` adds one instance. The sandbox takes
//! the count from the command line (`deploy --instances N`, default 1) and
//! `scale`.

use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize;
use serde_json::{Map, Value, json};

/// What the cluster calls a container job in the deploy document
/// (upstream's SLA says "container").
const CONTAINER: &str = "docker";

#[derive(Debug, Deserialize)]
struct Sla {
    applications: Vec<Application>,
}

#[derive(Debug, Deserialize)]
struct Application {
    application_name: String,
    #[serde(default = "default_namespace")]
    application_namespace: String,
    microservices: Vec<Microservice>,
}

#[derive(Debug, Deserialize)]
struct Microservice {
    microservice_name: String,
    #[serde(default = "default_namespace")]
    microservice_namespace: String,
    #[serde(default)]
    virtualization: String,
    /// The image: a registry reference or, in the sandbox, a local OCI
    /// (or docker-save) archive.
    code: String,
    #[serde(default)]
    cmd: Vec<String>,
    #[serde(default)]
    environment: Vec<String>,
    #[serde(default)]
    memory: u64,
    #[serde(default)]
    vcpus: u64,
    #[serde(default)]
    port: String,
    #[serde(default)]
    one_shot: bool,
    #[serde(default)]
    privileged: bool,
    #[serde(default)]
    arch: Vec<String>,
    #[serde(default)]
    constraints: Vec<Constraint>,
}

/// Upstream's placement constraints; the sandbox evaluates `direct`
/// (a list of node names, comma-separated as upstream's scheduler reads them).
#[derive(Debug, Deserialize)]
struct Constraint {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    node: String,
}

fn default_namespace() -> String {
    "default".into()
}

/// One microservice, ready to place and deploy.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceSpec {
    /// `app.appns.service.servicens`, upstream's job name.
    pub job: String,
    /// `code` as written (an archive path or a registry reference).
    pub code: String,
    pub cmd: Vec<String>,
    pub environment: Vec<String>,
    pub requirements: Requirements,
    /// Deploy document fields besides what [`testkit::JobSpec`] carries.
    pub document: Map<String, Value>,
}

/// What a node must offer to run an instance.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Requirements {
    /// As the deploy document names it ("docker", "unikernel", ...).
    pub virtualization: String,
    /// MiB; 0: any.
    pub memory: u64,
    /// 0: any.
    pub vcpus: u64,
    /// GOARCH names; empty: any.
    pub arch: Vec<String>,
    /// Node (host) names a `direct` constraint allows; empty: any.
    pub nodes: Vec<String>,
}

/// Upstream's name rule for the parts of a job name: not empty, no dots
/// (the job name joins them with dots), no whitespace or slashes (it
/// becomes an MQTT topic level and a containerd id).
fn check_name(what: &str, name: &str) -> Result<()> {
    ensure!(!name.is_empty(), "{what} is empty");
    ensure!(
        name.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
        "{what} {name:?} may hold only letters, digits, '-' and '_'"
    );
    Ok(())
}

/// The microservices of an SLA document, in order.
pub fn services(doc: &Value) -> Result<Vec<ServiceSpec>> {
    let sla: Sla = serde_path_to_error::deserialize(doc).context("the SLA")?;
    let mut out = Vec::new();
    for app in &sla.applications {
        check_name("application_name", &app.application_name)?;
        check_name("application_namespace", &app.application_namespace)?;
        ensure!(
            !app.microservices.is_empty(),
            "application {} has no microservices",
            app.application_name
        );
        for ms in &app.microservices {
            out.push(service(app, ms)?);
        }
    }
    ensure!(!out.is_empty(), "the SLA names no applications");
    let mut jobs: Vec<&str> = out.iter().map(|s| s.job.as_str()).collect();
    jobs.sort_unstable();
    if let Some(w) = jobs.windows(2).find(|w| w[0] == w[1]) {
        bail!("the SLA names {} twice", w[0]);
    }
    Ok(out)
}

fn service(app: &Application, ms: &Microservice) -> Result<ServiceSpec> {
    check_name("microservice_name", &ms.microservice_name)?;
    check_name("microservice_namespace", &ms.microservice_namespace)?;
    let job = format!(
        "{}.{}.{}.{}",
        app.application_name,
        app.application_namespace,
        ms.microservice_name,
        ms.microservice_namespace
    );
    ensure!(!ms.code.trim().is_empty(), "{job}: `code` names no image");
    let virtualization = match ms.virtualization.as_str() {
        "" | "container" => CONTAINER.to_string(),
        other => other.to_string(),
    };
    let nodes = ms
        .constraints
        .iter()
        .filter(|c| c.kind == "direct")
        .flat_map(|c| c.node.split(','))
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .collect();
    let mut document = Map::new();
    for (k, v) in [
        ("virtualization", json!(virtualization)),
        ("port", json!(ms.port)),
        ("one_shot", json!(ms.one_shot)),
        ("privileged", json!(ms.privileged)),
        ("vcpus", json!(ms.vcpus)),
        ("arch", json!(ms.arch)),
        ("applicationID", json!("")),
        ("microserviceID", json!("")),
    ] {
        document.insert(k.into(), v);
    }
    if ms.memory > 0 {
        document.insert("memory".into(), json!(ms.memory));
    }
    Ok(ServiceSpec {
        job,
        code: ms.code.trim().to_string(),
        cmd: ms.cmd.clone(),
        environment: ms.environment.clone(),
        requirements: Requirements {
            virtualization,
            memory: ms.memory,
            vcpus: ms.vcpus,
            arch: ms.arch.clone(),
            nodes,
        },
        document,
    })
}

/// Makes every `code` that names an existing file (relative to the
/// current directory, else to `base`, the SLA's directory) an absolute
/// path, for the sandbox process that imports it.
pub fn resolve_archives(doc: &mut Value, base: &std::path::Path) {
    let apps = doc["applications"].as_array_mut().into_iter().flatten();
    for ms in apps.flat_map(|a| a["microservices"].as_array_mut().into_iter().flatten()) {
        let Some(code) = ms["code"].as_str() else {
            continue;
        };
        let found = [std::path::PathBuf::from(code), base.join(code)]
            .into_iter()
            .find(|p| p.is_file())
            .and_then(|p| std::fs::canonicalize(p).ok());
        if let Some(path) = found {
            ms["code"] = path.to_string_lossy().into_owned().into();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sla(ms: Value) -> Value {
        json!({"sla_version": "v2.0", "customerID": "Admin", "applications": [{
            "applicationID": "", "application_name": "demo", "application_namespace": "test",
            "application_desc": "x", "microservices": [ms]}]})
    }

    #[test]
    fn upstreams_getting_started_descriptor_reads() {
        let doc = sla(json!({
            "microserviceID": "", "microservice_name": "curl", "microservice_namespace": "test",
            "virtualization": "container", "cmd": ["sh", "-c", "tail -f /dev/null"],
            "memory": 100, "vcpus": 1, "vgpus": 0, "vtpus": 0, "bandwidth_in": 0,
            "bandwidth_out": 0, "storage": 0, "code": "docker.io/curlimages/curl:7.82.0",
            "state": "", "port": "9080", "added_files": [],
            "addresses": {"rr_ip": "10.30.0.1"},
            "constraints": [{"type": "direct", "node": "w1, w2", "cluster": "c"}]
        }));
        let s = &services(&doc).unwrap()[0];
        assert_eq!(s.job, "demo.test.curl.test");
        assert_eq!(s.code, "docker.io/curlimages/curl:7.82.0");
        assert_eq!(s.cmd, ["sh", "-c", "tail -f /dev/null"]);
        assert_eq!(s.requirements.virtualization, "docker");
        assert_eq!(s.requirements.memory, 100);
        assert_eq!(s.requirements.nodes, ["w1", "w2"]);
        assert_eq!(s.document["port"], "9080");
        assert_eq!(s.document["memory"], 100);
    }

    #[test]
    fn bad_descriptors_are_refused_with_the_reason() {
        let no_code = sla(json!({"microservice_name": "a", "code": " "}));
        assert!(format!("{:#}", services(&no_code).unwrap_err()).contains("no image"));
        let dotted = sla(json!({"microservice_name": "a.b", "code": "x"}));
        assert!(format!("{:#}", services(&dotted).unwrap_err()).contains("microservice_name"));
        let typed = sla(json!({"microservice_name": "a", "code": "x", "memory": "lots"}));
        let e = format!("{:#}", services(&typed).unwrap_err());
        assert!(e.contains("memory"), "{e}");
        let twice = json!({"applications": [{"application_name": "a", "microservices": [
            {"microservice_name": "s", "code": "x"}, {"microservice_name": "s", "code": "y"}]}]});
        assert!(format!("{:#}", services(&twice).unwrap_err()).contains("twice"));
        assert!(services(&json!({"applications": []})).is_err());
    }

    #[test]
    fn namespaces_default_and_other_runtimes_pass_through() {
        let doc = json!({"applications": [{"application_name": "a", "microservices": [
            {"microservice_name": "s", "code": "x", "virtualization": "unikernel"}]}]});
        let s = &services(&doc).unwrap()[0];
        assert_eq!(s.job, "a.default.s.default");
        assert_eq!(s.requirements.virtualization, "unikernel");
        assert!(!s.document.contains_key("memory"));
    }

    #[test]
    fn archive_paths_become_absolute_and_references_stay() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("img.tar"), b"x").unwrap();
        let mut doc = json!({"applications": [{"application_name": "a", "microservices": [
            {"microservice_name": "s", "code": "img.tar"},
            {"microservice_name": "t", "code": "docker.io/library/nginx:latest"}]}]});
        resolve_archives(&mut doc, dir.path());
        let ms = &doc["applications"][0]["microservices"];
        let abs = std::fs::canonicalize(dir.path().join("img.tar")).unwrap();
        assert_eq!(ms[0]["code"], json!(abs.to_string_lossy()));
        assert_eq!(ms[1]["code"], "docker.io/library/nginx:latest");
    }
}
