//! Loading the embedded eBPF object: map sizes from the configuration,
//! pinned maps checked against the layout the programs expect (`pins`), and
//! the programs loaded into the kernel. The object's own tests check that
//! it and `netmanager_common` agree on every map, size and program.

use std::collections::BTreeMap;
use std::path::PathBuf;

use aya::programs::{Program, SchedClassifier, Xdp};
use aya::{Ebpf, EbpfLoader};
use netmanager_common::maps;

use super::{DataplaneConfig, DataplaneError, EBPF_OBJECT, MAP_NAMES, Result, pins};

/// Map sizes the configuration sets instead of the object's defaults.
pub(super) fn size_overrides(cfg: &DataplaneConfig) -> [(&'static str, u32); 7] {
    [
        (maps::FLOWS, cfg.sizes.flows),
        (maps::REVERSE_FLOWS, cfg.sizes.flows),
        (maps::SERVICES, cfg.sizes.services),
        (maps::BACKENDS, cfg.sizes.backends),
        (maps::INSTANCES, cfg.sizes.instances),
        (maps::INSTANCE_NODES, cfg.sizes.instances),
        (maps::PENDING, cfg.sizes.pending),
    ]
}

/// Every map as the loader will create it: the object's declaration with
/// the configured sizes.
pub(super) fn expected_layouts(cfg: &DataplaneConfig) -> Result<BTreeMap<String, pins::Layout>> {
    let obj = aya_obj::Object::parse(EBPF_OBJECT)
        .map_err(|e| DataplaneError::bpf("parsing the embedded eBPF object", e))?;
    let overrides = size_overrides(cfg);
    MAP_NAMES
        .iter()
        .map(|name| {
            let m = obj.maps.get(*name).ok_or_else(|| {
                DataplaneError::Other(format!("the eBPF object has no map {name}"))
            })?;
            let max_entries = overrides
                .iter()
                .find(|(n, _)| n == name)
                .map_or(m.max_entries(), |(_, size)| *size);
            let layout = pins::Layout {
                map_type: m.map_type(),
                key_size: m.key_size(),
                value_size: m.value_size(),
                max_entries,
                flags: m.map_flags(),
            };
            Ok((name.to_string(), layout))
        })
        .collect()
}

pub(super) fn load(cfg: &DataplaneConfig) -> Result<Ebpf> {
    let pins: Vec<(&str, PathBuf)> = MAP_NAMES
        .iter()
        .map(|name| (*name, cfg.pin_dir.join(name)))
        .collect();
    let mut loader = EbpfLoader::new();
    for (name, path) in &pins {
        loader.map_pin_path(name, path.as_path());
    }
    for (name, size) in size_overrides(cfg) {
        loader.map_max_entries(name, size);
    }
    // Read-only for the programs: the verifier drops the decapsulation path
    // this kernel does not take.
    let decap_l3 = u8::from(crate::kernel_support::probe().adjust_room_decap_l3);
    loader.override_global(netmanager_common::DECAP_L3_FLAG_GLOBAL, &decap_l3, true);
    loader.load(EBPF_OBJECT).map_err(|e| {
        DataplaneError::bpf(
            format!(
                "loading the eBPF object (maps pinned in {})",
                cfg.pin_dir.display()
            ),
            e,
        )
    })
}

/// Verifies and loads a program. The verifier gives up with EAGAIN when a
/// signal reaches the loading thread (a child process exiting under a
/// runtime that handles SIGCHLD, say), so that answer is retried, as
/// libbpf does.
pub(super) fn load_program(ebpf: &mut Ebpf, name: &str) -> Result<()> {
    const ATTEMPTS: u32 = 5;
    let mut attempt = 1;
    loop {
        let program = ebpf.program_mut(name).ok_or_else(|| {
            DataplaneError::Other(format!("the eBPF object has no program {name}"))
        })?;
        let loaded = match program {
            Program::Xdp(p) => p.load(),
            Program::SchedClassifier(p) => p.load(),
            _ => {
                return Err(DataplaneError::Other(format!(
                    "program {name} is of a type NetManager does not load"
                )));
            }
        };
        match loaded {
            Ok(()) => return Ok(()),
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempt < ATTEMPTS =>
            {
                tracing::debug!(program = name, attempt, "verification interrupted; again");
                attempt += 1;
            }
            Err(e) => return Err(DataplaneError::bpf(format!("loading program {name}"), e)),
        }
    }
}

pub(super) fn program_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier> {
    ebpf.program_mut(name)
        .ok_or_else(|| DataplaneError::Other(format!("the eBPF object has no program {name}")))?
        .try_into()
        .map_err(|e| DataplaneError::bpf(format!("program {name}"), e))
}

pub(super) fn xdp_program_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    ebpf.program_mut(name)
        .ok_or_else(|| DataplaneError::Other(format!("the eBPF object has no program {name}")))?
        .try_into()
        .map_err(|e| DataplaneError::bpf(format!("program {name}"), e))
}

#[cfg(test)]
mod tests {
    use super::super::{MapSizes, PROGRAMS};
    use super::*;
    use netmanager_common::Counter;

    fn object() -> aya_obj::Object {
        aya_obj::Object::parse(EBPF_OBJECT).expect("the embedded eBPF object parses")
    }

    /// The eBPF side names its maps by Rust identifiers; userspace finds,
    /// sizes and pins them by `netmanager_common::maps`. This keeps the two
    /// from drifting apart.
    #[test]
    fn the_object_has_exactly_the_common_maps() {
        // Global data (.rodata...) becomes maps the loader creates and never
        // pins; only the declared maps count.
        let mut in_object: Vec<String> = object()
            .maps
            .iter()
            .filter(|(_, m)| {
                matches!(
                    m.section_kind(),
                    aya_obj::EbpfSectionKind::BtfMaps | aya_obj::EbpfSectionKind::Maps
                )
            })
            .map(|(name, _)| name.clone())
            .collect();
        in_object.sort();
        let mut expected: Vec<String> = MAP_NAMES.iter().map(|n| n.to_string()).collect();
        expected.sort();
        assert_eq!(in_object, expected);
    }

    #[test]
    fn the_object_declares_the_common_default_sizes() {
        let obj = object();
        let defaults = MapSizes::default();
        for (name, size) in [
            (maps::FLOWS, defaults.flows),
            (maps::REVERSE_FLOWS, defaults.flows),
            (maps::SERVICES, defaults.services),
            (maps::BACKENDS, defaults.backends),
            (maps::INSTANCES, defaults.instances),
            (maps::PENDING, defaults.pending),
            (maps::INSTANCE_NODES, defaults.instances),
            (maps::COUNTERS, Counter::COUNT as u32),
            (maps::MISSES, netmanager_common::DEFAULT_MISS_RING_BYTES),
            (
                maps::NODE_ADDRESSES,
                netmanager_common::DEFAULT_NODE_ADDRESSES,
            ),
            (
                maps::TRUSTED_PEERS,
                netmanager_common::DEFAULT_TRUSTED_PEERS,
            ),
            (maps::FLOW_COUNTS, netmanager_common::DEFAULT_FLOW_COUNTS),
        ] {
            assert_eq!(obj.maps[name].max_entries(), size, "max entries of {name}");
        }
    }

    #[test]
    fn the_object_has_all_programs() {
        let obj = object();
        for name in PROGRAMS {
            assert!(obj.programs.contains_key(name), "program {name}");
        }
    }
}
