//! Letting the bridge's traffic through the host's own FORWARD chain.
//!
//! Our `inet oakestra` table accepts forwarding between the bridge and the
//! rest, but an accept in one table cannot overrule a drop in another: every
//! base chain on the forward hook must let a packet pass. Docker sets the
//! iptables FORWARD policy to DROP, so on a host that also runs Docker,
//! container egress and host-port DNAT would die there. Upstream appends
//! `-i <bridge> -j ACCEPT` and `-o <bridge> -j ACCEPT` to FORWARD; so do we,
//! in whichever iptables backend the host uses (both, when both hold a
//! filter table):
//!
//! - **iptables-nft** (Debian 11+, Ubuntu 21.04+, what Docker uses there):
//!   the chain is `FORWARD` in nftables' `ip filter` / `ip6 filter` tables;
//!   we add our rules with `nft`, marked by a comment.
//! - **iptables-legacy** (x_tables; `/proc/net/ip_tables_names` lists
//!   `filter`): through `iptables-legacy` / `ip6tables-legacy`.
//!
//! Rules are appended (after Docker's jumps, like upstream's), added only
//! when missing, so repeating it is harmless, and removed with the bridge.
//! A host whose FORWARD chain does not exist is left alone.

use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::nft::run_nft;

/// Marks our rules; followed by the direction and the bridge.
pub const COMMENT: &str = "oakestra-netmanager";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn nft(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }

    fn legacy_binary(self) -> &'static str {
        match self {
            Family::V4 => "iptables-legacy",
            Family::V6 => "ip6tables-legacy",
        }
    }

    fn legacy_tables(self) -> &'static str {
        match self {
            Family::V4 => "/proc/thread-self/net/ip_tables_names",
            Family::V6 => "/proc/thread-self/net/ip6_tables_names",
        }
    }
}

const FAMILIES: [Family; 2] = [Family::V4, Family::V6];

/// (match option of iptables, nft meta key, word in the comment)
const DIRECTIONS: [(&str, &str, &str); 2] = [("-i", "iifname", "in"), ("-o", "oifname", "out")];

fn comment(direction: &str, bridge: &str) -> String {
    format!("{COMMENT} {direction} {bridge}")
}

/// Accept the bridge's forwarded traffic in every FORWARD chain the host
/// has (in the calling thread's network namespace).
pub fn ensure(bridge: &str) -> Result<()> {
    for family in FAMILIES {
        if let Some(rules) = nft_forward_rules(family)? {
            for (_, key, word) in DIRECTIONS {
                let c = comment(word, bridge);
                if !rules.iter().any(|(_, have)| *have == c) {
                    run_nft(&format!(
                        "add rule {} filter FORWARD {key} \"{bridge}\" counter accept comment \"{c}\"\n",
                        family.nft()
                    ))
                    .with_context(|| format!("accepting {bridge} in {} filter FORWARD", family.nft()))?;
                }
            }
        }
        if legacy_filter_in_use(family) {
            for (opt, _, word) in DIRECTIONS {
                let spec = legacy_spec(opt, bridge, word);
                if legacy(family, "-C", &spec).is_err() {
                    legacy(family, "-A", &spec)?;
                }
            }
        }
    }
    Ok(())
}

/// Remove what [`ensure`] added for `bridge`; absent rules are fine.
pub fn remove(bridge: &str) -> Result<()> {
    for family in FAMILIES {
        if let Some(rules) = nft_forward_rules(family)? {
            let ours: Vec<String> = DIRECTIONS
                .iter()
                .map(|(_, _, word)| comment(word, bridge))
                .collect();
            for (handle, c) in rules {
                if ours.contains(&c) {
                    run_nft(&format!(
                        "delete rule {} filter FORWARD handle {handle}\n",
                        family.nft()
                    ))?;
                }
            }
        }
        if legacy_filter_in_use(family) {
            for (opt, _, word) in DIRECTIONS {
                let spec = legacy_spec(opt, bridge, word);
                while legacy(family, "-C", &spec).is_ok() {
                    legacy(family, "-D", &spec)?;
                }
            }
        }
    }
    Ok(())
}

/// (handle, comment) of each rule in `<family> filter FORWARD`, or None
/// when that chain does not exist.
fn nft_forward_rules(family: Family) -> Result<Option<Vec<(u64, String)>>> {
    let out = Command::new("nft")
        .args(["-j", "list", "chain", family.nft(), "filter", "FORWARD"])
        .output()
        .context("running nft (is nftables installed?)")?;
    if !out.status.success() {
        // No such table or chain: nothing on this hook to get past.
        return Ok(None);
    }
    let listing: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "reading `nft -j list chain {} filter FORWARD`",
            family.nft()
        )
    })?;
    Ok(Some(rules_with_comments(&listing)))
}

fn rules_with_comments(listing: &Value) -> Vec<(u64, String)> {
    listing["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|item| {
            let rule = item.get("rule")?;
            Some((
                rule["handle"].as_u64()?,
                rule["comment"].as_str()?.to_string(),
            ))
        })
        .collect()
}

/// Whether x_tables holds a filter table in this namespace (something
/// used iptables-legacy here). Reading the list loads no module; it is the
/// calling thread's namespace's list (`/proc/net` would be the process's).
fn legacy_filter_in_use(family: Family) -> bool {
    std::fs::read_to_string(family.legacy_tables())
        .is_ok_and(|names| names.lines().any(|n| n.trim() == "filter"))
}

fn legacy_spec(opt: &str, bridge: &str, word: &str) -> Vec<String> {
    [
        "FORWARD",
        opt,
        bridge,
        "-m",
        "comment",
        "--comment",
        &comment(word, bridge),
        "-j",
        "ACCEPT",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// `<family>tables-legacy -w <op> <spec>`.
fn legacy(family: Family, op: &str, spec: &[String]) -> Result<()> {
    let bin = family.legacy_binary();
    let out = Command::new(bin)
        .args(["-w", op])
        .args(spec)
        .output()
        .with_context(|| {
            format!("running {bin}: the host uses iptables-legacy, install iptables")
        })?;
    if !out.status.success() {
        bail!(
            "{bin} {op} {}: {}",
            spec.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_rules_are_found_by_comment() {
        let listing = serde_json::json!({"nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {"chain": {"family": "ip", "table": "filter", "name": "FORWARD", "policy": "drop"}},
            {"rule": {"family": "ip", "table": "filter", "chain": "FORWARD", "handle": 4,
                      "expr": [{"jump": {"target": "DOCKER-USER"}}]}},
            {"rule": {"family": "ip", "table": "filter", "chain": "FORWARD", "handle": 9,
                      "comment": "oakestra-netmanager in goProxyBridge", "expr": []}},
        ]});
        assert_eq!(
            rules_with_comments(&listing),
            vec![(9, "oakestra-netmanager in goProxyBridge".to_string())]
        );
        assert_eq!(
            legacy_spec("-o", "goProxyBridge", "out").join(" "),
            "FORWARD -o goProxyBridge -m comment --comment oakestra-netmanager out goProxyBridge -j ACCEPT"
        );
    }
}
