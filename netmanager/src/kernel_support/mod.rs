//! What the running kernel offers the dataplane, probed once at start.
//!
//! [`check`] is the start-up gate: it refuses a kernel older than
//! [`MINIMUM_KERNEL`] or one that lacks a program type, map type or helper
//! the programs use, naming each missing piece with the Linux version that
//! introduced it. Probes ask the kernel itself (aya's feature probes, or a
//! two-instruction program where aya has none), so vendor kernels with
//! backports are judged by what they do, not by their release string.
//!
//! Two answers are not pass/fail but choose a path:
//! - [`KernelSupport::tcx`]: TCX links (Linux 6.6) can attach the programs;
//!   without them only classic tc (clsact + cls_bpf filter) can.
//! - [`KernelSupport::adjust_room_decap_l3`]: `bpf_skb_adjust_room` accepts
//!   `BPF_F_ADJ_ROOM_DECAP_L3_IPV6` (Linux 6.3). The loader hands this to the
//!   programs as a read-only global; before 6.3 they decapsulate IPv6 inner
//!   packets through `bpf_skb_change_proto` instead.

mod raw_probes;

use std::sync::OnceLock;

use aya::maps::MapType;
use aya::programs::ProgramType;
use aya::sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported};
use aya::util::KernelVersion;
use aya_obj::generated::bpf_func_id;
use raw_probes::{adjust_room_decap_l3_supported, tcx_supported};

/// The oldest kernel NetManager supports (Ubuntu 22.04's; Debian 12 ships
/// 6.1). Everything the programs need is in it except TCX (6.6) and the
/// decapsulation flags (6.3), which have fallbacks.
pub const MINIMUM_KERNEL: KernelVersion = KernelVersion::new(5, 15, 0);

/// A kernel feature the programs cannot do without.
struct Requirement {
    feature: Feature,
    /// As the kernel and bpftool name it.
    name: &'static str,
    /// The Linux release that introduced it.
    since: &'static str,
}

enum Feature {
    Program(ProgramType),
    Map(MapType),
    /// A helper, probed for TC classifier programs.
    Helper(BpfHelper),
}

const fn helper(id: bpf_func_id, name: &'static str, since: &'static str) -> Requirement {
    Requirement {
        feature: Feature::Helper(id),
        name,
        since,
    }
}

/// Every program type, map type and helper `netmanager-ebpf` uses
/// (docs/old-kernels.md lists the same, with the flags and context fields
/// that cannot be probed this way).
const REQUIREMENTS: &[Requirement] = &[
    Requirement {
        feature: Feature::Program(ProgramType::SchedClassifier),
        name: "BPF_PROG_TYPE_SCHED_CLS",
        since: "4.1",
    },
    Requirement {
        feature: Feature::Map(MapType::Hash),
        name: "BPF_MAP_TYPE_HASH",
        since: "3.19",
    },
    Requirement {
        feature: Feature::Map(MapType::Array),
        name: "BPF_MAP_TYPE_ARRAY",
        since: "3.19",
    },
    Requirement {
        feature: Feature::Map(MapType::PerCpuArray),
        name: "BPF_MAP_TYPE_PERCPU_ARRAY",
        since: "4.6",
    },
    Requirement {
        feature: Feature::Map(MapType::LruHash),
        name: "BPF_MAP_TYPE_LRU_HASH",
        since: "4.10",
    },
    Requirement {
        feature: Feature::Map(MapType::RingBuf),
        name: "BPF_MAP_TYPE_RINGBUF",
        since: "5.8",
    },
    helper(
        bpf_func_id::BPF_FUNC_map_lookup_elem,
        "bpf_map_lookup_elem",
        "3.19",
    ),
    helper(
        bpf_func_id::BPF_FUNC_map_update_elem,
        "bpf_map_update_elem",
        "3.19",
    ),
    helper(
        bpf_func_id::BPF_FUNC_skb_store_bytes,
        "bpf_skb_store_bytes",
        "4.1",
    ),
    helper(
        bpf_func_id::BPF_FUNC_l4_csum_replace,
        "bpf_l4_csum_replace",
        "4.1",
    ),
    helper(bpf_func_id::BPF_FUNC_redirect, "bpf_redirect", "4.4"),
    helper(
        bpf_func_id::BPF_FUNC_skb_load_bytes,
        "bpf_skb_load_bytes",
        "4.5",
    ),
    helper(bpf_func_id::BPF_FUNC_csum_diff, "bpf_csum_diff", "4.6"),
    helper(
        bpf_func_id::BPF_FUNC_skb_change_proto,
        "bpf_skb_change_proto",
        "4.8",
    ),
    helper(
        bpf_func_id::BPF_FUNC_skb_change_tail,
        "bpf_skb_change_tail",
        "4.9",
    ),
    helper(
        bpf_func_id::BPF_FUNC_skb_adjust_room,
        "bpf_skb_adjust_room",
        "4.13",
    ),
    helper(bpf_func_id::BPF_FUNC_fib_lookup, "bpf_fib_lookup", "4.18"),
    helper(
        bpf_func_id::BPF_FUNC_ktime_get_coarse_ns,
        "bpf_ktime_get_coarse_ns",
        "5.11",
    ),
    helper(
        bpf_func_id::BPF_FUNC_ringbuf_reserve,
        "bpf_ringbuf_reserve",
        "5.8",
    ),
    helper(
        bpf_func_id::BPF_FUNC_ringbuf_submit,
        "bpf_ringbuf_submit",
        "5.8",
    ),
    helper(
        bpf_func_id::BPF_FUNC_redirect_neigh,
        "bpf_redirect_neigh",
        "5.10",
    ),
    helper(
        bpf_func_id::BPF_FUNC_redirect_peer,
        "bpf_redirect_peer",
        "5.10",
    ),
];

/// A required feature the kernel lacks (or that could not be probed).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Missing {
    pub name: &'static str,
    pub since: &'static str,
    /// Why the probe could not tell, when it failed rather than said no.
    pub probe_error: Option<String>,
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (Linux {})", self.name, self.since)?;
        if let Some(e) = &self.probe_error {
            write!(f, ": probe failed: {e}")?;
        }
        Ok(())
    }
}

/// What the running kernel offers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KernelSupport {
    /// `uname -r`.
    pub release: String,
    /// Parsed version (Ubuntu's and Debian's real patch level included);
    /// None when the release string could not be read.
    pub version: Option<String>,
    /// Below [`MINIMUM_KERNEL`] by its version.
    pub below_minimum: bool,
    /// TCX links (Linux 6.6): attach through bpf links; else classic tc.
    pub tcx: bool,
    /// `bpf_skb_adjust_room` knows `BPF_F_ADJ_ROOM_DECAP_L3_IPV6` (6.3).
    pub adjust_room_decap_l3: bool,
    /// Required features the kernel lacks.
    pub missing: Vec<Missing>,
}

#[derive(Debug, thiserror::Error)]
pub enum KernelSupportError {
    #[error(
        "Linux {release} cannot run NetManager's eBPF dataplane (it needs Linux {minimum} or newer){}",
        list(.missing)
    )]
    Unsupported {
        release: String,
        minimum: String,
        missing: Vec<Missing>,
    },
}

fn list(missing: &[Missing]) -> String {
    if missing.is_empty() {
        return String::new();
    }
    let items: Vec<String> = missing.iter().map(|m| format!("  - {m}")).collect();
    format!("; missing:\n{}", items.join("\n"))
}

/// The start-up gate: the kernel's support, or an error naming everything
/// that is missing. Call once before opening the dataplane (needs root,
/// like every BPF operation here).
pub fn check() -> Result<&'static KernelSupport, KernelSupportError> {
    let support = probe();
    if support.below_minimum || !support.missing.is_empty() {
        return Err(KernelSupportError::Unsupported {
            release: support.release.clone(),
            minimum: MINIMUM_KERNEL.to_string(),
            missing: support.missing.clone(),
        });
    }
    tracing::info!(
        release = %support.release,
        tcx = support.tcx,
        adjust_room_decap_l3 = support.adjust_room_decap_l3,
        "the kernel supports the eBPF dataplane"
    );
    Ok(support)
}

/// Probes the kernel (once per process; the answers cannot change while it runs).
pub fn probe() -> &'static KernelSupport {
    static SUPPORT: OnceLock<KernelSupport> = OnceLock::new();
    SUPPORT.get_or_init(|| {
        let version = KernelVersion::current().ok();
        KernelSupport {
            release: release(),
            version: version.map(|v| v.to_string()),
            below_minimum: version.is_some_and(|v| v < MINIMUM_KERNEL),
            tcx: tcx_supported(),
            adjust_room_decap_l3: adjust_room_decap_l3_supported(),
            missing: REQUIREMENTS.iter().filter_map(missing).collect(),
        }
    })
}

fn release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| format!("(unknown: {e})"))
}

/// `Some` when the kernel lacks `req` or the probe itself failed.
fn missing(req: &Requirement) -> Option<Missing> {
    let answer = match &req.feature {
        Feature::Program(t) => is_program_supported(*t).map_err(|e| e.to_string()),
        Feature::Map(t) => is_map_supported(*t).map_err(|e| e.to_string()),
        Feature::Helper(h) => {
            is_helper_supported(ProgramType::SchedClassifier, *h).map_err(|e| e.to_string())
        }
    };
    match answer {
        Ok(true) => None,
        Ok(false) => Some(Missing {
            name: req.name,
            since: req.since,
            probe_error: None,
        }),
        Err(e) => Some(Missing {
            name: req.name,
            since: req.since,
            probe_error: Some(e),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_names_every_missing_feature_with_its_release() {
        let e = KernelSupportError::Unsupported {
            release: "5.4.0-150-generic".into(),
            minimum: MINIMUM_KERNEL.to_string(),
            missing: vec![
                Missing {
                    name: "bpf_redirect_peer",
                    since: "5.10",
                    probe_error: None,
                },
                Missing {
                    name: "BPF_MAP_TYPE_RINGBUF",
                    since: "5.8",
                    probe_error: Some("Operation not permitted".into()),
                },
            ],
        };
        assert_eq!(
            e.to_string(),
            "Linux 5.4.0-150-generic cannot run NetManager's eBPF dataplane (it needs Linux 5.15.0 or newer); missing:\n  \
             - bpf_redirect_peer (Linux 5.10)\n  \
             - BPF_MAP_TYPE_RINGBUF (Linux 5.8): probe failed: Operation not permitted"
        );
    }
}
