//! Attaching programs through TCX links pinned in bpffs.
//!
//! A pinned link outlives NetManager: traffic keeps flowing while it is down,
//! and the next NetManager swaps its freshly loaded program into the same
//! link (an atomic replace) instead of detaching and reattaching.

use std::io;
use std::path::PathBuf;

use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::tc::TcAttachOptions;
use aya::programs::tc::{SchedClassifierLink, SchedClassifierLinkId};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use aya::sys::SyscallError;

use super::{DataplaneError, Result};

pub struct Attachments {
    dir: PathBuf,
    /// (program, interface) pairs attached by this process.
    attached: Vec<(String, String)>,
}

impl Attachments {
    pub fn new(dir: PathBuf) -> Attachments {
        Attachments {
            dir,
            attached: Vec::new(),
        }
    }

    fn pin_path(&self, program: &str, ifname: &str) -> PathBuf {
        self.dir.join(format!("{program}@{ifname}"))
    }

    /// Attaches `prog` on the ingress of `ifname`, adopting a pinned link
    /// from an earlier run when there is one.
    pub fn attach(
        &mut self,
        prog: &mut SchedClassifier,
        program: &str,
        ifname: &str,
    ) -> Result<()> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| DataplaneError::bpf(format!("creating {}", self.dir.display()), e))?;
        let path = self.pin_path(program, ifname);
        let what = || format!("attaching {program} to {ifname}");
        let link_id = match adopt(prog, &path) {
            Some(id) => id,
            None => {
                // Nothing (usable) pinned: a fresh link. A stale pin of a
                // link whose interface is gone is replaced.
                let _ = std::fs::remove_file(&path);
                prog.attach_with_options(
                    ifname,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(|e| DataplaneError::bpf(what(), e))?
            }
        };
        let link = prog
            .take_link(link_id)
            .map_err(|e| DataplaneError::bpf(what(), e))?;
        let fd_link: FdLink = link
            .try_into()
            .map_err(|e: LinkError| DataplaneError::bpf(what(), e))?;
        // Re-pinning an adopted link at its own path fails with EEXIST;
        // the existing pin already keeps it alive.
        if !path.exists() {
            fd_link
                .pin(&path)
                .map_err(|e| DataplaneError::bpf(format!("pinning {}", path.display()), e))?;
        }
        self.remember(program, ifname);
        Ok(())
    }

    /// Detaches by removing the pin (the last reference to the link).
    pub fn detach(&mut self, program: &str, ifname: &str) -> Result<()> {
        let path = self.pin_path(program, ifname);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(DataplaneError::bpf(
                    format!("removing {}", path.display()),
                    e,
                ));
            }
        }
        self.attached
            .retain(|(p, i)| !(p == program && i == ifname));
        Ok(())
    }

    fn remember(&mut self, program: &str, ifname: &str) {
        if !self
            .attached
            .iter()
            .any(|(p, i)| p == program && i == ifname)
        {
            self.attached
                .push((program.to_string(), ifname.to_string()));
        }
    }

    /// (program, interface, hook) of every attachment this process made.
    pub fn list(&self) -> Vec<(String, String, String)> {
        self.attached
            .iter()
            .map(|(p, i)| (p.clone(), i.clone(), "tcx/ingress".to_string()))
            .collect()
    }
}

/// Swaps `prog` into the link pinned at `path`, if there is one that still
/// has an interface.
fn adopt(prog: &mut SchedClassifier, path: &std::path::Path) -> Option<SchedClassifierLinkId> {
    let old = match PinnedLink::from_pin(path) {
        Ok(old) => old,
        Err(LinkError::SyscallError(SyscallError { io_error, .. }))
            if io_error.kind() == io::ErrorKind::NotFound =>
        {
            return None;
        }
        Err(e) => {
            tracing::warn!("ignoring unusable pinned link {}: {e}", path.display());
            return None;
        }
    };
    let link: SchedClassifierLink = FdLink::from(old).try_into().ok()?;
    match prog.attach_to_link(link) {
        Ok(id) => Some(id),
        Err(e) => {
            tracing::warn!("pinned link {} could not be reused: {e}", path.display());
            None
        }
    }
}
