//! End to end through the sandbox: the cluster's broker goes away and
//! comes back. Established service traffic does not need it; afterwards
//! both daemons of every worker have reconnected and re-subscribed:
//! a new deployment works and routes follow `updates_available`.

use anyhow::{Result, ensure};
use oakestra_worker_tests::e2e::{E2e, eventually, http_get};
use xtask::sandbox::sample_services::echo_server;

testkit::main! {
    broker_outage_and_recovery: [Root, Bpffs, Mosquitto, Containerd, Busybox, Nft, Python3],
}

fn broker_outage_and_recovery() -> Result<()> {
    let mut e = E2e::start("mq", 2)?;
    let (job, client, rr) = e.web_and_client()?;
    let (id1, id2) = (e.worker(1).id.clone(), e.worker(2).id.clone());
    eventually("RR before the outage", || {
        http_get(e.worker(2), &client, 0, &rr)
    })?;

    e.sb.broker.stop()?;
    for _ in 0..5 {
        let b = http_get(e.worker(2), &client, 0, &rr)?;
        ensure!(b.contains("instance-0"), "during the outage: {b}");
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    e.sb.broker.start()?;

    // Scale out to w2 and remove instance 0: the client's node must hear
    // `updates_available` again to switch.
    let mut second = echo_server("w2");
    second.job_name = job.clone();
    // Both daemons of each worker reconnect with back-off. NodeEngine's
    // session state is not visible here, so give it the moment it needs to
    // take the deploy; an update published before a NetManager has
    // resubscribed would not reach it (the refresh after its reconnect
    // covers what came earlier), so also wait until both say they are.
    std::thread::sleep(std::time::Duration::from_secs(3));
    eventually("both NetManagers reconnected", || {
        for n in [1, 2] {
            let s = e.worker(n).status()?;
            ensure!(s["mqtt"]["connected"] == true, "worker {n}: {}", s["mqtt"]);
        }
        Ok(())
    })?;
    e.sb.cluster.deploy(&id2, &second, 1)?;
    e.sb.cluster.wait_instances(&job, 2)?;
    e.sb.cluster.undeploy(&id1, &job, 0)?;
    e.sb.cluster.wait_status(&job, 0, "UNDEPLOYED", 1)?;
    eventually("RR follows the update", || {
        let b = http_get(e.worker(2), &client, 0, &rr)?;
        ensure!(b.contains("instance-1"), "answered by {b}");
        Ok(())
    })
    .map_err(|err| {
        // What the client's node believes, for whoever reads the failure.
        let routes = e.worker(2).status().map(|s| s["routes"].clone());
        err.context(format!("worker 2's routes: {routes:?}"))
    })?;
    Ok(())
}
