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
}

impl UplinkHook {
    /// Every hook, for tools that list what they can attach.
    pub const ALL: [UplinkHook; 2] = [UplinkHook::Tc, UplinkHook::Xdp];

    pub fn as_str(self) -> &'static str {
        match self {
            UplinkHook::Tc => "tc",
            UplinkHook::Xdp => "xdp",
        }
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
}
