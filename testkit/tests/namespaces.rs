//! The kit's namespace and link guards: what they create works, and what
//! they created is gone when they go -- also when a test panics.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use testkit::netlink::Route;
use testkit::{ContainerProcess, Netns, NsPath, Underlay, wait_until};

testkit::main! {
    a_namespace_goes_with_everything_in_it: [Root],
    guards_undo_their_change_also_on_panic: [Root],
    nodes_on_the_underlay_reach_each_other: [Root],
}

fn gone(path: &Path) -> bool {
    !path.exists()
}

fn a_namespace_goes_with_everything_in_it() {
    let ns = Netns::new("kit").unwrap();
    let path = ns.path().to_path_buf();
    assert!(ns.link("lo").unwrap().is_some_and(|l| l.up), "lo is up");
    let mut sleeper = ns.spawn(&["sleep", "1000"]).unwrap();
    assert_eq!(ns.pids(), vec![sleeper.pid() as i32]);
    drop(ns);
    assert!(gone(&path));
    wait_until("the process inside to die", Duration::from_secs(5), || {
        !sleeper.alive()
    });

    // A panicking test leaves nothing either.
    let kept = std::panic::catch_unwind(|| {
        let ns = Netns::new("kit").unwrap();
        let p = ns.path().to_path_buf();
        std::panic::panic_any(p);
    });
    let p = kept.unwrap_err().downcast::<std::path::PathBuf>().unwrap();
    assert!(gone(&p), "{} survived a panic", p.display());

    // A container process has a namespace of its own that goes with it.
    let c = ContainerProcess::start().unwrap();
    let own = std::fs::read_link(c.ns().path()).unwrap();
    assert_ne!(own, std::fs::read_link("/proc/self/ns/net").unwrap());
}

fn guards_undo_their_change_also_on_panic() {
    let (a, b) = (Netns::new("kita").unwrap(), Netns::new("kitb").unwrap());
    {
        let _veth = a.add_veth("va", "eth0", Some(&b)).unwrap();
        assert!(a.link("va").unwrap().is_some());
        assert!(b.link("eth0").unwrap().is_some(), "the peer lives in b");
        a.set_up("va").unwrap();
        let _addr = a.add_address("va", "198.51.100.9/24").unwrap();
        let _route = a
            .add_route(&Route::to("203.0.113.0/24").unwrap().dev("va"))
            .unwrap();
        let cidrs: Vec<String> = a
            .addresses("va")
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(cidrs, vec!["198.51.100.9/24".to_string()]);
    }
    assert!(
        a.link("va").unwrap().is_none(),
        "the veth went with its guard"
    );
    assert!(b.link("eth0").unwrap().is_none(), "and its peer");

    a.add_bridge("br0").unwrap().keep();
    a.set_up("br0").unwrap();
    let bridge: &NsPath = &a;
    let r = std::panic::catch_unwind(|| {
        let _addr = bridge.add_address("br0", "192.0.2.1/24").unwrap();
        let _route = bridge
            .add_route(
                &Route::to("203.0.113.0/24")
                    .unwrap()
                    .via("192.0.2.2".parse().unwrap()),
            )
            .unwrap();
        panic!("mid-test");
    });
    assert!(r.is_err());
    let left = a.addresses("br0").unwrap();
    assert!(
        left.iter().all(|c| c.addr.is_ipv6()),
        "address left after a panic: {left:?}"
    );
    assert_eq!(a.default_gateway(false).unwrap(), None);
    let key = "net/ipv4/ip_forward";
    let before = b.read_sysctl(key).unwrap();
    let flipped = if before == "1" { "0" } else { "1" };
    a.sysctl(key, flipped).unwrap();
    assert_eq!(a.read_sysctl(key).unwrap(), flipped);
    assert_eq!(
        b.read_sysctl(key).unwrap(),
        before,
        "sysctls are per namespace"
    );
}

fn nodes_on_the_underlay_reach_each_other() {
    let under = Underlay::new().unwrap();
    let (n1, n2) = (under.node(1).unwrap(), under.node(2).unwrap());
    assert_eq!(
        n1.ns.default_gateway(false).unwrap(),
        Some("198.51.100.254".parse().unwrap())
    );
    assert_eq!(
        under.ns.master_of(&n1.peer).unwrap().as_deref(),
        Some("br0")
    );
    let listener = n2
        .ns
        .within(|| TcpListener::bind("198.51.100.2:7000"))
        .unwrap()
        .unwrap();
    let to = SocketAddr::from(([198, 51, 100, 2], 7000));
    let connected = n1
        .ns
        .within(|| TcpStream::connect_timeout(&to, Duration::from_secs(5)))
        .unwrap();
    assert!(connected.is_ok(), "{connected:?}");
    let (_, from) = listener.accept().unwrap();
    assert_eq!(from.ip().to_string(), "198.51.100.1");
    // Nothing was added to this (the root) namespace.
    let root = NsPath::of_pid(std::process::id());
    for link in root.links().unwrap() {
        for c in root.addresses(&link.name).unwrap_or_default() {
            assert!(
                !c.addr.to_string().starts_with("198.51.100."),
                "{c} on {} in the root namespace",
                link.name
            );
        }
    }
}
