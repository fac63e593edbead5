//! What NodeEngine, NetManager, xtask and the tests share, so each fact and
//! each piece of plumbing is written once:
//!
//! - the NetManager socket API (`netmanager_api`), task ids and job names
//!   (`task_id`), default paths (`paths`), lenient readers for documents that
//!   come from the cluster (`lenient`);
//! - TLS client setup (`tls`), the HTTP client (`http`), logging and log
//!   following (`logging`), the stop signal (`shutdown`), retry pacing
//!   (`backoff`), the root check (`privileges`), `config check` reports
//!   (`check`), command-line pieces (`args`), life under systemd
//!   (`systemd`: unit names, readiness, watchdog), what `--version`
//!   says (`version`) and the metrics and health listener (`metrics`).

pub mod args;
pub mod backoff;
pub mod check;
pub mod http;
pub mod lenient;
pub mod logging;
pub mod metrics;
pub mod netmanager_api;
pub mod paths;
pub mod privileges;
pub mod shutdown;
pub mod systemd;
pub mod task_id;
pub mod tls;
pub mod version;
