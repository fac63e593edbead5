//! Library half of xtask: the sandbox (a whole Oakestra cluster on one
//! machine, built from the test kit), shared by `cargo xtask sandbox`, the
//! benchmark and the end-to-end tests.

pub mod debian_kernel;
pub mod sandbox;
