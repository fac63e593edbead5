//! Shared harness for the root-only tests: the namespace testbed (from
//! xtask, shared with the benchmarks), the end-to-end sandbox helpers, and
//! where the binaries built alongside the tests live.

pub mod e2e;

use std::path::PathBuf;

pub use worker_common::privileges::is_root;
pub use xtask::sandbox::procs::{ns_sh, sh};
pub use xtask::testbed::{Container, Lab};

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
