//! Both attach modes -- TCX links and classic tc filters over netlink --
//! under a stream of tunnel datagrams: a restart replaces the programs
//! without losing one datagram and leaves exactly one program per hook,
//! switching modes across a restart leaves only the new mode's attachment,
//! and the uplink program follows the uplink to another interface.
//!
//! "Restart" here is what a new NetManager process does: open the
//! dataplane again on the same pins after the previous one went away
//! without detaching anything (the kill -9 tests in `overlay*.rs` do it with
//! real processes). No python or broker needed, so `cargo xtask test --full`
//! runs this on Debian 12's 6.1 too, where only the netlink mode exists.

mod common;
mod packet_support;

use std::collections::BTreeSet;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Netns, in_netns, require_root};
use netmanager::dataplane::{
    AttachMode, Dataplane, DataplaneConfig, InstanceEntry, LocalPort, MapSizes, UPLINK_PROGRAM,
};
use netmanager::kernel_support;
use packet_support::*;

const NODE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const NODE_CIDR: &str = "198.51.100.1/24";
const PEER_NODE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const CONTAINER_MAC: [u8; 6] = [0x02, 0, 0x0a, 0x12, 0, 0x02];
const PORT: u16 = 6100;
/// Datagrams between two restarts.
const BURST: u32 = 300;

/// The modes this kernel offers.
fn modes() -> Vec<AttachMode> {
    let mut m = vec![AttachMode::Netlink];
    if kernel_support::probe().tcx {
        m.push(AttachMode::Tcx);
    } else {
        eprintln!("no TCX on this kernel: netlink mode only");
    }
    m
}

/// A node namespace with two uplinks, `up0` (wire `up1`, the node address)
/// and `up2` (wire `up3`, no address), and a container behind veth `c0`;
/// its pins; removed on drop.
struct Lab {
    pin_dir: PathBuf,
    ctr: Netns,
    node: Netns,
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

impl Lab {
    fn new() -> Lab {
        let node = Netns::new();
        let ctr = Netns::new();
        let n = |args: &[&str]| {
            node.ip(args)
                .unwrap_or_else(|| panic!("ip {args:?} in node"))
        };
        for (dev, wire, mac) in [
            ("up0", "up1", "02:00:c6:33:64:01"),
            ("up2", "up3", "02:00:c6:33:64:11"),
        ] {
            n(&["link", "add", dev, "type", "veth", "peer", "name", wire]);
            n(&["link", "set", dev, "address", mac]);
            n(&["link", "set", dev, "up"]);
            n(&["link", "set", wire, "up"]);
        }
        // Tunnel datagrams are taken when addressed to one of the node's
        // addresses (NODE_ADDRESSES, which the address watch fills).
        n(&["addr", "add", NODE_CIDR, "dev", "up0"]);
        n(&[
            "link", "add", "c0", "type", "veth", "peer", "name", "c1", "netns", &ctr.name,
        ]);
        n(&["link", "set", "c0", "up"]);
        let c = |args: &[&str]| {
            ctr.ip(args)
                .unwrap_or_else(|| panic!("ip {args:?} in container"))
        };
        c(&["link", "set", "c1", "address", "02:00:0a:12:00:02"]);
        c(&["addr", "add", "10.18.0.2/26", "dev", "c1"]);
        c(&["link", "set", "c1", "up"]);
        c(&["route", "add", "default", "dev", "c1"]);
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}", common::unique("oak-attach")));
        Lab { pin_dir, ctr, node }
    }

    /// What a starting NetManager does: load, adopt the pins, attach.
    fn open(&self, uplink: &str, mode: AttachMode) -> Dataplane {
        let cfg = DataplaneConfig {
            pin_dir: self.pin_dir.clone(),
            uplink: uplink.to_string(),
            node_ip: IpAddr::V4(NODE),
            tunnel_port: 50103,
            tunnel_mtu: 1450,
            service_ranges: vec![("10.30.0.0".parse().unwrap(), 16)],
            sizes: MapSizes {
                flows: 1024,
                services: 256,
                backends: 1024,
                instances: 256,
                pending: 64,
            },
            miss_hold: 2,
            container_bridge: String::new(),
            attach_mode: mode,
            trusted_peers: Vec::new(),
            flows_per_container: 0,
        };
        in_netns(&self.node, || {
            let dp = Dataplane::open(&cfg).expect("opening the dataplane");
            dp.upsert_instance(
                "10.18.0.2".parse().unwrap(),
                InstanceEntry {
                    instance_ip: Some("10.30.0.3".parse().unwrap()),
                    node_ip: IpAddr::V4(NODE),
                    node_port: 50103,
                    local: Some(LocalPort {
                        ifindex: ifindex("c0"),
                        mac: CONTAINER_MAC,
                    }),
                },
            )
            .expect("writing the container's entry");
            // The sender of the stream's datagrams, on the peer node: only
            // that node's datagrams are accepted for it.
            dp.upsert_instance(
                "10.18.0.130".parse().unwrap(),
                InstanceEntry {
                    instance_ip: Some("10.30.0.5".parse().unwrap()),
                    node_ip: IpAddr::V4(PEER_NODE),
                    node_port: 50103,
                    local: None,
                },
            )
            .expect("writing the sender's entry");
            dp
        })
    }

    /// The node address leaves `from` for `to`.
    fn move_address(&self, from: &str, to: &str) {
        for (op, dev) in [("del", from), ("add", to)] {
            self.node
                .ip(&["addr", op, NODE_CIDR, "dev", dev])
                .unwrap_or_else(|| panic!("ip addr {op} {NODE_CIDR} dev {dev}"));
        }
    }

    fn attached(&self, ifname: &str) -> Vec<(String, String, u32)> {
        common::ingress_programs(&self.node, ifname)
    }

    /// Exactly one program on `ifname`'s ingress: `uplink_ingress`,
    /// attached in `mode`; its id.
    fn assert_one_uplink_program(&self, ifname: &str, mode: AttachMode) -> u32 {
        let hook = common::hook_of(mode.as_str());
        let got = self.attached(ifname);
        assert_eq!(got.len(), 1, "programs on {ifname}: {got:?}");
        assert_eq!(
            (got[0].0.as_str(), got[0].1.as_str()),
            (hook, UPLINK_PROGRAM)
        );
        got[0].2
    }
}

fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: a valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(i, 0, "no interface {name}");
    i
}

/// A raw socket writing frames onto one wire (in the calling thread's namespace).
struct Wire {
    sock: OwnedFd,
    ifindex: i32,
}

impl Wire {
    fn open(ifname: &str) -> Wire {
        // SAFETY: plain socket call; the descriptor is owned right away.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
        Wire {
            // SAFETY: the kernel just gave us this descriptor.
            sock: unsafe { OwnedFd::from_raw_fd(fd) },
            ifindex: ifindex(ifname) as i32,
        }
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: zeroed is a valid sockaddr_ll; we fill what sendto needs.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = self.ifindex;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: buffer and address are valid for the sizes given.
        let n = unsafe {
            libc::sendto(
                self.sock.as_raw_fd(),
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
                &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            n,
            frame.len() as isize,
            "sendto: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Numbered tunnel datagrams from the peer node, into the node through the
/// uplink's wire, to a socket in the container; what arrived is recorded.
struct Stream {
    stop: Arc<AtomicBool>,
    sent: Arc<Mutex<u32>>,
    received: Arc<Mutex<BTreeSet<u32>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Stream {
    fn start(lab: &Lab, uplink: &str) -> Stream {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(Mutex::new(0u32));
        let received = Arc::new(Mutex::new(BTreeSet::new()));
        let uplink = uplink.to_string();
        let sock = in_netns(&lab.ctr, || {
            UdpSocket::bind(("0.0.0.0", PORT)).expect("binding in the container")
        });
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let rx = {
            let (stop, received) = (stop.clone(), received.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                loop {
                    match sock.recv(&mut buf) {
                        Ok(4) => {
                            let seq = u32::from_be_bytes(buf[..4].try_into().unwrap());
                            received.lock().unwrap().insert(seq);
                        }
                        Ok(_) => {}
                        // Quiet for a while after the sender stopped: done.
                        Err(_) if stop.load(Ordering::SeqCst) => return,
                        Err(_) => {}
                    }
                }
            })
        };
        let node_path = lab.node.path();
        let tx = {
            let (stop, sent) = (stop.clone(), sent.clone());
            std::thread::spawn(move || {
                let file = File::open(node_path).expect("node namespace");
                // SAFETY: a valid namespace descriptor; this thread only.
                assert_eq!(
                    unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
                    0
                );
                let mut seq = 0u32;
                let (wire, mac) = if uplink == "up0" {
                    ("up1", [0x02, 0, 0xc6, 0x33, 0x64, 0x01])
                } else {
                    ("up3", [0x02, 0, 0xc6, 0x33, 0x64, 0x11])
                };
                let wire = Wire::open(wire);
                while !stop.load(Ordering::SeqCst) {
                    let inner = Ip::new(
                        "10.30.0.5",
                        "10.18.0.2",
                        L4::Udp {
                            sport: 7000,
                            dport: PORT,
                            payload: seq.to_be_bytes().to_vec(),
                        },
                    );
                    let frame = eth(
                        mac,
                        [0x02, 0, 0xc6, 0x33, 0x64, 0x02],
                        0x0800,
                        &tunnel_datagram(PEER_NODE, NODE, 50103, 50103, &inner.bytes()),
                    );
                    wire.send(&frame);
                    seq += 1;
                    *sent.lock().unwrap() = seq;
                    std::thread::sleep(Duration::from_micros(500));
                }
            })
        };
        Stream {
            stop,
            sent,
            received,
            threads: vec![tx, rx],
        }
    }

    fn sent(&self) -> u32 {
        *self.sent.lock().unwrap()
    }

    /// Lets `n` more datagrams go out.
    fn wait_for(&self, n: u32) {
        let target = self.sent() + n;
        common::wait_until("datagrams to be sent", Duration::from_secs(60), || {
            self.sent() >= target
        });
    }

    /// Stops, and asserts every datagram sent arrived.
    fn finish(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            t.join().expect("stream thread");
        }
        let sent = self.sent();
        let received = self.received.lock().unwrap();
        let missing: Vec<u32> = (0..sent).filter(|s| !received.contains(s)).collect();
        assert!(sent > 0);
        assert!(
            missing.is_empty(),
            "{} of {sent} datagrams lost, first {:?}",
            missing.len(),
            &missing[..missing.len().min(10)]
        );
    }
}

/// Restarting in the same mode replaces the program in place, datagram
/// for datagram, and never adds a second one.
#[test]
fn restarts_replace_the_programs_without_losing_a_datagram() {
    if !require_root("restarts_replace_the_programs_without_losing_a_datagram") {
        return;
    }
    for mode in modes() {
        let lab = Lab::new();
        let mut dp = lab.open("up0", mode);
        let mut id = lab.assert_one_uplink_program("up0", mode);
        let stream = Stream::start(&lab, "up0");
        stream.wait_for(BURST);
        for _ in 0..3 {
            // The previous process goes away without detaching anything ...
            drop(dp);
            stream.wait_for(BURST / 3);
            // ... and the next one takes over.
            dp = lab.open("up0", mode);
            let new_id = lab.assert_one_uplink_program("up0", mode);
            assert_ne!(new_id, id, "{mode}: the program was not replaced");
            id = new_id;
            stream.wait_for(BURST);
        }
        stream.finish();
        let status = dp.status().unwrap();
        assert_eq!(status.attach_mode, mode.to_string());
        assert!(
            status
                .attachments
                .iter()
                .any(|(p, i, _)| p == UPLINK_PROGRAM && i == "up0"),
            "{status:?}"
        );
    }
}

/// A restart in the other mode takes over from the previous mode's
/// attachment and removes it: one program, no lost datagram.
#[test]
fn switching_modes_across_a_restart_leaves_one_program() {
    if !require_root("switching_modes_across_a_restart_leaves_one_program") {
        return;
    }
    if !kernel_support::probe().tcx {
        eprintln!(
            "SKIP switching_modes_across_a_restart_leaves_one_program: no TCX on this kernel"
        );
        return;
    }
    let lab = Lab::new();
    let mut dp = lab.open("up0", AttachMode::Tcx);
    lab.assert_one_uplink_program("up0", AttachMode::Tcx);
    let stream = Stream::start(&lab, "up0");
    stream.wait_for(BURST);
    for mode in [AttachMode::Netlink, AttachMode::Tcx, AttachMode::Netlink] {
        drop(dp);
        dp = lab.open("up0", mode);
        lab.assert_one_uplink_program("up0", mode);
        stream.wait_for(BURST);
    }
    stream.finish();
    drop(dp);
}

/// The uplink moves while running (`set_uplink`) and while NetManager is
/// down (the next start sweeps the old interface). The node's address
/// moves with it, as it does when Wi-Fi gives way to LTE: the program is on
/// the new uplink only, and datagrams arriving there are delivered. (A
/// stream across the move, with the route events that drive it, is in
/// `overlay_lifecycle.rs`.)
#[test]
fn the_uplink_program_follows_the_uplink() {
    if !require_root("the_uplink_program_follows_the_uplink") {
        return;
    }
    for mode in modes() {
        let lab = Lab::new();
        let dp = lab.open("up0", mode);
        let stream = Stream::start(&lab, "up0");
        stream.wait_for(BURST);
        stream.finish();
        lab.move_address("up0", "up2");
        in_netns(&lab.node, || dp.set_uplink("up2", IpAddr::V4(NODE))).expect("moving the uplink");
        // The address watch and the move may come in either order; both
        // leave the program where the address and the uplink are.
        common::wait_until("the program to leave up0", Duration::from_secs(10), || {
            lab.attached("up0").is_empty()
        });
        lab.assert_one_uplink_program("up2", mode);
        let stream = Stream::start(&lab, "up2");
        stream.wait_for(BURST);
        stream.finish();
        assert!(
            dp.status()
                .unwrap()
                .attachments
                .iter()
                .all(|(p, i, _)| p != UPLINK_PROGRAM || i == "up2")
        );

        // Down, the uplink moves back; the next start cleans up after it.
        drop(dp);
        lab.move_address("up2", "up0");
        let dp = lab.open("up0", mode);
        lab.assert_one_uplink_program("up0", mode);
        assert!(lab.attached("up2").is_empty(), "{:?}", lab.attached("up2"));
        drop(dp);
    }
}

/// The default route moves to `up2` while `up0` keeps its address (both
/// links up, another one preferred): `up0` still receives -- peers may
/// send to that address -- and each interface has exactly one program.
#[test]
fn an_old_uplink_with_an_address_keeps_receiving() {
    if !require_root("an_old_uplink_with_an_address_keeps_receiving") {
        return;
    }
    for mode in modes() {
        let lab = Lab::new();
        lab.node
            .ip(&["addr", "add", "198.51.100.11/24", "dev", "up2"])
            .unwrap();
        let dp = lab.open("up0", mode);
        let second = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 11));
        in_netns(&lab.node, || dp.set_uplink("up2", second)).expect("moving the uplink");
        lab.assert_one_uplink_program("up0", mode);
        lab.assert_one_uplink_program("up2", mode);
        let stream = Stream::start(&lab, "up0");
        stream.wait_for(BURST);
        stream.finish();
        drop(dp);
    }
}

/// What was attached to an interface that went away while NetManager was
/// down leaves no pin behind (links and filters go with the interface).
#[test]
fn pins_of_vanished_interfaces_are_dropped() {
    if !require_root("pins_of_vanished_interfaces_are_dropped") {
        return;
    }
    for mode in modes() {
        let lab = Lab::new();
        lab.node
            .ip(&["link", "add", "cx0", "type", "veth", "peer", "name", "cx1"])
            .unwrap();
        let dp = lab.open("up0", mode);
        in_netns(&lab.node, || dp.attach_container("cx0")).unwrap();
        let dir = if mode == AttachMode::Netlink {
            "tc"
        } else {
            "links"
        };
        let pin = lab.pin_dir.join(dir).join("container_egress@cx0");
        assert!(pin.exists(), "{}", pin.display());
        drop(dp);
        lab.node.ip(&["link", "del", "cx0"]).unwrap();
        let dp = lab.open("up0", mode);
        assert!(!pin.exists(), "{} left behind", pin.display());
        lab.assert_one_uplink_program("up0", mode);
        drop(dp);
    }
}
