//! Which hook screens tunnel datagrams on the uplink (`--uplink-hook`), and
//! in which XDP mode (`--xdp-mode`). docs/dataplane.md, "The uplink hook:
//! TC or XDP", has the measurements behind the default.

use serde::{Deserialize, Serialize};

/// What runs on the ingress of every interface that receives tunnel
/// datagrams (`--uplink-hook`, `NETMANAGER_UPLINK_HOOK`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum UplinkHook {
    /// The TC program alone: it checks, decapsulates and delivers.
    #[default]
    Tc,
    /// The XDP program in front of the TC program: malformed and rejected
    /// datagrams are dropped before the stack; the rest goes on to TC.
    Xdp,
    /// As `xdp`, and the XDP program also decapsulates, translates and
    /// redirects into the container's veth what it can deliver whole; the
    /// rest goes on to TC.
    #[serde(rename = "xdp-redirect")]
    XdpRedirect,
}

impl UplinkHook {
    /// Every hook, for tools that list what they can attach.
    pub const ALL: [UplinkHook; 3] = [UplinkHook::Tc, UplinkHook::Xdp, UplinkHook::XdpRedirect];

    pub fn as_str(self) -> &'static str {
        match self {
            UplinkHook::Tc => "tc",
            UplinkHook::Xdp => "xdp",
            UplinkHook::XdpRedirect => "xdp-redirect",
        }
    }

    /// Whether the XDP program runs in front of the TC program.
    pub fn uses_xdp(self) -> bool {
        self != UplinkHook::Tc
    }

    /// Whether the XDP program delivers into containers' veths (whose
    /// container ends then need NAPI: `plumbing` enables GRO there).
    pub fn redirects(self) -> bool {
        self == UplinkHook::XdpRedirect
    }
}

impl std::fmt::Display for UplinkHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the XDP program attaches (`--xdp-mode`, `NETMANAGER_XDP_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Native where the interface's driver has it, generic otherwise.
    #[default]
    Auto,
    /// In the driver, before any skb exists; fails where the driver lacks it.
    Native,
    /// In the stack, on the skb (any interface).
    Generic,
}

impl XdpMode {
    pub fn as_str(self) -> &'static str {
        match self {
            XdpMode::Auto => "auto",
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
        }
    }

    /// The modes to try, in order.
    pub(super) fn candidates(self) -> &'static [XdpMode] {
        match self {
            XdpMode::Auto => &[XdpMode::Native, XdpMode::Generic],
            XdpMode::Native => &[XdpMode::Native],
            XdpMode::Generic => &[XdpMode::Generic],
        }
    }

    /// The mode to attach in on an interface whose driver is `driver`
    /// (None: unknown). With `xdp-redirect`, `auto` takes generic on a
    /// veth: native XDP there loses GSO and cannot redirect the checksum
    /// seeds (`CHECKSUM_PARTIAL`) of senders on the same host, whose
    /// packets then fail the container's checksum check
    /// (docs/dataplane.md, "The uplink hook").
    pub fn on_interface(self, hook: UplinkHook, driver: Option<&str>) -> XdpMode {
        if self == XdpMode::Auto && hook.redirects() && driver == Some("veth") {
            XdpMode::Generic
        } else {
            self
        }
    }

    /// The hook as `NetManager status` lists it.
    pub(super) fn hook(self) -> &'static str {
        match self {
            XdpMode::Generic => "xdp/generic",
            _ => "xdp/native",
        }
    }

    pub(super) fn aya(self) -> aya::programs::XdpMode {
        match self {
            XdpMode::Generic => aya::programs::XdpMode::Skb,
            XdpMode::Native => aya::programs::XdpMode::Driver,
            XdpMode::Auto => aya::programs::XdpMode::Default,
        }
    }
}

impl std::fmt::Display for XdpMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_tries_native_before_generic() {
        assert_eq!(
            XdpMode::Auto.candidates(),
            &[XdpMode::Native, XdpMode::Generic]
        );
        assert_eq!(XdpMode::Generic.candidates(), &[XdpMode::Generic]);
        assert_eq!(XdpMode::Native.candidates(), &[XdpMode::Native]);
        assert_eq!(UplinkHook::default(), UplinkHook::Tc);
    }

    #[test]
    fn auto_delivers_generically_on_a_veth_and_natively_elsewhere() {
        let redirect = UplinkHook::XdpRedirect;
        assert_eq!(
            XdpMode::Auto.on_interface(redirect, Some("veth")),
            XdpMode::Generic
        );
        assert_eq!(
            XdpMode::Auto.on_interface(redirect, Some("ixgbe")),
            XdpMode::Auto
        );
        assert_eq!(XdpMode::Auto.on_interface(redirect, None), XdpMode::Auto);
        // Screening only, or a mode asked for explicitly: unchanged.
        assert_eq!(
            XdpMode::Auto.on_interface(UplinkHook::Xdp, Some("veth")),
            XdpMode::Auto
        );
        assert_eq!(
            XdpMode::Native.on_interface(redirect, Some("veth")),
            XdpMode::Native
        );
    }

    #[test]
    fn every_hook_reads_back_from_its_name() {
        use clap::ValueEnum;
        for hook in UplinkHook::ALL {
            assert_eq!(UplinkHook::from_str(hook.as_str(), false), Ok(hook));
            let json = serde_json::to_string(&hook).unwrap();
            assert_eq!(json, format!("\"{hook}\""));
        }
        assert!(UplinkHook::XdpRedirect.uses_xdp() && UplinkHook::XdpRedirect.redirects());
        assert!(UplinkHook::Xdp.uses_xdp() && !UplinkHook::Xdp.redirects());
        assert!(!UplinkHook::Tc.uses_xdp());
    }
}
