//! Oakestra NetManager: the node-local half of the Oakestra overlay, with the
//! per-packet work done by eBPF programs (`dataplane`) and everything else
//! here. docs/architecture.md shows how the modules fit together:
//!
//! - `api` serves the local socket and hands requests to `registration`,
//!   which holds the one live `node` and its `supervisor` (background tasks).
//! - A `node` wires `cluster_link` (MQTT), `forwarding` (the dataplane),
//!   `local` (instances on this node), `routes` (table results as map
//!   entries), `resolver` (queries, interests, misses) and `deployer`
//!   (plumbing, NAT, persistence) together.
//! - `config_check` and `teardown` are operator commands
//!   (docs/operations.md): `NetManager config check` and `NetManager teardown`.

pub mod addresses;
pub mod api;
pub mod cli;
pub mod cluster_link;
pub mod config;
pub mod config_check;
pub mod dataplane;
pub mod deployer;
pub mod error;
pub mod ethtool;
pub mod forwarding;
pub mod kernel_support;
pub mod local;
pub mod metrics;
pub mod node;
pub mod plumbing;
pub mod registration;
pub mod resolver;
pub mod routes;
pub mod state;
pub mod status;
pub mod supervisor;
pub mod teardown;
pub mod uplink;
