//! A job's `volumes`, mounted through their CSI drivers before the container
//! starts and released after it stops.
//!
//! For each volume: NodeStageVolume (when the plugin has STAGE_UNSTAGE_VOLUME)
//! at a node-wide staging path, NodePublishVolume at a per-instance target
//! path, and a bind mount of that target at `mount_path` in the container;
//! release is the reverse. What is mounted is recorded in a file per instance
//! (`<state>/csi/mounts/<task id>.json`) as each step succeeds, so a daemon
//! that restarts (or crashes mid-deploy) still releases it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::plugin::Plugin;
use super::registry::Registry;

/// Where a volume goes in the container when the job names no `mount_path`
/// (upstream's default), followed by the volume id.
const DEFAULT_MOUNT_ROOT: &str = "/mnt/csi";
/// Longest `volume_id`, driver name, `mount_path` or config entry accepted.
const MAX_FIELD: usize = 4096;

/// One entry of a job's `volumes` (upstream's VolumeRequest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRequest {
    pub volume_id: String,
    pub csi_driver: String,
    /// Absolute, normalised path in the container.
    pub mount_path: String,
    /// Passed to the plugin as the volume context.
    pub config: HashMap<String, String>,
}

/// A `volumes` entry as the cluster sends it (keys case-insensitive, values
/// of `config` may be numbers or booleans).
#[derive(Deserialize)]
struct RawVolume {
    #[serde(default)]
    volume_id: Value,
    #[serde(default)]
    csi_driver: Value,
    #[serde(default)]
    mount_path: Value,
    #[serde(default)]
    config: Value,
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn checked(field: &str, s: String) -> Result<String, String> {
    if s.contains('\0') {
        return Err(format!("{field} contains a NUL byte"));
    }
    if s.len() > MAX_FIELD {
        return Err(format!("{field} is longer than {MAX_FIELD} bytes"));
    }
    Ok(s)
}

/// An absolute container path without `.`/`..` components, normalised.
fn container_path(p: &str) -> Result<String, String> {
    if !p.starts_with('/') {
        return Err(format!("mount_path {p:?} is not absolute"));
    }
    let mut parts = Vec::new();
    for c in p.split('/').filter(|c| !c.is_empty() && *c != ".") {
        if c == ".." {
            return Err(format!("mount_path {p:?} contains '..'"));
        }
        parts.push(c);
    }
    if parts.is_empty() {
        return Err(format!("mount_path {p:?} is the container's root"));
    }
    Ok(format!("/{}", parts.join("/")))
}

/// Validates the `volumes` list of a deploy document; null or absent is empty.
pub fn parse_volumes(v: &Value) -> Result<Vec<VolumeRequest>, String> {
    let items = match v {
        Value::Null => return Ok(Vec::new()),
        Value::Array(a) => a,
        _ => return Err("not a list".into()),
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| parse_one(item).map_err(|e| format!("entry {i}: {e}")))
        .collect()
}

fn parse_one(item: &Value) -> Result<VolumeRequest, String> {
    let Value::Object(map) = item else {
        return Err("not an object".into());
    };
    let lowered: serde_json::Map<String, Value> = map
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .collect();
    let raw: RawVolume =
        serde_json::from_value(Value::Object(lowered)).map_err(|e| e.to_string())?;
    let volume_id = scalar(&raw.volume_id)
        .filter(|s| !s.is_empty())
        .ok_or("volume_id is missing")?;
    let volume_id = checked("volume_id", volume_id)?;
    let csi_driver = scalar(&raw.csi_driver)
        .filter(|s| !s.is_empty())
        .ok_or("csi_driver is missing")?;
    let csi_driver = checked("csi_driver", csi_driver)?;
    let mount_path = match scalar(&raw.mount_path).filter(|s| !s.is_empty()) {
        Some(p) => checked("mount_path", p)?,
        None => format!("{DEFAULT_MOUNT_ROOT}/{}", volume_id.trim_start_matches('/')),
    };
    let mount_path = container_path(&mount_path)?;
    let config = match &raw.config {
        Value::Null => HashMap::new(),
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| {
                let v =
                    scalar(v).ok_or_else(|| format!("config value of {k:?} is not a scalar"))?;
                Ok((
                    checked("config key", k.clone())?,
                    checked("config value", v)?,
                ))
            })
            .collect::<Result<_, String>>()?,
        _ => return Err("config is not an object".into()),
    };
    Ok(VolumeRequest {
        volume_id,
        csi_driver,
        mount_path,
        config,
    })
}

/// A volume staged and/or published for one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountedVolume {
    pub volume_id: String,
    /// The configured driver name.
    pub driver: String,
    /// The plugin's socket when it was mounted (the driver may be renamed or
    /// removed from conf.json meanwhile).
    pub endpoint: String,
    pub staging: Option<PathBuf>,
    /// Published here; None while only staged.
    pub target: Option<PathBuf>,
    pub mount_path: String,
}

/// The bind mounts that put published volumes into a container (OCI spec
/// `mounts` entries).
pub fn spec_mounts(mounted: &[MountedVolume]) -> Vec<Value> {
    mounted
        .iter()
        .filter_map(|m| {
            let source = m.target.as_ref()?;
            Some(json!({
                "destination": m.mount_path,
                "type": "bind",
                "source": source,
                "options": ["rbind", "rprivate", "rw"],
            }))
        })
        .collect()
}

/// Appends the bind mounts of `mounted` to an OCI runtime spec's `mounts`.
pub fn add_to_spec(spec: &mut Value, mounted: &[MountedVolume]) {
    let extra = spec_mounts(mounted);
    if extra.is_empty() {
        return;
    }
    match spec.get_mut("mounts").and_then(Value::as_array_mut) {
        Some(mounts) => mounts.extend(extra),
        None => spec["mounts"] = Value::Array(extra),
    }
}

/// A name from a job or the configuration as one safe path component: kept
/// when it is a plain name, else a readable prefix and a hash (a volume id
/// may be a path, e.g. the hostpath plugin's).
fn path_component(s: &str) -> String {
    let plain = !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if plain {
        return s.to_string();
    }
    let prefix: String = s
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(40)
        .collect();
    let hash = Sha256::digest(s.as_bytes());
    let hex: String = hash[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{hex}", prefix.trim_start_matches('.'))
}

/// Mounts and releases volumes; one per daemon.
#[derive(Debug, Clone)]
pub struct VolumeManager {
    registry: Registry,
    /// `<state>/csi`: staging/, publish/, mounts/.
    base: PathBuf,
}

impl VolumeManager {
    pub fn new(registry: Registry, base: impl Into<PathBuf>) -> VolumeManager {
        VolumeManager {
            registry,
            base: base.into(),
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    fn record_path(&self, task_id: &str) -> PathBuf {
        self.base.join("mounts").join(format!("{task_id}.json"))
    }

    fn read_record(&self, task_id: &str) -> Vec<MountedVolume> {
        let path = self.record_path(task_id);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), "unreadable CSI mount record: {e}");
                Vec::new()
            }),
            Err(_) => Vec::new(),
        }
    }

    /// Replaces the record (atomically and durably); an empty list removes it.
    fn write_record(&self, task_id: &str, mounted: &[MountedVolume]) -> Result<()> {
        let path = self.record_path(task_id);
        if mounted.is_empty() {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("removing {}", path.display()));
                }
                _ => return Ok(()),
            }
        }
        let dir = self.base.join("mounts");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let tmp = dir.join(format!(".{task_id}.json.tmp"));
        let bytes = serde_json::to_vec(mounted).context("encoding the CSI mount record")?;
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)
                .with_context(|| format!("creating {}", tmp.display()))?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
    }

    /// Mounts every volume of instance `task_id`, in order. On failure what was
    /// already mounted is released, and the error names the volume and driver.
    pub async fn mount_all(
        &self,
        task_id: &str,
        volumes: &[VolumeRequest],
    ) -> Result<Vec<MountedVolume>> {
        let mut mounted: Vec<MountedVolume> = Vec::new();
        for v in volumes {
            if let Err(e) = self.mount_one(task_id, v, &mut mounted).await {
                self.release(task_id).await;
                return Err(e.context(format!(
                    "volume {:?} (CSI driver {:?})",
                    v.volume_id, v.csi_driver
                )));
            }
        }
        Ok(mounted)
    }

    async fn mount_one(
        &self,
        task_id: &str,
        v: &VolumeRequest,
        mounted: &mut Vec<MountedVolume>,
    ) -> Result<()> {
        let driver = self
            .registry
            .resolve(&v.csi_driver)
            .await
            .map_err(anyhow::Error::msg)?;
        let driver_dir = path_component(&driver.name);
        let volume_dir = path_component(&v.volume_id);
        let mut entry = MountedVolume {
            volume_id: v.volume_id.clone(),
            driver: driver.name.clone(),
            endpoint: driver.plugin.socket().display().to_string(),
            staging: None,
            target: None,
            mount_path: v.mount_path.clone(),
        };
        if driver.info.stage_unstage {
            let staging = self
                .base
                .join("staging")
                .join(&driver_dir)
                .join(&volume_dir);
            create_dir(&staging)?;
            // Recorded before the call: a plugin that staged and then timed out
            // is unstaged on release.
            entry.staging = Some(staging.clone());
            mounted.push(entry.clone());
            self.write_record(task_id, mounted)?;
            driver
                .plugin
                .stage(&v.volume_id, &staging, &v.config)
                .await?;
            mounted.pop();
        }
        let target = self
            .base
            .join("publish")
            .join(&driver_dir)
            .join(task_id)
            .join(&volume_dir);
        create_dir(&target)?;
        entry.target = Some(target.clone());
        mounted.push(entry.clone());
        self.write_record(task_id, mounted)?;
        driver
            .plugin
            .publish(&v.volume_id, entry.staging.as_deref(), &target, &v.config)
            .await?;
        tracing::info!(
            task = task_id, volume = %v.volume_id, driver = %driver.name,
            target = %target.display(), mount_path = %v.mount_path, "CSI volume published"
        );
        Ok(())
    }

    /// Unpublishes and unstages what instance `task_id` has mounted. What
    /// cannot be released stays in the record for the next attempt (the next
    /// release or the sweep at start).
    pub async fn release(&self, task_id: &str) {
        let mounted = self.read_record(task_id);
        if mounted.is_empty() {
            return;
        }
        let mut left = Vec::new();
        for m in mounted.into_iter().rev() {
            if let Err(e) = self.release_one(task_id, &m).await {
                tracing::warn!(
                    task = task_id, volume = %m.volume_id, driver = %m.driver,
                    "releasing CSI volume: {e:#}"
                );
                left.push(m);
            }
        }
        left.reverse();
        if let Err(e) = self.write_record(task_id, &left) {
            tracing::warn!(task = task_id, "{e:#}");
        }
    }

    async fn release_one(&self, task_id: &str, m: &MountedVolume) -> Result<()> {
        let plugin = Plugin::new(&m.endpoint)?;
        if let Some(target) = &m.target {
            plugin.unpublish(&m.volume_id, target).await?;
            remove_empty_dir(target);
            // <driver>/<task id>/ is this instance's alone.
            if let Some(task_dir) = target.parent() {
                let _ = std::fs::remove_dir(task_dir);
            }
            tracing::info!(task = task_id, volume = %m.volume_id, driver = %m.driver, "CSI volume unpublished");
        }
        if let Some(staging) = &m.staging {
            if self.staging_in_use(task_id, staging) {
                return Ok(());
            }
            plugin.unstage(&m.volume_id, staging).await?;
            remove_empty_dir(staging);
        }
        Ok(())
    }

    /// Another instance's record still uses this staging path.
    fn staging_in_use(&self, task_id: &str, staging: &Path) -> bool {
        let Ok(rd) = std::fs::read_dir(self.base.join("mounts")) else {
            return false;
        };
        rd.flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_suffix(".json").map(str::to_string)
            })
            .filter(|id| id != task_id && !id.starts_with('.'))
            .any(|id| {
                self.read_record(&id)
                    .iter()
                    .any(|m| m.staging.as_deref() == Some(staging))
            })
    }

    /// Releases the volumes of every recorded instance for which `running`
    /// is false (daemon start, after running instances were adopted).
    pub async fn sweep(&self, running: impl Fn(&str) -> bool) {
        let Ok(rd) = std::fs::read_dir(self.base.join("mounts")) else {
            return;
        };
        let stale: Vec<String> = rd
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_suffix(".json")
                    .filter(|id| !id.starts_with('.'))
                    .map(str::to_string)
            })
            .filter(|id| !running(id))
            .collect();
        for id in stale {
            tracing::info!(task = %id, "releasing the CSI volumes of an instance that no longer runs");
            self.release(&id).await;
        }
    }
}

/// Creates a directory (and parents) only root can enter.
fn create_dir(path: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(path)
        .with_context(|| format!("creating {}", path.display()))
}

/// Removes a target or staging directory once empty. Never recursive: if the
/// plugin left the volume mounted there, deleting through it would destroy
/// the volume's data.
fn remove_empty_dir(path: &Path) {
    if let Err(e) = std::fs::remove_dir(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), "leaving CSI directory in place: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volumes_as_upstream_sends_them() {
        let v = parse_volumes(&json!([
            {"volume_id": "/host/data", "csi_driver": "csi.oakestra.io/hostpath", "mount_path": "/data"},
            {"Volume_ID": "named", "CSI_DRIVER": "nfs.csi.k8s.io", "config": {"server": "10.0.0.1", "port": 2049, "ro": false}},
        ]))
        .expect("parses");
        assert_eq!(v[0].mount_path, "/data");
        assert_eq!(v[1].mount_path, "/mnt/csi/named");
        assert_eq!(v[1].config["port"], "2049");
        assert_eq!(v[1].config["ro"], "false");
        assert_eq!(parse_volumes(&Value::Null), Ok(Vec::new()));
    }

    #[test]
    fn hostile_volumes_are_rejected() {
        for bad in [
            json!({"csi_driver": "d", "mount_path": "/x"}),
            json!({"volume_id": "v", "mount_path": "/x"}),
            json!({"volume_id": "v", "csi_driver": "d", "mount_path": "relative"}),
            json!({"volume_id": "v", "csi_driver": "d", "mount_path": "/a/../../etc"}),
            json!({"volume_id": "v", "csi_driver": "d", "mount_path": "/"}),
            json!({"volume_id": "v", "csi_driver": "d", "config": {"k": {"nested": 1}}}),
            json!({"volume_id": "v\u{0}", "csi_driver": "d"}),
            json!("not an object"),
        ] {
            assert!(parse_volumes(&json!([bad])).is_err(), "{bad} accepted");
        }
        assert!(parse_volumes(&json!({"volume_id": "v"})).is_err());
    }

    #[test]
    fn default_mount_path_keeps_paths_inside() {
        let v = parse_volumes(&json!([{"volume_id": "/a/b", "csi_driver": "d"}])).expect("ok");
        assert_eq!(v[0].mount_path, "/mnt/csi/a/b");
        assert!(parse_volumes(&json!([{"volume_id": "../../etc", "csi_driver": "d"}])).is_err());
    }

    #[test]
    fn path_components_are_safe() {
        assert_eq!(path_component("csi.example.io"), "csi.example.io");
        for s in [
            "/host/data",
            "..",
            ".",
            "",
            "a/../b",
            "csi.oakestra.io/hostpath",
        ] {
            let c = path_component(s);
            assert!(
                !c.contains('/') && c != "." && c != ".." && !c.is_empty(),
                "{s} -> {c}"
            );
            assert!(!c.starts_with('.'), "{s} -> {c}");
        }
        assert_ne!(path_component("a/b"), path_component("a_b"));
    }

    #[test]
    fn published_volumes_become_bind_mounts() {
        let m = MountedVolume {
            volume_id: "v".into(),
            driver: "d".into(),
            endpoint: "/run/d.sock".into(),
            staging: None,
            target: Some("/var/lib/oakestra/csi/publish/d/t/v".into()),
            mount_path: "/data".into(),
        };
        let staged_only = MountedVolume {
            target: None,
            ..m.clone()
        };
        let mounts = spec_mounts(&[m, staged_only]);
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0]["destination"], "/data");
        assert_eq!(mounts[0]["source"], "/var/lib/oakestra/csi/publish/d/t/v");
        assert_eq!(mounts[0]["type"], "bind");
    }
}
