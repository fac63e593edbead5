//! Which runtimes this node offers, and which one runs a job.
//!
//! As upstream: containerd's default runtime is "docker"; the runtimes
//! containerd is configured with (`plugins.<plugin>.containerd.runtimes.<name>`
//! in `/etc/containerd/config.toml`, e.g. runsc or kata) are offered under
//! their names; the `virtualizations` of the configuration that are active
//! are offered too. The list goes out as `virtualization` in the node report.
//!
//! A job naming anything else is refused by the node's local policy unless
//! the operator allowed unknown runtimes; then, as upstream, an
//! `io.containerd.*` name is used as a containerd shim and any other name as
//! a runc-compatible binary found on PATH.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::config::{Config, RUNTIME_CONTAINER, RUNTIME_CROSVM, RUNTIME_UNIKERNEL};
use crate::containerd_runtime::{RUNC_RUNTIME, RuntimeChoice};
use crate::node_report::find_on_path;

/// containerd's configuration, where upstream looks for runtimes.
pub const DEFAULT_CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";

/// A runtime containerd's configuration names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfiguredRuntime {
    /// The shim (`runtime_type`), runc's when absent.
    pub shim: String,
    /// `options.BinaryName`, for runc-compatible runtimes.
    pub binary: Option<PathBuf>,
}

/// Runtimes named in containerd's configuration (any plugin's
/// `containerd.runtimes` table, which covers containerd 1.x's CRI plugin
/// and 2.x's `io.containerd.cri.v1.runtime`). An unreadable or invalid file
/// yields none, with a log line, as upstream.
pub fn discover_configured(path: &Path) -> BTreeMap<String, ConfiguredRuntime> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            tracing::info!(config = %path.display(), "no containerd configuration to read runtimes from: {e}");
            return BTreeMap::new();
        }
    };
    match parse_configured(&text) {
        Ok(found) => {
            for name in found.keys() {
                tracing::info!(config = %path.display(), "offering runtime {name:?} configured in containerd");
            }
            found
        }
        Err(e) => {
            tracing::warn!(config = %path.display(), "cannot read runtimes from containerd's configuration: {e}");
            BTreeMap::new()
        }
    }
}

/// The runtimes of one containerd configuration document.
pub fn parse_configured(
    text: &str,
) -> Result<BTreeMap<String, ConfiguredRuntime>, toml::de::Error> {
    let doc: toml::Table = toml::from_str(text)?;
    let mut out = BTreeMap::new();
    let plugins = doc.get("plugins").and_then(|p| p.as_table());
    for plugin in plugins.into_iter().flat_map(|p| p.values()) {
        let runtimes = plugin
            .get("containerd")
            .and_then(|c| c.get("runtimes"))
            .and_then(|r| r.as_table());
        for (name, rt) in runtimes.into_iter().flatten() {
            let shim = rt
                .get("runtime_type")
                .and_then(|t| t.as_str())
                .filter(|t| !t.trim().is_empty())
                .unwrap_or(RUNC_RUNTIME)
                .to_string();
            let binary = rt
                .get("options")
                .and_then(|o| o.get("BinaryName"))
                .and_then(|b| b.as_str())
                .filter(|b| !b.trim().is_empty())
                .map(PathBuf::from);
            out.entry(name.clone())
                .or_insert(ConfiguredRuntime { shim, binary });
        }
    }
    Ok(out)
}

/// Where a job runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    Containerd(RuntimeChoice),
    Unikernel,
}

/// Why a job cannot run here; the text is the FAILED report's detail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error(
        "unknown virtualization {0:?}: this node offers no such runtime, and its local \
         policy refuses unknown runtimes (local_policy.allow_unknown_runtimes in the node's \
         conf.json; `NodeEngine config policy unknown-runtimes allow`)"
    )]
    RefusedByPolicy(String),
    #[error("unknown virtualization {0:?}: no such runtime binary on this node's PATH")]
    NoSuchBinary(String),
    #[error(
        "the {0} runtime is not enabled on this node (NodeEngine config virtualization {0} on)"
    )]
    NotEnabled(&'static str),
    #[error("the containerd runtime is not active on this node")]
    NoContainerd,
    #[error(
        "crosvm is enabled but not installed on this node (Debian 12 has no crosvm package; \
         install it from the ChromiumOS sources)"
    )]
    CrosvmMissing,
    #[error(
        "crosvm is installed but this worker does not run crosvm VMs yet \
         (docs/nodeengine-parity.md)"
    )]
    CrosvmUnsupported,
}

/// The runtimes of this node.
#[derive(Debug, Clone, Default)]
pub struct Runtimes {
    containerd: bool,
    unikernel: bool,
    crosvm: bool,
    configured: BTreeMap<String, ConfiguredRuntime>,
    allow_unknown: bool,
}

impl Runtimes {
    /// From the node configuration and containerd's (read once, at start).
    pub fn new(cfg: &Config, containerd_config: &Path) -> Runtimes {
        let containerd = cfg.runtime_active(RUNTIME_CONTAINER);
        Runtimes {
            containerd,
            unikernel: cfg.runtime_active(RUNTIME_UNIKERNEL),
            crosvm: cfg.runtime_active(RUNTIME_CROSVM),
            configured: if containerd {
                discover_configured(containerd_config)
            } else {
                BTreeMap::new()
            },
            allow_unknown: cfg.local_policy.allow_unknown_runtimes,
        }
    }

    /// `virtualization` of the node report: the active runtimes of the
    /// configuration and containerd's configured ones. crosvm is left out:
    /// this worker cannot run its jobs, so the scheduler should not send them.
    pub fn advertised(&self, cfg: &Config) -> Vec<String> {
        let mut out: Vec<String> = cfg
            .active_runtimes()
            .into_iter()
            .filter(|r| r != RUNTIME_CROSVM)
            .collect();
        if self.crosvm {
            tracing::warn!("{}", self.crosvm_reason());
        }
        for name in self.configured.keys() {
            if !out.contains(name) {
                out.push(name.clone());
            }
        }
        out
    }

    fn crosvm_reason(&self) -> PlacementError {
        if find_on_path("crosvm").is_some() {
            PlacementError::CrosvmUnsupported
        } else {
            PlacementError::CrosvmMissing
        }
    }

    /// Where a job with this `virtualization` runs, or why it cannot.
    pub fn place(&self, virtualization: &str) -> Result<Placement, PlacementError> {
        let name = virtualization.trim();
        match name {
            "" | RUNTIME_CONTAINER | "containerd" => {
                return self.containerd(RuntimeChoice::default());
            }
            RUNTIME_UNIKERNEL => {
                return if self.unikernel {
                    Ok(Placement::Unikernel)
                } else {
                    Err(PlacementError::NotEnabled(RUNTIME_UNIKERNEL))
                };
            }
            RUNTIME_CROSVM => {
                return Err(if self.crosvm {
                    self.crosvm_reason()
                } else {
                    PlacementError::NotEnabled(RUNTIME_CROSVM)
                });
            }
            _ => {}
        }
        if let Some(rt) = self.configured.get(name) {
            return self.containerd(configured_choice(name, rt));
        }
        if !self.allow_unknown {
            return Err(PlacementError::RefusedByPolicy(name.to_string()));
        }
        // Upstream's handling of any other name, allowed by the operator.
        if name.starts_with("io.containerd.") && name.len() < 100 {
            return self.containerd(RuntimeChoice {
                shim: name.to_string(),
                binary: None,
            });
        }
        let binary = valid_binary_name(name)
            .then(|| find_on_path(name))
            .flatten()
            .ok_or_else(|| PlacementError::NoSuchBinary(name.to_string()))?;
        self.containerd(RuntimeChoice {
            shim: RUNC_RUNTIME.to_string(),
            binary: Some(binary),
        })
    }

    fn containerd(&self, choice: RuntimeChoice) -> Result<Placement, PlacementError> {
        if self.containerd {
            Ok(Placement::Containerd(choice))
        } else {
            Err(PlacementError::NoContainerd)
        }
    }
}

/// A configured runtime: its shim; a runc-compatible one runs its
/// `BinaryName`, or, as upstream, the binary of its name when one is on PATH.
fn configured_choice(name: &str, rt: &ConfiguredRuntime) -> RuntimeChoice {
    let binary = if rt.shim == RUNC_RUNTIME {
        rt.binary
            .clone()
            .or_else(|| (name != "runc").then(|| find_on_path(name)).flatten())
    } else {
        rt.binary.clone()
    };
    RuntimeChoice {
        shim: rt.shim.clone(),
        binary,
    }
}

/// A file name, not a path: a job may not point at arbitrary files.
fn valid_binary_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.')
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTAINERD_1_6: &str = r#"
version = 2
[plugins]
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runsc]
      runtime_type = "io.containerd.runsc.v1"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.crun]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.crun.options]
        BinaryName = "/usr/local/bin/crun"
"#;

    const CONTAINERD_2: &str = r#"
version = 3
[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.kata]
  runtime_type = 'io.containerd.kata.v2'
"#;

    fn runtimes(toml: &str, allow_unknown: bool) -> Runtimes {
        Runtimes {
            containerd: true,
            unikernel: false,
            crosvm: false,
            configured: parse_configured(toml).expect("parses"),
            allow_unknown,
        }
    }

    #[test]
    fn configured_runtimes_are_found_in_both_config_versions() {
        let v2 = parse_configured(CONTAINERD_1_6).expect("parses");
        assert_eq!(v2.keys().collect::<Vec<_>>(), ["crun", "runc", "runsc"]);
        assert_eq!(v2["runsc"].shim, "io.containerd.runsc.v1");
        assert_eq!(
            v2["crun"].binary.as_deref(),
            Some(Path::new("/usr/local/bin/crun"))
        );
        let v3 = parse_configured(CONTAINERD_2).expect("parses");
        assert_eq!(v3["kata"].shim, "io.containerd.kata.v2");
        assert!(
            parse_configured("[plugins]\nx = 1")
                .expect("parses")
                .is_empty()
        );
        assert!(parse_configured("not toml [").is_err());
    }

    #[test]
    fn placements() {
        let r = runtimes(CONTAINERD_1_6, false);
        assert_eq!(
            r.place("docker"),
            Ok(Placement::Containerd(RuntimeChoice::default()))
        );
        assert_eq!(
            r.place("runsc"),
            Ok(Placement::Containerd(RuntimeChoice {
                shim: "io.containerd.runsc.v1".into(),
                binary: None
            }))
        );
        assert_eq!(
            r.place("crun"),
            Ok(Placement::Containerd(RuntimeChoice {
                shim: RUNC_RUNTIME.into(),
                binary: Some("/usr/local/bin/crun".into())
            }))
        );
        assert_eq!(
            r.place("unikernel"),
            Err(PlacementError::NotEnabled("unikernel"))
        );
        let refused = r.place("io.containerd.wasm.v1").unwrap_err();
        assert!(matches!(refused, PlacementError::RefusedByPolicy(_)));
        assert!(
            refused
                .to_string()
                .contains("local_policy.allow_unknown_runtimes")
        );
        let open = runtimes(CONTAINERD_1_6, true);
        assert_eq!(
            open.place("io.containerd.wasm.v1"),
            Ok(Placement::Containerd(RuntimeChoice {
                shim: "io.containerd.wasm.v1".into(),
                binary: None
            }))
        );
        assert_eq!(
            open.place("../../bin/sh"),
            Err(PlacementError::NoSuchBinary("../../bin/sh".into()))
        );
        assert_eq!(
            open.place("no-such-runtime-binary"),
            Err(PlacementError::NoSuchBinary(
                "no-such-runtime-binary".into()
            ))
        );
    }

    #[test]
    fn crosvm_is_never_advertised_and_fails_with_a_reason() {
        let mut cfg = Config::default();
        cfg.set_virtualization(RUNTIME_CROSVM, true);
        let mut r = runtimes(CONTAINERD_2, false);
        r.crosvm = true;
        assert_eq!(r.advertised(&cfg), ["docker", "kata"]);
        let err = r.place("crosvm").unwrap_err();
        assert!(
            matches!(
                err,
                PlacementError::CrosvmMissing | PlacementError::CrosvmUnsupported
            ),
            "{err}"
        );
        r.crosvm = false;
        assert_eq!(r.place("crosvm"), Err(PlacementError::NotEnabled("crosvm")));
    }
}
