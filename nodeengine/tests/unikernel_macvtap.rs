//! The guest network in upstream's current NetManager layout, on a real
//! namespace: `tap0` a macvtap on the uplink, which the guest takes over.
//! (This repository's NetManager makes the bridge layout, which the
//! unikernel end-to-end test boots a guest on.)

use std::net::Ipv4Addr;
use std::process::Command;

use nodeengine::unikernel::guest_net::{self, Backend, Namespace};

fn sh(cmd: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("run sh");
    assert!(
        out.status.success(),
        "`{cmd}`: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[tokio::test]
async fn macvtap_guest_takes_over_the_instance_address() {
    if !worker_common::privileges::is_root() {
        eprintln!("SKIPPED macvtap_guest_takes_over_the_instance_address: needs root");
        return;
    }
    let ns = Netns(format!("ukmvt{}", std::process::id()));
    let n = &ns.0;
    sh(&format!(
        "ip netns add {n} && ip -n {n} link add v0 type veth peer name v1 && \
         ip -n {n} addr add 10.77.0.2/26 dev v0 && ip -n {n} link set v0 up && \
         ip -n {n} link set v1 up && ip -n {n} route add default via 10.77.0.1 && \
         ip -n {n} link add link v0 name tap0 type macvtap mode bridge && \
         ip -n {n} link set tap0 up"
    ));
    let tap_mac = sh(&format!(
        "ip netns exec {n} cat /sys/class/net/tap0/address"
    ));

    let namespace = Namespace::read(n).await.expect("read the namespace");
    let g = namespace.guest_net().expect("guest network");
    assert_eq!(g.address, Ipv4Addr::new(10, 77, 0, 2));
    assert_eq!(g.gateway, Ipv4Addr::new(10, 77, 0, 1));
    assert_eq!(g.mask(), Ipv4Addr::new(255, 255, 255, 192));
    assert_eq!(g.mac, tap_mac.trim());
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
    let left = sh(&format!("ip -n {n} -4 addr show dev v0"));
    assert!(!left.contains("10.77.0.2"), "{left}");
}
