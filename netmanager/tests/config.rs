//! netcfg.json and tuncfg.json parsing against upstream's files, the
//! command line's precedence over them, and the daemon's refusal to start
//! on an invalid one.

use std::process::Command;
use std::time::Duration;

use netmanager::config::{self, NetConfig, TunConfig};
use testkit::{ClusterDouble, Mosquitto, NetManager, Node, Proc, temp_dir, wait_until};

testkit::main! {
    upstream_default_file: [],
    every_property: [],
    invalid_values_name_file_and_field: [],
    daemon_refuses_an_invalid_config: [Root],
    cli_version_and_help: [],
    every_environment_variable_is_a_flag: [],
    dataplane_table_sizes_are_configurable: [],
    default_state_and_pins_are_per_network_namespace: [Root],
    attach_mode_and_discovery_url_on_the_command_line: [],
    settings_take_flags_then_files_then_defaults: [],
    upstream_tuncfg_files: [],
    invalid_tuncfg_names_file_and_field: [],
    a_service_range_over_the_container_subnet_is_refused: [Root, Mosquitto],
}

fn upstream_default_file() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/netcfg.json");
    let c = NetConfig::load(&path).unwrap();
    assert_eq!(c, NetConfig::default());
    assert_eq!(c.node_public_port, 50103);
    assert_eq!(c.cluster_mqtt_port, 10003);
    assert!(c.node_public_address.is_none() && c.cluster_url.is_none());
}

fn every_property() {
    let c = NetConfig::parse(
        r#"{"NodePublicAddress":"198.51.100.3","NodePublicPort":"50200","ClusterUrl":"cluster.example",
            "ClusterMqttPort":"10004","DefaultInterface":"eth1","Debug":true,"PublicIPNetworking":true,
            "MqttCert":"/etc/c.pem","MqttKey":"/etc/k.pem","Unknown":1}"#,
    )
    .unwrap();
    assert_eq!(c.node_public_address, Some("198.51.100.3".parse().unwrap()));
    assert_eq!(c.node_public_port, 50200);
    assert_eq!(c.cluster_url.as_deref(), Some("cluster.example"));
    assert_eq!(c.cluster_mqtt_port, 10004);
    assert_eq!(c.default_interface.as_deref(), Some("eth1"));
    assert!(c.debug && c.public_ip_networking);
    assert_eq!(c.mqtt_cert.unwrap().to_str(), Some("/etc/c.pem"));
    assert_eq!(c.mqtt_key.unwrap().to_str(), Some("/etc/k.pem"));
}

fn invalid_values_name_file_and_field() {
    let dir = temp_dir();
    let dir = dir.path();
    for (body, field) in [
        (r#"{"ClusterMqttPort": "abc"}"#, "ClusterMqttPort"),
        (r#"{"NodePublicPort": 70000}"#, "NodePublicPort"),
        (r#"{"NodePublicAddress": "not-an-ip"}"#, "NodePublicAddress"),
        (r#"{"Debug": "maybe"}"#, "Debug"),
        (r#"{"MqttCert": "/c.pem"}"#, "MqttKey"),
    ] {
        let p = dir.join("netcfg.json");
        std::fs::write(&p, body).unwrap();
        let e = format!("{:#}", NetConfig::load(&p).unwrap_err());
        assert!(
            e.contains(field) && e.contains("netcfg.json"),
            "{body}: {e}"
        );
    }
    let p = dir.join("broken.json");
    std::fs::write(&p, "{\n \"Debug\": tru").unwrap();
    let e = format!("{:#}", NetConfig::load(&p).unwrap_err());
    assert!(e.contains("broken.json") && e.contains("line 2"), "{e}");
    // Absent file: defaults.
    assert_eq!(
        NetConfig::load(&dir.join("absent.json")).unwrap(),
        NetConfig::default()
    );
}

fn daemon_refuses_an_invalid_config() {
    let dir = temp_dir();
    let dir = dir.path();
    let p = dir.join("netcfg.json");
    std::fs::write(&p, r#"{"NodePublicPort": "x"}"#).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_NetManager"))
        .env("NETMANAGER_CONFIG", &p)
        .env("NETMANAGER_SOCKET", dir.join("s.sock"))
        .env("NETMANAGER_STATE", dir.join("state.json"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("NodePublicPort") && err.contains("netcfg.json"),
        "{err}"
    );
    assert!(!dir.join("s.sock").exists());
}

fn cli_version_and_help() {
    let out = Command::new(env!("CARGO_BIN_EXE_NetManager"))
        .arg("version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
    let out = Command::new(env!("CARGO_BIN_EXE_NetManager"))
        .arg("help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("status") && help.contains("logs") && help.contains("--socket"),
        "{help}"
    );
    // status without a daemon: a clear error, not a hang.
    let out = Command::new(env!("CARGO_BIN_EXE_NetManager"))
        .args(["status", "--socket", "/nonexistent/nm.sock"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is NetManager running"));
    let _ = config::DEFAULT_SOCKET_PATH;
}

fn every_environment_variable_is_a_flag() {
    use clap::Parser;
    use netmanager::cli::Cli;
    let cli = Cli::try_parse_from(["NetManager", "--tunnel-mtu", "1400"]).unwrap();
    assert_eq!(cli.tunnel_mtu, Some(1400));
    assert!(Cli::try_parse_from(["NetManager", "--tunnel-mtu", "huge"]).is_err());
    assert!(Cli::try_parse_from(["NetManager", "--tunnel-mtu", "100"]).is_err());
    // Environment variables name the same settings (upstream's TUN_MTU_SIZE).
    let out = Command::new(env!("CARGO_BIN_EXE_NetManager"))
        .arg("help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for var in [
        "NETMANAGER_CONFIG",
        "NETMANAGER_SOCKET",
        "NETMANAGER_BPF_DIR",
        "NETMANAGER_STATE",
        "NETMANAGER_LOG_FILE",
        "NETMANAGER_UPLINK",
        "NETMANAGER_NO_DATAPLANE",
        "TUN_MTU_SIZE",
        "NETMANAGER_ADDRESS_CHECK_SECS",
        "NETMANAGER_MQTT_CA",
        "OAKESTRA_LOG_FORMAT",
        "NETMANAGER_ATTACH_MODE",
        "NETMANAGER_UPLINK_HOOK",
        "NETMANAGER_XDP_MODE",
        "NETMANAGER_PUBLIC_IP_URL",
        "NETMANAGER_TUN_CONFIG",
    ] {
        assert!(help.contains(var), "{var} missing from --help:\n{help}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_NetManager"))
        .env("TUN_MTU_SIZE", "huge")
        .arg("version")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("TUN_MTU_SIZE")
            || String::from_utf8_lossy(&out.stderr).contains("tunnel-mtu")
    );
}

fn dataplane_table_sizes_are_configurable() {
    let c = NetConfig::parse(
        r#"{"FlowTableSize":1048576,"ServiceTableSize":"100000","BackendTableSize":200000,
            "InstanceTableSize":50000,"PendingTableSize":64,"MissHold":2}"#,
    )
    .unwrap();
    assert_eq!(c.tables.flows, 1_048_576);
    assert_eq!(c.tables.services, 100_000);
    assert_eq!(c.tables.backends, 200_000);
    assert_eq!(c.tables.instances, 50_000);
    assert_eq!(c.tables.pending, 64);
    assert_eq!(c.tables.miss_hold, 2);
    let err = NetConfig::parse(r#"{"FlowTableSize":0}"#).unwrap_err();
    assert!(format!("{err:#}").contains("FlowTableSize"), "{err:#}");
    let err = NetConfig::parse(r#"{"MissHold":true}"#).unwrap_err();
    assert!(format!("{err:#}").contains("MissHold"), "{err:#}");
}

/// Two NetManagers in two network namespaces with default paths never share
/// a state file, a pin directory or a socket.
fn default_state_and_pins_are_per_network_namespace() {
    let dir = temp_dir();
    let dir = dir.path();
    let (a, b) = (Node::standalone(1).unwrap(), Node::standalone(2).unwrap());
    let mut seen = Vec::new();
    for (node, tag) in [(&a, "a"), (&b, "b")] {
        let log = dir.join(format!("{tag}.log"));
        let mut cmd = node.ns.command(env!("CARGO_BIN_EXE_NetManager")).unwrap();
        cmd.env("NETMANAGER_CONFIG", dir.join("absent.json"))
            .env_remove("NETMANAGER_SOCKET")
            .env_remove("NETMANAGER_STATE")
            .env_remove("NETMANAGER_BPF_DIR")
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(&log).unwrap());
        let mut child = Proc::spawn("NetManager", cmd).unwrap();
        wait_until("start", Duration::from_secs(10), || {
            std::fs::read_to_string(&log).is_ok_and(|t| t.contains("listening"))
        });
        child.kill9();
        let text = std::fs::read_to_string(&log).unwrap();
        let field = |name: &str| {
            text.split(&format!("{name}="))
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .unwrap_or_else(|| panic!("no {name} in {text}"))
                .to_string()
        };
        seen.push((field("state"), field("bpf_dir"), field("socket")));
    }
    assert_ne!(seen[0].0, seen[1].0, "{seen:?}");
    assert_ne!(seen[0].1, seen[1].1, "{seen:?}");
    assert_ne!(seen[0].2, seen[1].2, "{seen:?}");
    for (_, _, socket) in &seen {
        let _ = std::fs::remove_file(socket);
    }
    assert!(
        seen[0].0.starts_with("/run/oakestra/netmanager-state."),
        "{seen:?}"
    );
}

fn attach_mode_and_discovery_url_on_the_command_line() {
    use clap::Parser;
    use netmanager::cli::Cli;
    use netmanager::dataplane::AttachMode;
    let cli = Cli::try_parse_from(["NetManager"]).unwrap();
    assert_eq!(cli.attach_mode, AttachMode::Auto);
    for (arg, mode) in [
        ("tcx", AttachMode::Tcx),
        ("netlink", AttachMode::Netlink),
        ("auto", AttachMode::Auto),
    ] {
        let cli = Cli::try_parse_from(["NetManager", "--attach-mode", arg]).unwrap();
        assert_eq!(cli.attach_mode, mode);
    }
    assert!(Cli::try_parse_from(["NetManager", "--attach-mode", "xdp"]).is_err());
    // The uplink hook: TC unless asked, XDP in the mode asked.
    use netmanager::dataplane::{UplinkHook, XdpMode};
    assert_eq!(
        (cli.uplink_hook, cli.xdp_mode),
        (UplinkHook::Tc, XdpMode::Auto)
    );
    let cli = Cli::try_parse_from([
        "NetManager",
        "--uplink-hook",
        "xdp",
        "--xdp-mode",
        "generic",
    ])
    .unwrap();
    assert_eq!(
        (cli.uplink_hook, cli.xdp_mode),
        (UplinkHook::Xdp, XdpMode::Generic)
    );
    let cli = Cli::try_parse_from(["NetManager", "--uplink-hook", "xdp-redirect"]).unwrap();
    assert_eq!(cli.uplink_hook, UplinkHook::XdpRedirect);
    assert!(Cli::try_parse_from(["NetManager", "--uplink-hook", "nic"]).is_err());
    assert!(Cli::try_parse_from(["NetManager", "--xdp-mode", "offload"]).is_err());
    assert!(Cli::try_parse_from(["NetManager", "--public-ip-url", "ftp://x"]).is_err());
    let out = Command::new(env!("CARGO_BIN_EXE_NetManager"))
        .env("NETMANAGER_ATTACH_MODE", "sideways")
        .arg("version")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("sideways"));
}

/// The URL: the flag, else netcfg.json's PublicIPDiscoveryUrl, else the
/// default. The MTU: the flag, else tuncfg.json's, else 1450. The tunnel
/// port: tuncfg.json's TunnelPort, else 50103 (NodePublicPort is only
/// advertised: behind NAT the router's port).
fn settings_take_flags_then_files_then_defaults() {
    use clap::Parser;
    use netmanager::cli::Cli;
    let dir = temp_dir();
    let net = dir.path().join("netcfg.json");
    let tun = dir.path().join("tuncfg.json");
    let parse = |extra: &[&str]| {
        let mut args = vec![
            "NetManager",
            "--config",
            net.to_str().unwrap(),
            "--tun-config",
            tun.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        Cli::try_parse_from(args).unwrap().settings().unwrap()
    };
    std::fs::write(&net, r#"{"NodePublicPort": "50300"}"#).unwrap();
    let s = parse(&[]);
    assert_eq!(s.public_ip_url, config::DEFAULT_PUBLIC_IP_URL);
    assert_eq!(s.tunnel_mtu, 1450);
    assert_eq!(s.tunnel_port, 50103);
    assert_eq!(s.net.node_public_port, 50300);
    assert_eq!(
        s.service_ranges,
        netmanager::addresses::ServiceRanges::default()
    );

    std::fs::write(
        &net,
        r#"{"NodePublicPort": "50300", "PublicIPDiscoveryUrl": "http://disc.example/ip"}"#,
    )
    .unwrap();
    std::fs::write(&tun, r#"{"TunnelPort": 50400, "MTUSize": 1400}"#).unwrap();
    let s = parse(&[]);
    assert_eq!(s.public_ip_url, "http://disc.example/ip");
    assert_eq!(s.tunnel_mtu, 1400);
    assert_eq!(s.tunnel_port, 50400);
    assert_eq!(s.net.node_public_port, 50300, "still what peers are told");
    let s = parse(&[
        "--public-ip-url",
        "https://other.example/",
        "--tunnel-mtu",
        "1300",
    ]);
    assert_eq!(s.public_ip_url, "https://other.example/");
    assert_eq!(s.tunnel_mtu, 1300);

    std::fs::write(&net, r#"{"PublicIPDiscoveryUrl": "ifconfig.co"}"#).unwrap();
    let e = format!(
        "{:#}",
        Cli::try_parse_from(["NetManager", "--config", net.to_str().unwrap()])
            .unwrap()
            .settings()
            .unwrap_err()
    );
    assert!(e.contains("PublicIPDiscoveryUrl"), "{e}");
}

/// Upstream's sample file (`config/tuncfg.json`) and the keys of its Go
/// struct, matched without regard to case as Go's decoder does.
fn upstream_tuncfg_files() {
    let sample = r#"{
      "HostTUNDeviceName": "goProxyTun",
      "TunNetIP": "10.19.1.254",
      "ProxySubnetwork": "10.30.0.0",
      "ProxySubnetworkMask": "255.255.0.0",
      "TunnelPort": 50103,
      "Mtusize": 1450
    }"#;
    let t = TunConfig::parse(sample).unwrap();
    assert_eq!(t.service_v4, Some(("10.30.0.0".parse().unwrap(), 16)));
    assert_eq!(t.tunnel_port, Some(50103));
    assert_eq!(t.mtu, Some(1450));
    assert_eq!(t.service_v6, None);
    assert_eq!(
        t.service_ranges(),
        netmanager::addresses::ServiceRanges::default()
    );

    let t = TunConfig::parse(
        r#"{"HostTunnelDeviceName": "goProxyTun", "TunnelIP": "10.19.1.254",
            "ProxySubnetwork": "10.40.0.0", "ProxySubnetworkMask": "255.254.0.0",
            "TunnelPort": "50200", "MTUSize": 1400, "TunNetIPv6": "fcef::dead:beef",
            "ProxySubnetworkIPv6": "fd00:40::", "ProxySubnetworkIPv6Prefix": 32}"#,
    )
    .unwrap();
    assert_eq!(t.service_v4, Some(("10.40.0.0".parse().unwrap(), 15)));
    assert_eq!(t.service_v6, Some(("fd00:40::".parse().unwrap(), 32)));
    assert_eq!(t.tunnel_port, Some(50200));
    assert_eq!(t.mtu, Some(1400));
    let ranges = t.service_ranges();
    let r = ranges.as_slice();
    assert_eq!(
        r,
        &[
            ("10.40.0.0".parse().unwrap(), 15),
            ("fd00:40::".parse().unwrap(), 32),
            ("fdff::".parse().unwrap(), 16),
        ]
    );
    assert!(ranges.contains("10.41.255.1".parse().unwrap()));
    assert!(!ranges.contains("10.30.0.1".parse().unwrap()));

    // Half a range keeps upstream's default for the other half.
    let t = TunConfig::parse(r#"{"ProxySubnetworkMask": "255.255.255.0"}"#).unwrap();
    assert_eq!(t.service_v4, Some(("10.30.0.0".parse().unwrap(), 24)));
    assert_eq!(TunConfig::parse("{}").unwrap(), TunConfig::default());
}

fn invalid_tuncfg_names_file_and_field() {
    let dir = temp_dir();
    for (body, words) in [
        (r#"{"TunnelPort": "port"}"#, &["TunnelPort"][..]),
        (r#"{"tunnelport": 0}"#, &["tunnelport"][..]),
        (r#"{"MTUSize": 100}"#, &["MTUSize", "576"][..]),
        (
            r#"{"ProxySubnetworkMask": "255.0.255.0"}"#,
            &["ProxySubnetworkMask", "contiguous"][..],
        ),
        (
            r#"{"ProxySubnetwork": "ten"}"#,
            &["ProxySubnetwork", "IPv4"][..],
        ),
        (
            r#"{"ProxySubnetworkIPv6Prefix": 129}"#,
            &["ProxySubnetworkIPv6Prefix", "128"][..],
        ),
        (r#"[1]"#, &["object"][..]),
    ] {
        let p = dir.path().join("tuncfg.json");
        std::fs::write(&p, body).unwrap();
        let e = format!("{:#}", TunConfig::load(&p).unwrap_err());
        assert!(e.contains("tuncfg.json"), "{body}: {e}");
        for w in words {
            assert!(e.contains(w), "{body}: {w} missing in {e}");
        }
    }
    assert_eq!(
        TunConfig::load(&dir.path().join("absent.json")).unwrap(),
        TunConfig::default()
    );
}

/// Upstream's built-in IPv6 proxy range fc00::/7 holds the node's own
/// container subnet: registering with it is refused, saying why.
fn a_service_range_over_the_container_subnet_is_refused() {
    let dir = temp_dir();
    let node = Node::standalone(1).expect("node namespace");
    let broker = Mosquitto::in_netns(&node.ns, "127.0.0.1", 1883, dir.path()).expect("mosquitto");
    let csm = ClusterDouble::options(broker.endpoint())
        .start()
        .expect("cluster double");
    csm.pin_subnet("6650aa00bb22cc33dd440c01", "10.18.0.64", "fc00::40");
    let nm = NetManager::builder(env!("CARGO_BIN_EXE_NetManager"), &node.ns, dir.path())
        .tun_config(
            serde_json::json!({"ProxySubnetworkIPv6": "fc00::", "ProxySubnetworkIPv6Prefix": 7}),
        )
        .start()
        .expect("NetManager");
    let (code, body) = nm.post(
        "/register",
        r#"{"client_id":"6650aa00bb22cc33dd440c01","cluster_address":"127.0.0.1"}"#,
    );
    assert_eq!(code, 500, "{body}");
    let e = body["error"].as_str().unwrap_or_default();
    assert!(
        e.contains("fc00::/7") && e.contains("tuncfg.json") && e.contains("fc00::40"),
        "{e}"
    );
}
