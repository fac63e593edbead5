//! The one test kit of the worker, shared by the tests of every crate, the
//! sandbox (`cargo xtask sandbox`) and the benchmark (`cargo xtask bench`):
//!
//! - [`harness`]: tests declare what they need of the machine; a missing
//!   prerequisite reads as *ignored, not run*, never as passed, and fails
//!   the test under `OAK_REQUIRE_ALL=1` (CI);
//! - [`netns`], [`netlink`], [`topology`]: network namespaces, links,
//!   addresses and routes through netlink, an underlay with node and
//!   container namespaces -- all removed by their guards, also on panic;
//! - [`broker`]: a mosquitto per test (optionally TLS with a password,
//!   certificates from [`pki`]); [`cluster`]: the one cluster double
//!   (cluster manager and cluster service manager);
//! - [`runners`]: NetManager, nodeengined and containerd processes;
//!   [`image`]: the offline busybox container image;
//! - [`process`], [`bpffs`], [`mounts`]: child processes, pin directories
//!   and mount points that clean up after themselves; [`metrics`]:
//!   Prometheus output through the reference parser.
//!
//! How to write a test with it: `testkit/README.md`.

pub mod bpffs;
pub mod broker;
pub mod cluster;
pub mod fixtures;
pub mod harness;
pub mod image;
pub mod metrics;
pub mod mounts;
pub mod netlink;
pub mod netns;
pub mod pki;
pub mod process;
pub mod runners;
pub mod topology;

pub use bpffs::PinDir;
pub use broker::{BrokerSecurity, Endpoint, Mosquitto};
pub use cluster::{ClusterDouble, ClusterOptions, JobSpec, MqttLogin};
pub use harness::{Need, block_on, runtime};
pub use netlink::{Cidr, LinkSettings, Route};
pub use netns::{Netns, NsPath, unique};
pub use pki::Pki;
pub use process::{Proc, path_with, sh, wait_for, wait_until, write_script};
pub use runners::{Containerd, NetManager, NodeEngine};
pub use topology::{Container, ContainerProcess, Node, Underlay};

/// A temporary directory, removed with everything in it on drop.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("oak-test-")
        .tempdir()
        .expect("a temporary directory")
}

/// This machine's hostname (the one a nodeengined without a UTS namespace
/// of its own registers with).
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The directories directly inside `dir` (none when it cannot be read).
pub fn subdirs(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default()
}
