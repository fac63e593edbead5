//! The stop signal: SIGTERM and SIGINT sent to this test process are
//! caught (the process survives) and told apart. Its own test binary, so
//! no other test shares the signal handlers.

use worker_common::shutdown::{StopSignal, StopSignals};

fn send(sig: i32) {
    // SAFETY: kill(2) on our own process, whose handler for `sig` is installed.
    assert_eq!(unsafe { libc::kill(libc::getpid(), sig) }, 0);
}

#[tokio::test]
async fn sigterm_and_sigint_are_stop_requests() {
    let mut signals = StopSignals::install().expect("install handlers");
    send(libc::SIGTERM);
    assert_eq!(signals.recv().await, StopSignal::Terminate);
    send(libc::SIGINT);
    assert_eq!(signals.recv().await, StopSignal::Interrupt);
}
