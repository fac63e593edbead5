//! End to end through the sandbox: real NodeEngines and NetManagers with
//! the eBPF overlay, deployed by the cluster double. Scale a service to
//! three instances on two workers: RR spreads new connections over all of
//! them, Closest stays on the client's node, TCP streams arrive intact;
//! scale down (undeploy) and RR stops using the removed instance.

use std::collections::BTreeSet;

use anyhow::{Result, ensure};
use oakestra_worker_tests::e2e::{E2e, eventually, http_get, stream, stream_servers};
use xtask::sandbox::sample_services::{echo_server, idle};
use xtask::sandbox::workers::Worker;

testkit::main! {
    scale_rr_closest_streams_and_undeploy: [Root, Bpffs, Mosquitto, Containerd, Busybox, Nft, Python3],
}

fn web(e: &E2e, w: &Worker) -> testkit::JobSpec {
    let mut s = echo_server(&w.ns);
    s.job_name = e.job("web");
    s
}

/// Which instance answered (`hello from instance-<n> on <node>`).
fn who(body: &str) -> String {
    body.split_whitespace().nth(2).unwrap_or("").to_string()
}

fn scale_rr_closest_streams_and_undeploy() -> Result<()> {
    let e = E2e::start("svc", 2)?;
    let c = &e.sb.cluster;
    let (w1, w2) = (e.worker(1), e.worker(2));
    let job = e.job("web");
    c.deploy(&w1.id, &web(&e, w1), 0)?;
    c.deploy(&w2.id, &web(&e, w2), 1)?;
    c.deploy(&w2.id, &web(&e, w2), 2)?;
    c.wait_instances(&job, 3)?;
    let client = e.job("client");
    c.deploy(&w1.id, &idle(&client), 0)?;
    c.wait_status(&client, 0, "CREATED", 1)?;
    let (rr, closest) = c.service_ips(&job);

    // RR: every new connection picks the next backend.
    eventually("first answer by RR", || http_get(w1, &client, 0, &rr.0))?;
    let mut seen = BTreeSet::new();
    for _ in 0..12 {
        seen.insert(who(&http_get(w1, &client, 0, &rr.0)?));
    }
    ensure!(seen.len() == 3, "RR reached only {seen:?}");
    let v6 = eventually("RR over IPv6", || {
        http_get(w1, &client, 0, &format!("[{}]", rr.1))
    })?;
    ensure!(v6.starts_with("hello from"), "{v6}");

    // Closest: the instance on the client's own node, every time.
    eventually("first answer by Closest", || {
        http_get(w1, &client, 0, &closest.0)
    })?;
    for _ in 0..6 {
        let body = http_get(w1, &client, 0, &closest.0)?;
        ensure!(who(&body) == "instance-0", "Closest answered {body}");
    }

    // Bytes end to end, across nodes and locally (RR rotates).
    let _s1 = stream_servers(w1, &job, &[0])?;
    let _s2 = stream_servers(w2, &job, &[1, 2])?;
    for _ in 0..3 {
        stream(w1, &client, 0, &rr.0, 20_000_000)?;
    }

    // Scale down: instance 2 goes, RR keeps answering from 0 and 1 only.
    c.undeploy(&w2.id, &job, 2)?;
    c.wait_status(&job, 2, "UNDEPLOYED", 1)?;
    c.wait_instances(&job, 2)?;
    eventually("RR without instance 2", || {
        let mut seen = BTreeSet::new();
        for _ in 0..8 {
            seen.insert(who(&http_get(w1, &client, 0, &rr.0)?));
        }
        ensure!(
            seen == BTreeSet::from(["instance-0".to_string(), "instance-1".to_string()]),
            "RR reached {seen:?}"
        );
        Ok(())
    })?;
    Ok(())
}
