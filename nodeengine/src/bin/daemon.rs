//! `nodeengined`: the worker daemon.

use clap::Parser;
use nodeengine::daemon::DaemonArgs;
use worker_common::logging::{self, LogOptions};

fn main() {
    let args = DaemonArgs::parse();
    // Under systemd the journal, else stderr (`NodeEngine -a -d` appends it
    // to the log file): one copy of each line either way.
    let logs = LogOptions {
        filter: args.log_filter.clone(),
        args: args.log.clone(),
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
