//! cluster_link against a real mosquitto and the cluster double. These need
//! no namespaces, only mosquitto.

use std::path::Path;
use std::time::Duration;

use netmanager::cluster_link::{ClusterLink, LinkEvent, LinkOptions, QueryKey};
use serde_json::json;
use tempfile::TempDir;
use testkit::cluster::LoopbackCluster;
use testkit::{ClusterDouble, Mosquitto, block_on, temp_dir};
use tokio::sync::mpsc::Receiver;

testkit::main! {
    subnet_request: [Mosquitto],
    unanswered_subnet_request_is_not_repeated_early_and_first_answer_wins: [Mosquitto],
    coalesced_table_queries_and_interest: [Mosquitto],
    table_query_timeout: [Mosquitto],
    a_query_after_a_change_does_not_take_an_older_requests_fate: [Mosquitto],
    interest_expires_without_holders: [Mosquitto],
    survives_broker_restart: [Mosquitto],
    server_verified_tls_with_credentials: [Mosquitto, Openssl],
}

const NODE: &str = "6650aa00bb22cc33dd440002";
const JOB: &str = "clientsrvr.test.nginx.test";

/// A broker on loopback and the cluster double, which gives NODE the
/// subnet 10.18.0.64 / fc00::40. Fields drop in order, the directory last.
struct Cluster {
    csm: ClusterDouble,
    broker: Mosquitto,
    _dir: TempDir,
}

fn cluster() -> Cluster {
    let dir = temp_dir();
    let LoopbackCluster {
        cluster: csm,
        broker,
    } = LoopbackCluster::start(dir.path()).expect("broker and cluster double");
    csm.pin_subnet(NODE, "10.18.0.64", "fc00::40");
    Cluster {
        csm,
        broker,
        _dir: dir,
    }
}

fn fixture() -> serde_json::Value {
    serde_json::from_str(include_str!("fixtures/tablequery-result.json")).unwrap()
}

fn link(port: u16, tweak: impl FnOnce(&mut LinkOptions)) -> (ClusterLink, Receiver<LinkEvent>) {
    let mut o = LinkOptions::new(NODE, "127.0.0.1", port);
    o.keep_alive = Duration::from_secs(5);
    tweak(&mut o);
    ClusterLink::connect(o).unwrap()
}

async fn connected(rx: &mut Receiver<LinkEvent>) {
    next_event(
        rx,
        |e| matches!(e, LinkEvent::Connected),
        Duration::from_secs(10),
    )
    .await;
}

async fn next_event(
    rx: &mut Receiver<LinkEvent>,
    pred: impl Fn(&LinkEvent) -> bool,
    within: Duration,
) -> LinkEvent {
    tokio::time::timeout(within, async {
        loop {
            let ev = rx.recv().await.expect("event stream ended");
            if pred(&ev) {
                return ev;
            }
        }
    })
    .await
    .expect("expected event did not arrive")
}

fn subnet_request() {
    block_on(async {
        let Cluster { _dir, broker, csm } = cluster();
        let (link, _rx) = link(broker.port(), |_| {});
        let subnet = link.request_subnet(Duration::from_secs(10)).await.unwrap();
        assert_eq!(subnet.v4.to_string(), "10.18.0.64");
        assert_eq!(subnet.v6.to_string(), "fc00::40");
        // The real cluster allocates a fresh subnet for every request: one
        // registration must ask exactly once, also after the answer arrived.
        tokio::time::sleep(Duration::from_secs(4)).await;
        let reqs = csm.seen_on(&format!("nodes/{NODE}/net/subnet"));
        assert_eq!(reqs, vec![json!({"METHOD": "GET"})]);
    })
}

fn unanswered_subnet_request_is_not_repeated_early_and_first_answer_wins() {
    block_on(async {
        let Cluster { _dir, broker, csm } = cluster();
        csm.answer_subnet_requests(false);
        let (link, _rx) = link(broker.port(), |_| {});
        let asking = tokio::spawn({
            let link = link.clone();
            async move { link.request_subnet(Duration::from_secs(30)).await }
        });
        // Longer than the old 3 s retry, shorter than upstream's 10 s.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let topic = format!("nodes/{NODE}/net/subnet");
        assert_eq!(csm.seen_on(&topic).len(), 1, "asked again too early");
        let result = format!("nodes/{NODE}/net/subnetwork/result");
        csm.publish(
            &result,
            r#"{"address":"10.18.1.0","addressv6":"fc00::100"}"#,
        )
        .unwrap();
        csm.publish(
            &result,
            r#"{"address":"10.18.2.0","addressv6":"fc00::200"}"#,
        )
        .unwrap();
        let subnet = asking.await.unwrap().unwrap();
        assert_eq!(subnet.v4.to_string(), "10.18.1.0");
        assert_eq!(csm.seen_on(&topic).len(), 1);
    })
}

fn coalesced_table_queries_and_interest() {
    block_on(async {
        let Cluster { _dir, broker, csm } = cluster();
        csm.set_table(JOB, fixture());
        let (link, mut rx) = link(broker.port(), |_| {});
        connected(&mut rx).await;

        let key = QueryKey::Ip("10.30.55.56".parse().unwrap());
        let (a, b, c) = tokio::join!(
            link.table_query(&key),
            link.table_query(&key),
            link.table_query(&key)
        );
        let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
        assert_eq!(a.app_name, JOB);
        assert_eq!(a.instance_list.len(), 2);
        assert_eq!(a.instance_list[1].host_port, 50103); // a string in the fixture
        assert!(std::sync::Arc::ptr_eq(&a, &b) && std::sync::Arc::ptr_eq(&b, &c));
        let reqs = csm.seen_on("/net/tablequery/request");
        assert_eq!(
            reqs,
            vec![json!({"sname": "", "sip": "10.30.55.56"})],
            "queries were not coalesced"
        );

        let by_job = link.table_query(&QueryKey::Job(JOB.into())).await.unwrap();
        assert_eq!(by_job.instance_list.len(), 2);
        assert_eq!(
            csm.seen_on("/net/tablequery/request").last().unwrap(),
            &json!({"sname": JOB, "sip": ""})
        );

        // An interest turns updates_available into JobUpdated events.
        link.hold_interest(JOB, "local-1").await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        csm.publish_update(JOB);
        let ev = next_event(
            &mut rx,
            |e| matches!(e, LinkEvent::JobUpdated(_)),
            Duration::from_secs(5),
        )
        .await;
        assert!(matches!(ev, LinkEvent::JobUpdated(j) if j == JOB));

        // Publications follow the contract.
        let ns = netmanager::addresses::AddressPair {
            v4: "10.18.0.66".parse().unwrap(),
            v6: "fc00::42".parse().unwrap(),
        };
        link.publish_deployed(JOB, 1, ns, "198.51.100.1".parse().unwrap(), 50103)
            .await
            .unwrap();
        link.publish_undeployed(JOB, 1).await.unwrap();
        link.publish_address_changed(JOB, 1, "198.51.100.7".parse().unwrap(), 50103)
            .await
            .unwrap();
        let d = csm.wait_for("/net/service/deployed", 1, Duration::from_secs(5));
        assert_eq!(
            d[0],
            json!({"appname": JOB, "status": "DEPLOYED", "instance_number": 1, "nsip": "10.18.0.66",
               "nsipv6": "fc00::42", "host_ip": "198.51.100.1", "host_port": "50103"})
        );
        let u = csm.wait_for("/net/service/undeployed", 1, Duration::from_secs(5));
        assert_eq!(u[0], json!({"appname": JOB, "instance_number": 1}));
        let c = csm.wait_for("/net/service/address-changed", 1, Duration::from_secs(5));
        assert_eq!(
            c[0],
            json!({"appname": JOB, "instance_number": 1, "host_ip": "198.51.100.7", "host_port": "50103"})
        );
    })
}

/// The cluster with table queries going unanswered, and a connected link
/// whose queries give up after 800 ms.
async fn unanswering() -> (Cluster, ClusterLink, Receiver<LinkEvent>) {
    let c = cluster();
    c.csm.answer_table_queries(false);
    let (link, mut rx) = link(c.broker.port(), |o| {
        o.query_timeout = Duration::from_millis(800)
    });
    connected(&mut rx).await;
    (c, link, rx)
}

fn table_query_timeout() {
    block_on(async {
        let (
            Cluster {
                _dir,
                broker: _broker,
                csm,
            },
            link,
            _rx,
        ) = unanswering().await;
        let started = std::time::Instant::now();
        let key = QueryKey::Ip("10.30.9.9".parse().unwrap());
        let (a, b) = tokio::join!(link.table_query(&key), link.table_query(&key));
        assert!(a.is_err() && b.is_err());
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "took {:?}",
            started.elapsed()
        );
        // After a failure the next query asks again.
        csm.answer_table_queries(true);
        csm.set_table(JOB, fixture());
        let _ = link
            .table_query(&QueryKey::Ip("10.30.55.57".parse().unwrap()))
            .await
            .unwrap();
        assert_eq!(csm.seen_on("/net/tablequery/request").len(), 2);
    })
}

/// A refresh after `updates_available` that finds a request already out
/// (here one the cluster never answers, as when it was published while the
/// cluster was resubscribing) waits it out and asks again, so the change
/// is not lost; a plain query shares that request's fate.
fn a_query_after_a_change_does_not_take_an_older_requests_fate() {
    block_on(async {
        let (
            Cluster {
                _dir,
                broker: _broker,
                csm,
            },
            link,
            _rx,
        ) = unanswering().await;
        let key = QueryKey::Job(JOB.into());
        let earlier = link.table_query(&key);
        let after_change = async {
            // The cluster is back and has the table once the first request is out.
            csm.wait_for("/net/tablequery/request", 1, Duration::from_secs(5));
            csm.answer_table_queries(true);
            csm.set_table(JOB, fixture());
            link.table_query_fresh(&key).await
        };
        let (earlier, fresh) = tokio::join!(earlier, after_change);
        assert!(
            earlier.is_err(),
            "the unanswered request failed: {earlier:?}"
        );
        let fresh = fresh.expect("the refresh asked again and got the table");
        assert_eq!(fresh.instance_list.len(), 2);
        assert_eq!(
            csm.seen_on("/net/tablequery/request"),
            vec![json!({"sname": JOB, "sip": ""}); 2]
        );
    })
}

fn interest_expires_without_holders() {
    block_on(async {
        let Cluster { _dir, broker, csm } = cluster();
        let (link, mut rx) = link(broker.port(), |o| {
            o.interest_ttl = Duration::from_millis(800)
        });
        connected(&mut rx).await;

        link.hold_interest(JOB, "inst-0").await.unwrap();
        link.register_interest("other.app.svc.ns").await.unwrap();
        // Held: survives well past the TTL. Unheld: dropped.
        let ev = next_event(
            &mut rx,
            |e| matches!(e, LinkEvent::InterestDropped(_)),
            Duration::from_secs(5),
        )
        .await;
        assert!(matches!(ev, LinkEvent::InterestDropped(j) if j == "other.app.svc.ns"));
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(link.interests(), vec![JOB.to_string()]);

        link.release_holder("inst-0");
        let ev = next_event(
            &mut rx,
            |e| matches!(e, LinkEvent::InterestDropped(_)),
            Duration::from_secs(5),
        )
        .await;
        assert!(matches!(ev, LinkEvent::InterestDropped(j) if j == JOB));
        let removed = csm.wait_for("/net/interest/remove", 2, Duration::from_secs(5));
        assert!(removed.contains(&json!({"appname": JOB})), "{removed:?}");
        assert!(link.interests().is_empty());

        // Unsubscribed: an update no longer reaches us.
        tokio::time::sleep(Duration::from_millis(300)).await;
        csm.publish_update(JOB);
        let got = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                if let Some(LinkEvent::JobUpdated(_)) = rx.recv().await {
                    return;
                }
            }
        })
        .await;
        assert!(
            got.is_err(),
            "update received after the interest was dropped"
        );
    })
}

fn survives_broker_restart() {
    block_on(async {
        let Cluster {
            _dir,
            mut broker,
            csm,
        } = cluster();
        csm.set_table(JOB, fixture());
        let (link, mut rx) = link(broker.port(), |_| {});
        connected(&mut rx).await;
        link.hold_interest(JOB, "inst-0").await.unwrap();

        broker.stop();
        tokio::time::sleep(Duration::from_millis(500)).await;
        broker.resume().expect("mosquitto back");
        // Both the double and the link reconnect; the link resubscribes.
        next_event(
            &mut rx,
            |e| matches!(e, LinkEvent::Connected),
            Duration::from_secs(20),
        )
        .await;
        let r = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if let Ok(r) = link.table_query(&QueryKey::Job(JOB.into())).await {
                    return r;
                }
            }
        })
        .await
        .expect("no table query answered after the broker restart");
        assert_eq!(r.app_name, JOB);
        // The interest subscription came back too.
        let got = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                csm.publish_update(JOB);
                if let Ok(Some(LinkEvent::JobUpdated(j))) =
                    tokio::time::timeout(Duration::from_millis(500), rx.recv()).await
                {
                    return j;
                }
            }
        })
        .await
        .expect("updates_available not received after the broker restart");
        assert_eq!(got, JOB);
    })
}

/// A broker that wants TLS and a password: a CA and a server certificate for
/// 127.0.0.1 made with openssl, a mosquitto password file.
struct SecureBroker {
    broker: Mosquitto,
    ca: std::path::PathBuf,
}

fn secure_broker(dir: &Path) -> SecureBroker {
    let mut make = std::process::Command::new("sh");
    make.arg("-ec")
        .arg(
            "openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=test-ca -keyout ca.key -out ca.pem 2>/dev/null
             openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout srv.key -out srv.csr 2>/dev/null
             printf 'subjectAltName=IP:127.0.0.1\n' > san.ext
             openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile san.ext -out srv.pem 2>/dev/null
             touch passwd && chmod 600 passwd && mosquitto_passwd -b passwd node secret-pw",
        )
        .current_dir(dir);
    testkit::process::output(make).expect("certificates and a password file");
    let d = dir.display();
    let broker = Mosquitto::loopback_with(
        dir,
        &format!(
            "cafile {d}/ca.pem\ncertfile {d}/srv.pem\nkeyfile {d}/srv.key\n\
             allow_anonymous false\npassword_file {d}/passwd\nuser root"
        ),
    )
    .expect("secure mosquitto");
    SecureBroker {
        broker,
        ca: dir.join("ca.pem"),
    }
}

async fn connects(opts: LinkOptions) -> bool {
    let (_link, mut rx) = ClusterLink::connect(opts).unwrap();
    tokio::time::timeout(Duration::from_secs(4), async {
        while let Some(ev) = rx.recv().await {
            if matches!(ev, LinkEvent::Connected) {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false)
}

/// MQTTS that verifies the broker without a client certificate, and broker
/// credentials (security: any client of an open broker could otherwise
/// publish to the node).
fn server_verified_tls_with_credentials() {
    let dir = temp_dir();
    let b = secure_broker(dir.path());
    let port = b.broker.port();
    let opts = |ca: Option<&std::path::Path>, password: &str| {
        let mut o = LinkOptions::new(NODE, "127.0.0.1", port);
        o.keep_alive = Duration::from_secs(5);
        let mut tls = worker_common::tls::ClientTls::system_roots();
        if let Some(ca) = ca {
            tls = tls.with_extra_ca(ca);
        }
        o.tls = Some(tls);
        o.credentials = Some(("node".into(), password.into()));
        o
    };
    block_on(async {
        assert!(connects(opts(Some(&b.ca), "secret-pw")).await);
        assert!(
            !connects(opts(Some(&b.ca), "wrong")).await,
            "a wrong password was accepted"
        );
        assert!(
            !connects(opts(None, "secret-pw")).await,
            "a broker certificate from an unknown CA was accepted"
        );
        let mut plain = LinkOptions::new(NODE, "127.0.0.1", port);
        plain.keep_alive = Duration::from_secs(5);
        assert!(!connects(plain).await, "plaintext reached a TLS listener");
    })
}
