//! Support for the end-to-end and namespace tests of the whole worker: the
//! end-to-end sandbox helpers (on the test kit and xtask's sandbox), and
//! where the binaries built alongside the tests live.

pub mod e2e;
pub mod floor;

use std::path::PathBuf;

/// Path of a binary built alongside the tests.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .map(PathBuf::from)
        .unwrap_or_default();
    dir.join(name)
}
