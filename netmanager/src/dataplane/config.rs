//! What the dataplane is opened with: map sizes and the node's settings,
//! built by NetManager from netcfg.json, tuncfg.json and the command line.

use std::net::IpAddr;
use std::path::PathBuf;

use super::{AttachMode, UplinkHook, XdpMode};

/// Map sizes (max entries).
#[derive(Debug, Clone)]
pub struct MapSizes {
    pub flows: u32,
    pub services: u32,
    pub backends: u32,
    pub instances: u32,
    pub pending: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        MapSizes {
            flows: netmanager_common::DEFAULT_FLOWS,
            services: netmanager_common::DEFAULT_SERVICES,
            backends: netmanager_common::DEFAULT_BACKENDS,
            instances: netmanager_common::DEFAULT_INSTANCES,
            pending: netmanager_common::DEFAULT_PENDING,
        }
    }
}

/// Everything needed to load (or adopt) the dataplane.
#[derive(Debug, Clone)]
pub struct DataplaneConfig {
    /// bpffs directory for pinned maps and links, e.g. /sys/fs/bpf/oakestra
    pub pin_dir: PathBuf,
    /// Uplink interface name (tunnel traffic in and out). Empty: attach
    /// nothing and create no reinjection device (packet tests).
    pub uplink: String,
    /// The address this node advertises (`NodePublicAddress`, or the
    /// uplink's own), IPv4 or IPv6: the outer source when the node owns it.
    pub node_ip: IpAddr,
    /// Tunnel UDP port the node listens on and sends from (50103; what it
    /// advertises may differ behind NAT).
    pub tunnel_port: u16,
    /// Tunnel MTU (1450).
    pub tunnel_mtu: u16,
    /// Service address ranges (address, prefix length), v4 and v6.
    pub service_ranges: Vec<(IpAddr, u8)>,
    pub sizes: MapSizes,
    /// Packets held per unknown address while it is resolved.
    pub miss_hold: u32,
    /// The container bridge: its addresses are the containers' gateways,
    /// never tunnel endpoints ("" for none).
    pub container_bridge: String,
    /// TCX links, classic tc filters, or whichever this kernel has.
    pub attach_mode: AttachMode,
    /// TC alone on the uplink, or XDP in front of it.
    pub uplink_hook: UplinkHook,
    /// Native or generic XDP (with the XDP hook), or native where it can.
    pub xdp_mode: XdpMode,
    /// Underlay prefixes (address, prefix length) trusted to send tunnel
    /// datagrams for any instance (netcfg.json `TunnelPeers`).
    pub trusted_peers: Vec<(IpAddr, u8)>,
    /// Most flows one container may hold; 0: a quarter of the flow table.
    pub flows_per_container: u32,
}

impl DataplaneConfig {
    /// The per-container flow limit in force.
    pub fn flows_per_container(&self) -> u32 {
        match self.flows_per_container {
            0 => netmanager_common::default_flows_per_container(self.sizes.flows),
            n => n,
        }
    }
}
