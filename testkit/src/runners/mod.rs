//! The processes under test: NetManager, nodeengined, and a containerd.

pub mod containerd;
pub mod netmanager;
pub mod nodeengine;

pub use containerd::Containerd;
pub use netmanager::{NetManager, NetManagerBuilder, upstream_netcfg};
pub use nodeengine::{NodeEngine, NodeEngineBuilder};
