//! The guest network in upstream's current NetManager layout, on a real
//! namespace: `tap0` a macvtap on the uplink, which the guest takes over.
//! (This repository's NetManager makes the bridge layout, which the
//! unikernel end-to-end test boots a guest on.)

use std::net::Ipv4Addr;

use nodeengine::unikernel::guest_net::{self, Backend, Namespace};
use testkit::netlink::{MacVtapMode, Route};
use testkit::{Cidr, Netns};

testkit::main! {
    macvtap_guest_takes_over_the_instance_address: [Root],
}

fn macvtap_guest_takes_over_the_instance_address() {
    let ns = Netns::new("ukmvt").expect("namespace");
    let n = ns.name();
    ns.add_veth("v0", "v1", None).expect("veth").keep();
    ns.add_address("v0", "10.77.0.2/26").expect("addr").keep();
    ns.set_up("v0").expect("up");
    ns.set_up("v1").expect("up");
    ns.add_route(&Route::default_via(Ipv4Addr::new(10, 77, 0, 1).into()))
        .expect("default route")
        .keep();
    ns.add_macvtap("tap0", "v0", MacVtapMode::Bridge)
        .expect("macvtap")
        .keep();
    ns.set_up("tap0").expect("up");
    let tap_mac = ns
        .link("tap0")
        .expect("links")
        .and_then(|l| l.mac)
        .expect("tap0's MAC");
    let tap_mac = tap_mac.map(|b| format!("{b:02x}")).join(":");

    testkit::block_on(async {
        let namespace = Namespace::read(n).await.expect("read the namespace");
        let g = namespace.guest_net().expect("guest network");
        assert_eq!(g.address, Ipv4Addr::new(10, 77, 0, 2));
        assert_eq!(g.gateway, Ipv4Addr::new(10, 77, 0, 1));
        assert_eq!(g.mask(), Ipv4Addr::new(255, 255, 255, 192));
        assert_eq!(g.mac, tap_mac);
        let Backend::Macvtap { device } = &g.backend else {
            panic!("not a macvtap backend: {:?}", g.backend);
        };
        // qemu gets the macvtap's character device.
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(device)
            .unwrap_or_else(|e| panic!("opening {device}: {e}"));

        // The guest owns the address: it leaves the uplink.
        let (dev, a, p) = namespace.uplink().expect("uplink");
        guest_net::release_address(n, &dev, a, p)
            .await
            .expect("release the address");
    });
    let left = ns.addresses("v0").expect("addresses");
    let gone: Cidr = "10.77.0.2/26".parse().expect("cidr");
    assert!(!left.contains(&gone), "{left:?}");
}
