//! The stop request of a daemon: SIGTERM (systemd, `kill`) or SIGINT (Ctrl-C).

use tokio::signal::unix::{Signal, SignalKind, signal};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    Terminate,
    Interrupt,
}

impl StopSignal {
    pub fn name(self) -> &'static str {
        match self {
            StopSignal::Terminate => "SIGTERM",
            StopSignal::Interrupt => "SIGINT",
        }
    }
}

/// Handlers for both signals. Installed at creation, so a signal that
/// arrives before the first `recv` is not lost (and does not kill us).
pub struct StopSignals {
    term: Signal,
    int: Signal,
}

impl StopSignals {
    /// Needs a tokio runtime.
    pub fn install() -> std::io::Result<StopSignals> {
        Ok(StopSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// The next stop request.
    pub async fn recv(&mut self) -> StopSignal {
        let got = tokio::select! {
            _ = self.term.recv() => StopSignal::Terminate,
            _ = self.int.recv() => StopSignal::Interrupt,
        };
        tracing::info!("{} received, stopping", got.name());
        got
    }
}

/// Resolves on the first SIGTERM or SIGINT. Without signal handlers only
/// Ctrl-C can stop the daemon; if even that cannot be watched, it runs
/// until killed.
pub async fn stop_signal() -> StopSignal {
    match StopSignals::install() {
        Ok(mut s) => s.recv().await,
        Err(e) => {
            tracing::warn!("cannot watch SIGTERM/SIGINT ({e}); only Ctrl-C stops this process");
            match tokio::signal::ctrl_c().await {
                Ok(()) => StopSignal::Interrupt,
                Err(_) => std::future::pending().await,
            }
        }
    }
}
