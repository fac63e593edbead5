//! Library half of xtask: the sandbox (a whole Oakestra cluster on one
//! machine), shared by `cargo xtask sandbox` and the end-to-end tests.

pub mod debian_kernel;
pub mod sandbox;
pub mod testbed;
