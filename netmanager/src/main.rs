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
            worker_common::logging::follow(&path).map_err(Into::into)
        }
        Some(Command::Status) => {
            runtime().and_then(|rt| rt.block_on(cli::status(&args.socket_path())))
        }
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
    worker_common::privileges::require_root(
        "the NetManager daemon",
        "it configures interfaces and loads eBPF",
    )?;
    let settings = args.settings()?;
    worker_common::logging::init(&args.log_options(settings.net.debug))?;
    let kernel = netmanager::kernel_support::check()?;
    // An impossible --attach-mode fails here, not at the first /register.
    let attach_mode = settings.attach_mode.resolve(kernel.tcx)?;
    tracing::info!(
        config = %settings.config_path.display(),
        socket = %settings.socket_path.display(),
        bpf_dir = %settings.bpf_dir.display(),
        state = %settings.state_path.display(),
        mtu = settings.tunnel_mtu,
        tunnel_port = settings.tunnel_port,
        %attach_mode,
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
    let metrics = serve_metrics(&args.metrics_address, daemon.clone()).await;
    worker_common::shutdown::stop_signal().await;
    tracing::info!("stopping; containers, bridge and dataplane stay in place for the next start");
    server.abort();
    if let Some(m) = metrics {
        m.abort();
    }
    daemon.shutdown().await;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

/// The metrics/health listener; a failure to bind is logged, not fatal (the
/// API socket is what NodeEngine needs).
async fn serve_metrics(address: &str, daemon: Arc<Daemon>) -> Option<tokio::task::JoinHandle<()>> {
    if address.is_empty() || address == "off" {
        return None;
    }
    let listener = match tokio::net::TcpListener::bind(address).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(address, "metrics listener not started: {e}");
            return None;
        }
    };
    tracing::info!(address, "serving /metrics, /healthz and /readyz");
    let app = netmanager::api::metrics_router(daemon);
    Some(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!("metrics listener: {e}");
        }
    }))
}
