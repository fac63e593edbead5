//! The only code that touches the eBPF programs and maps.
//!
//! [`Dataplane::open`] loads the programs embedded at build time, creates the
//! maps pinned under the configured bpffs directory -- or adopts them when a
//! previous NetManager left them there -- and attaches through pinned TCX
//! links or classic tc filters (`attach`), so a restart replaces programs
//! atomically and never flushes state.
//! Everything else is a typed operation on those maps, through `&self`: one
//! mutex inside guards the loaded object (aya needs `&mut` to attach), the
//! map handles and the attachment list; map updates are short syscalls.
//! With an uplink, two threads of its own follow the node's addresses
//! (`address_watch`) and serve the slow-path socket (`slow_path`).

mod addr;
mod address_watch;
mod attach;
mod attach_mode;
mod background;
mod checksum;
mod config;
mod devices;
mod inspect;
mod loader;
mod misses;
mod open;
mod pins;
mod route_watch;
mod slow_path;
mod slow_path_frame;
mod tables;
mod underlay;
mod uplink_hook;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use aya::Ebpf;

pub use attach::{AttachMode, TC_PRIORITY, recorded_filters, remove_recorded_filter};
pub use config::{DataplaneConfig, MapSizes};
pub use inspect::DataplaneStatus;
pub use misses::{INJECT_DEVICE, MissReceiver};
pub use netmanager_common::{MAP_NAMES, MissReason, ServiceKind};
pub use slow_path::SlowPathStatus;
pub use uplink_hook::{UplinkHook, XdpMode};

use attach::Attachments;
use background::Background;
use loader::{program_mut, xdp_program_mut};
use tables::Tables;
use underlay::UnderlayState;

/// The programs, built from `netmanager-ebpf/` and embedded by build.rs.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netmanager.bpf.o"));

/// Program attached on the host end of every container veth (and the
/// reinjection device).
pub const CONTAINER_PROGRAM: &str = "container_egress";
/// Program attached on the uplink and every other Ethernet interface that
/// carries one of the node's addresses.
pub const UPLINK_PROGRAM: &str = "uplink_ingress";
/// Program attached on the far end of the slow-path device.
pub const SLOW_PATH_PROGRAM: &str = "slow_path_ingress";
/// XDP program in front of [`UPLINK_PROGRAM`] wherever that is attached,
/// with `--uplink-hook xdp`.
pub const UPLINK_XDP_PROGRAM: &str = "uplink_xdp";
/// Every program of the object, each loaded at start (the XDP one too,
/// whatever the hook: the packet fixtures run it).
pub const PROGRAMS: [&str; 4] = [
    CONTAINER_PROGRAM,
    UPLINK_PROGRAM,
    SLOW_PATH_PROGRAM,
    UPLINK_XDP_PROGRAM,
];

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("{context}: {source}")]
    Bpf {
        context: String,
        #[source]
        source: anyhow::Error,
    },
    #[error("{0}")]
    Other(String),
}

impl DataplaneError {
    fn bpf(context: impl Into<String>, source: impl Into<anyhow::Error>) -> Self {
        DataplaneError::Bpf {
            context: context.into(),
            source: source.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, DataplaneError>;

/// A container on this node, as the dataplane needs to know it.
#[derive(Debug, Clone, Copy)]
pub struct LocalPort {
    /// ifindex of the host end of the container's veth
    pub ifindex: u32,
    /// MAC of the container end
    pub mac: [u8; 6],
}

/// One INSTANCES entry, keyed by namespace IP.
#[derive(Debug, Clone, Copy)]
pub struct InstanceEntry {
    /// The instance's own instance_ip (same family as the ns ip); None while unknown.
    pub instance_ip: Option<IpAddr>,
    /// Underlay address of its node, IPv4 or IPv6.
    pub node_ip: IpAddr,
    pub node_port: u16,
    /// Some for containers on this node.
    pub local: Option<LocalPort>,
}

#[derive(Debug, Clone)]
pub struct Miss {
    pub reason: MissReason,
    /// Service address, the sender's namespace address, or (`Peer`) the
    /// inner source of a tunnel datagram.
    pub addr: IpAddr,
    /// `Peer`: the outer source of the datagram, i.e. who sent it.
    pub peer: Option<IpAddr>,
    /// The interface the packet came in on: for a container's miss, its
    /// veth, which is what bounds one container's share of the lookups.
    pub ifindex: u32,
    /// The held Ethernet frame, to pass back to `reinject` (`reinject_tunnel`
    /// for `Peer`) once resolved.
    pub frame: Option<Vec<u8>>,
}

pub struct Dataplane {
    /// Stopped (and joined) before anything else goes: they use the state.
    _background: Vec<Background>,
    /// The one lock: everything that needs `&mut` or must not interleave.
    state: Arc<Mutex<State>>,
    /// Send on their own packet sockets; need no lock.
    reinjector: Option<misses::Reinjector>,
    tunnel_reinjector: Option<TunnelReinjector>,
    slow_path: Option<Arc<slow_path::SlowPathCounters>>,
}

/// Writes held tunnel datagrams into the slow-path device.
struct TunnelReinjector {
    socket: misses::Reinjector,
    /// MAC of the device's far end, where `slow_path_ingress` runs.
    peer_mac: [u8; 6],
}

fn no_reinjection() -> DataplaneError {
    DataplaneError::Other("no reinjection device (dataplane opened without an uplink)".into())
}

struct State {
    /// What CONFIG holds; the uplink and node address change at run time.
    cfg: DataplaneConfig,
    ebpf: Ebpf,
    tables: Tables,
    attachments: Attachments,
    misses: Option<misses::MissSource>,
    underlay: UnderlayState,
    /// Interfaces besides the uplink the receive program was attached to.
    receive_interfaces: BTreeSet<String>,
}

impl Dataplane {
    /// The advertised node address changed.
    pub fn set_node_ip(&self, ip: IpAddr) -> Result<()> {
        let mut state = self.lock();
        let State {
            cfg,
            tables,
            underlay,
            ..
        } = &mut *state;
        cfg.node_ip = ip;
        underlay.advertised = ip;
        tables.write_config(cfg, underlay)
    }

    /// The default route moved to `ifname` (or `ifname` was created anew):
    /// the uplink program is attached there before anything leaves the old
    /// uplink, the outer source prefers `ifname`'s addresses, and `ip` is
    /// the advertised address. The old uplink keeps the program while it
    /// still carries a node address (it receives, like any such interface).
    pub fn set_uplink(&self, ifname: &str, ip: IpAddr) -> Result<()> {
        let mut state = self.lock();
        let ifindex = tables::ifindex(ifname)?;
        let old = state.cfg.uplink.clone();
        state.attach(UPLINK_PROGRAM, ifname)?;
        state.receive_interfaces.remove(ifname);
        let State {
            cfg,
            tables,
            underlay,
            ..
        } = &mut *state;
        cfg.uplink = ifname.to_string();
        cfg.node_ip = ip;
        underlay.advertised = ip;
        underlay.uplink_ifindex = ifindex;
        tables.write_config(cfg, underlay)?;
        if old == ifname || old.is_empty() {
            return Ok(());
        }
        let old_receives = tables::ifindex(&old)
            .map(|i| state.underlay.addresses.values().any(|a| *a == i))
            .unwrap_or(false);
        if old_receives {
            state.receive_interfaces.insert(old);
        } else {
            state.attachments.detach(UPLINK_PROGRAM, &old)?;
        }
        Ok(())
    }

    /// The node's addresses (address, ifindex). A dataplane with an uplink
    /// follows them by itself; without one (packet tests, benchmarks) this
    /// says what they are.
    pub fn set_node_addresses(&self, addresses: &[(IpAddr, u32)]) -> Result<()> {
        let mut state = self.lock();
        let State {
            cfg,
            tables,
            underlay,
            ..
        } = &mut *state;
        underlay.addresses = addresses.iter().copied().collect();
        tables.sync_node_addresses(&underlay.addresses)?;
        tables.write_config(cfg, underlay)
    }

    /// Attach the container-side program to a container veth (host end).
    pub fn attach_container(&self, host_ifname: &str) -> Result<()> {
        self.lock().attach(CONTAINER_PROGRAM, host_ifname)
    }

    pub fn detach_container(&self, host_ifname: &str) -> Result<()> {
        self.lock()
            .attachments
            .detach(CONTAINER_PROGRAM, host_ifname)
    }

    pub fn upsert_instance(&self, ns_ip: IpAddr, entry: InstanceEntry) -> Result<()> {
        self.lock().tables.upsert_instance(ns_ip, &entry)
    }

    pub fn remove_instance(&self, ns_ip: IpAddr) -> Result<()> {
        self.lock().tables.remove_instance(ns_ip)
    }

    /// Replace the backend list of a service address atomically. `backends`
    /// are namespace IPs (same family as `service_ip`), nearest first for Closest.
    pub fn upsert_service(
        &self,
        service_ip: IpAddr,
        kind: ServiceKind,
        backends: &[IpAddr],
    ) -> Result<()> {
        self.lock()
            .tables
            .upsert_service(service_ip, kind, backends)
    }

    pub fn remove_service(&self, service_ip: IpAddr) -> Result<()> {
        self.lock().tables.remove_service(service_ip)
    }

    /// Take the miss stream (once).
    pub fn misses(&self) -> Result<MissReceiver> {
        self.lock()
            .misses
            .take()
            .ok_or_else(|| DataplaneError::Other("the miss stream was already taken".into()))?
            .into_receiver()
    }

    /// Send a held container frame through the container program again.
    pub fn reinject(&self, frame: &[u8]) -> Result<()> {
        self.reinjector
            .as_ref()
            .ok_or_else(no_reinjection)?
            .send(frame)
    }

    /// Send a held tunnel datagram through the receive path again (the
    /// slow-path device's program), addressed to that device like the slow
    /// path's own frames.
    pub fn reinject_tunnel(&self, frame: &[u8]) -> Result<()> {
        let r = self.tunnel_reinjector.as_ref().ok_or_else(no_reinjection)?;
        let mut frame = frame.to_vec();
        if let Some(dst) = frame.get_mut(..6) {
            dst.copy_from_slice(&r.peer_mac);
        }
        r.socket.send(&frame)
    }

    /// Forget the pending marker for an address (resolved or failed).
    pub fn resolved(&self, addr: IpAddr) -> Result<()> {
        self.lock().tables.clear_pending(addr)
    }

    /// Remove flows idle for more than 60 s; returns how many.
    pub fn expire_flows(&self) -> Result<usize> {
        self.expire_flows_after(0)
    }

    /// [`expire_flows`](Self::expire_flows) as it will be `ns` from now
    /// (tests and tools; the daemon passes 0).
    pub fn expire_flows_after(&self, ns: u64) -> Result<usize> {
        self.lock()
            .tables
            .expire_flows(addr::monotonic_ns().saturating_add(ns))
    }

    /// A panic while the lock was held leaves nothing half-done that matters:
    /// each map write is one syscall, and a service's new backend slice only
    /// goes live with its `SERVICES` entry. So carry on rather than fail
    /// every later call.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl State {
    /// Attaches `program` to `ifname`; the uplink program with the XDP
    /// program in front of it when the hook is XDP.
    fn attach(&mut self, program: &str, ifname: &str) -> Result<()> {
        let prog = program_mut(&mut self.ebpf, program)?;
        self.attachments.attach(prog, program, ifname)?;
        if program == UPLINK_PROGRAM && self.cfg.uplink_hook.uses_xdp() {
            let xdp = xdp_program_mut(&mut self.ebpf, UPLINK_XDP_PROGRAM)?;
            let driver = crate::ethtool::driver(ifname)
                .map_err(|e| tracing::debug!(interface = %ifname, "{e:#}"))
                .ok();
            let wanted = self
                .cfg
                .xdp_mode
                .on_interface(self.cfg.uplink_hook, driver.as_deref());
            let mode = self.attachments.attach_xdp(xdp, ifname, wanted)?;
            tracing::debug!(interface = %ifname, xdp_mode = %mode, "XDP program attached");
        }
        Ok(())
    }
}
