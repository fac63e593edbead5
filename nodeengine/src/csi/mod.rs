//! CSI volumes, as upstream's NodeEngine provides them: the drivers listed in
//! conf.json (`csi_drivers`, edited with `NodeEngine config csi`) are probed
//! over their unix sockets and only those that answer are advertised
//! ([`registry`]); a job's `volumes` are staged and published through their
//! driver's Node service ([`plugin`]) and bind-mounted into the container
//! ([`volumes`]). A volume that cannot be provided fails the deploy with a
//! reason naming the volume and its driver.

pub mod plugin;
pub mod registry;
pub mod volumes;

pub use registry::Registry;
pub use volumes::{MountedVolume, VolumeManager, VolumeRequest};
