//! Runs NetManager's dataplane with a fixed table (JSON on the command
//! line's file argument) until SIGTERM/SIGINT: the overlay without the
//! cluster conversation, for namespace tests and benchmarks.

use std::net::IpAddr;

use anyhow::{Context, Result};
use netmanager::dataplane::{
    AttachMode, Dataplane, DataplaneConfig, InstanceEntry, LocalPort, MapSizes, ServiceKind,
    UplinkHook, XdpMode,
};
use serde::Deserialize;

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
    let path = std::env::args()
        .nth(1)
        .context("usage: oak-static-dataplane TABLE.json")?;
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let table: Table = serde_json::from_str(&text).with_context(|| format!("parsing {path}"))?;
    let cfg = DataplaneConfig {
        pin_dir: table.pin_dir.clone().into(),
        uplink: table.uplink.clone(),
        node_ip: table.node_ip,
        tunnel_port: table.tunnel_port,
        tunnel_mtu: 1450,
        service_ranges: table.service_ranges.clone(),
        // The daemon's defaults, so benchmarks measure what a node runs.
        sizes: MapSizes::default(),
        miss_hold: netmanager_common::DEFAULT_MISS_HOLD,
        attach_mode: table.attach_mode,
        uplink_hook: table.uplink_hook,
        xdp_mode: table.xdp_mode,
        container_bridge: "goProxyBridge".to_string(),
        trusted_peers: table.tunnel_peers.clone(),
        flows_per_container: 0,
    };
    let dp = Dataplane::open(&cfg).context("opening the dataplane")?;
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
