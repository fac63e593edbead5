//! Work the dataplane does on its own -- following the node's addresses,
//! serving the slow-path socket -- each on a thread with a single-threaded
//! runtime, so the dataplane works the same inside the daemon's runtime, in
//! a plain `main` and in tests. Stopped and joined on drop.

use std::future::Future;
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use super::{DataplaneError, Result};

pub struct Background {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Background {
    /// Runs the future `task()` builds (on the new thread, so it need not be
    /// `Send`) until it ends or the `Background` is dropped.
    pub fn spawn<F, Fut>(name: &str, task: F) -> Result<Background>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        let (stop, stopped) = oneshot::channel::<()>();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| DataplaneError::bpf(format!("starting the {name} runtime"), e))?;
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                rt.block_on(async move {
                    tokio::select! {
                        _ = stopped => {}
                        () = task() => {}
                    }
                })
            })
            .map_err(|e| DataplaneError::bpf(format!("starting the {name} thread"), e))?;
        Ok(Background {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
