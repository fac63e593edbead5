use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;

use netmanager::cli::{self, Cli, Command};
use netmanager::registration::Daemon;

fn main() -> ExitCode {
    let args = Cli::parse();
    let result = match &args.command {
        Some(Command::Version) => {
            println!("NetManager {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Some(Command::Logs) => {
            let path = args
                .effective_log_file()
                .unwrap_or_else(|| netmanager::config::DEFAULT_LOG_PATH.into());
            cli::follow_log(&path)
        }
        Some(Command::Status) => runtime().and_then(|rt| rt.block_on(cli::status(&args.socket))),
        None => runtime().and_then(|rt| rt.block_on(run_daemon(&args))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("NetManager: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The daemon: restore, serve the API until SIGTERM/SIGINT, leave the
/// dataplane in place for the next start.
async fn run_daemon(args: &Cli) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!(
            "the NetManager daemon must run as root (it configures interfaces and loads eBPF)"
        );
    }
    let settings = args.settings()?;
    cli::init_logging(settings.net.debug, settings.log_path.as_deref())?;
    netmanager::kernel_support::check()?;
    tracing::info!(
        config = %settings.config_path.display(),
        socket = %settings.socket_path.display(),
        bpf_dir = %settings.bpf_dir.display(),
        state = %settings.state_path.display(),
        mtu = settings.tunnel_mtu,
        "NetManager {} starting",
        env!("CARGO_PKG_VERSION")
    );
    let socket = settings.socket_path.clone();
    let daemon = Arc::new(Daemon::new(settings));
    if let Err(e) = daemon.restore().await {
        // Keep serving: the NodeEngine registers again and deployments can be redone.
        tracing::error!("could not restore the previous state: {e:#}");
    }
    let listener = netmanager::api::bind(&socket)?;
    tracing::info!(socket = %socket.display(), "listening");
    let server = tokio::spawn(netmanager::api::serve(daemon.clone(), listener));
    shutdown_signal().await;
    tracing::info!("stopping; containers, bridge and dataplane stay in place for the next start");
    server.abort();
    daemon.shutdown().await;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers run until killed.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
