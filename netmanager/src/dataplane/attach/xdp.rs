//! The XDP program (`--uplink-hook xdp`) goes where `uplink_ingress` goes,
//! through an XDP bpf link pinned at `<pin dir>/links/uplink_xdp_<mode>@<interface>`
//! and swapped like a TCX link by the next run. The mode (native or
//! generic) is in the name: a link cannot change it, and the two cannot be
//! attached to one interface at once, so a link of the other mode is
//! released before a new one is made. In that moment TC alone screens the
//! interface, which it does anyway: nothing gets through that the XDP
//! program would have dropped.

use std::path::Path;

use aya::programs::Xdp;
use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::xdp::XdpLink;

use super::super::uplink_hook::XdpMode;
use super::super::{DataplaneError, Result, UPLINK_XDP_PROGRAM};
use super::{Attachments, pinned_interfaces, release_link};

/// The modes an XDP link can have, each with pins of its own.
const XDP_MODES: [XdpMode; 2] = [XdpMode::Native, XdpMode::Generic];

/// The name XDP links of `mode` are pinned under (`uplink_xdp_native`; bpffs
/// refuses dots in names).
fn xdp_key(mode: XdpMode) -> String {
    format!("{UPLINK_XDP_PROGRAM}_{mode}")
}

impl Attachments {
    /// (program, interface, hook) of every attachment this process made.
    pub fn list(&self) -> Vec<(String, String, String)> {
        self.attached
            .iter()
            .map(
                |(p, i)| match XDP_MODES.iter().find(|m| *p == xdp_key(**m)) {
                    Some(m) => (
                        UPLINK_XDP_PROGRAM.to_string(),
                        i.clone(),
                        m.hook().to_string(),
                    ),
                    None => (p.clone(), i.clone(), self.mode.hook().to_string()),
                },
            )
            .collect()
    }

    /// Attaches the XDP program to `ifname` in the first of `mode`'s
    /// candidates that works there, taking over the link an earlier run
    /// pinned in the preferred one (`auto` prefers native: a generic link
    /// of an earlier run is replaced, in case the driver can do better).
    /// Returns the mode it got.
    pub fn attach_xdp(&mut self, prog: &mut Xdp, ifname: &str, mode: XdpMode) -> Result<XdpMode> {
        let preferred = mode.candidates()[0];
        let got = if adopt_xdp_link(prog, &self.link_pin(&xdp_key(preferred), ifname)) {
            preferred
        } else {
            // Nothing to take over in the preferred mode: whatever else is
            // there goes first (one XDP link per interface).
            self.detach_xdp(ifname)?;
            self.attach_xdp_link(prog, ifname, mode)?
        };
        for other in XDP_MODES.into_iter().filter(|m| *m != got) {
            self.release_xdp(other, ifname)?;
        }
        self.remember(&xdp_key(got), ifname);
        Ok(got)
    }

    /// A fresh link in the first candidate mode the interface takes, pinned.
    fn attach_xdp_link(&self, prog: &mut Xdp, ifname: &str, mode: XdpMode) -> Result<XdpMode> {
        let mut failures = Vec::new();
        for m in mode.candidates() {
            let link_id = match prog.attach(ifname, m.aya()) {
                Ok(id) => id,
                Err(e) => {
                    failures.push(format!("{m}: {e}"));
                    continue;
                }
            };
            let what = || format!("attaching {UPLINK_XDP_PROGRAM} to {ifname} (xdp {m})");
            let link = prog
                .take_link(link_id)
                .map_err(|e| DataplaneError::bpf(what(), e))?;
            // Only a bpf link (Linux 5.9) can be pinned, and so outlive us.
            let fd_link: FdLink = link
                .try_into()
                .map_err(|e: LinkError| DataplaneError::bpf(what(), e))?;
            let path = self.link_pin(&xdp_key(*m), ifname);
            fd_link
                .pin(&path)
                .map_err(|e| DataplaneError::bpf(format!("pinning {}", path.display()), e))?;
            return Ok(*m);
        }
        Err(DataplaneError::Other(format!(
            "attaching {UPLINK_XDP_PROGRAM} to {ifname} (xdp {mode}): {}",
            failures.join("; ")
        )))
    }

    /// Releases the XDP links of `ifname`, in either mode.
    pub(super) fn detach_xdp(&mut self, ifname: &str) -> Result<()> {
        for m in XDP_MODES {
            self.release_xdp(m, ifname)?;
        }
        Ok(())
    }

    /// Releases the XDP link of `ifname` in `mode`, if there is one.
    fn release_xdp(&mut self, mode: XdpMode, ifname: &str) -> Result<()> {
        let key = xdp_key(mode);
        release_link(&self.link_pin(&key, ifname))?;
        self.attached.retain(|(p, i)| !(*p == key && i == ifname));
        Ok(())
    }

    /// Releases every XDP link this process has not attached: those of
    /// interfaces no longer used, and all of them when the uplink hook is
    /// TC now.
    pub fn sweep_xdp(&mut self) -> Result<()> {
        for m in XDP_MODES {
            let key = xdp_key(m);
            for ifname in pinned_interfaces(&self.links, &key)? {
                if !self.attached.iter().any(|(p, i)| *p == key && *i == ifname) {
                    tracing::info!(interface = %ifname, "releasing the XDP program of an earlier run");
                    release_link(&self.link_pin(&key, &ifname))?;
                }
            }
        }
        Ok(())
    }
}

/// Swaps the XDP program into the link pinned at `path`, if there is one
/// that still has an interface; true when it did.
fn adopt_xdp_link(prog: &mut Xdp, path: &Path) -> bool {
    let Ok(old) = PinnedLink::from_pin(path) else {
        return false;
    };
    let Ok(link) = XdpLink::try_from(FdLink::from(old)) else {
        tracing::warn!("ignoring pinned link {}: not an XDP link", path.display());
        return false;
    };
    let adopted = prog.attach_to_link(link).and_then(|id| prog.take_link(id));
    match adopted {
        // The pin keeps the link; the descriptor may go.
        Ok(_) => true,
        Err(e) => {
            tracing::warn!("pinned link {} could not be reused: {e}", path.display());
            false
        }
    }
}
