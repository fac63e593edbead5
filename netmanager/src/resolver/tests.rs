//! The resolver against a fake cluster and dataplane: bounds, budgets and
//! the negative caches.

use super::*;
use crate::cluster_link::LinkOptions;
use crate::forwarding::InMemory;
use std::net::Ipv4Addr;
use std::sync::Mutex;

/// Routes that know what a test tells them: running services and the
/// nodes of instance addresses.
#[derive(Default)]
struct NoRoutes {
    services: Mutex<Vec<IpAddr>>,
    nodes: Mutex<Vec<(IpAddr, IpAddr)>>,
}
impl RouteTables for NoRoutes {
    fn apply(&self, _: &TableResult) -> Result<()> {
        Ok(())
    }
    fn local_job(&self, _: IpAddr) -> Option<String> {
        None
    }
    fn knows_instance_ip(&self, _: IpAddr) -> bool {
        false
    }
    fn knows_service(&self, addr: IpAddr) -> bool {
        self.services.lock().unwrap().contains(&addr)
    }
    fn holders(&self) -> Vec<String> {
        Vec::new()
    }
    fn instance_node(&self, ip: IpAddr) -> Option<IpAddr> {
        self.nodes
            .lock()
            .unwrap()
            .iter()
            .find(|(a, _)| *a == ip)
            .map(|(_, n)| *n)
    }
}

/// A resolver with routes that know nothing, whose link has no broker
/// behind it: its queries only queue (and time out as `o` says).
fn offline(o: LinkOptions) -> (Resolver, mpsc::Receiver<crate::cluster_link::LinkEvent>) {
    let (link, events) = ClusterLink::connect(o).unwrap();
    let r = Resolver::new(
        link,
        Arc::new(NoRoutes::default()),
        Arc::new(InMemory::default()),
    );
    (r, events)
}

/// A service miss from one of 64 containers.
fn miss(n: u32) -> Miss {
    miss_from(n, 7 + n % 64)
}

/// A service miss from the container behind interface `ifindex`.
fn miss_from(n: u32, ifindex: u32) -> Miss {
    Miss {
        reason: MissReason::Service,
        addr: IpAddr::V6(std::net::Ipv6Addr::from(
            0xfdff_0000_0000_0000_0000_0000_0000_0000u128 + u128::from(n),
        )),
        peer: None,
        ifindex,
        frame: Some(vec![0; 64]),
    }
}

fn tunnel_miss(n: u32, sender: u8) -> Miss {
    Miss {
        reason: MissReason::Peer,
        peer: Some(IpAddr::V4(Ipv4Addr::new(198, 51, 100, sender))),
        ..miss(n)
    }
}

#[tokio::test]
async fn a_miss_flood_is_bounded() {
    // hold() is what is under test.
    let (r, _events) = offline(LinkOptions::new("n", "127.0.0.1", 9));
    let started = (0..1000).filter(|&n| r.hold(miss(n))).count();
    assert_eq!(started, QUERY_BURST as usize);
    // Another frame for an address in flight joins it instead.
    assert!(!r.hold(miss(0)));
    assert_eq!(
        r.pending().frames[&(MissReason::Service, miss(0).addr)].len(),
        2
    );
    let s = r.stats();
    assert_eq!(s.refused_rate as usize, 1000 - started);
    assert!(r.pending().frames.len() <= MAX_LOOKUPS);
}

#[tokio::test]
async fn one_container_uses_up_only_its_own_share() {
    let (r, _events) = offline(LinkOptions::new("n", "127.0.0.1", 9));
    let flooder = |range: std::ops::Range<u32>| range.filter(|&n| r.hold(miss_from(n, 3))).count();
    assert_eq!(flooder(0..1000), CONTAINER_QUERY_BURST as usize);
    // Its neighbours still get the rest of the common budget.
    let others = (1000..1200)
        .filter(|&n| r.hold(miss_from(n, 4 + n % 8)))
        .count();
    assert_eq!(others, (QUERY_BURST - CONTAINER_QUERY_BURST) as usize);
    // Refilled (2 s give it its whole burst back), the flooder is held
    // to MAX_LOOKUPS_PER_CONTAINER lookups in flight.
    std::thread::sleep(Duration::from_secs(2));
    let again = flooder(2000..3000);
    assert_eq!(
        CONTAINER_QUERY_BURST as usize + again,
        MAX_LOOKUPS_PER_CONTAINER
    );
    assert_eq!(
        r.pending().per_origin[&Origin::Interface(3)],
        MAX_LOOKUPS_PER_CONTAINER
    );
}

#[tokio::test]
async fn tunnel_misses_are_bounded_per_sender_and_have_their_own_budget() {
    let (r, _events) = offline(LinkOptions::new("n", "127.0.0.1", 9));
    // One host: at most MAX_LOOKUPS_PER_PEER lookups at a time.
    let one_host = (0..100).filter(|&n| r.hold(tunnel_miss(n, 3))).count();
    assert_eq!(one_host, MAX_LOOKUPS_PER_PEER);
    // Many hosts: the tunnel budget runs out ...
    let many = (100..1000)
        .filter(|&n| r.hold(tunnel_miss(n, (n % 200) as u8 + 10)))
        .count();
    assert_eq!(one_host + many, PEER_QUERY_BURST as usize);
    // ... and the containers' budget is untouched. The same address
    // missing as a service and as a tunnel source is two lookups.
    assert!(r.hold(miss(0)));
    let containers = (2000..2100).filter(|&n| r.hold(miss(n))).count();
    assert_eq!(containers + 1, QUERY_BURST as usize);
    assert!(
        r.pending()
            .frames
            .contains_key(&(MissReason::Peer, miss(0).addr))
    );
}

#[tokio::test]
async fn a_refused_tunnel_sender_is_not_asked_about_again_at_once() {
    let (link, _events) = ClusterLink::connect(LinkOptions::new("n", "127.0.0.1", 9)).unwrap();
    let routes = Arc::new(NoRoutes::default());
    let r = Resolver::new(link, routes.clone(), Arc::new(InMemory::default()));
    let spoofed = tunnel_miss(1, 66);
    assert!(r.hold(spoofed.clone()));
    // The cluster names another node (198.51.100.2) as the one running
    // the address: the held datagram is refused ...
    let frames = r.pending().frames.remove(&(MissReason::Peer, spoofed.addr));
    r.reinject(
        &MissReason::Peer,
        spoofed.addr,
        Some(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 2))),
        frames.unwrap_or_default(),
    );
    assert_eq!(r.stats().refused_wrong_node, 1);
    // ... and the same host repeating it costs no question ...
    assert!(!r.hold(spoofed.clone()));
    assert_eq!(r.stats().refused_recent_failure, 1);
    // ... while the real node sending it is still asked about.
    assert!(r.hold(tunnel_miss(1, 2)));
    // A table result placing the address on that host (it moved there)
    // drops the refusal: the host is asked about again.
    r.pending().frames.clear();
    r.clear_answered();
    assert!(!r.hold(spoofed.clone()));
    routes
        .nodes
        .lock()
        .unwrap()
        .push((spoofed.addr, IpAddr::V4(Ipv4Addr::new(198, 51, 100, 66))));
    r.clear_answered();
    assert_eq!(r.stats().negative_cleared, 1);
    assert!(r.hold(spoofed));
}

#[tokio::test]
async fn a_dialing_clients_frames_go_through_once_a_table_answers_its_failure() {
    let (link, _events) = ClusterLink::connect(LinkOptions::new("n", "127.0.0.1", 9)).unwrap();
    let routes = Arc::new(NoRoutes::default());
    let fwd = Arc::new(InMemory::default());
    let r = Resolver::new(link, routes.clone(), fwd.clone());
    let syn = miss(1);
    let key = (MissReason::Service, syn.addr);
    // The lookup fails (no instance yet) with the first SYN held ...
    assert!(r.hold(syn.clone()));
    let held = r.pending().frames.remove(&key).unwrap_or_default();
    r.pending().failed.insert(
        key.clone(),
        Failure {
            at: Instant::now(),
            parked: held,
        },
    );
    // ... the client keeps dialing: refused without a question, parked,
    // the newest few only.
    for _ in 0..10 {
        assert!(!r.hold(syn.clone()));
    }
    assert_eq!(r.stats().refused_recent_failure, 10);
    assert_eq!(
        r.pending().failed[&key].parked.len(),
        MAX_PARKED_PER_ADDRESS
    );
    // A result that does not answer it changes nothing ...
    r.clear_answered();
    assert!(r.pending().failed.contains_key(&key));
    assert_eq!(fwd.snapshot().reinjected, 0);
    // ... one that writes the service (the instance is up) drops the
    // negative entry and sends the parked frames through.
    routes.services.lock().unwrap().push(syn.addr);
    r.clear_answered();
    assert!(!r.pending().failed.contains_key(&key));
    assert_eq!(fwd.snapshot().reinjected, MAX_PARKED_PER_ADDRESS);
    let s = r.stats();
    assert_eq!(
        (s.negative_cleared, s.parked_reinjected),
        (1, MAX_PARKED_PER_ADDRESS as u64)
    );
}

#[tokio::test]
async fn parked_frames_are_bounded_over_all_addresses() {
    let (r, _events) = offline(LinkOptions::new("n", "127.0.0.1", 9));
    let mut p = r.pending();
    for n in 0..1000 {
        let m = miss(n);
        let key = (MissReason::Service, m.addr);
        p.failed.insert(
            key.clone(),
            Failure {
                at: Instant::now(),
                parked: Vec::new(),
            },
        );
        p.park(
            &key,
            HeldFrame {
                sender: None,
                bytes: vec![0; 64],
            },
        );
    }
    let total: usize = p.failed.values().map(|f| f.parked.len()).sum();
    assert_eq!(total, MAX_PARKED_FRAMES);
}

#[tokio::test]
async fn a_flood_of_updates_runs_one_refresh_per_job() {
    // No broker: every query goes unanswered, and without an interest a
    // failed refresh is not retried -- what is left is the rounds.
    let mut o = LinkOptions::new("n", "127.0.0.1", 9);
    o.query_timeout = Duration::from_millis(200);
    let (r, _events) = offline(o);
    let r = Arc::new(r);
    for _ in 0..1000 {
        r.refresh_later("a.b.c.d".into(), "after an update");
    }
    r.refresh_later("e.f.g.h".into(), "after an update");
    assert_eq!(
        r.refreshes_running(),
        2,
        "one refresh per job, not per update"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while r.refreshes_running() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "refreshes never ended"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // a.b.c.d: its round and one more for the updates that came during
    // it; e.f.g.h: one round.
    assert_eq!(r.link.stats().queries_sent, 3);
}
