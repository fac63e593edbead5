//! Oakestra NetManager: the node-local half of the Oakestra overlay, with the
//! per-packet work done by eBPF programs (`dataplane`) and everything else --
//! local API, container plumbing, cluster protocol, route tables -- here.

pub mod address_watch;
pub mod addresses;
pub mod api;
pub mod cli;
pub mod cluster_link;
pub mod config;
pub mod dataplane;
pub mod forwarding;
pub mod misses;
pub mod node;
pub mod plumbing;
pub mod services;
pub mod state;
