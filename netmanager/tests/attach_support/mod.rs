//! What is attached where, for the tests of both attach modes (TCX links
//! and classic tc filters) and both uplink hooks (TC alone, XDP in front):
//! the programs on an interface's ingress as the kernel lists them, and the
//! mode a running NetManager reports.
//!
//! The namespace suites name the way their daemons run by a variant:
//! "tcx" and "netlink" (attach modes, TC uplink hook), "xdp" (TCX, with
//! the XDP program in front of the uplink program, native where the
//! interface has it: veths do) or "xdp-generic" (the same in generic mode).

#![allow(dead_code)]

use serde_json::{Value, json};
use testkit::{NetManager, NsPath};

/// The attach modes, by the name `--attach-mode` takes.
pub const MODES: [&str; 2] = ["tcx", "netlink"];

/// (hook, program, program id) of every program on the ingress of
/// `ifname` in `ns`: TCX links as the kernel lists them ("tcx/ingress"),
/// clsact filters as `bpftool net show` lists them ("clsact/ingress").
pub fn ingress_programs(ns: &NsPath, ifname: &str) -> Vec<(String, String, u32)> {
    use aya::programs::{SchedClassifier, TcAttachType};
    let mut out: Vec<(String, String, u32)> = ns
        .within(|| {
            if !netmanager::kernel_support::probe().tcx {
                return Vec::new();
            }
            let (_, progs) = SchedClassifier::query_tcx(ifname, TcAttachType::Ingress)
                .unwrap_or_else(|e| panic!("querying TCX programs of {ifname}: {e}"));
            progs
                .iter()
                .map(|p| {
                    (
                        "tcx/ingress".to_string(),
                        p.name_as_str().unwrap_or_default().to_string(),
                        p.id(),
                    )
                })
                .collect()
        })
        .expect("inside the namespace");
    let listed = ns
        .run(&["bpftool", "-j", "net", "show", "dev", ifname])
        .unwrap_or_else(|e| panic!("bpftool net show dev {ifname}: {e:#}"));
    let json: Value = serde_json::from_str(&listed).expect("bpftool's JSON");
    for entry in json.as_array().into_iter().flatten() {
        for f in entry["tc"].as_array().into_iter().flatten() {
            let kind = f["kind"].as_str().unwrap_or_default();
            // Newer bpftool lists TCX links here too; they were counted above.
            if kind.starts_with("clsact/") {
                out.push((
                    kind.to_string(),
                    f["name"].as_str().unwrap_or_default().to_string(),
                    f["id"].as_u64().unwrap_or_default() as u32,
                ));
            }
        }
    }
    out
}

/// The attach mode of a variant.
pub fn attach_mode_of(variant: &str) -> &str {
    match variant {
        "xdp" | "xdp-generic" | "xdp-redirect" => "tcx",
        mode => mode,
    }
}

/// The uplink hook of a variant, as `--uplink-hook` takes it.
pub fn uplink_hook_of(variant: &str) -> &'static str {
    match variant {
        "xdp" | "xdp-generic" => "xdp",
        "xdp-redirect" => "xdp-redirect",
        _ => "tc",
    }
}

/// The XDP mode of a variant, as `--xdp-mode` takes it.
pub fn xdp_mode_of(variant: &str) -> &'static str {
    match variant {
        "xdp-generic" => "generic",
        _ => "auto",
    }
}

/// The environment that makes a daemon run as `variant`.
pub fn daemon_env(variant: &str) -> [(&'static str, String); 3] {
    [
        ("NETMANAGER_XDP_MODE", xdp_mode_of(variant).to_string()),
        (
            "NETMANAGER_ATTACH_MODE",
            attach_mode_of(variant).to_string(),
        ),
        (
            "NETMANAGER_UPLINK_HOOK",
            uplink_hook_of(variant).to_string(),
        ),
    ]
}

/// `b` set up to run the daemon as `variant`.
pub fn with_variant(
    mut b: testkit::runners::netmanager::NetManagerBuilder,
    variant: &str,
) -> testkit::runners::netmanager::NetManagerBuilder {
    for (k, v) in daemon_env(variant) {
        b = b.env(k, &v);
    }
    b
}

/// The daemon's dataplane runs as `variant` (so a test run "in netlink
/// mode" or "with XDP" really did).
pub fn assert_attach_mode(nm: &NetManager, variant: &str) {
    let (_, st) = nm.get("/status");
    assert_eq!(
        st["dataplane"]["attach_mode"],
        json!(attach_mode_of(variant)),
        "{st}"
    );
    let xdp = st["dataplane"]["attachments"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|a| a[0] == "uplink_xdp");
    assert_eq!(xdp, uplink_hook_of(variant) != "tc", "{st}");
}

/// The hook [`ingress_programs`] reports for a variant.
pub fn hook_of(variant: &str) -> &'static str {
    match variant {
        "netlink" => "clsact/ingress",
        _ => "tcx/ingress",
    }
}

/// `bpftool net show`'s entry for the XDP program on `ifname` in `ns`.
fn xdp_entry(ns: &NsPath, ifname: &str) -> Option<Value> {
    let listed = ns
        .run(&["bpftool", "-j", "net", "show", "dev", ifname])
        .unwrap_or_else(|e| panic!("bpftool net show dev {ifname}: {e:#}"));
    let json: Value = serde_json::from_str(&listed).expect("bpftool's JSON");
    json.as_array()
        .into_iter()
        .flatten()
        .flat_map(|e| e["xdp"].as_array().into_iter().flatten())
        .next()
        .cloned()
}

/// The id of the XDP program on `ifname` in `ns`.
pub fn xdp_program_id(ns: &NsPath, ifname: &str) -> Option<u64> {
    xdp_entry(ns, ifname).and_then(|e| e["id"].as_u64())
}

/// (mode, program name) of the XDP program on `ifname` in `ns`, as
/// `bpftool net show` lists it ("driver" or "generic").
pub fn xdp_program(ns: &NsPath, ifname: &str) -> Option<(String, String)> {
    let entry = xdp_entry(ns, ifname)?;
    let id = entry["id"].as_u64().expect("an XDP program id");
    let prog = ns
        .run(&["bpftool", "-j", "prog", "show", "id", &id.to_string()])
        .unwrap_or_else(|e| panic!("bpftool prog show id {id}: {e:#}"));
    let prog: Value = serde_json::from_str(&prog).expect("bpftool's JSON");
    Some((
        entry["mode"].as_str().unwrap_or_default().to_string(),
        prog["name"].as_str().unwrap_or_default().to_string(),
    ))
}

/// The XDP program is on `ifname` exactly when the variant puts it there,
/// in the variant's mode (auto takes native on a veth, except to deliver
/// there: `XdpMode::on_interface`).
pub fn assert_uplink_xdp(ns: &NsPath, ifname: &str, variant: &str) {
    let found = xdp_program(ns, ifname);
    if uplink_hook_of(variant) != "tc" {
        let mode = match (xdp_mode_of(variant), uplink_hook_of(variant)) {
            ("generic", _) | (_, "xdp-redirect") => "generic",
            _ => "driver",
        };
        assert_eq!(
            found,
            Some((mode.to_string(), "uplink_xdp".to_string())),
            "XDP on {ifname}"
        );
    } else {
        assert_eq!(found, None, "XDP on {ifname} with the TC hook");
    }
}

/// A counter of `NetManager status`'s dataplane section, in packets.
pub fn dataplane_counter(st: &Value, name: &str) -> Option<u64> {
    st["dataplane"]["counters"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c[0] == name)
        .and_then(|c| c[1].as_u64())
}
