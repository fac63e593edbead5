//! `/etc/oakestra/conf.json`: the one file the CLI edits and the daemon reads.
//!
//! The on-disk format is upstream's, byte for byte where it matters: compact JSON,
//! fields in upstream's order, and the misspelled `virutalizaiton_*` keys, so a file
//! written by the upstream CLI keeps working and vice versa. Unlike upstream we never
//! truncate a file we cannot parse: the error names the file and the position.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use worker_common::lenient;

/// Default location of the configuration file.
pub use worker_common::paths::NODEENGINE_CONFIG as DEFAULT_CONF_PATH;
/// Environment variable that overrides [`DEFAULT_CONF_PATH`] on both command
/// lines (used by tests and by operators who keep several worker identities on
/// one machine).
pub const CONF_ENV: &str = "OAKESTRA_CONF";
/// Default NetManager socket.
pub use worker_common::paths::NETMANAGER_SOCKET as DEFAULT_NETMANAGER_SOCK;

/// `overlay_network` value meaning "NodeEngine starts NetManager".
pub const OVERLAY_AUTO: &str = "default";
/// `overlay_network` value upstream's `-o disabled` writes; `config network
/// off` writes `""`. Both (and anything unknown) mean "no overlay".
pub const OVERLAY_DISABLED: &str = "disabled";
/// Prefix of `overlay_network` for an operator-managed NetManager socket.
pub const OVERLAY_CUSTOM_PREFIX: &str = "custom:";

/// Addon names as upstream advertises them in `supported_addons`.
pub const ADDON_FLOPS: &str = "FLOps-learner";
pub const ADDON_IMAGE_BUILDER: &str = "image-builder";

/// Runtime names used in `virutalizaiton_runtime` and in job documents.
pub const RUNTIME_CONTAINER: &str = "docker";
pub const RUNTIME_UNIKERNEL: &str = "unikernel";
pub const RUNTIME_CROSVM: &str = "crosvm";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "configuration {path} is not valid at line {line}, column {column}{}: {message} \
         (the file was left untouched; fix it or run `NodeEngine config default`)",
        field.as_ref().map(|f| format!(" (field `{f}`)")).unwrap_or_default()
    )]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        /// The field, when the document is JSON but a value is wrong.
        field: Option<String>,
        message: String,
    },
    #[error("cannot write configuration {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Addon {
    pub addon_name: String,
    #[serde(default)]
    pub addon_active: bool,
    #[serde(default, deserialize_with = "lenient::null_as_default")]
    pub addon_config: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Virtualization {
    #[serde(rename = "virutalizaiton_name")]
    pub name: String,
    #[serde(rename = "virutalizaiton_runtime")]
    pub runtime: String,
    #[serde(rename = "virutalizaiton_active", default)]
    pub active: bool,
    #[serde(
        rename = "virutalizaiton_config",
        default,
        deserialize_with = "lenient::null_as_default"
    )]
    pub config: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CsiDriver {
    pub csi_driver_name: String,
    pub csi_driver_endpoint: String,
}

/// The configuration document. Field order is the on-disk order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    #[serde(default = "default_version")]
    pub conf_version: String,
    #[serde(default = "default_address")]
    pub cluster_address: String,
    #[serde(default)]
    pub cluster_ssl: bool,
    #[serde(default = "default_port")]
    pub cluster_port: u16,
    #[serde(default = "default_app_logs")]
    pub app_logs: String,
    #[serde(default = "default_overlay")]
    pub overlay_network: String,
    /// Upstream accepts a bool or a string ("auto", an address); keep whatever is there.
    #[serde(default = "default_public_ip")]
    pub public_ip: serde_json::Value,
    #[serde(default)]
    pub overlay_network_port: u16,
    #[serde(default)]
    pub mqtt_cert_file: String,
    #[serde(default)]
    pub mqtt_key_file: String,
    #[serde(default, deserialize_with = "lenient::null_as_default")]
    pub addons: Vec<Addon>,
    #[serde(default, deserialize_with = "lenient::null_as_default")]
    pub virtualizations: Vec<Virtualization>,
    /// Upstream writes `null` here; we read it as empty and write `[]`.
    #[serde(default, deserialize_with = "lenient::null_as_default")]
    pub csi_drivers: Vec<CsiDriver>,
    // Our additions (docs/nodeengine-parity.md). Absent while at their
    // defaults, so a file upstream wrote round-trips unchanged and upstream
    // reads our files (it ignores keys it does not know).
    /// Broker user name (password in `mqtt_password_file`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mqtt_username: String,
    /// A root-only file holding the broker password (never the password
    /// itself: this file is world-readable, as upstream writes it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mqtt_password_file: String,
    /// MQTT over TLS, verifying the broker, even without a client certificate.
    #[serde(default, skip_serializing_if = "is_false")]
    pub mqtt_tls: bool,
    /// The cluster CA the broker's certificate is checked against (besides
    /// the system's); default `ca.crt` next to `mqtt_cert_file`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mqtt_ca_file: String,
    /// What this node runs whatever the cluster asks (docs/security.md).
    #[serde(default, skip_serializing_if = "LocalPolicy::is_default")]
    pub local_policy: LocalPolicy,
    /// Keys written by newer upstream versions (`mode`, `p2p`, ...) survive our edits.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The node's own limits on what the cluster may run here. Only the node's
/// configuration sets them: no job document can change them, so a publisher
/// on the broker cannot turn them off.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LocalPolicy {
    /// Run jobs marked `privileged` (they get `/dev/fuse`, as upstream).
    #[serde(default)]
    pub allow_privileged: bool,
    /// Run jobs whose `virtualization` names no runtime of this node (an
    /// `io.containerd.*` shim, or a runtime binary on PATH, as upstream does).
    #[serde(default)]
    pub allow_unknown_runtimes: bool,
}

impl LocalPolicy {
    fn is_default(&self) -> bool {
        *self == LocalPolicy::default()
    }
}

/// Where the node's `ip` comes from (`public_ip`, `config visibility`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicIp {
    /// The first non-loopback IPv4 address of the machine.
    Private,
    /// The address a discovery service sees us coming from.
    Discover,
    /// An address the operator wrote (upstream's newer string form).
    Fixed(String),
}

fn default_version() -> String {
    "1.0".into()
}
fn default_address() -> String {
    "0.0.0.0".into()
}
fn default_port() -> u16 {
    10100
}
fn default_app_logs() -> String {
    "/tmp".into()
}
fn default_overlay() -> String {
    OVERLAY_AUTO.into()
}
fn default_public_ip() -> serde_json::Value {
    serde_json::Value::Bool(false)
}

impl Default for Config {
    fn default() -> Self {
        Config {
            conf_version: default_version(),
            cluster_address: default_address(),
            cluster_ssl: false,
            cluster_port: default_port(),
            app_logs: default_app_logs(),
            overlay_network: default_overlay(),
            public_ip: default_public_ip(),
            overlay_network_port: 0,
            mqtt_cert_file: String::new(),
            mqtt_key_file: String::new(),
            addons: Vec::new(),
            virtualizations: vec![Virtualization {
                name: "containerd".into(),
                runtime: RUNTIME_CONTAINER.into(),
                active: true,
                config: Vec::new(),
            }],
            csi_drivers: Vec::new(),
            mqtt_username: String::new(),
            mqtt_password_file: String::new(),
            mqtt_tls: false,
            mqtt_ca_file: String::new(),
            local_policy: LocalPolicy::default(),
            extra: serde_json::Map::new(),
        }
    }
}

/// How the daemon reaches the overlay network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkMode {
    /// NodeEngine starts NetManager itself and uses the default socket.
    Auto,
    /// NetManager is run by the operator; connect to this socket.
    Manual(PathBuf),
    /// No overlay.
    Off,
}

impl NetworkMode {
    pub fn socket(&self) -> Option<PathBuf> {
        match self {
            // NetManager started in a network namespace of its own (tests, the
            // sandbox) listens on a socket named for that namespace; a NodeEngine
            // in the same namespace must find it there.
            NetworkMode::Auto => Some(worker_common::paths::per_netns(DEFAULT_NETMANAGER_SOCK)),
            NetworkMode::Manual(p) => Some(p.clone()),
            NetworkMode::Off => None,
        }
    }
}

impl Config {
    /// Parses a configuration document. `path` only labels errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let error = |field: Option<String>, e: serde_json::Error| ConfigError::Parse {
            path: path.to_path_buf(),
            line: e.line(),
            column: e.column(),
            field,
            message: e.to_string(),
        };
        let mut json = serde_json::Deserializer::from_str(text);
        let config = serde_path_to_error::deserialize(&mut json).map_err(|e| {
            let field = Some(e.path().to_string()).filter(|p| p != ".");
            error(field, e.into_inner())
        })?;
        // Nothing but whitespace may follow the document.
        json.end().map_err(|e| error(None, e))?;
        Ok(config)
    }

    /// Reads the file; a missing or empty file yields the defaults (as upstream).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) if text.trim().is_empty() => Ok(Config::default()),
            Ok(text) => Config::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(source) => Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Compact JSON, as upstream writes it.
    pub fn to_json(&self) -> String {
        // Serialising plain strings, numbers and maps cannot fail.
        serde_json::to_string(self).unwrap_or_else(|_| "{}".into())
    }

    /// Writes atomically (temp file + rename) so a crash never leaves half a file.
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let werr = |source| ConfigError::Write {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(werr)?;
        }
        let tmp = path.with_extension(format!("json.tmp.{}", std::process::id()));
        let mut f = std::fs::File::create(&tmp).map_err(werr)?;
        f.write_all(self.to_json().as_bytes()).map_err(werr)?;
        f.sync_all().map_err(werr)?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            werr(e)
        })
    }

    pub fn network_mode(&self) -> NetworkMode {
        let v = self.overlay_network.trim();
        if v == OVERLAY_AUTO {
            NetworkMode::Auto
        } else if let Some(sock) = v.strip_prefix(OVERLAY_CUSTOM_PREFIX) {
            let sock = if sock.is_empty() {
                DEFAULT_NETMANAGER_SOCK
            } else {
                sock
            };
            NetworkMode::Manual(PathBuf::from(sock))
        } else {
            // "disabled", "" and anything unknown: upstream disables the overlay too.
            NetworkMode::Off
        }
    }

    /// `off` writes `""`, as upstream's `config network off` does.
    pub fn set_network_mode(&mut self, mode: &NetworkMode) {
        self.overlay_network = match mode {
            NetworkMode::Auto => OVERLAY_AUTO.into(),
            NetworkMode::Manual(p) => format!("{OVERLAY_CUSTOM_PREFIX}{}", p.display()),
            NetworkMode::Off => String::new(),
        };
    }

    /// `public_ip`: `false`, `"false"` and `""` keep the private address;
    /// `true`, `"true"` and `"auto"` discover the public one; any other
    /// string is taken as the address (upstream's newer form).
    pub fn public_ip(&self) -> PublicIp {
        match &self.public_ip {
            serde_json::Value::Bool(true) => PublicIp::Discover,
            serde_json::Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
                "" | "false" => PublicIp::Private,
                "true" | "auto" => PublicIp::Discover,
                _ => PublicIp::Fixed(s.trim().to_string()),
            },
            _ => PublicIp::Private,
        }
    }

    /// `config visibility public|private` writes a boolean, which both
    /// upstream's older (bool) and newer (string) readers accept.
    pub fn set_public_ip(&mut self, public: bool) {
        self.public_ip = serde_json::Value::Bool(public);
    }

    /// Turns an addon on or off, adding its entry when absent.
    pub fn set_addon(&mut self, name: &str, active: bool) {
        match self.addons.iter_mut().find(|a| a.addon_name == name) {
            Some(a) => a.addon_active = active,
            None => self.addons.push(Addon {
                addon_name: name.into(),
                addon_active: active,
                addon_config: Vec::new(),
            }),
        }
    }

    /// Names of active addons, for `supported_addons`.
    pub fn active_addons(&self) -> Vec<String> {
        self.addons
            .iter()
            .filter(|a| a.addon_active)
            .map(|a| a.addon_name.clone())
            .collect()
    }

    /// Turns a virtualization on or off, adding its entry (named as upstream
    /// names it) when absent.
    pub fn set_virtualization(&mut self, runtime: &str, active: bool) {
        match self
            .virtualizations
            .iter_mut()
            .find(|v| v.runtime == runtime)
        {
            Some(v) => v.active = active,
            None => self.virtualizations.push(Virtualization {
                name: match runtime {
                    RUNTIME_UNIKERNEL => "unikraft".into(),
                    RUNTIME_CONTAINER => "containerd".into(),
                    other => other.into(),
                },
                runtime: runtime.into(),
                active,
                config: Vec::new(),
            }),
        }
    }

    /// Runtimes advertised in `virtualization` (active entries, deduplicated).
    pub fn active_runtimes(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for v in self.virtualizations.iter().filter(|v| v.active) {
            if !out.contains(&v.runtime) {
                out.push(v.runtime.clone());
            }
        }
        out
    }

    /// Adds a CSI driver, or changes the endpoint of the one with this name;
    /// true when it replaced one.
    pub fn set_csi_driver(&mut self, name: &str, endpoint: &str) -> bool {
        match self
            .csi_drivers
            .iter_mut()
            .find(|d| d.csi_driver_name == name)
        {
            Some(d) => {
                d.csi_driver_endpoint = endpoint.into();
                true
            }
            None => {
                self.csi_drivers.push(CsiDriver {
                    csi_driver_name: name.into(),
                    csi_driver_endpoint: endpoint.into(),
                });
                false
            }
        }
    }

    /// Removes the CSI driver with this name; false when there was none.
    pub fn remove_csi_driver(&mut self, name: &str) -> bool {
        let before = self.csi_drivers.len();
        self.csi_drivers.retain(|d| d.csi_driver_name != name);
        self.csi_drivers.len() != before
    }

    pub fn runtime_active(&self, runtime: &str) -> bool {
        self.virtualizations
            .iter()
            .any(|v| v.active && v.runtime == runtime)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPSTREAM: &str = r#"{"conf_version":"1.0","cluster_address":"192.168.1.10","cluster_ssl":false,"cluster_port":10100,"app_logs":"/tmp","overlay_network":"default","public_ip":false,"overlay_network_port":0,"mqtt_cert_file":"","mqtt_key_file":"","addons":[{"addon_name":"FLOps-learner","addon_active":true,"addon_config":[]}],"virtualizations":[{"virutalizaiton_name":"containerd","virutalizaiton_runtime":"docker","virutalizaiton_active":true,"virutalizaiton_config":[]}],"csi_drivers":null}"#;

    #[test]
    fn upstream_round_trip_only_changes_null_lists() {
        let c = Config::parse(UPSTREAM, Path::new("x")).expect("parse");
        assert_eq!(
            c.to_json(),
            UPSTREAM.replace("\"csi_drivers\":null", "\"csi_drivers\":[]")
        );
    }

    #[test]
    fn unknown_keys_survive() {
        let text = format!("{},\"mode\":\"cluster\"}}", &UPSTREAM[..UPSTREAM.len() - 1]);
        let c = Config::parse(&text, Path::new("x")).expect("parse");
        assert_eq!(c.extra.get("mode"), Some(&serde_json::json!("cluster")));
        assert!(c.to_json().ends_with(",\"mode\":\"cluster\"}"));
    }

    #[test]
    fn parse_error_has_position() {
        let err = Config::parse("{\n  \"cluster_port\": x", Path::new("/c.json")).unwrap_err();
        match err {
            ConfigError::Parse { line, column, .. } => {
                assert_eq!(line, 2);
                assert!(column > 0);
            }
            other => panic!("unexpected {other}"),
        }
        let err = Config::parse(
            "{\"conf_version\":\"1.0\",\n\"cluster_port\": \"not a number\"}",
            Path::new("/c.json"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("field `cluster_port`"), "{err}");
        match err {
            ConfigError::Parse { line, field, .. } => {
                assert_eq!(line, 2);
                assert_eq!(field.as_deref(), Some("cluster_port"));
            }
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn trailing_garbage_is_an_error() {
        assert!(Config::parse(&format!("{UPSTREAM} x"), Path::new("x")).is_err());
        assert!(Config::parse(&format!("{UPSTREAM}\n"), Path::new("x")).is_ok());
    }

    #[test]
    fn csi_drivers_round_trip() {
        let mut c = Config::parse(UPSTREAM, Path::new("x")).expect("parse");
        assert!(!c.set_csi_driver("csi.example.io", "unix:///run/a.sock"));
        assert!(c.set_csi_driver("csi.example.io", "/run/b.sock"));
        assert!(!c.set_csi_driver("other", "/run/c.sock"));
        let json = c.to_json();
        assert!(
            json.ends_with(r#""csi_drivers":[{"csi_driver_name":"csi.example.io","csi_driver_endpoint":"/run/b.sock"},{"csi_driver_name":"other","csi_driver_endpoint":"/run/c.sock"}]}"#),
            "{json}"
        );
        let mut back = Config::parse(&json, Path::new("x")).expect("parse");
        assert_eq!(back, c);
        assert!(back.remove_csi_driver("csi.example.io"));
        assert!(!back.remove_csi_driver("csi.example.io"));
        assert_eq!(back.csi_drivers.len(), 1);
    }

    #[test]
    fn network_modes() {
        let mut c = Config::default();
        assert_eq!(c.network_mode(), NetworkMode::Auto);
        c.set_network_mode(&NetworkMode::Manual("/run/nm.sock".into()));
        assert_eq!(c.overlay_network, "custom:/run/nm.sock");
        assert_eq!(c.network_mode(), NetworkMode::Manual("/run/nm.sock".into()));
        c.set_network_mode(&NetworkMode::Off);
        assert_eq!(c.overlay_network, "");
        assert_eq!(c.network_mode(), NetworkMode::Off);
        c.overlay_network = OVERLAY_DISABLED.into();
        assert_eq!(c.network_mode(), NetworkMode::Off);
    }

    #[test]
    fn public_ip_forms() {
        let mut c = Config::default();
        assert_eq!(c.public_ip(), PublicIp::Private);
        c.set_public_ip(true);
        assert!(c.to_json().contains("\"public_ip\":true"));
        assert_eq!(c.public_ip(), PublicIp::Discover);
        for (v, want) in [
            ("auto", PublicIp::Discover),
            (" TRUE ", PublicIp::Discover),
            ("false", PublicIp::Private),
            ("", PublicIp::Private),
            ("203.0.113.9", PublicIp::Fixed("203.0.113.9".into())),
        ] {
            c.public_ip = serde_json::json!(v);
            assert_eq!(c.public_ip(), want, "{v:?}");
        }
    }

    #[test]
    fn our_additions_are_read_and_written_only_when_set() {
        let text = format!(
            "{},\"mqtt_username\":\"n1\",\"mqtt_tls\":true,\"local_policy\":{{\"allow_privileged\":true}}}}",
            &UPSTREAM[..UPSTREAM.len() - 1]
        );
        let c = Config::parse(&text, Path::new("x")).expect("parse");
        assert_eq!(c.mqtt_username, "n1");
        assert!(c.mqtt_tls);
        assert!(c.local_policy.allow_privileged);
        assert!(!c.local_policy.allow_unknown_runtimes);
        assert!(c.extra.is_empty(), "{:?}", c.extra);
        let json = c.to_json();
        assert!(json.ends_with(
            ",\"mqtt_username\":\"n1\",\"mqtt_tls\":true,\"local_policy\":{\"allow_privileged\":true,\"allow_unknown_runtimes\":false}}"
        ), "{json}");
    }
}
