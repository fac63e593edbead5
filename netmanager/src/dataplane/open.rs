//! Opening the dataplane: programs loaded, pinned maps adopted or made
//! (their layout checked, see `pins`), tables written, the uplink and the
//! dataplane's own devices attached, and the background tasks started.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use super::attach::Attachments;
use super::background::Background;
use super::devices::{self, Ensured};
use super::loader::{expected_layouts, load, load_program};
use super::tables::{self, Tables};
use super::underlay::UnderlayState;
use super::{
    CONTAINER_PROGRAM, Dataplane, DataplaneConfig, DataplaneError, PROGRAMS, Result,
    SLOW_PATH_PROGRAM, State, TunnelReinjector, UPLINK_PROGRAM, address_watch, misses, pins,
    route_watch, slow_path,
};

impl Dataplane {
    /// Load the programs, create or adopt the pinned maps (checking their
    /// layout, see `pins`) and links, attach the uplink.
    pub fn open(cfg: &DataplaneConfig) -> Result<Dataplane> {
        let (mut state, inject) = load_state(cfg)?;
        let Some(inject) = inject else {
            return Ok(Dataplane {
                _background: Vec::new(),
                state: Arc::new(Mutex::new(state)),
                reinjector: None,
                tunnel_reinjector: None,
                slow_path: None,
            });
        };
        state.attach(UPLINK_PROGRAM, &cfg.uplink)?;
        state.attach(CONTAINER_PROGRAM, misses::INJECT_PEER)?;
        let reinjector = Some(misses::Reinjector::open(misses::INJECT_DEVICE)?);
        if inject.gso_limited {
            state.underlay.segment = Some((inject.ifindex, inject.peer_ifindex));
        } else {
            tracing::warn!(
                "{} cannot segment GSO packets: TCP to nodes on an IPv6 underlay is dropped (counter drop_encap)",
                misses::INJECT_DEVICE
            );
        }
        let slow = devices::ensure(&slow_path::SLOW_PAIR)?;
        state.attach(SLOW_PATH_PROGRAM, slow_path::SLOW_PAIR.peer)?;
        // Held tunnel datagrams go back through the slow-path device: its
        // program is the receive path, sender check included.
        let tunnel_reinjector = Some(TunnelReinjector {
            socket: misses::Reinjector::open(slow_path::SLOW_PAIR.name)?,
            peer_mac: slow.peer_mac,
        });
        let state = Arc::new(Mutex::new(state));
        let (background, slow_counters) = start_background(cfg, &state, &slow)?;
        Ok(Dataplane {
            _background: background,
            state,
            reinjector,
            tunnel_reinjector,
            slow_path: slow_counters,
        })
    }
}

/// Programs loaded, maps adopted or made, tables written; nothing attached
/// yet. The reinjection pair comes with it when there is an uplink.
fn load_state(cfg: &DataplaneConfig) -> Result<(State, Option<Ensured>)> {
    std::fs::create_dir_all(&cfg.pin_dir)
        .map_err(|e| DataplaneError::bpf(format!("creating {}", cfg.pin_dir.display()), e))?;
    let decisions = pins::decide(&cfg.pin_dir, &expected_layouts(cfg)?)?;
    pins::set_aside(&cfg.pin_dir, &decisions)?;
    let mut ebpf = match load(cfg) {
        Ok(ebpf) => ebpf,
        Err(e) => {
            // Leave the pins as found, for the NetManager that made them.
            pins::restore(&cfg.pin_dir, &decisions);
            return Err(e);
        }
    };
    pins::finish(&cfg.pin_dir, &decisions)?;
    for name in PROGRAMS {
        load_program(&mut ebpf, name)?;
    }
    // The reinjection pair first: the configuration names its
    // container-side end, exempt from the source-to-veth check.
    let inject = match cfg.uplink.is_empty() {
        true => None,
        false => Some(devices::ensure(&misses::INJECT_PAIR)?),
    };
    let mut tables = Tables::take(&mut ebpf, inject.as_ref().map_or(0, |d| d.peer_ifindex))?;
    let underlay = UnderlayState::new(cfg.node_ip, tables::ifindex(&cfg.uplink)?);
    tables.write_config(cfg, &underlay)?;
    tables.write_trusted_peers(&cfg.trusted_peers)?;
    let misses = misses::MissSource::take(&mut ebpf)?;
    let mode = cfg
        .attach_mode
        .resolve(crate::kernel_support::probe().tcx)?;
    let mut state = State {
        cfg: cfg.clone(),
        ebpf,
        tables,
        attachments: Attachments::new(&cfg.pin_dir, mode)?,
        misses: Some(misses),
        underlay,
        receive_interfaces: BTreeSet::new(),
    };
    state.attachments.forget_vanished()?;
    tracing::info!(attach_mode = %mode, uplink_hook = %cfg.uplink_hook, "dataplane loaded");
    Ok((state, inject))
}

/// The address and route watches, the sweep of what an earlier run left
/// attached, and the slow path's socket.
fn start_background(
    cfg: &DataplaneConfig,
    state: &Arc<Mutex<State>>,
    slow: &Ensured,
) -> Result<(Vec<Background>, Option<Arc<slow_path::SlowPathCounters>>)> {
    let addresses = address_watch::NodeAddressSet::default();
    let mut background = vec![
        address_watch::start(
            state.clone(),
            cfg.container_bridge.clone(),
            addresses.clone(),
        )?,
        route_watch::start(state.clone())?,
    ];
    {
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        // What an earlier run left on interfaces that neither carry the
        // uplink nor a node address now (the uplink moved while NetManager
        // was down): swept only after the address watch took over the
        // receive interfaces, so none of those goes without the program.
        s.attachments.sweep(UPLINK_PROGRAM)?;
        // XDP links of interfaces no longer used, or all of them when the
        // hook is TC now.
        s.attachments.sweep_xdp()?;
    }
    let slow_counters = match slow_path::open_socket(cfg.tunnel_port) {
        Ok(socket) => {
            let counters = Arc::new(slow_path::SlowPathCounters::default());
            let path = slow_path::SlowPath {
                socket,
                tunnel_port: cfg.tunnel_port,
                reinjector: misses::Reinjector::open(slow_path::SLOW_PAIR.name)?,
                peer_mac: slow.peer_mac,
                addresses,
                counters: counters.clone(),
            };
            background.push(Background::spawn("oak-slow-path", move || path.run())?);
            Some(counters)
        }
        // The fast path works without it; fragmented datagrams, IP
        // options and interfaces without the program do not.
        Err(e) => {
            tracing::error!(
                "slow path off: cannot listen on UDP port {}: {e}",
                cfg.tunnel_port
            );
            None
        }
    };
    Ok((background, slow_counters))
}
