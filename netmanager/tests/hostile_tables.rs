//! Forged table results that answer a query NetManager really asked
//! (issue 12, point 4; the unsolicited ones are in api.rs). A publisher on
//! the broker waits for the node's `tablequery/request` and answers first:
//! with a wildcard job name, with addresses outside the cluster's ranges,
//! with more instances than the tables may hold, and with a message larger
//! than the link accepts. The node writes only what is valid, within its
//! limits, keeps serving deployments and keeps its link.
//!
//! NetManager runs without eBPF here (the InMemory plane gets the same
//! writes the maps would); its status reports both the routes it wrote and
//! the plane's entry counts.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use serde_json::{Value, json};
use testkit::runners::upstream_netcfg;
use testkit::{ClusterDouble, ContainerProcess, Mosquitto, NetManager, Node, NsPath, wait_until};

testkit::main! {
    forged_answers_to_a_real_query_write_only_valid_entries: [Root, Mosquitto, Nft],
    one_message_cannot_fill_the_tables_or_break_the_link: [Root, Mosquitto, Nft],
}

const NODE_ID: &str = "6650aa00bb22cc33dd440002";
const JOB1: &str = "clientsrvr.test.curl.test";
const JOB2: &str = "clientsrvr.test.nginx.test";
const RESULT_TOPIC: &str = "nodes/6650aa00bb22cc33dd440002/net/tablequery/result";

/// Fields drop in order: daemon first, the directory with its log last.
struct Env {
    nm: NetManager,
    csm: ClusterDouble,
    broker: Mosquitto,
    node: Node,
    _dir: tempfile::TempDir,
}

/// A registered node whose cluster double does not answer table queries:
/// the test answers them.
fn env(netcfg: Value) -> Env {
    let dir = testkit::temp_dir();
    let node = Node::standalone(1).expect("node namespace");
    let broker = Mosquitto::in_netns(&node.ns, "127.0.0.1", 1883, dir.path()).expect("mosquitto");
    let csm = ClusterDouble::options(broker.endpoint())
        .start()
        .expect("cluster double");
    csm.pin_subnet(NODE_ID, "10.18.0.64", "fc00::40");
    csm.answer_table_queries(false);
    let nm = NetManager::builder(env!("CARGO_BIN_EXE_NetManager"), &node.ns, dir.path())
        .netcfg(upstream_netcfg(broker.port()))
        .netcfg_with(netcfg)
        .env("NETMANAGER_ADDRESS_CHECK_SECS", "1")
        .start()
        .expect("NetManager");
    let (code, body) = nm.post(
        "/register",
        &json!({"client_id": NODE_ID, "cluster_address": "127.0.0.1"}).to_string(),
    );
    assert_eq!(code, 200, "{body}");
    Env {
        nm,
        csm,
        broker,
        node,
        _dir: dir,
    }
}

fn deploy(nm: &NetManager, pid: u32, job: &str) -> (u16, Value) {
    nm.post(
        "/container/deploy",
        &json!({"pid": pid, "serviceName": job, "instanceNumber": 0, "portMappings": ""})
            .to_string(),
    )
}

/// What the node wrote: (routes, plane instance entries, plane service
/// entries, interests).
fn tables(nm: &NetManager) -> (Value, u64, u64, Value) {
    let (_, st) = nm.get("/status");
    let count = |prefix: &str| {
        st["dataplane"]["maps"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m[0].as_str().is_some_and(|n| n.starts_with(prefix)))
            .and_then(|m| m[1].as_u64())
            .unwrap_or_else(|| panic!("no {prefix} map in {st}"))
    };
    (
        st["routes"].clone(),
        count("instances"),
        count("services"),
        st["interests"].clone(),
    )
}

/// Waits for the node's `count`-th table query for `job`.
fn wait_query(csm: &ClusterDouble, job: &str, count: usize) {
    wait_until(
        &format!("query {count} for {job}"),
        Duration::from_secs(10),
        || {
            csm.seen_on("tablequery/request")
                .iter()
                .filter(|q| q["sname"] == json!(job))
                .count()
                >= count
        },
    );
}

/// Publishes `payload` as any broker client could, whatever its size (the
/// cluster double's client keeps rumqttc's 10 KiB default).
fn publish_as_attacker(node: &NsPath, port: u16, topic: &str, payload: Vec<u8>) {
    let topic = topic.to_string();
    node.within(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let mut opts = MqttOptions::new(testkit::unique("attacker"), "127.0.0.1", port);
            opts.set_max_packet_size(8 << 20, 8 << 20);
            let (client, mut el) = AsyncClient::new(opts, 10);
            client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .expect("queue the publish");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                match tokio::time::timeout_at(deadline, el.poll()).await {
                    Ok(Ok(Event::Incoming(Incoming::PubAck(_)))) => break,
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => panic!("attacker's publish: {e}"),
                    Err(_) => panic!("attacker's publish not acknowledged"),
                }
            }
            let _ = client.disconnect().await;
        });
    })
    .expect("the attacker inside the node");
}

fn instance(n: u32, ns: &str, host: &str, sips: Value) -> Value {
    json!({"instance_number": n, "namespace_ip": ns, "host_ip": host, "host_port": 50103,
           "service_ip": sips})
}

/// An answer to the node's own query for JOB1: a wildcard job name is not
/// taken (nor subscribed to), and of the real job's answer only the
/// addresses inside the cluster's ranges are written.
fn forged_answers_to_a_real_query_write_only_valid_entries() {
    let e = env(json!({}));
    let c1 = ContainerProcess::start().expect("a container");
    let (code, body) = deploy(&e.nm, c1.pid(), JOB1);
    assert_eq!(code, 200, "{body}");
    wait_query(&e.csm, JOB1, 1);
    let (_, instances_before, services_before, _) = tables(&e.nm);

    // A wildcard job name answering the pending query: `+` as a topic level
    // would subscribe the node to every job's updates.
    for job in ["+", "#", "a/+"] {
        let forged = json!({"app_name": job, "query_key": JOB1, "instance_list": [
            instance(0, "10.18.5.2", "198.51.100.66", json!([{"IpType": "RR", "Address": "10.30.55.55"}]))]});
        e.csm
            .publish(RESULT_TOPIC, forged.to_string())
            .expect("publish");
    }
    // Then the job's own name with hostile entries next to one valid one.
    let answer = json!({"app_name": JOB1, "query_key": JOB1, "instance_list": [
        // valid: one instance entry, an RR and an instance service address
        instance(0, "10.18.0.130", "198.51.100.2", json!([
            {"IpType": "RR", "Address": "10.30.55.55"},
            {"IpType": "instance_ip", "Address": "10.30.0.3"}])),
        // namespace addresses outside 10.16.0.0/12 and fc00::/7: skipped
        {"instance_number": 1, "namespace_ip": "8.8.8.8", "namespace_ip_v6": "2001:db8::1",
         "host_ip": "198.51.100.3", "host_port": 50103,
         "service_ip": [{"IpType": "RR", "Address": "10.30.55.55"}]},
        // service addresses outside the service ranges: the instance
        // stays, the addresses are not captured
        instance(2, "10.18.0.131", "198.51.100.4", json!([
            {"IpType": "RR", "Address": "192.168.1.1", "Address_v6": "2001:db8::2"},
            {"IpType": "Closest", "Address": "8.8.8.8"},
            {"IpType": "instance_ip", "Address": "1.1.1.1"}])),
        // host addresses that are no node: skipped
        instance(3, "10.18.0.132", "127.0.0.1", json!([{"IpType": "RR", "Address": "10.30.55.55"}])),
        instance(4, "10.18.0.133", "224.0.0.1", json!([{"IpType": "RR", "Address": "10.30.55.55"}])),
        instance(5, "10.18.0.134", "0.0.0.0", json!([{"IpType": "RR", "Address": "10.30.55.55"}])),
    ]});
    e.csm
        .publish(RESULT_TOPIC, answer.to_string())
        .expect("publish");
    wait_until("JOB1 routes", Duration::from_secs(10), || {
        tables(&e.nm).0["jobs"] == json!([JOB1])
    });

    let (routes, instances, services, interests) = tables(&e.nm);
    assert_eq!(
        (&routes["instances"], &routes["services"]),
        (&json!(2), &json!(2)),
        "routes written from the hostile answer: {routes}"
    );
    assert_eq!(
        (instances, services),
        (instances_before + 2, services_before + 2),
        "dataplane entries"
    );
    assert_eq!(interests, json!([JOB1]), "subscribed to a forged job");
    let mut e = e;
    assert!(e.nm.alive());
}

/// One answer cannot fill the tables: with room for 72 route entries
/// (InstanceTableSize 200 less the local reserve), an answer listing 300
/// instances is refused whole, and the next deployment still gets its
/// entries. A message above the link's 1 MiB limit costs a reconnect,
/// nothing else: the node queries and routes again afterwards.
fn one_message_cannot_fill_the_tables_or_break_the_link() {
    let e = env(json!({"InstanceTableSize": 200}));
    let c1 = ContainerProcess::start().expect("a container");
    let (code, body) = deploy(&e.nm, c1.pid(), JOB1);
    assert_eq!(code, 200, "{body}");
    wait_query(&e.csm, JOB1, 1);
    let before = tables(&e.nm);

    let list: Vec<Value> = (0..300u32)
        .map(|n| {
            instance(
                n,
                &format!("10.19.{}.{}", n / 200, n % 200 + 2),
                "198.51.100.2",
                json!([{"IpType": "RR", "Address": "10.30.55.55"}]),
            )
        })
        .collect();
    let flood = json!({"app_name": JOB1, "query_key": JOB1, "instance_list": list});
    publish_as_attacker(
        &e.node.ns,
        e.broker.port(),
        RESULT_TOPIC,
        flood.to_string().into_bytes(),
    );
    // The answer is taken (the query is answered) but writes nothing.
    wait_until(
        "the flood answered the query",
        Duration::from_secs(10),
        || {
            e.nm.get("/status").1["mqtt"]["queries_answered"]
                .as_u64()
                .is_some_and(|n| n >= 1)
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    let after = tables(&e.nm);
    assert_eq!(after, before, "a 300-instance answer was written");
    assert!(
        e.nm.log_text().contains("do not fit the dataplane tables"),
        "no log line names the refusal"
    );
    // The next deployment finds room for its own entries.
    let c2 = ContainerProcess::start().expect("a container");
    let (code, body) = deploy(&e.nm, c2.pid(), JOB2);
    assert_eq!(code, 200, "{body}");
    wait_until("JOB2's local entries", Duration::from_secs(10), || {
        tables(&e.nm).1 == before.1 + 2
    });

    // Above rumqttc's 1 MiB limit: the link drops and reconnects.
    let connections = e.nm.get("/status").1["mqtt"]["connections"]
        .as_u64()
        .unwrap_or(0);
    let mut huge = flood.clone();
    huge["padding"] = json!("x".repeat(2 << 20));
    publish_as_attacker(
        &e.node.ns,
        e.broker.port(),
        RESULT_TOPIC,
        huge.to_string().into_bytes(),
    );
    wait_until("the link reconnected", Duration::from_secs(15), || {
        let st = e.nm.get("/status").1;
        st["mqtt"]["connected"] == json!(true)
            && st["mqtt"]["connections"].as_u64().unwrap_or(0) > connections
    });
    // And works: an update makes the node ask again, and a valid answer
    // is written.
    e.csm.answer_table_queries(true);
    e.csm.set_table(
        JOB1,
        json!({"instance_list": [instance(1, "10.18.0.130", "198.51.100.2",
            json!([{"IpType": "RR", "Address": "10.30.55.55"}]))]}),
    );
    e.csm.publish_update(JOB1);
    wait_until(
        "JOB1 routed after the reconnect",
        Duration::from_secs(15),
        || {
            tables(&e.nm).0["jobs"]
                .as_array()
                .is_some_and(|j| j.contains(&json!(JOB1)))
        },
    );
    let mut e = e;
    assert!(e.nm.alive());
}
