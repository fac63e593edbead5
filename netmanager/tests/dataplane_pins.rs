//! Pinned maps found at start: adopted when they match, migrated with their
//! entries when only the type, size or flags changed (the flow tables of a
//! version that used LRU maps, a new table size), recreated when NetManager
//! rewrites them anyway, refused -- naming the map and what differs -- when
//! their entries have another layout. Pins of older layouts are made with
//! bpftool, as an older NetManager would have left them. Needs root.

mod packet_support;

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::Command;

use aya::programs::TestRunOptions;
use netmanager::dataplane::{
    CONTAINER_PROGRAM, Dataplane, DataplaneConfig, InstanceEntry, LocalPort, MapSizes, ServiceKind,
};
use netmanager_common::{Addr, Counter, FlowKey, maps};
use packet_support::*;
use testkit::PinDir;

testkit::main! {
    a_restart_adopts_the_pins_and_a_new_size_keeps_the_flows: [Root, Bpffs, Bpftool],
    pins_of_an_older_version_are_migrated_or_recreated: [Root, Bpffs, Bpftool],
    pins_with_another_entry_layout_are_refused_and_left_alone: [Root, Bpffs, Bpftool],
}

const NODE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

fn pin_dir(name: &str) -> PinDir {
    let p = PinDir::new(&format!("pins-{name}-"));
    std::fs::create_dir_all(p.path()).unwrap();
    p
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn config(pins: &Path, flows: u32) -> DataplaneConfig {
    DataplaneConfig {
        pin_dir: pins.to_path_buf(),
        uplink: String::new(),
        node_ip: IpAddr::V4(NODE),
        tunnel_port: 50103,
        tunnel_mtu: 1450,
        service_ranges: vec![(ip("10.30.0.0"), 16)],
        sizes: MapSizes {
            flows,
            services: 256,
            backends: 1024,
            instances: 256,
            pending: 64,
        },
        miss_hold: 2,
        container_bridge: String::new(),
        attach_mode: netmanager::dataplane::AttachMode::Auto,
        uplink_hook: Default::default(),
        xdp_mode: Default::default(),
        trusted_peers: Vec::new(),
        flows_per_container: 0,
    }
}

/// A client (on the loopback device, where BPF_PROG_TEST_RUN runs) and a
/// remote backend behind 10.30.55.56.
fn tables(dp: &Dataplane) {
    for (ns, inst, node, local) in [
        (
            "10.18.0.2",
            "10.30.0.3",
            NODE,
            Some(LocalPort {
                ifindex: 1,
                mac: CLIENT_MAC,
            }),
        ),
        (
            "10.18.0.130",
            "10.30.0.5",
            Ipv4Addr::new(198, 51, 100, 2),
            None,
        ),
    ] {
        dp.upsert_instance(
            ip(ns),
            InstanceEntry {
                instance_ip: Some(ip(inst)),
                node_ip: IpAddr::V4(node),
                node_port: 50103,
                local,
            },
        )
        .unwrap();
    }
    dp.upsert_service(
        ip("10.30.55.56"),
        ServiceKind::RoundRobin,
        &[ip("10.18.0.130")],
    )
    .unwrap();
}

fn open_flow(dp: &Dataplane, sport: u16) {
    let frame = from_container(&Ip::new(
        "10.18.0.2",
        "10.30.55.56",
        L4::Tcp {
            sport,
            dport: 80,
            flags: 0x02,
            payload: vec![],
        },
    ));
    let mut out = vec![0u8; 256];
    let r = dp
        .test_run(
            CONTAINER_PROGRAM,
            TestRunOptions {
                data_in: Some(&frame),
                data_out: Some(&mut out),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(r.return_value, 7, "redirected");
}

fn flow_key(sport: u16) -> FlowKey {
    FlowKey {
        src: Addr::from_v4_octets([10, 18, 0, 2]),
        dst: Addr::from_v4_octets([10, 30, 55, 56]),
        src_port: sport.to_be(),
        dst_port: 80u16.to_be(),
        proto: 6,
        _pad: [0; 3],
    }
}

fn bpftool(args: &[&str]) -> String {
    let out = Command::new("bpftool")
        .args(args)
        .output()
        .expect("bpftool is installed by `cargo xtask setup`");
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// (type, key size, value size, max entries) of a pinned map.
fn layout(pin: &Path) -> (String, u64, u64, u64) {
    let v: serde_json::Value = serde_json::from_str(&bpftool(&[
        "-j",
        "map",
        "show",
        "pinned",
        &pin.to_string_lossy(),
    ]))
    .unwrap();
    (
        v["type"].as_str().unwrap().to_string(),
        v["bytes_key"].as_u64().unwrap(),
        v["bytes_value"].as_u64().unwrap(),
        v["max_entries"].as_u64().unwrap(),
    )
}

fn hex_bytes(b: &[u8]) -> Vec<String> {
    b.iter().map(|x| x.to_string()).collect()
}

fn a_restart_adopts_the_pins_and_a_new_size_keeps_the_flows() {
    let pins = pin_dir("adopt");
    // A known underlay: the FIB finds the way to the backend's node.
    let _netns = FibNetns::enter("pins-adopt");
    let dp = Dataplane::open(&config(&pins, 1024)).unwrap();
    tables(&dp);
    open_flow(&dp, 1000);
    let before = layout(&pins.join(maps::FLOWS));
    drop(dp);

    let dp = Dataplane::open(&config(&pins, 1024)).unwrap();
    assert!(dp.flow(&flow_key(1000)).unwrap().is_some(), "adopted");
    assert_eq!(layout(&pins.join(maps::FLOWS)), before);
    drop(dp);

    // FlowTableSize changed: a bigger map, the flow copied over.
    let dp = Dataplane::open(&config(&pins, 4096)).unwrap();
    assert_eq!(layout(&pins.join(maps::FLOWS)).3, 4096);
    assert_eq!(layout(&pins.join(maps::REVERSE_FLOWS)).3, 4096);
    assert!(dp.flow(&flow_key(1000)).unwrap().is_some(), "migrated");
    // ... and it still counts against its container.
    assert_eq!(dp.flow_counts(1).unwrap(), (1, 0));
    assert!(!pins.join("FLOWS-replaced").exists());
}

fn pins_of_an_older_version_are_migrated_or_recreated() {
    let pins = pin_dir("older");
    let _netns = FibNetns::enter("pins-older");
    let at = |m: &str| pins.join(m).to_string_lossy().into_owned();
    // As the version with LRU flow tables, 19 counters and a 104-byte
    // CONFIG left them: a flow of the client and a count.
    bpftool(&[
        "map",
        "create",
        &at(maps::FLOWS),
        "type",
        "lru_hash",
        "key",
        "40",
        "value",
        "40",
        "entries",
        "1024",
        "name",
        "FLOWS",
    ]);
    bpftool(&[
        "map",
        "create",
        &at(maps::REVERSE_FLOWS),
        "type",
        "lru_hash",
        "key",
        "40",
        "value",
        "24",
        "entries",
        "1024",
        "name",
        "REVERSE_FLOWS",
    ]);
    bpftool(&[
        "map",
        "create",
        &at(maps::COUNTERS),
        "type",
        "percpu_array",
        "key",
        "4",
        "value",
        "16",
        "entries",
        "19",
        "name",
        "COUNTERS",
    ]);
    bpftool(&[
        "map",
        "create",
        &at(maps::CONFIG),
        "type",
        "array",
        "key",
        "4",
        "value",
        "104",
        "entries",
        "1",
        "name",
        "CONFIG",
    ]);
    let key = flow_key(2000);
    // SAFETY: FlowKey is plain bytes (repr(C), no padding holes).
    let key_bytes: &[u8] = unsafe {
        std::slice::from_raw_parts(&key as *const FlowKey as *const u8, size_of::<FlowKey>())
    };
    let mut value = vec![0u8; 40];
    value[..16].copy_from_slice(&Addr::from_v4_octets([10, 18, 0, 130]).bytes);
    value[16..32].copy_from_slice(&Addr::from_v4_octets([10, 30, 0, 3]).bytes);
    // last_seen far in the future: the flow is fresh for the test's lifetime.
    value[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
    let mut args = vec!["map", "update", "pinned"];
    let flows = at(maps::FLOWS);
    args.push(&flows);
    args.push("key");
    let k = hex_bytes(key_bytes);
    args.extend(k.iter().map(String::as_str));
    args.push("value");
    let v = hex_bytes(&value);
    args.extend(v.iter().map(String::as_str));
    bpftool(&args);
    let counters = at(maps::COUNTERS);
    let tunnelled = (Counter::Tunnelled as u32).to_le_bytes();
    let tk = hex_bytes(&tunnelled);
    let mut args = vec!["map", "update", "pinned", counters.as_str(), "key"];
    args.extend(tk.iter().map(String::as_str));
    args.extend([
        "value", "42", "0", "0", "0", "0", "0", "0", "0", "0", "0", "0", "0", "0", "0", "0", "0",
    ]);
    bpftool(&args);

    let dp = Dataplane::open(&config(&pins, 1024)).unwrap();
    assert_eq!(
        layout(&pins.join(maps::FLOWS)).0,
        "hash",
        "no longer evicting"
    );
    assert_eq!(layout(&pins.join(maps::REVERSE_FLOWS)).0, "hash");
    let flow = dp
        .flow(&flow_key(2000))
        .unwrap()
        .expect("the flow was copied over");
    assert_eq!(flow.backend, Addr::from_v4_octets([10, 18, 0, 130]));
    assert_eq!(
        layout(&pins.join(maps::FLOWS)).2,
        size_of::<netmanager_common::Flow>() as u64,
        "the value widened"
    );
    assert_eq!(flow.epoch, 0, "the new fields zero: not filled in yet");
    assert_eq!(
        layout(&pins.join(maps::COUNTERS)).3,
        Counter::COUNT as u64,
        "room for every counter"
    );
    let per_cpu = aya::util::nr_cpus().unwrap() as u64;
    let counted = dp.counters().unwrap();
    assert_eq!(counted[Counter::Tunnelled as usize].1, 42 * per_cpu, "kept");
    assert_eq!(
        layout(&pins.join(maps::CONFIG)).2,
        size_of::<netmanager_common::Config>() as u64,
        "recreated"
    );
    // The programs run on the new maps; the copied flow keeps its backend
    // and gets its copies of INSTANCES on its next packet.
    tables(&dp);
    open_flow(&dp, 2000);
    let flow = dp.flow(&flow_key(2000)).unwrap().expect("still there");
    assert_eq!(flow.backend, Addr::from_v4_octets([10, 18, 0, 130]));
    assert_ne!(flow.epoch, 0, "filled in");
    assert_eq!(
        flow.target.instance_ip,
        Addr::from_v4_octets([10, 30, 0, 5])
    );
    open_flow(&dp, 2001);
    assert!(dp.flow(&flow_key(2001)).unwrap().is_some());
    for name in [maps::FLOWS, maps::COUNTERS, maps::CONFIG] {
        assert!(!pins.join(format!("{name}-replaced")).exists(), "{name}");
    }
}

fn pins_with_another_entry_layout_are_refused_and_left_alone() {
    let pins = pin_dir("foreign");
    let flows = pins.join(maps::FLOWS).to_string_lossy().into_owned();
    // 48 bytes: no size FLOWS ever had (40 before the INSTANCES copies).
    bpftool(&[
        "map", "create", &flows, "type", "hash", "key", "40", "value", "48", "entries", "1024",
        "name", "FLOWS",
    ]);
    let e = Dataplane::open(&config(&pins, 1024))
        .err()
        .expect("a FLOWS with 48-byte values is refused");
    let text = format!("{e:#}");
    let want = size_of::<netmanager_common::Flow>();
    assert!(
        text.contains(&format!("FLOWS: value size 48 (this NetManager: {want})")),
        "{text}"
    );
    assert!(text.contains(&pins.display().to_string()), "{text}");
    assert_eq!(
        layout(Path::new(&flows)),
        ("hash".to_string(), 40, 48, 1024),
        "untouched"
    );
    // Nothing else was changed either: removing the pin is all it takes.
    std::fs::remove_file(&flows).unwrap();
    Dataplane::open(&config(&pins, 1024)).unwrap();
}
