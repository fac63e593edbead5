//! End to end through the sandbox: restarts and moves under traffic.
//! Hashed TCP streams keep flowing while the client node's NetManager is
//! killed (-9) and restarted and while the server node's NodeEngine
//! restarts; then the instance moves to the other node and the service
//! address follows it.

use anyhow::{Context, Result, ensure};
use oakestra_worker_tests::e2e::{E2e, eventually, http_get, stream, stream_loop, stream_servers};
use xtask::sandbox::sample_services::echo_server;

testkit::main! {
    restarts_mid_traffic_and_move: [Root, Bpffs, Mosquitto, Containerd, Busybox, Nft, Python3],
}

fn restarts_mid_traffic_and_move() -> Result<()> {
    let mut e = E2e::start("life", 2)?;
    let (job, client, rr) = e.web_and_client()?;
    let (id1, id2) = (e.worker(1).id.clone(), e.worker(2).id.clone());
    let servers = stream_servers(e.worker(1), &job, &[0])?;
    eventually("first stream", || {
        stream(e.worker(2), &client, 0, &rr, 1_000_000)
    })?;

    // kill -9 and restart the client node's NetManager mid-traffic.
    let traffic = stream_loop(e.worker(2), &client, 0, &rr, 15, 5_000_000)?;
    std::thread::sleep(std::time::Duration::from_millis(500));
    let w2 = e.sb.worker_mut(2)?;
    w2.kill_netmanager();
    std::thread::sleep(std::time::Duration::from_secs(1));
    w2.start_netmanager()?;
    traffic
        .join()
        .map_err(|_| anyhow::anyhow!("traffic thread panicked"))?
        .context("streams across the NetManager restart")?;

    // Restart the server node's NodeEngine mid-traffic: its container stays.
    let traffic = stream_loop(e.worker(2), &client, 0, &rr, 10, 5_000_000)?;
    let w1 = e.sb.worker_mut(1)?;
    w1.stop_nodeengine();
    w1.start_nodeengine()?;
    traffic
        .join()
        .map_err(|_| anyhow::anyhow!("traffic thread panicked"))?
        .context("streams across the NodeEngine restart")?;
    drop(servers);

    // The restarted NodeEngine still takes orders: move instance 0 to w2.
    e.sb.cluster.undeploy(&id1, &job, 0)?;
    e.sb.cluster.wait_status(&job, 0, "UNDEPLOYED", 1)?;
    let mut moved = echo_server("w2");
    moved.job_name = job.clone();
    e.sb.cluster.deploy(&id2, &moved, 0)?;
    e.sb.cluster.wait_status(&job, 0, "CREATED", 2)?;
    let body = eventually("the moved instance by RR", || {
        let b = http_get(e.worker(2), &client, 0, &rr)?;
        ensure!(b.contains("on w2"), "still answered by {b}");
        Ok(b)
    })?;
    ensure!(body.starts_with("hello from instance-0"), "{body}");
    Ok(())
}
