//! Both attach modes -- TCX links and classic tc filters over netlink --
//! under a stream of tunnel datagrams: a restart replaces the programs
//! without losing one datagram and leaves exactly one program per hook,
//! switching modes across a restart leaves only the new mode's attachment,
//! switching the uplink hook (TC, XDP native or generic) across restarts
//! leaves the XDP program as the hook says, and the uplink program follows
//! the uplink to another interface.
//!
//! "Restart" here is what a new NetManager process does: open the
//! dataplane again on the same pins after the previous one went away
//! without detaching anything (the kill -9 tests in `overlay*.rs` do it with
//! real processes). No python or broker needed, so `cargo xtask test --full`
//! runs this on Debian 12's 6.1 too, where only the netlink mode exists.

mod attach_support;
mod packet_support;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use netmanager::dataplane::{
    AttachMode, Dataplane, DataplaneConfig, InstanceEntry, LocalPort, MapSizes, UPLINK_PROGRAM,
    UplinkHook, XdpMode,
};
use packet_support::*;
use testkit::netlink::{LinkSettings, Route};
use testkit::{Netns, PinDir, wait_until};

// Each test once per attach mode; TCX needs Linux 6.6, the netlink mode
// runs everywhere (also on Debian 12's 6.1 under `cargo xtask test --full`).
testkit::main! {
    restarts_replace_the_programs_without_losing_a_datagram(AttachMode::Tcx)
        as tcx_restarts_replace_the_programs_without_losing_a_datagram: [Root, Bpffs, Bpftool, Tcx],
    restarts_replace_the_programs_without_losing_a_datagram(AttachMode::Netlink)
        as netlink_restarts_replace_the_programs_without_losing_a_datagram: [Root, Bpffs, Bpftool],
    switching_modes_across_a_restart_leaves_one_program: [Root, Bpffs, Bpftool, Tcx],
    switching_the_uplink_hook_across_restarts_loses_no_datagram: [Root, Bpffs, Bpftool, Tcx],
    the_uplink_program_follows_the_uplink(AttachMode::Tcx)
        as tcx_the_uplink_program_follows_the_uplink: [Root, Bpffs, Bpftool, Tcx],
    the_uplink_program_follows_the_uplink(AttachMode::Netlink)
        as netlink_the_uplink_program_follows_the_uplink: [Root, Bpffs, Bpftool],
    an_old_uplink_with_an_address_keeps_receiving(AttachMode::Tcx)
        as tcx_an_old_uplink_with_an_address_keeps_receiving: [Root, Bpffs, Bpftool, Tcx],
    an_old_uplink_with_an_address_keeps_receiving(AttachMode::Netlink)
        as netlink_an_old_uplink_with_an_address_keeps_receiving: [Root, Bpffs, Bpftool],
    pins_of_vanished_interfaces_are_dropped(AttachMode::Tcx)
        as tcx_pins_of_vanished_interfaces_are_dropped: [Root, Bpffs, Bpftool, Tcx],
    pins_of_vanished_interfaces_are_dropped(AttachMode::Netlink)
        as netlink_pins_of_vanished_interfaces_are_dropped: [Root, Bpffs, Bpftool],
}

const NODE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const NODE_CIDR: &str = "198.51.100.1/24";
const PEER_NODE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const CONTAINER_MAC: [u8; 6] = [0x02, 0, 0x0a, 0x12, 0, 0x02];
const PORT: u16 = 6100;
/// Datagrams between two restarts.
const BURST: u32 = 300;

/// A node namespace with two uplinks, `up0` (wire `up1`, the node address)
/// and `up2` (wire `up3`, no address), and a container behind veth `c0`;
/// its pins; removed on drop.
struct Lab {
    pin_dir: PinDir,
    ctr: Netns,
    node: Netns,
}

impl Lab {
    fn new() -> Lab {
        let node = Netns::new("attach").expect("node namespace");
        let ctr = Netns::new("attachc").expect("container namespace");
        for (dev, wire, mac) in [
            ("up0", "up1", [0x02, 0, 0xc6, 0x33, 0x64, 0x01]),
            ("up2", "up3", [0x02, 0, 0xc6, 0x33, 0x64, 0x11]),
        ] {
            node.add_veth(dev, wire, None).expect("veth").keep();
            node.set_link(
                dev,
                &LinkSettings {
                    up: true,
                    mac: Some(mac),
                    ..Default::default()
                },
            )
            .expect("uplink up");
            node.set_up(wire).expect("wire up");
        }
        // Tunnel datagrams are taken when addressed to one of the node's
        // addresses (NODE_ADDRESSES, which the address watch fills).
        node.add_address("up0", NODE_CIDR).expect("address").keep();
        node.add_veth("c0", "c1", Some(&ctr)).expect("veth").keep();
        node.set_up("c0").expect("up");
        ctr.set_link(
            "c1",
            &LinkSettings {
                up: true,
                mac: Some(CONTAINER_MAC),
                ..Default::default()
            },
        )
        .expect("c1 up");
        ctr.add_address("c1", "10.18.0.2/26")
            .expect("address")
            .keep();
        ctr.add_route(&Route::default_dev("c1", false))
            .expect("default route")
            .keep();
        Lab {
            pin_dir: PinDir::new("attach"),
            ctr,
            node,
        }
    }

    /// What a starting NetManager does: load, adopt the pins, attach.
    fn open(&self, uplink: &str, mode: AttachMode) -> Dataplane {
        self.open_hooked(uplink, mode, UplinkHook::Tc, XdpMode::Auto)
    }

    /// [`Lab::open`] with an uplink hook.
    fn open_hooked(
        &self,
        uplink: &str,
        mode: AttachMode,
        uplink_hook: UplinkHook,
        xdp_mode: XdpMode,
    ) -> Dataplane {
        if uplink_hook.redirects() {
            // As NetManager does before its dataplane delivers in XDP.
            self.ctr
                .within(|| netmanager::ethtool::enable_gro("c1"))
                .expect("inside the container")
                .expect("GRO on c1");
        }
        let cfg = DataplaneConfig {
            pin_dir: self.pin_dir.to_path_buf(),
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
            uplink_hook,
            xdp_mode,
            trusted_peers: Vec::new(),
            flows_per_container: 0,
        };
        self.node
            .within(|| {
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
            .expect("inside the node")
    }

    /// The node address leaves `from` for `to`.
    fn move_address(&self, from: &str, to: &str) {
        self.node.del_address(from, NODE_CIDR).expect("address off");
        self.node
            .add_address(to, NODE_CIDR)
            .expect("address on")
            .keep();
    }

    fn attached(&self, ifname: &str) -> Vec<(String, String, u32)> {
        attach_support::ingress_programs(&self.node, ifname)
    }

    /// Exactly one program on `ifname`'s ingress: `uplink_ingress`,
    /// attached in `mode`; its id.
    fn assert_one_uplink_program(&self, ifname: &str, mode: AttachMode) -> u32 {
        let hook = attach_support::hook_of(mode.as_str());
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
        let sock = lab
            .ctr
            .within(|| UdpSocket::bind(("0.0.0.0", PORT)).expect("binding in the container"))
            .expect("inside the container");
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
        let tx = {
            let (stop, sent) = (stop.clone(), sent.clone());
            let node = (*lab.node).clone();
            std::thread::spawn(move || {
                node.enter_this_thread().expect("into the node namespace");
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
        wait_until("datagrams to be sent", Duration::from_secs(60), || {
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
fn restarts_replace_the_programs_without_losing_a_datagram(mode: AttachMode) {
    {
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
fn switching_modes_across_a_restart_leaves_one_program() {
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

/// Restarts that switch the uplink hook (TC alone, XDP native -- a veth
/// has it -- or generic, XDP delivering, and back) leave the XDP program exactly where and
/// as the hook says, replace it in place when the mode stays, and lose no
/// datagram of the stream: while one XDP link gives way to another, TC
/// alone screens and delivers.
fn switching_the_uplink_hook_across_restarts_loses_no_datagram() {
    let lab = Lab::new();
    let mut dp = lab.open("up0", AttachMode::Tcx);
    let stream = Stream::start(&lab, "up0");
    stream.wait_for(BURST);
    let mut last_id = None;
    for (hook, xdp_mode, expect) in [
        (UplinkHook::Xdp, XdpMode::Auto, Some("driver")),
        // Delivering in XDP: auto takes generic on a veth (and the stream
        // is delivered by XDP now, not TC).
        (UplinkHook::XdpRedirect, XdpMode::Auto, Some("generic")),
        (UplinkHook::Xdp, XdpMode::Native, Some("driver")),
        (UplinkHook::Xdp, XdpMode::Generic, Some("generic")),
        (UplinkHook::Xdp, XdpMode::Auto, Some("driver")),
        (UplinkHook::Tc, XdpMode::Auto, None),
    ] {
        drop(dp);
        dp = lab.open_hooked("up0", AttachMode::Tcx, hook, xdp_mode);
        lab.assert_one_uplink_program("up0", AttachMode::Tcx);
        let found = attach_support::xdp_program(&lab.node, "up0");
        assert_eq!(
            found.as_ref().map(|(m, name)| (m.as_str(), name.as_str())),
            expect.map(|m| (m, "uplink_xdp")),
            "{hook} {xdp_mode}"
        );
        let id = attach_support::xdp_program_id(&lab.node, "up0");
        assert!(
            id.is_none() || id != last_id,
            "{hook} {xdp_mode}: the XDP program was not replaced"
        );
        last_id = id;
        let redirected = |dp: &Dataplane| {
            dp.status()
                .unwrap()
                .counters
                .iter()
                .find(|c| c.0 == "xdp_redirected")
                .map_or(0, |c| c.1)
        };
        let before = redirected(&dp);
        stream.wait_for(BURST);
        if hook.redirects() {
            assert!(redirected(&dp) > before, "{hook}: XDP delivered nothing");
        }
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
fn the_uplink_program_follows_the_uplink(mode: AttachMode) {
    {
        let lab = Lab::new();
        let dp = lab.open("up0", mode);
        let stream = Stream::start(&lab, "up0");
        stream.wait_for(BURST);
        stream.finish();
        lab.move_address("up0", "up2");
        lab.node
            .within(|| dp.set_uplink("up2", IpAddr::V4(NODE)))
            .expect("inside the node")
            .expect("moving the uplink");
        // The address watch and the move may come in either order; both
        // leave the program where the address and the uplink are.
        wait_until("the program to leave up0", Duration::from_secs(10), || {
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
fn an_old_uplink_with_an_address_keeps_receiving(mode: AttachMode) {
    {
        let lab = Lab::new();
        lab.node
            .add_address("up2", "198.51.100.11/24")
            .expect("second address")
            .keep();
        let dp = lab.open("up0", mode);
        let second = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 11));
        lab.node
            .within(|| dp.set_uplink("up2", second))
            .expect("inside the node")
            .expect("moving the uplink");
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
fn pins_of_vanished_interfaces_are_dropped(mode: AttachMode) {
    {
        let lab = Lab::new();
        lab.node.add_veth("cx0", "cx1", None).expect("veth").keep();
        let dp = lab.open("up0", mode);
        lab.node
            .within(|| dp.attach_container("cx0"))
            .expect("inside the node")
            .unwrap();
        let dir = if mode == AttachMode::Netlink {
            "tc"
        } else {
            "links"
        };
        let pin = lab.pin_dir.join(dir).join("container_egress@cx0");
        assert!(pin.exists(), "{}", pin.display());
        drop(dp);
        lab.node.del_link("cx0").expect("cx0 removed");
        let dp = lab.open("up0", mode);
        assert!(!pin.exists(), "{} left behind", pin.display());
        lab.assert_one_uplink_program("up0", mode);
        drop(dp);
    }
}
