//! The cluster double against a real mosquitto, with this test playing the
//! worker: registration over HTTP, subnets, deploys, table queries and the
//! failure window behave like upstream's cluster (docs/contract.md §3).

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use tempfile::TempDir;
use testkit::cluster::LoopbackCluster;
use testkit::{ClusterDouble, JobSpec, Mosquitto, temp_dir, unique, wait_until};
use worker_common::http;
use worker_common::tls::ClientTls;

testkit::main! {
    registration_gives_each_hostname_one_id: [Mosquitto],
    a_worker_sees_upstreams_cluster_behaviour: [Mosquitto],
}

const JOB: &str = "app.ns.web.main";

/// Fields drop in order: the double first, the directory last.
struct Cluster {
    cluster: ClusterDouble,
    broker: Mosquitto,
    _dir: TempDir,
}

fn cluster(window: Duration) -> Cluster {
    let dir = temp_dir();
    let LoopbackCluster { cluster, broker } =
        LoopbackCluster::start_with(dir.path(), |o| o.failure_window(window))
            .expect("broker and cluster double");
    Cluster {
        cluster,
        broker,
        _dir: dir,
    }
}

fn register(c: &ClusterDouble, body: &str) -> (u16, Value) {
    let tls = ClientTls::system_roots()
        .build()
        .expect("TLS configuration");
    let client = http::blocking::Client::new(http::Client::tcp(tls)).expect("HTTP client");
    let url = format!("http://{}/api/node/register", c.http_addr());
    let resp = client
        .send(
            http::Method::POST,
            &url,
            Some(("application/json", body.to_string().into())),
        )
        .expect("an answer");
    let v = serde_json::from_slice(&resp.body).expect("a JSON answer");
    (resp.status.as_u16(), v)
}

fn registration_gives_each_hostname_one_id() {
    let c = cluster(Duration::from_secs(30));
    let early = c.cluster.id_for_host("worker-a");
    let (code, a) = register(&c.cluster, r#"{"host": "worker-a", "id": ""}"#);
    assert_eq!(code, 200, "{a}");
    assert_eq!(a["id"], json!(early));
    assert_eq!(a["MQTT_BROKER_PORT"], json!(c.broker.port().to_string()));
    let (_, again) = register(&c.cluster, r#"{"host": "worker-a"}"#);
    assert_eq!(again["id"], a["id"], "same hostname, same id");
    let (_, b) = register(&c.cluster, r#"{"host": "worker-b"}"#);
    assert_ne!(b["id"], a["id"]);
    assert_eq!(b["id"].as_str().map(str::len), Some(24));
    let (code, bad) = register(&c.cluster, "{not json");
    assert_eq!(code, 400, "{bad}");
    assert_eq!(c.cluster.registrations().len(), 3);
    let nodes = c.cluster.nodes();
    assert_eq!(nodes.len(), 2);
    assert_eq!(
        c.cluster.node("worker-b").map(|n| n.id),
        b["id"].as_str().map(str::to_string)
    );
}

/// A worker's MQTT side: what it receives arrives on the channel.
struct Worker {
    id: String,
    client: Client,
    inbox: Receiver<(String, Value)>,
}

impl Worker {
    fn connect(port: u16, id: &str) -> Worker {
        let mut o = MqttOptions::new(unique("fake-worker"), "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(5));
        let (client, mut connection) = Client::new(o, 100);
        let (tx, inbox) = std::sync::mpsc::channel();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for ev in connection.iter() {
                match ev {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let v = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                        if tx.send((p.topic.clone(), v)).is_err() {
                            return;
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                    Ok(_) => {}
                }
            }
        });
        for topic in [
            format!("nodes/{id}/#"),
            format!("jobs/{JOB}/updates_available"),
        ] {
            client
                .subscribe(topic, QoS::AtLeastOnce)
                .expect("subscribe");
            ready.recv_timeout(Duration::from_secs(10)).expect("suback");
        }
        Worker {
            id: id.to_string(),
            client,
            inbox,
        }
    }

    fn send(&self, suffix: &str, body: Value) {
        self.client
            .publish(
                format!("nodes/{}/{suffix}", self.id),
                QoS::AtLeastOnce,
                false,
                body.to_string(),
            )
            .expect("publish");
    }

    /// The next message on `topic` (others are skipped).
    fn next(&self, topic: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.inbox.recv_timeout(left) {
                Ok((t, v)) if t == topic => return v,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => panic!("nothing on {topic}"),
                Err(RecvTimeoutError::Disconnected) => panic!("the worker's connection ended"),
            }
        }
    }

    fn query(&self, sname: &str, sip: &str) -> Value {
        self.send(
            "net/tablequery/request",
            json!({"sname": sname, "sip": sip}),
        );
        self.next(&format!("nodes/{}/net/tablequery/result", self.id))
    }
}

fn a_worker_sees_upstreams_cluster_behaviour() {
    let c = cluster(Duration::from_secs(1));
    let cluster = &c.cluster;
    let w = Worker::connect(c.broker.port(), "6650aa00bb22cc33dd440077");
    let result = format!("nodes/{}/net/subnetwork/result", w.id);

    // Every subnet request allocates; the node's record keeps the last.
    w.send("net/subnet", json!({"METHOD": "GET"}));
    let first = w.next(&result);
    w.send("net/subnet", json!({"METHOD": "GET"}));
    let second = w.next(&result);
    assert_ne!(first, second);
    let record = cluster.subnet_of(&w.id).expect("a subnet on record");
    assert_eq!(json!({"address": record.0, "addressv6": record.1}), second);

    // A deploy reaches the node; the instance is listed, without addresses.
    let spec = JobSpec {
        job_name: JOB.into(),
        image: "img".into(),
        cmd: vec!["sleep".into(), "1".into()],
        environment: vec![],
    };
    cluster.deploy(&w.id, &spec, 0).unwrap();
    let doc = w.next(&format!("nodes/{}/control/deploy", w.id));
    assert_eq!(
        (doc["job_name"].clone(), doc["instance_number"].clone()),
        (json!(JOB), json!(0))
    );
    let (rr, _) = cluster.service_ips(JOB);
    let t = w.query("", &rr.0);
    assert_eq!(
        (t["app_name"].clone(), t["query_key"].clone()),
        (json!(JOB), json!(rr.0))
    );
    let i = &t["instance_list"][0];
    assert!(i["namespace_ip"].is_null() && i["host_ip"].is_null(), "{i}");
    assert_eq!(cluster.interests_of(&w.id), vec![JOB.to_string()]);

    // The worker's report fills the addresses in and is announced.
    w.send(
        "net/service/deployed",
        json!({"appname": JOB, "status": "DEPLOYED", "instance_number": 0, "nsip": "10.18.0.66",
               "nsipv6": "fc00::42", "host_ip": "198.51.100.1", "host_port": "50103"}),
    );
    let update = w.next(&format!("jobs/{JOB}/updates_available"));
    assert_eq!(update, json!({"type": "DEPLOYMENT"}));
    let t = w.query(JOB, "");
    assert_eq!(t["query_key"], json!(JOB));
    assert_eq!(t["instance_list"][0]["namespace_ip"], json!("10.18.0.66"));
    assert_eq!(cluster.instances(JOB).len(), 1);
    w.send("net/interest/remove", json!({"appname": JOB}));
    wait_until("the interest to go", Duration::from_secs(5), || {
        cluster.interests_of(&w.id).is_empty()
    });

    // Silence fails the instance; a later report is accepted again.
    wait_until("the instance to fail", Duration::from_secs(10), || {
        cluster
            .instance_state(JOB, 0)
            .is_some_and(|s| s.status == "FAILED")
    });
    w.send(
        "jobs/resources",
        json!({"services": [{"job_name": JOB, "instance": 0, "cpu_percent": "0"}]}),
    );
    wait_until("the instance to run again", Duration::from_secs(5), || {
        cluster
            .instance_state(JOB, 0)
            .is_some_and(|s| s.status == "RUNNING")
    });

    // Undeploying removes it and tells the interested workers.
    cluster.undeploy(&w.id, JOB, 0).unwrap();
    let del = w.next(&format!("nodes/{}/control/delete", w.id));
    assert_eq!(del["job_name"], json!(JOB));
    assert_eq!(
        w.next(&format!("jobs/{JOB}/updates_available")),
        json!({"type": "UNDEPLOYMENT"})
    );
    assert_eq!(w.query(JOB, "")["instance_list"], json!([]));
}
