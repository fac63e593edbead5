//! `nodeengined`: the worker daemon. It reads only the configuration file.

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
#[command(name = "nodeengined", version, about = "Oakestra NodeEngine daemon")]
struct Args {
    /// Configuration file (default: $OAKESTRA_CONF or /etc/oakestra/conf.json)
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
}

fn main() {
    let args = Args::parse();
    nodeengine::daemon::init_logging();
    let path = nodeengine::config::conf_path(args.config.as_deref());
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nodeengined: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(nodeengine::daemon::run(path)) {
        tracing::error!("{e:#}");
        eprintln!("nodeengined: {e:#}");
        std::process::exit(1);
    }
}
