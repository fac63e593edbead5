//! `nodeengined`: the worker daemon.

use clap::Parser;
use nodeengine::daemon::DaemonArgs;
use worker_common::logging::{self, LogOptions};

fn main() {
    let args = DaemonArgs::parse();
    // The systemd unit appends stderr to the log file.
    let logs = LogOptions {
        filter: args.log_filter.clone(),
        ..LogOptions::default()
    };
    if let Err(e) = logging::init(&logs) {
        eprintln!("nodeengined: {e}");
        std::process::exit(1);
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nodeengined: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(nodeengine::daemon::run(args)) {
        tracing::error!("{e:#}");
        eprintln!("nodeengined: {e:#}");
        std::process::exit(1);
    }
}
