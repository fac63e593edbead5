use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;

use netmanager::cli::{self, Cli, Command, ConfigCommand};
use netmanager::registration::Daemon;

fn main() -> ExitCode {
    let args = Cli::parse();
    let result = match &args.command {
        Some(Command::Version) => {
            println!("NetManager {}", worker_common::version::VERSION);
            Ok(())
        }
        Some(Command::Logs) => args.follow_logs(),
        Some(Command::Status) => {
            runtime().and_then(|rt| rt.block_on(cli::status(&args.socket_path())))
        }
        Some(Command::Config(ConfigCommand::Check { broker })) => runtime()
            .and_then(|rt| rt.block_on(netmanager::config_check::run(&args, broker.as_deref()))),
        Some(Command::Teardown { dry_run }) => {
            runtime().and_then(|rt| rt.block_on(netmanager::teardown::run(&args, *dry_run)))
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
    let sink = worker_common::logging::init(&args.log_options(settings.net.debug))?;
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
        uplink_hook = %settings.uplink_hook,
        xdp_mode = %settings.xdp_mode,
        log = ?sink,
        "NetManager {} starting",
        worker_common::version::VERSION
    );
    let socket = settings.socket_path.clone();
    let socket_for_probe = socket.clone();
    let daemon = Arc::new(Daemon::new(settings));
    if let Err(e) = daemon.restore().await {
        // Keep serving: the NodeEngine registers again and deployments can be redone.
        tracing::error!("could not restore the previous state: {e:#}");
    }
    let listener = netmanager::api::bind(&socket)?;
    tracing::info!(socket = %socket.display(), "listening");
    let server = tokio::spawn(netmanager::api::serve(daemon.clone(), listener));
    let metrics = serve_metrics(&args.metrics_address, daemon.clone()).await;
    // The socket is bound and served: requests from now on are answered.
    // Readiness never waits for nodeengined (its unit is ordered after ours).
    worker_common::systemd::ready(&format!("serving {}", socket.display()));
    let _watchdog = worker_common::systemd::spawn_watchdog(move || {
        netmanager::api::probe(socket_for_probe.clone())
    });
    worker_common::shutdown::stop_signal().await;
    worker_common::systemd::stopping();
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
    let app = netmanager::api::metrics_router(daemon);
    worker_common::metrics::serve(address, app).await
}
