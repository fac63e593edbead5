//! docs/dataplane.md lists the maps and the counters for operators; these
//! tests keep those tables equal to the declarations they describe.

use netmanager_common::{
    Counter, CounterKind, DEFAULT_BACKENDS, DEFAULT_FLOW_COUNTS, DEFAULT_FLOWS, DEFAULT_INSTANCES,
    DEFAULT_PENDING, DEFAULT_SERVICES, DEFAULT_TRUSTED_PEERS, MAP_NAMES, maps,
};

const DOC: &str = include_str!("../../docs/dataplane.md");

/// The rows of the first table after `heading`, split into trimmed cells.
fn table(heading: &str) -> Vec<Vec<String>> {
    let at = DOC
        .find(heading)
        .unwrap_or_else(|| panic!("docs/dataplane.md has no section {heading:?}"));
    DOC[at..]
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2) // header and separator
        .map(|l| {
            l.trim_matches('|')
                .split(" | ")
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect()
}

/// The counters table as it must read.
fn counters_table() -> String {
    let mut t = String::from("| index | counter | kind | meaning |\n|---|---|---|---|\n");
    for c in Counter::ALL {
        let kind = match c.kind() {
            CounterKind::Verdict => "verdict",
            CounterKind::Drop => "drop",
        };
        t += &format!(
            "| {} | `{}` | {kind} | {} |\n",
            c as u32,
            c.name(),
            c.help()
        );
    }
    t
}

#[test]
fn counters_table_is_the_declaration() {
    let expected = counters_table();
    assert!(
        DOC.contains(&expected),
        "docs/dataplane.md, section Counters, must contain exactly:\n\n{expected}"
    );
}

#[test]
fn maps_table_names_every_map_with_its_default_size() {
    let rows = table("## Maps");
    let names: Vec<&str> = rows.iter().map(|r| r[0].trim_matches('`')).collect();
    assert_eq!(names, MAP_NAMES, "the maps, in MAP_NAMES order");
    let size = |map: &str| {
        rows.iter()
            .find(|r| r[0] == format!("`{map}`"))
            .map(|r| r[3].clone())
            .unwrap()
    };
    for (map, default) in [
        (maps::SERVICES, DEFAULT_SERVICES),
        (maps::BACKENDS, DEFAULT_BACKENDS),
        (maps::INSTANCES, DEFAULT_INSTANCES),
        (maps::FLOWS, DEFAULT_FLOWS),
        (maps::REVERSE_FLOWS, DEFAULT_FLOWS),
        (maps::PENDING, DEFAULT_PENDING),
        (maps::COUNTERS, Counter::COUNT as u32),
        (maps::INSTANCE_NODES, DEFAULT_INSTANCES),
        (maps::TRUSTED_PEERS, DEFAULT_TRUSTED_PEERS),
        (maps::FLOW_COUNTS, DEFAULT_FLOW_COUNTS),
    ] {
        assert_eq!(size(map), default.to_string(), "default size of {map}");
    }
}
