//! The sandbox as a workbench, end to end: a user's service described as
//! an upstream SLA, its image a local OCI archive, deployed through the
//! sandbox's control API (the socket `cargo xtask sandbox deploy|ps|...`
//! talk to) onto two real workers; reached through its service address
//! from another container, scaled up and down, its log read, undeployed
//! until its service address stops answering; an image from a registry
//! that does not answer fails with the worker's reason. Each worker's metrics
//! endpoints show live dataplane counters and deploy figures.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use oakestra_worker_tests::e2e::{E2e, eventually, http_get};
use serde_json::{Value, json};
use testkit::image::{ImageSpec, write_busybox_oci_tar};
use xtask::sandbox::control::{ControlClient, ControlServer, SOCKET};
use xtask::sandbox::sample_services::idle;
use xtask::sandbox::workbench::Workbench;
use xtask::sandbox::workers::Worker;

testkit::main! {
    sla_deploy_ps_scale_logs_undeploy_and_metrics: [Root, Bpffs, Mosquitto, Containerd, Busybox, Nft],
}

/// An upstream SLA: one busybox httpd microservice whose image is `archive`.
fn sla(app: &str, archive: &str, memory: u64) -> Value {
    json!({
        "sla_version": "v2.0", "customerID": "Admin",
        "applications": [{
            "applicationID": "", "application_name": app, "application_namespace": "e2e",
            "application_desc": "workbench test",
            "microservices": [{
                "microserviceID": "", "microservice_name": "web", "microservice_namespace": "t",
                "virtualization": "container", "code": archive,
                "cmd": ["sh", "-c", "echo \"serving on $HOSTNAME\"; \
                         echo \"hello from $HOSTNAME\" > /www/index.html; \
                         exec httpd -f -v -p 80 -h /www"],
                "memory": memory, "vcpus": 1, "vgpus": 0, "storage": 0, "port": "",
                "added_files": [], "addresses": {}
            }]
        }]
    })
}

/// The error of a call that must be refused.
fn refused(call: Result<Value>) -> Result<String> {
    match call {
        Ok(v) => anyhow::bail!("accepted: {v}"),
        Err(e) => Ok(format!("{e:#}")),
    }
}

/// Which instance answered (`hello from instance-<n>`).
fn who(body: &str) -> String {
    body.split_whitespace().nth(2).unwrap_or("").to_string()
}

/// (instance, worker) of the one service in a `ps`/`scale` answer.
fn placement(svc: &Value) -> Vec<(u64, u64)> {
    svc["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| Some((i["instance"].as_u64()?, i["worker"].as_u64()?)))
        .collect()
}

/// The sum of a metric family's samples in a Prometheus text answer.
fn family_sum(text: &str, family: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(family) && l[family.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// `GET http://127.0.0.1:<port>/metrics` inside the worker's namespace.
fn scrape(w: &Worker, port: u16) -> Result<String> {
    let url = format!("http://127.0.0.1:{port}/metrics");
    let answer = w.node.ns.http_get(&url, Duration::from_secs(5))?;
    ensure!(answer.status.is_success(), "{url}: {}", answer.status);
    Ok(answer.text().into_owned())
}

fn sla_deploy_ps_scale_logs_undeploy_and_metrics() -> Result<()> {
    let e = E2e::start("wb", 2)?;
    let run_dir = &e.sb.options.run_dir;
    let archive = run_dir.join("web.oci.tar");
    write_busybox_oci_tar(
        &archive,
        &ImageSpec {
            name: "docker.io/library/oak-workbench-web:1",
            ..Default::default()
        },
    )?;
    let control = ControlServer::start(&run_dir.join(SOCKET))?;
    let client = ControlClient::new(control.socket())?;
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        // The sandbox's side: what `cargo xtask sandbox` does between its
        // counter printouts.
        let sb = &e.sb;
        let done = &done;
        s.spawn(move || {
            let mut bench = Workbench::default();
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                control.answer(Duration::from_millis(100), |op| bench.handle(sb, op));
            }
        });
        let outcome = scenario(&e, &client, &archive.to_string_lossy());
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        outcome
    })
}

fn scenario(e: &E2e, api: &ControlClient, archive: &str) -> Result<()> {
    let c = &e.sb.cluster;
    let job = e.job("web");
    let (w1, w2) = (e.worker(1), e.worker(2));

    // Asking too much is refused with each worker's reason; nothing stays.
    let e_mem = refused(api.deploy(&sla(&e.app, archive, 1 << 40), 1))?;
    ensure!(
        e_mem.contains("no worker can run it") && e_mem.contains("MiB"),
        "{e_mem}"
    );
    ensure!(
        api.ps()? == json!([]),
        "a refused deploy left {}",
        api.ps()?
    );

    // A registry nobody answers at: the worker's pull error comes back.
    let why = refused(api.deploy(&sla(&e.app, "127.0.0.1:5999/oak/none:1", 64), 1))?;
    ensure!(
        why.contains("failed on a worker") && why.contains("127.0.0.1:5999/oak/none:1"),
        "{why}"
    );
    ensure!(api.ps()? == json!([]), "a failed deploy left {}", api.ps()?);

    // All or nothing: when an SLA's second service cannot be placed, its
    // first, already running, is undeployed again.
    let mut two = sla(&e.app, archive, 64);
    let mut big = two["applications"][0]["microservices"][0].clone();
    big["microservice_name"] = json!("big");
    big["memory"] = json!(1u64 << 40);
    two["applications"][0]["microservices"]
        .as_array_mut()
        .context("microservices")?
        .push(big);
    let half = refused(api.deploy(&two, 1))?;
    ensure!(half.contains("no worker can run it"), "{half}");
    ensure!(
        api.ps()? == json!([]),
        "a half-deployed SLA left {}",
        api.ps()?
    );
    eventually("the half-deployed service's container removed", || {
        ensure!(w1.task_pid(&job, 0).is_none(), "instance 0 still runs");
        Ok(())
    })?;

    // Deploy: one instance, from the local archive, on worker 1.
    let deployed = api.deploy(&sla(&e.app, archive, 64), 1)?;
    let svc = &deployed[0];
    ensure!(svc["service"] == job.as_str(), "{deployed}");
    ensure!(
        svc["image"] == "sandbox.local/web:latest",
        "{}",
        svc["image"]
    );
    ensure!(placement(svc) == [(0, 1)], "{svc}");
    let again = refused(api.deploy(&sla(&e.app, archive, 64), 1))?;
    ensure!(again.contains("already deployed"), "{again}");

    // ps: the service with its addresses, the instance's place and state.
    let ps = api.ps()?;
    let listed = &ps[0];
    let rr = listed["rr_ip"]
        .as_str()
        .context("no RR address")?
        .to_string();
    ensure!(rr.starts_with("10.30."), "{listed}");
    let inst = &listed["instances"][0];
    ensure!(
        inst["node"] == w1.ns.as_str() && inst["namespace_ip"].is_string(),
        "{inst}"
    );
    ensure!(
        matches!(inst["status"].as_str(), Some("CREATED" | "RUNNING")),
        "{inst}"
    );

    // Reached through its service address from another container.
    let client = e.job("client");
    c.deploy(&w2.id, &idle(&client), 0)?;
    c.wait_status(&client, 0, "CREATED", 1)?;
    eventually("the service by RR", || http_get(w2, &client, 0, &rr))?;
    let before = family_sum(&scrape(w2, 9102)?, "netmanager_dataplane_packets_total");

    // Scale to 2: the new instance goes to the idle worker; RR reaches both.
    let scaled = api.scale(&job, 2)?;
    ensure!(placement(&scaled) == [(0, 1), (1, 2)], "{scaled}");
    eventually("RR over both instances", || {
        let mut seen = BTreeSet::new();
        for _ in 0..8 {
            seen.insert(who(&http_get(w2, &client, 0, &rr)?));
        }
        ensure!(seen.len() == 2, "RR reached {seen:?}");
        Ok(())
    })?;

    // Metrics: live dataplane counters (they grew with the requests) and
    // the deploys each NodeEngine carried out.
    let after = family_sum(&scrape(w2, 9102)?, "netmanager_dataplane_packets_total");
    ensure!(after > before, "dataplane packets {before} -> {after}");
    for w in [w1, w2] {
        let nm = scrape(w, 9102)?;
        ensure!(
            family_sum(&nm, "netmanager_dataplane_packets_total") > 0,
            "worker {}: {nm}",
            w.index
        );
        let ne = scrape(w, 9103)?;
        ensure!(
            ne.contains("nodeengine_deploys_total{outcome=\"created\"} ")
                && family_sum(&ne, "nodeengine_deploy_duration_seconds_count") >= 1,
            "worker {}: {ne}",
            w.index
        );
    }

    // Back to 1: the newest instance goes.
    let down = api.scale(&job, 1)?;
    ensure!(placement(&down) == [(0, 1)], "{down}");
    ensure!(c.instances(&job).len() == 1);

    // Logs: the instance's own output.
    let logs = api.logs(&job, 0)?;
    let text = logs["log"].as_str().unwrap_or("");
    ensure!(text.contains("serving on instance-0"), "{logs}");
    ensure!(api.logs(&job, 1).is_err(), "instance 1 is gone");

    // Undeploy: the instances and the service address go.
    let gone = api.undeploy(&job)?;
    ensure!(gone["removed_instances"] == json!([0]), "{gone}");
    ensure!(api.ps()? == json!([]), "{}", api.ps()?);
    ensure!(c.instances(&job).is_empty());
    eventually("the service address to stop answering", || {
        for _ in 0..3 {
            let answer = http_get(w2, &client, 0, &rr);
            ensure!(answer.is_err(), "{rr} still answers: {answer:?}");
        }
        Ok(())
    })?;
    let unknown = refused(api.scale(&job, 1))?;
    ensure!(unknown.contains("no service"), "{unknown}");
    Ok(())
}
