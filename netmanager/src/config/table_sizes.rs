//! How big the dataplane's tables are: netcfg.json's `TableProfile` and
//! the sizes given one by one, turned into the map sizes the daemon and the
//! bench runner open the dataplane with.

use netmanager_common::DEFAULT_MISS_HOLD;

use crate::dataplane::MapSizes;

/// netcfg.json keys: `TableProfile` (the defaults the others start from),
/// `FlowTableSize`, `ServiceTableSize`,
/// `BackendTableSize`, `InstanceTableSize`, `PendingTableSize`, `MissHold`,
/// `FlowsPerContainer`. A changed size takes effect at the next start: the
/// pinned map is replaced by one of the new size with its entries copied
/// over (those that fit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSizes {
    pub flows: u32,
    pub services: u32,
    pub backends: u32,
    pub instances: u32,
    pub pending: u32,
    pub miss_hold: u32,
    /// Default: a quarter of `flows`.
    pub flows_per_container: u32,
}

/// The size defaults the tables start from: netcfg.json `TableProfile`,
/// `"default"` or `"edge"` (small boards; a quarter of the map memory,
/// docs/performance.md). Sizes given one by one override either.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TableProfile {
    #[default]
    Default,
    Edge,
}

impl std::str::FromStr for TableProfile {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "default" => Ok(TableProfile::Default),
            "edge" => Ok(TableProfile::Edge),
            _ => Err(format!("{s:?} is neither \"default\" nor \"edge\"")),
        }
    }
}

impl TableSizes {
    /// The sizes of `profile` before any single size is overridden.
    pub fn of_profile(profile: TableProfile) -> TableSizes {
        use netmanager_common as c;
        let (flows, services, backends, instances, pending) = match profile {
            TableProfile::Default => (
                c::DEFAULT_FLOWS,
                c::DEFAULT_SERVICES,
                c::DEFAULT_BACKENDS,
                c::DEFAULT_INSTANCES,
                c::DEFAULT_PENDING,
            ),
            TableProfile::Edge => (
                c::EDGE_FLOWS,
                c::EDGE_SERVICES,
                c::EDGE_BACKENDS,
                c::EDGE_INSTANCES,
                c::EDGE_PENDING,
            ),
        };
        TableSizes {
            flows,
            services,
            backends,
            instances,
            pending,
            miss_hold: DEFAULT_MISS_HOLD,
            flows_per_container: c::default_flows_per_container(flows),
        }
    }

    /// The map sizes the dataplane is opened with (the daemon and the
    /// bench runner both take them from here).
    pub fn map_sizes(&self) -> MapSizes {
        MapSizes {
            flows: self.flows,
            services: self.services,
            backends: self.backends,
            instances: self.instances,
            pending: self.pending,
        }
    }
}

impl Default for TableSizes {
    fn default() -> Self {
        TableSizes::of_profile(TableProfile::Default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NetConfig;

    #[test]
    fn edge_profile_sizes_and_single_overrides() {
        let c = NetConfig::parse(r#"{"TableProfile": "edge"}"#).unwrap();
        assert_eq!(c.tables, TableSizes::of_profile(TableProfile::Edge));
        assert_eq!(c.tables.flows, netmanager_common::EDGE_FLOWS);
        assert_eq!(
            c.tables.flows_per_container,
            netmanager_common::EDGE_FLOWS / 4
        );
        assert!(c.tables.flows < TableSizes::default().flows);
        let c = NetConfig::parse(r#"{"TableProfile": "Edge", "FlowTableSize": 40000}"#).unwrap();
        assert_eq!(c.tables.flows, 40000);
        assert_eq!(c.tables.flows_per_container, 10000);
        assert_eq!(c.tables.services, netmanager_common::EDGE_SERVICES);
        let c = NetConfig::parse(r#"{"TableProfile": "default"}"#).unwrap();
        assert_eq!(c.tables, TableSizes::default());
        let e = NetConfig::parse(r#"{"TableProfile": "tiny"}"#).unwrap_err();
        assert!(format!("{e:#}").contains("TableProfile"), "{e:#}");
    }
}
