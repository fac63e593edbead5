//! `NodeEngine` edits the upstream configuration format in place.
//!
//! Every test starts from the upstream-written fixture in its own temp dir and
//! checks the exact bytes written back.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

testkit::main! {
    fixture_is_upstream_compact_json: [],
    config_cluster_round_trips_exactly: [],
    config_applogs: [],
    config_auth_requires_existing_files: [],
    config_addons: [],
    config_network_modes: [],
    config_unikernel: [],
    config_default_writes_upstream_defaults: [],
    global_config_flag_overrides_env: [],
    missing_file_is_created_with_defaults: [],
    corrupt_config_is_reported_and_left_untouched: [],
    bad_arguments_are_usage_errors: [],
    help_and_version: [],
    status_and_stop_without_systemd_say_so: [NoSystemd],
    addon_and_virtualization_without_arguments_list_the_state: [],
    enable_true_disable_false_as_upstream: [],
    crosvm_and_visibility_as_upstream_writes_them: [],
    upstream_flag_names_of_config_verbs: [],
    broker_credentials_tls_and_policy: [],
    image_builder_needs_qemu_user_static: [],
}

const FIXTURE: &str = include_str!("fixtures/conf.json");

fn setup() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("conf.json");
    std::fs::write(&conf, FIXTURE).expect("copy fixture");
    (dir, conf)
}

/// Runs the CLI with the config given through the environment variable.
fn ne(conf: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_NodeEngine"))
        .env("OAKESTRA_CONF", conf)
        .args(args)
        .output()
        .expect("run NodeEngine")
}

fn ok(conf: &Path, args: &[&str]) -> String {
    let out = ne(conf, args);
    assert!(
        out.status.success(),
        "NodeEngine {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(conf).expect("read conf")
}

/// The fixture with `csi_drivers: null` normalised to `[]`, then `edit` applied.
fn expected(edit: impl FnOnce(&mut String)) -> String {
    let mut s = FIXTURE
        .trim_end()
        .replace("\"csi_drivers\":null", "\"csi_drivers\":[]");
    edit(&mut s);
    s
}

fn fixture_is_upstream_compact_json() {
    let v: Value = serde_json::from_str(FIXTURE).expect("fixture parses");
    assert!(v["csi_drivers"].is_null());
    assert!(!FIXTURE.trim_end().contains('\n'));
}

fn config_cluster_round_trips_exactly() {
    let (_d, conf) = setup();
    let got = ok(&conf, &["config", "cluster", "10.1.2.3"]);
    assert_eq!(
        got,
        expected(|s| *s = s.replace("\"192.168.1.10\"", "\"10.1.2.3\""))
    );
    let got = ok(
        &conf,
        &["config", "cluster", "10.1.2.4", "-p", "10200", "-s"],
    );
    assert_eq!(
        got,
        expected(|s| {
            *s = s
                .replace("\"192.168.1.10\"", "\"10.1.2.4\"")
                .replace("\"cluster_ssl\":false", "\"cluster_ssl\":true")
                .replace("\"cluster_port\":10100", "\"cluster_port\":10200")
        })
    );
}

fn config_applogs() {
    let (_d, conf) = setup();
    let got = ok(&conf, &["config", "applogs", "/var/log/apps"]);
    assert_eq!(
        got,
        expected(|s| *s = s.replace("\"app_logs\":\"/tmp\"", "\"app_logs\":\"/var/log/apps\""))
    );
}

fn config_auth_requires_existing_files() {
    let (d, conf) = setup();
    let out = ne(
        &conf,
        &["config", "auth", "-c", "/nonexistent.crt", "-k", "/x.key"],
    );
    assert!(!out.status.success());
    assert_eq!(std::fs::read_to_string(&conf).expect("read"), FIXTURE);

    let cert = d.path().join("n.crt");
    let key = d.path().join("n.key");
    std::fs::write(&cert, "c").expect("w");
    std::fs::write(&key, "k").expect("w");
    let (c, k) = (cert.display().to_string(), key.display().to_string());
    let got = ok(&conf, &["config", "auth", "-c", &c, "-k", &k]);
    assert_eq!(
        got,
        expected(|s| {
            *s = s
                .replace(
                    "\"mqtt_cert_file\":\"\"",
                    &format!("\"mqtt_cert_file\":\"{c}\""),
                )
                .replace(
                    "\"mqtt_key_file\":\"\"",
                    &format!("\"mqtt_key_file\":\"{k}\""),
                )
        })
    );
}

fn config_addons() {
    let (_d, conf) = setup();
    let got = ok(&conf, &["config", "addon", "FLOps", "off"]);
    assert_eq!(
        got,
        expected(|s| *s = s.replace("\"addon_active\":true", "\"addon_active\":false"))
    );
    let got = ok(&conf, &["config", "addon", "imageBuilder", "on"]);
    assert_eq!(
        got,
        expected(|s| {
            *s = s.replace("\"addon_active\":true", "\"addon_active\":false").replace(
                "\"addon_config\":[]}]",
                "\"addon_config\":[]},{\"addon_name\":\"image-builder\",\"addon_active\":true,\"addon_config\":[]}]",
            )
        })
    );
}

fn config_network_modes() {
    let (_d, conf) = setup();
    // Upstream's `config network off` writes "".
    let got = ok(&conf, &["config", "network", "off"]);
    assert_eq!(
        got,
        expected(|s| *s = s.replace(
            "\"overlay_network\":\"default\"",
            "\"overlay_network\":\"\""
        ))
    );
    let got = ok(&conf, &["config", "network", "manual", "/run/nm.sock"]);
    assert_eq!(
        got,
        expected(|s| *s = s.replace(
            "\"overlay_network\":\"default\"",
            "\"overlay_network\":\"custom:/run/nm.sock\""
        ))
    );
    let got = ok(&conf, &["config", "network", "manual"]);
    assert!(got.contains("\"overlay_network\":\"custom:/etc/netmanager/netmanager.sock\""));
    let got = ok(&conf, &["config", "network", "auto"]);
    assert_eq!(got, expected(|_| {}));
}

fn config_unikernel() {
    let (_d, conf) = setup();
    let got = ok(&conf, &["config", "virtualization", "unikernel", "off"]);
    assert_eq!(
        got,
        expected(|s| *s = s.replace(
            "\"virutalizaiton_runtime\":\"unikernel\",\"virutalizaiton_active\":true",
            "\"virutalizaiton_runtime\":\"unikernel\",\"virutalizaiton_active\":false"
        ))
    );
    let got = ok(&conf, &["config", "virtualization", "unikernel", "on"]);
    assert_eq!(got, expected(|_| {}));
}

fn config_default_writes_upstream_defaults() {
    let (_d, conf) = setup();
    let got = ok(&conf, &["config", "default"]);
    assert_eq!(
        got,
        r#"{"conf_version":"1.0","cluster_address":"0.0.0.0","cluster_ssl":false,"cluster_port":10100,"app_logs":"/tmp","overlay_network":"default","public_ip":false,"overlay_network_port":0,"mqtt_cert_file":"","mqtt_key_file":"","addons":[],"virtualizations":[{"virutalizaiton_name":"containerd","virutalizaiton_runtime":"docker","virutalizaiton_active":true,"virutalizaiton_config":[]}],"csi_drivers":[]}"#
    );
}

fn global_config_flag_overrides_env() {
    let (d, conf) = setup();
    let other = d.path().join("other.json");
    std::fs::write(&other, FIXTURE).expect("w");
    let out = Command::new(env!("CARGO_BIN_EXE_NodeEngine"))
        .env("OAKESTRA_CONF", &conf)
        .args(["config", "applogs", "/x", "--config"])
        .arg(&other)
        .output()
        .expect("run");
    assert!(out.status.success());
    assert_eq!(std::fs::read_to_string(&conf).expect("r"), FIXTURE);
    assert!(
        std::fs::read_to_string(&other)
            .expect("r")
            .contains("\"app_logs\":\"/x\"")
    );
}

fn missing_file_is_created_with_defaults() {
    let d = tempfile::tempdir().expect("tempdir");
    let conf = d.path().join("sub/conf.json");
    let got = ok(&conf, &["config", "applogs", "/logs"]);
    let v: Value = serde_json::from_str(&got).expect("json");
    assert_eq!(v["app_logs"], "/logs");
    assert_eq!(v["virtualizations"][0]["virutalizaiton_runtime"], "docker");
}

fn corrupt_config_is_reported_and_left_untouched() {
    let (_d, conf) = setup();
    let corrupt = "{\"conf_version\":\"1.0\",\n\"cluster_port\": \"not a number\"}";
    std::fs::write(&conf, corrupt).expect("w");
    for args in [
        &["config", "applogs", "/x"][..],
        &["config", "network", "off"],
        &["config", "cluster", "1.2.3.4"],
        &["config", "addon", "FLOps", "on"],
    ] {
        let out = ne(&conf, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&conf.display().to_string()), "{err}");
        assert!(err.contains("line 2"), "{err}");
        assert!(err.contains("column"), "{err}");
        assert_eq!(std::fs::read_to_string(&conf).expect("r"), corrupt);
    }
}

fn bad_arguments_are_usage_errors() {
    let (_d, conf) = setup();
    for args in [
        &["config", "addon", "Nope", "on"][..],
        &["config", "addon", "FLOps", "maybe"],
        &["config", "network", "sideways"],
        &["config", "cluster"],
        &["config", "cluster", "1.2.3.4", "-p", "notaport"],
        &["config", "auth", "-c"],
        &["config", "virtualization", "wasm", "on"],
        &["config", "virtualization", "unikernel", "maybe"],
        &["config", "addon", "FLOps"],
        &["config", "visibility", "sideways"],
        &["config", "policy", "privileged", "perhaps"],
        &["frobnicate"],
        &["-a", "10.0.0.1", "status"],
    ] {
        let out = ne(&conf, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("error:") && err.contains("--help"),
            "{args:?}: {err}"
        );
        assert_eq!(std::fs::read_to_string(&conf).expect("r"), FIXTURE);
    }
}

fn help_and_version() {
    let (_d, conf) = setup();
    let out = ne(&conf, &["help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["config", "status", "logs", "stop", "version"] {
        assert!(text.contains(cmd), "help lacks {cmd}: {text}");
    }
    let out = ne(&conf, &["version"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
    let out = ne(&conf, &["config", "--help"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("applogs"));
}

fn status_and_stop_without_systemd_say_so() {
    let (_d, conf) = setup();
    // Nothing listens there: even if another test's nodeengined runs on
    // this machine, this status cannot find a ready one.
    let nowhere = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .to_string();
    let out = ne_env(
        &conf,
        &["status"],
        &[("NODEENGINE_METRICS_ADDRESS", nowhere.as_str())],
    );
    // Not healthy: exit 1, for scripts and probes.
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("systemd is not running"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not healthy"));
    let out = ne(&conf, &["stop"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("systemd is not running"));
}

/// Runs the CLI with extra environment.
fn ne_env(conf: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_NodeEngine"))
        .env("OAKESTRA_CONF", conf)
        .envs(env.iter().copied())
        .args(args)
        .output()
        .expect("run NodeEngine")
}

fn addon_and_virtualization_without_arguments_list_the_state() {
    let (_d, conf) = setup();
    let out = ne(&conf, &["config", "addon"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "Configured Addons:\n\t - FLOps-learner: 🟢 Active\n"
    );
    let out = ne(&conf, &["config", "virtualization"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "Virtualization Runtimes:\n\t - containerd: 🟢 Active\n\t - unikraft: 🟢 Active\n"
    );
    // Listing writes nothing.
    assert_eq!(std::fs::read_to_string(&conf).expect("r"), FIXTURE);
    ok(&conf, &["config", "default"]);
    let out = ne(&conf, &["config", "addon"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "Configured Addons:\nNo Addons Configured.\n"
    );
}

fn enable_true_disable_false_as_upstream() {
    let (_d, conf) = setup();
    for (word, active) in [
        ("disable", false),
        ("enable", true),
        ("false", false),
        ("true", true),
        ("OFF", false),
        ("On", true),
    ] {
        let got = ok(&conf, &["config", "virtualization", "unikernel", word]);
        let v: Value = serde_json::from_str(&got).expect("json");
        assert_eq!(
            v["virtualizations"][1]["virutalizaiton_active"], active,
            "{word}"
        );
        let got = ok(&conf, &["config", "addon", "FLOps", word]);
        let v: Value = serde_json::from_str(&got).expect("json");
        assert_eq!(v["addons"][0]["addon_active"], active, "{word}");
    }
}

fn crosvm_and_visibility_as_upstream_writes_them() {
    let (_d, conf) = setup();
    let got = ok(&conf, &["config", "virtualization", "crosvm", "on"]);
    assert!(
        got.contains(
            "{\"virutalizaiton_name\":\"crosvm\",\"virutalizaiton_runtime\":\"crosvm\",\"virutalizaiton_active\":true,\"virutalizaiton_config\":[]}"
        ),
        "{got}"
    );
    let got = ok(&conf, &["config", "visibility", "public"]);
    assert!(got.contains("\"public_ip\":true"), "{got}");
    let got = ok(&conf, &["config", "visibility", "private"]);
    assert!(got.contains("\"public_ip\":false"), "{got}");
}

fn upstream_flag_names_of_config_verbs() {
    let (d, conf) = setup();
    let got = ok(
        &conf,
        &[
            "config",
            "cluster",
            "10.9.9.9",
            "--clusterPort",
            "10300",
            "--clusterSSL",
        ],
    );
    assert!(
        got.contains(
            "\"cluster_address\":\"10.9.9.9\",\"cluster_ssl\":true,\"cluster_port\":10300"
        ),
        "{got}"
    );
    let cert = d.path().join("n.crt");
    let key = d.path().join("n.key");
    std::fs::write(&cert, "c").expect("w");
    std::fs::write(&key, "k").expect("w");
    let got = ok(
        &conf,
        &[
            "config",
            "auth",
            "--certFile",
            &cert.display().to_string(),
            "--keyFile",
            &key.display().to_string(),
        ],
    );
    assert!(got.contains(&format!("\"mqtt_cert_file\":\"{}\"", cert.display())));
    // Only the key: the certificate stays.
    let got = ok(&conf, &["config", "auth", "-k", &key.display().to_string()]);
    assert!(got.contains(&format!("\"mqtt_cert_file\":\"{}\"", cert.display())));
}

fn broker_credentials_tls_and_policy() {
    let (d, conf) = setup();
    let ca = d.path().join("ca.crt");
    let pw = d.path().join("mqtt.pw");
    std::fs::write(&ca, "ca").expect("w");
    std::fs::write(&pw, "secret\n").expect("w");
    let got = ok(
        &conf,
        &[
            "config",
            "auth",
            "--tls",
            "on",
            "--ca",
            &ca.display().to_string(),
            "-u",
            "node-1",
            "--password-file",
            &pw.display().to_string(),
        ],
    );
    let v: Value = serde_json::from_str(&got).expect("json");
    assert_eq!(v["mqtt_tls"], true);
    assert_eq!(v["mqtt_username"], "node-1");
    assert_eq!(v["mqtt_password_file"], pw.display().to_string());
    assert_eq!(v["mqtt_ca_file"], ca.display().to_string());
    let out = ne(&conf, &["config", "auth"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("transport: TLS"));

    let out = ne(&conf, &["config", "policy"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("privileged: refuse"));
    let got = ok(&conf, &["config", "policy", "privileged", "allow"]);
    let v: Value = serde_json::from_str(&got).expect("json");
    assert_eq!(v["local_policy"]["allow_privileged"], true);
    assert_eq!(v["local_policy"]["allow_unknown_runtimes"], false);
    let got = ok(&conf, &["config", "policy", "privileged", "refuse"]);
    assert!(
        !got.contains("local_policy"),
        "defaults are not written: {got}"
    );
}

/// A `dpkg` that says whether qemu-user-static is installed.
fn fake_dpkg(dir: &Path, installed: bool) -> String {
    let bin = dir.join(if installed { "dpkg-yes" } else { "dpkg-no" });
    std::fs::create_dir_all(&bin).expect("mkdir");
    let script = if installed {
        "#!/bin/sh\necho 'Package: qemu-user-static'\necho 'Status: install ok installed'\n"
    } else {
        "#!/bin/sh\necho \"dpkg-query: package '$2' is not installed\" >&2\nexit 1\n"
    };
    let path = bin.join("dpkg");
    std::fs::write(&path, script).expect("w");
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

fn image_builder_needs_qemu_user_static() {
    let (d, conf) = setup();
    let out = ne_env(
        &conf,
        &["config", "addon", "imageBuilder", "on"],
        &[("PATH", &fake_dpkg(d.path(), false))],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("qemu-user-static"));
    assert_eq!(std::fs::read_to_string(&conf).expect("r"), FIXTURE);
    let out = ne_env(
        &conf,
        &["config", "addon", "image-builder", "on"],
        &[("PATH", &fake_dpkg(d.path(), true))],
    );
    assert!(out.status.success(), "{out:?}");
    assert!(
        std::fs::read_to_string(&conf)
            .expect("r")
            .contains("\"image-builder\"")
    );
}
