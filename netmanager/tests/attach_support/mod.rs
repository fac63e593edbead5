//! What is attached where, for the tests of both attach modes (TCX links
//! and classic tc filters): the programs on an interface's ingress as the
//! kernel lists them, and the mode a running NetManager reports.

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

/// The daemon's dataplane runs in `mode` (so a test run "in netlink mode"
/// really did).
pub fn assert_attach_mode(nm: &NetManager, mode: &str) {
    let (_, st) = nm.get("/status");
    assert_eq!(st["dataplane"]["attach_mode"], json!(mode), "{st}");
}

/// The hook [`ingress_programs`] reports for an attach mode.
pub fn hook_of(mode: &str) -> &'static str {
    match mode {
        "netlink" => "clsact/ingress",
        _ => "tcx/ingress",
    }
}
