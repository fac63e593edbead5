//! The packet counters: what the programs count (index into `COUNTERS`),
//! their names in `NetManager status`, and a one-line meaning each.
//!
//! Everything is generated from the single [`counters!`] declaration below,
//! so the enum, the names, the count and the help texts cannot drift apart.

/// Whether a counter is a verdict (what happened to the packet) or one of the
/// reasons a packet was dropped; metrics label the first by `verdict`, the
/// second by `verdict="drop"` and `reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CounterKind {
    Verdict,
    Drop,
}

/// Declares every counter once: `Variant: verdict "name", "help";` or
/// `Variant: drop "reason", "help";` (a drop counter is named `drop_<reason>`).
/// Indices follow declaration order, so new counters go at the end: the
/// per-CPU `COUNTERS` map of a running node is adopted across upgrades.
macro_rules! counters {
    ($($variant:ident: $kind:ident $label:literal, $help:literal;)+) => {
        /// Why a packet took the path it took; index into the `COUNTERS` map.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Counter {
            $(#[doc = $help] $variant,)+
        }

        impl Counter {
            /// Every counter, in index order.
            pub const ALL: [Counter; [$(Counter::$variant),+].len()] = [$(Counter::$variant),+];
            pub const COUNT: usize = Counter::ALL.len();

            /// Name in `NetManager status` (e.g. `tunnelled`, `drop_ttl`).
            pub const fn name(self) -> &'static str {
                match self {
                    $(Counter::$variant => counters!(@name $kind $label),)+
                }
            }

            /// One line saying what the counter counts.
            pub const fn help(self) -> &'static str {
                match self {
                    $(Counter::$variant => $help,)+
                }
            }

            pub const fn kind(self) -> CounterKind {
                match self {
                    $(Counter::$variant => counters!(@kind $kind),)+
                }
            }

            /// The `verdict` label: the counter's name, or `drop` for a drop reason.
            pub const fn verdict(self) -> &'static str {
                match self {
                    $(Counter::$variant => counters!(@verdict $kind $label),)+
                }
            }

            /// The `reason` label of a drop counter (`ttl` for `drop_ttl`).
            pub const fn reason(self) -> Option<&'static str> {
                match self {
                    $(Counter::$variant => counters!(@reason $kind $label),)+
                }
            }
        }
    };
    (@name verdict $label:literal) => { $label };
    (@name drop $label:literal) => { concat!("drop_", $label) };
    (@kind verdict) => { CounterKind::Verdict };
    (@kind drop) => { CounterKind::Drop };
    (@verdict verdict $label:literal) => { $label };
    (@verdict drop $label:literal) => { "drop" };
    (@reason verdict $label:literal) => { None };
    (@reason drop $label:literal) => { Some($label) };
}

counters! {
    Passed: verdict "passed", "Not service traffic: left to the kernel.";
    LocalDelivered: verdict "local_delivered", "Translated and delivered to a container on this node.";
    Tunnelled: verdict "tunnelled", "Translated and sent through the tunnel to the backend's node.";
    Decapsulated: verdict "decapsulated", "Received through the tunnel and delivered to a local container.";
    ReverseTranslated: verdict "reverse_translated", "Reply received through the tunnel, source restored to the dialled service address, delivered.";
    MissHeld: verdict "miss_held", "Unknown service or sender: held and handed to NetManager to resolve and reinject.";
    PmtuSent: verdict "pmtu_sent", "Too big for the tunnel: answered with ICMP fragmentation-needed / packet-too-big.";
    DropMalformed: drop "malformed", "Truncated or inconsistent headers.";
    DropFragment: drop "fragment", "IP fragment to a service address (no ports to key a flow on).";
    DropUnsupportedProto: drop "unsupported_proto", "Protocol other than TCP, UDP and ICMP echo to a service address.";
    DropTtl: drop "ttl", "TTL or hop limit exhausted.";
    DropTooBig: drop "too_big", "IPv4 without DF larger than the tunnel MTU.";
    DropNoBackend: drop "no_backend", "Service address without backends, or whose backend is no longer in INSTANCES.";
    DropMissOverflow: drop "miss_overflow", "More than miss_hold packets for an unresolved address, or PENDING or the miss ring full (tunnel datagrams get half of it).";
    DropNotLocal: drop "not_local", "Sender, or tunnelled destination, is not a container on this node.";
    DropBadInnerSource: drop "bad_inner_source", "Tunnelled packet whose inner source is not in a service range.";
    DropFlowTableFull: drop "flow_table_full", "A new flow could not be written to FLOWS or REVERSE_FLOWS.";
    DropRedirect: drop "redirect", "The redirect to the target interface failed (e.g. a vanished veth).";
    DropEncap: drop "encap", "Making room for the tunnel headers failed.";
    Resegmented: verdict "resegmented", "GSO packet for a node on an IPv6 underlay, sent through the reinjection device to be cut into segments, each then tunnelled with its own UDP checksum.";
    DropNoRoute: drop "no_route", "No route to the backend's node: the FIB lookup found it unreachable, blackholed, prohibited, local, or without a source address.";
    PeerHeld: verdict "peer_held", "Tunnel datagram for a local container whose inner source no known node runs, or another node than its sender: held while NetManager asks the cluster which node does.";
    DropSpoofedSource: drop "spoofed_source", "Sent by a container with another container's address (it arrived on another veth).";
    DropForgedSource: drop "forged_source", "Tunnel datagram whose inner source is an instance of another node than the one that sent it, for no local container (or an instance of this node).";
    DropFlowQuota: drop "flow_quota", "The sending container already has FlowsPerContainer flows.";
    XdpDropMalformed: drop "xdp_malformed", "XDP uplink hook: tunnel datagram whose lengths contradict each other or the frame, or whose payload is no IPv4/IPv6 packet.";
    XdpDropForgedSource: drop "xdp_forged_source", "XDP uplink hook: what drop_forged_source counts on TC, dropped before the stack.";
    XdpDropBadInnerSource: drop "xdp_bad_inner_source", "XDP uplink hook: what drop_bad_inner_source counts on TC, dropped before the stack.";
    XdpDropNotLocal: drop "xdp_not_local", "XDP uplink hook: tunnel datagram from a sender the tables do not name, for no container here (drop_not_local on TC).";
    XdpRedirected: verdict "xdp_redirected", "XDP uplink hook xdp-redirect: tunnel datagram decapsulated, reverse-translated where this node owns the flow, and redirected into the container's veth in XDP (what decapsulated and reverse_translated count on TC).";
}

impl Counter {
    /// The counter at `index` of the `COUNTERS` map.
    pub const fn from_index(index: u32) -> Option<Counter> {
        if (index as usize) < Counter::COUNT {
            Some(Counter::ALL[index as usize])
        } else {
            None
        }
    }
}

/// Every counter's name, in index order.
pub const COUNTER_NAMES: [&str; Counter::COUNT] = {
    let mut names = [""; Counter::COUNT];
    let mut i = 0;
    while i < Counter::COUNT {
        names[i] = Counter::ALL[i].name();
        i += 1;
    }
    names
};

/// Per-CPU value of `COUNTERS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterValue {
    pub packets: u64,
    pub bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_follow_declaration_order() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
            assert_eq!(Counter::from_index(i as u32), Some(*c));
        }
        assert_eq!(Counter::from_index(Counter::COUNT as u32), None);
        // Pinned COUNTERS maps of running nodes rely on these staying put.
        assert_eq!(Counter::Passed as u32, 0);
        assert_eq!(Counter::DropEncap as u32, 18);
        assert_eq!(Counter::DropNoRoute as u32, 20);
        assert_eq!(Counter::DropFlowQuota as u32, 24);
    }

    #[test]
    fn names_labels_and_help_agree() {
        for c in Counter::ALL {
            assert!(!c.help().is_empty());
            match c.kind() {
                CounterKind::Verdict => {
                    assert_eq!(c.verdict(), c.name());
                    assert_eq!(c.reason(), None);
                    assert!(!c.name().starts_with("drop_"));
                }
                CounterKind::Drop => {
                    assert_eq!(c.verdict(), "drop");
                    let reason = c.reason().unwrap();
                    assert_eq!(c.name().strip_prefix("drop_"), Some(reason));
                }
            }
        }
        assert_eq!(COUNTER_NAMES[Counter::DropTtl as usize], "drop_ttl");
        assert_eq!(
            COUNTER_NAMES[Counter::LocalDelivered as usize],
            "local_delivered"
        );
        let mut sorted = COUNTER_NAMES;
        sorted.sort();
        assert!(sorted.windows(2).all(|w| w[0] != w[1]), "names are unique");
    }
}
