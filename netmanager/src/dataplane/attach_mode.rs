//! The two ways programs can be attached (see `attach`), and which one a
//! kernel gets when the operator leaves it to NetManager.

use serde::{Deserialize, Serialize};

use super::{DataplaneError, Result};

/// How programs are attached (`--attach-mode`, `NETMANAGER_ATTACH_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// TCX where the kernel has it (Linux 6.6), classic tc otherwise.
    #[default]
    Auto,
    /// TCX links pinned in bpffs (Linux 6.6 and later).
    Tcx,
    /// Classic tc: clsact qdisc and a cls_bpf filter, set up over netlink.
    Netlink,
}

impl AttachMode {
    /// The mode to use on this kernel: `Auto` becomes what it has; TCX
    /// where the kernel lacks it is an error that says what to do.
    pub fn resolve(self, tcx_supported: bool) -> Result<AttachMode> {
        match self {
            AttachMode::Auto if tcx_supported => Ok(AttachMode::Tcx),
            AttachMode::Auto => Ok(AttachMode::Netlink),
            AttachMode::Tcx if !tcx_supported => Err(DataplaneError::Other(
                "attach mode tcx: this kernel has no TCX links (Linux 6.6); \
                 use --attach-mode netlink or auto"
                    .into(),
            )),
            mode => Ok(mode),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AttachMode::Auto => "auto",
            AttachMode::Tcx => "tcx",
            AttachMode::Netlink => "netlink",
        }
    }

    /// The hook as `bpftool net show` names it.
    pub(super) fn hook(self) -> &'static str {
        match self {
            AttachMode::Netlink => "clsact/ingress",
            _ => "tcx/ingress",
        }
    }
}

impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_resolves_to_what_the_kernel_has() {
        assert_eq!(AttachMode::Auto.resolve(true).unwrap(), AttachMode::Tcx);
        assert_eq!(
            AttachMode::Auto.resolve(false).unwrap(),
            AttachMode::Netlink
        );
        assert_eq!(
            AttachMode::Netlink.resolve(true).unwrap(),
            AttachMode::Netlink
        );
        let e = AttachMode::Tcx.resolve(false).unwrap_err().to_string();
        assert!(e.contains("6.6") && e.contains("netlink"), "{e}");
    }
}
