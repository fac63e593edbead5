//! Attaching the programs to interfaces, in one of two modes, so that a
//! restarted NetManager takes over without a dropped packet.
//!
//! - **TCX** (Linux 6.6): a bpf link per (program, interface), pinned in
//!   bpffs at `<pin dir>/links/<program>@<interface>`. The pin outlives
//!   NetManager; the next one swaps its freshly loaded program into the same
//!   link (`BPF_LINK_UPDATE`, atomic).
//! - **netlink** (classic tc, any supported kernel): a cls_bpf filter in
//!   direct-action mode on the interface's clsact qdisc, at a fixed priority
//!   and a fixed handle per program ([`TC_PRIORITY`], [`tc_handle`]). A filter
//!   is kernel state, so it outlives NetManager without a pin; the next one
//!   sends the same (priority, handle) again without `NLM_F_CREATE`, which
//!   cls_bpf answers by swapping the program in place (atomic, like the link
//!   update). What a run attached this way is recorded by pinning the program
//!   at `<pin dir>/tc/<program>@<interface>`: that pin is how a later run
//!   finds filters on interfaces it no longer uses.
//!
//! Attaching in one mode removes the other mode's attachment of the same
//! program on the same interface, after the new one is in place: a TCX
//! program runs before the clsact filters and our programs never hand a
//! packet on (`TC_ACT_UNSPEC`), so while both exist only the TCX one acts,
//! and there is never a moment with none.
//!
//! The XDP program's links: [`xdp`].

use std::io;
use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, Link, LinkError, PinnedLink};
use aya::programs::tc::{
    self, NlOptions, SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions, TcError, TcHandle,
};
use aya::programs::{LinkOrder, ProgramError, SchedClassifier, TcAttachType};
use aya::sys::SyscallError;

pub use super::attach_mode::AttachMode;
use super::{CONTAINER_PROGRAM, DataplaneError, Result, SLOW_PATH_PROGRAM, UPLINK_PROGRAM};

mod xdp;

/// Priority ("pref" in `tc filter show`) of NetManager's filters: one
/// fixed value, so every run finds and replaces its predecessor's filter.
pub const TC_PRIORITY: u16 = 0x4f4b;

/// Fixed filter handle of each program under [`TC_PRIORITY`].
pub fn tc_handle(program: &str) -> Result<TcHandle> {
    match program {
        CONTAINER_PROGRAM => Ok(TcHandle::new(0, 1)),
        UPLINK_PROGRAM => Ok(TcHandle::new(0, 2)),
        SLOW_PATH_PROGRAM => Ok(TcHandle::new(0, 3)),
        other => Err(DataplaneError::Other(format!(
            "no tc filter handle is assigned to program {other}"
        ))),
    }
}

pub struct Attachments {
    /// TCX link pins.
    links: PathBuf,
    /// Program pins recording the tc filters.
    tc: PathBuf,
    mode: AttachMode,
    /// (program, interface) pairs attached by this process; XDP links under
    /// their pin name ([`xdp_key`]).
    attached: Vec<(String, String)>,
}

impl Attachments {
    /// Attachments pinned under `pin_dir` in `mode` (already resolved:
    /// never `Auto`).
    pub fn new(pin_dir: &Path, mode: AttachMode) -> Result<Attachments> {
        if mode == AttachMode::Auto {
            return Err(DataplaneError::Other(
                "attach mode auto must be resolved before attaching".into(),
            ));
        }
        let a = Attachments {
            links: pin_dir.join("links"),
            tc: pin_dir.join("tc"),
            mode,
            attached: Vec::new(),
        };
        for dir in [&a.links, &a.tc] {
            std::fs::create_dir_all(dir)
                .map_err(|e| DataplaneError::bpf(format!("creating {}", dir.display()), e))?;
        }
        Ok(a)
    }

    pub fn mode(&self) -> AttachMode {
        self.mode
    }

    fn link_pin(&self, program: &str, ifname: &str) -> PathBuf {
        self.links.join(format!("{program}@{ifname}"))
    }

    fn tc_pin(&self, program: &str, ifname: &str) -> PathBuf {
        self.tc.join(format!("{program}@{ifname}"))
    }

    /// Attaches `prog` on the ingress of `ifname`, taking over what an
    /// earlier run attached there in either mode.
    pub fn attach(
        &mut self,
        prog: &mut SchedClassifier,
        program: &str,
        ifname: &str,
    ) -> Result<()> {
        match self.mode {
            AttachMode::Netlink => {
                self.attach_tc(prog, program, ifname)?;
                // A TCX link of an earlier run would keep running before
                // the filter: release it now that the filter is in place.
                release_link(&self.link_pin(program, ifname))?;
            }
            _ => {
                self.attach_tcx(prog, program, ifname)?;
                self.remove_tc(program, ifname)?;
            }
        }
        self.remember(program, ifname);
        Ok(())
    }

    fn attach_tcx(&self, prog: &mut SchedClassifier, program: &str, ifname: &str) -> Result<()> {
        let path = self.link_pin(program, ifname);
        let what = || format!("attaching {program} to {ifname} (tcx)");
        let link_id = match adopt_link(prog, &path) {
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
        Ok(())
    }

    fn attach_tc(&self, prog: &mut SchedClassifier, program: &str, ifname: &str) -> Result<()> {
        let what = || format!("attaching {program} to {ifname} (clsact filter)");
        let handle = tc_handle(program)?;
        match tc::qdisc_add_clsact(ifname) {
            Ok(()) => {}
            Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => {
                return Err(DataplaneError::bpf(
                    format!("adding the clsact qdisc to {ifname}"),
                    e,
                ));
            }
        }
        let ours =
            SchedClassifierLink::attached(ifname, TcAttachType::Ingress, TC_PRIORITY, handle, None)
                .map_err(|e| DataplaneError::bpf(what(), e))?;
        // Without NLM_F_CREATE: replaces the program of an existing filter
        // at our (priority, handle) in place, fails with ENOENT otherwise.
        let link_id = match prog.attach_to_link(ours) {
            Ok(id) => id,
            Err(e) if is_errno(&e, libc::ENOENT) => prog
                .attach_with_options(
                    ifname,
                    TcAttachType::Ingress,
                    TcAttachOptions::Netlink(NlOptions {
                        priority: TC_PRIORITY,
                        handle,
                        classid: None,
                    }),
                )
                .map_err(|e| DataplaneError::bpf(what(), e))?,
            Err(e) => return Err(DataplaneError::bpf(what(), e)),
        };
        let link = prog
            .take_link(link_id)
            .map_err(|e| DataplaneError::bpf(what(), e))?;
        // Dropping the link object would delete the filter, and the filter
        // must outlive this process. The object holds no descriptor or
        // memory beyond itself, only what identifies the filter.
        std::mem::forget(link);
        // The record of this filter: the program, pinned. Replaces the
        // previous run's program (which the filter no longer references).
        let pin = self.tc_pin(program, ifname);
        remove_pin(&pin)?;
        prog.pin(&pin)
            .map_err(|e| DataplaneError::bpf(format!("pinning {}", pin.display()), e))?;
        Ok(())
    }

    /// Deletes the filter at our (priority, handle) for `program` on
    /// `ifname` and its record; absent filter or interface is fine.
    fn remove_tc(&self, program: &str, ifname: &str) -> Result<()> {
        let pin = self.tc_pin(program, ifname);
        let handle = tc_handle(program)?;
        match SchedClassifierLink::attached(
            ifname,
            TcAttachType::Ingress,
            TC_PRIORITY,
            handle,
            None,
        ) {
            // The interface is gone, and its filters with it.
            Err(_) => {}
            Ok(link) => match link.detach() {
                Ok(()) => {}
                // No such filter (or no clsact qdisc at all).
                Err(e) if is_errno(&e, libc::ENOENT) || is_errno(&e, libc::EINVAL) => {}
                Err(e) if is_errno(&e, libc::ENODEV) => {}
                Err(e) => {
                    return Err(DataplaneError::bpf(
                        format!("removing the {program} filter from {ifname}"),
                        e,
                    ));
                }
            },
        }
        remove_pin(&pin)
    }

    /// Detaches `program` from `ifname`, whichever mode attached it; the
    /// uplink program takes the XDP program with it.
    pub fn detach(&mut self, program: &str, ifname: &str) -> Result<()> {
        if program == UPLINK_PROGRAM {
            self.detach_xdp(ifname)?;
        }
        release_link(&self.link_pin(program, ifname))?;
        self.remove_tc(program, ifname)?;
        self.attached
            .retain(|(p, i)| !(p == program && i == ifname));
        Ok(())
    }

    /// Detaches `program`, in both modes, from every interface this process
    /// has not attached it to: what an earlier run attached to an interface
    /// that is no longer one to use (an uplink that moved while NetManager
    /// was down), and the pins left of interfaces that are gone.
    pub fn sweep(&mut self, program: &str) -> Result<()> {
        let mut stale = Vec::new();
        for dir in [&self.links, &self.tc] {
            for ifname in pinned_interfaces(dir, program)? {
                let ours = self
                    .attached
                    .iter()
                    .any(|(p, i)| p == program && *i == ifname);
                if !ours && !stale.contains(&ifname) {
                    stale.push(ifname);
                }
            }
        }
        for ifname in stale {
            tracing::info!(program, interface = %ifname, "detaching from an interface no longer used");
            self.detach(program, &ifname)?;
        }
        Ok(())
    }

    /// Drops the pins of interfaces that no longer exist (a container's veth
    /// deleted while NetManager was down): their links and filters went
    /// with the interface, and the pins would only keep dead links and
    /// programs around.
    pub fn forget_vanished(&mut self) -> Result<()> {
        for dir in [&self.links, &self.tc] {
            let entries = match std::fs::read_dir(dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(DataplaneError::bpf(format!("listing {}", dir.display()), e));
                }
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some((_, ifname)) = name.to_str().and_then(|n| n.split_once('@')) else {
                    continue;
                };
                if super::tables::ifindex(ifname).is_err() {
                    tracing::debug!(pin = %entry.path().display(), "interface gone; pin removed");
                    remove_pin(&entry.path())?;
                }
            }
        }
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
}

/// The classic tc filters (netlink mode) recorded under `pin_dir`, as
/// (program, interface) pairs. Unlike TCX links they do not go away with
/// their pins, so `NetManager teardown` removes them one by one.
pub fn recorded_filters(pin_dir: &Path) -> Result<Vec<(String, String)>> {
    let tc = pin_dir.join("tc");
    let mut found = Vec::new();
    for program in [CONTAINER_PROGRAM, UPLINK_PROGRAM, SLOW_PATH_PROGRAM] {
        for ifname in pinned_interfaces(&tc, program)? {
            found.push((program.to_string(), ifname));
        }
    }
    Ok(found)
}

/// Deletes one recorded filter (see [`recorded_filters`]) and its record.
pub fn remove_recorded_filter(pin_dir: &Path, program: &str, ifname: &str) -> Result<()> {
    let records = Attachments {
        links: pin_dir.join("links"),
        tc: pin_dir.join("tc"),
        mode: AttachMode::Netlink,
        attached: Vec::new(),
    };
    records.remove_tc(program, ifname)
}

/// Interfaces with a pin of `program` in `dir` (`<program>@<interface>`).
fn pinned_interfaces(dir: &Path, program: &str) -> Result<Vec<String>> {
    let prefix = format!("{program}@");
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(DataplaneError::bpf(format!("listing {}", dir.display()), e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry =
            entry.map_err(|e| DataplaneError::bpf(format!("listing {}", dir.display()), e))?;
        if let Some(ifname) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
        {
            out.push(ifname.to_string());
        }
    }
    Ok(out)
}

/// Detaches the TCX link pinned at `path` (if any) before returning.
/// Removing the pin alone would also detach it, but the kernel frees a
/// link whose last reference was a pin from a work queue, a moment later;
/// closing the last descriptor frees it at once.
fn release_link(path: &Path) -> Result<()> {
    let link = PinnedLink::from_pin(path).ok();
    remove_pin(path)?;
    drop(link);
    Ok(())
}

fn remove_pin(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DataplaneError::bpf(
            format!("removing {}", path.display()),
            e,
        )),
    }
}

/// Whether a program error is the netlink error `errno`.
fn is_errno(e: &ProgramError, errno: i32) -> bool {
    match e {
        ProgramError::TcError(TcError::NetlinkError(n)) | ProgramError::NetlinkError(n) => {
            n.raw_os_error() == Some(errno)
        }
        ProgramError::TcError(TcError::IoError(io)) => io.raw_os_error() == Some(errno),
        _ => false,
    }
}

/// Swaps `prog` into the link pinned at `path`, if there is one that still
/// has an interface.
fn adopt_link(prog: &mut SchedClassifier, path: &Path) -> Option<SchedClassifierLinkId> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_program_has_its_own_filter_handle() {
        let handles = [CONTAINER_PROGRAM, UPLINK_PROGRAM, SLOW_PATH_PROGRAM]
            .map(|p| u32::from(tc_handle(p).unwrap()));
        assert_eq!(handles, [1, 2, 3]);
        assert!(tc_handle("other").is_err());
    }
}
