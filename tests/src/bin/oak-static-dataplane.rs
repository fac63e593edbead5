//! Runs NetManager's dataplane with a fixed table (JSON on the command
//! line's file argument) until SIGTERM/SIGINT: the overlay without the
//! cluster conversation, for namespace tests and benchmarks.
//!
//! `oak-static-dataplane --hooks` prints the uplink hooks this runner can
//! attach (one per line); the benchmark reports a hook it does not list as
//! "not available" instead of measuring it.

#[path = "../../../netmanager/tests/packet_support/mod.rs"]
mod packet_support;

use std::net::IpAddr;
use std::time::Instant;

use anyhow::{Context, Result};
use netmanager::config::NetConfig;
use netmanager::dataplane::{
    AttachMode, CONTAINER_PROGRAM, Dataplane, DataplaneConfig, InstanceEntry, LocalPort,
    ServiceKind, UplinkHook, XdpMode,
};
use serde::Deserialize;
use serde_json::json;

#[derive(Deserialize)]
struct Table {
    pin_dir: String,
    uplink: String,
    /// The address the node advertises (behind NAT: the router's).
    node_ip: IpAddr,
    #[serde(default = "default_port")]
    tunnel_port: u16,
    service_ranges: Vec<(IpAddr, u8)>,
    instances: Vec<Instance>,
    services: Vec<Service>,
    /// Services the stand-in cluster knows but the maps do not: written only
    /// when the programs report a miss for them, then the held packets are
    /// reinjected -- the dataplane half of the first-packet path, for the
    /// benchmark (no cluster round trip).
    #[serde(default)]
    deferred_services: Vec<Service>,
    /// "tcx", "netlink" or "auto" (the default), as NetManager's --attach-mode.
    #[serde(default)]
    attach_mode: AttachMode,
    /// "tc" (the default) or "xdp", as NetManager's --uplink-hook.
    #[serde(default)]
    uplink_hook: UplinkHook,
    /// "auto" (the default), "native" or "generic", as NetManager's --xdp-mode.
    #[serde(default)]
    xdp_mode: XdpMode,
    /// Underlay prefixes trusted to send tunnel datagrams for any instance
    /// (NetManager's `TunnelPeers`), as (address, prefix length).
    #[serde(default)]
    tunnel_peers: Vec<(IpAddr, u8)>,
    /// netcfg.json as NetManager reads it: the map sizes come from its
    /// table settings (`TableProfile`, `FlowTableSize`, ...) through the
    /// daemon's own code, so the bench measures what a node runs.
    #[serde(default = "empty_object")]
    netcfg: serde_json::Value,
    /// Flows to create before `ready` by running the container program on
    /// that many distinct packets (BPF_PROG_TEST_RUN) towards `prefill_service`.
    #[serde(default)]
    prefill_flows: u32,
    prefill_service: Option<IpAddr>,
    /// Where to write what this start took (JSON), before `ready`.
    report: Option<String>,
}

fn empty_object() -> serde_json::Value {
    json!({})
}

fn default_port() -> u16 {
    50103
}

#[derive(Deserialize)]
struct Instance {
    ns_ip: IpAddr,
    instance_ip: IpAddr,
    node_ip: IpAddr,
    /// The tunnel port its node advertises; the table's by default.
    node_port: Option<u16>,
    /// Host end of the container's veth when it runs on this node.
    veth: Option<String>,
    mac: Option<[u8; 6]>,
}

#[derive(Deserialize)]
struct Service {
    ip: IpAddr,
    kind: String,
    backends: Vec<IpAddr>,
}

fn kind(s: &str) -> Result<ServiceKind> {
    Ok(match s {
        "RR" => ServiceKind::RoundRobin,
        "Closest" => ServiceKind::Closest,
        "instance_ip" => ServiceKind::Instance,
        other => anyhow::bail!("unknown service kind {other}"),
    })
}

fn main() -> Result<()> {
    let process_start = Instant::now();
    let path = std::env::args()
        .nth(1)
        .context("usage: oak-static-dataplane TABLE.json | --hooks")?;
    if path == "--hooks" {
        // Every hook NetManager has: the runner attaches through its code.
        for hook in UplinkHook::ALL {
            println!("{hook}");
        }
        return Ok(());
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let table: Table = serde_json::from_str(&text).with_context(|| format!("parsing {path}"))?;
    let net = NetConfig::parse(&table.netcfg.to_string()).context("the table's netcfg")?;
    let sizes = &net.tables;
    let cfg = DataplaneConfig {
        pin_dir: table.pin_dir.clone().into(),
        uplink: table.uplink.clone(),
        node_ip: table.node_ip,
        tunnel_port: table.tunnel_port,
        tunnel_mtu: 1450,
        service_ranges: table.service_ranges.clone(),
        sizes: sizes.map_sizes(),
        miss_hold: sizes.miss_hold,
        attach_mode: table.attach_mode,
        uplink_hook: table.uplink_hook,
        xdp_mode: table.xdp_mode,
        container_bridge: "goProxyBridge".to_string(),
        trusted_peers: table.tunnel_peers.clone(),
        flows_per_container: sizes.flows_per_container,
    };
    let t = Instant::now();
    let dp = Dataplane::open(&cfg).context("opening the dataplane")?;
    let open_s = t.elapsed().as_secs_f64();
    for i in &table.instances {
        let local = match &i.veth {
            Some(veth) => {
                dp.attach_container(veth)?;
                Some(LocalPort {
                    ifindex: ifindex(veth)?,
                    mac: i.mac.unwrap_or_default(),
                })
            }
            None => None,
        };
        let entry = InstanceEntry {
            instance_ip: Some(i.instance_ip),
            node_ip: i.node_ip,
            node_port: i.node_port.unwrap_or(table.tunnel_port),
            local,
        };
        dp.upsert_instance(i.ns_ip, entry)?;
    }
    for s in &table.services {
        dp.upsert_service(s.ip, kind(&s.kind)?, &s.backends)?;
    }
    // Serving from here on: tables adopted or loaded, programs attached,
    // the table written.
    let ready_s = process_start.elapsed().as_secs_f64();
    let prefill_s = match table.prefill_service {
        Some(svc) if table.prefill_flows > 0 => {
            prefill(&dp, svc, table.prefill_flows, table.node_ip)?
        }
        _ => 0.0,
    };
    if let Some(report) = &table.report {
        let status = dp.status()?;
        let entries = |name: &str| {
            status
                .maps
                .iter()
                .find(|(n, _, _)| n == name)
                .map_or(0, |(_, e, _)| *e)
        };
        let r = json!({
            "open_s": open_s,
            "ready_s": ready_s,
            "prefill_s": prefill_s,
            "attach_mode": status.attach_mode,
            "flows": entries(netmanager_common::maps::FLOWS),
            "reverse_flows": entries(netmanager_common::maps::REVERSE_FLOWS),
        });
        std::fs::write(report, r.to_string()).with_context(|| format!("writing {report}"))?;
    }
    if !table.deferred_services.is_empty() {
        let deferred = table.deferred_services;
        std::thread::spawn(move || {
            if let Err(e) = resolve_misses(dp, deferred) {
                eprintln!("miss loop: {e:#}");
                std::process::exit(1);
            }
        });
    }
    println!("ready");
    wait_for_signal();
    Ok(())
}

/// Answers service misses from `deferred`: write the service, send the held
/// frame through the programs again, clear the pending marker.
fn resolve_misses(dp: Dataplane, deferred: Vec<Service>) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the miss loop runtime")?;
    // The ring buffer is registered with the runtime's reactor, so the
    // receiver must be polled inside it.
    rt.block_on(async move {
        let mut misses = dp.misses()?;
        while let Some(miss) = misses.recv().await {
            let Some(s) = deferred.iter().find(|s| s.ip == miss.addr) else {
                continue;
            };
            dp.upsert_service(s.ip, kind(&s.kind)?, &s.backends)?;
            if let Some(frame) = &miss.frame {
                dp.reinject(frame)?;
            }
            dp.resolved(miss.addr)?;
        }
        Ok(())
    })
}

/// The sender of the prefill packets: a container address the tables know
/// as local on ifindex 1, where BPF_PROG_TEST_RUN delivers them.
const PREFILL_SENDER: &str = "10.18.0.60";
const PREFILL_INSTANCE: &str = "10.30.0.60";

/// Creates `count` flows from PREFILL_SENDER to `service` as traffic does
/// (one container-program run per new 5-tuple); returns the seconds taken.
fn prefill(dp: &Dataplane, service: IpAddr, count: u32, node_ip: IpAddr) -> Result<f64> {
    use packet_support::{Ip, L4, from_container};
    let sender: IpAddr = PREFILL_SENDER.parse()?;
    dp.upsert_instance(
        sender,
        InstanceEntry {
            instance_ip: Some(PREFILL_INSTANCE.parse()?),
            node_ip,
            node_port: 50103,
            local: Some(LocalPort {
                ifindex: 1,
                mac: packet_support::CLIENT_MAC,
            }),
        },
    )?;
    let t = Instant::now();
    let mut out = vec![0u8; 4096];
    for i in 0..count {
        // Distinct port pairs: the reverse key has no service address.
        let l4 = L4::Tcp {
            sport: 1024 + (i % 60_000) as u16,
            dport: 1000 + (i / 60_000) as u16,
            flags: 0x10,
            payload: Vec::new(),
        };
        let frame = from_container(&Ip::new(PREFILL_SENDER, &service.to_string(), l4));
        dp.test_run(
            CONTAINER_PROGRAM,
            aya::programs::TestRunOptions {
                data_in: Some(&frame),
                data_out: Some(&mut out),
                repeat: 1,
                ..Default::default()
            },
        )?;
    }
    Ok(t.elapsed().as_secs_f64())
}

fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: c is NUL-terminated.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    anyhow::ensure!(i != 0, "no interface {name}");
    Ok(i)
}

fn wait_for_signal() {
    // SAFETY: blocking the signals, then waiting for one of them.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let mut sig = 0;
        libc::sigwait(&set, &mut sig);
    }
}
