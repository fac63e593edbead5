//! netcfg.json parsing against upstream's default file, and the daemon's
//! refusal to start on an invalid one.

use std::process::Command;
use std::time::Duration;

use netmanager::config::{self, NetConfig};
use testkit::{Node, Proc, temp_dir, wait_until};

testkit::main! {
    upstream_default_file: [],
    every_property: [],
    invalid_values_name_file_and_field: [],
    daemon_refuses_an_invalid_config: [Root],
    cli_version_and_help: [],
    every_environment_variable_is_a_flag: [],
    dataplane_table_sizes_are_configurable: [],
    default_state_and_pins_are_per_network_namespace: [Root],
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
    assert_eq!(cli.tunnel_mtu, 1400);
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
