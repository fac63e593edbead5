//! One CSI node plugin over its unix socket: the Identity calls that probe it
//! and the Node calls that stage, publish, unpublish and unstage a volume.
//!
//! The gRPC client is generated from the vendored `proto/csi.proto`; each call
//! has a deadline, since a plugin may hang.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::Code;
use tonic::transport::{Channel, Endpoint};

/// Generated from `proto/csi.proto` (package `csi.v1`, client side only).
pub mod pb {
    tonic::include_proto!("csi.v1");
}

use pb::identity_client::IdentityClient;
use pb::node_client::NodeClient;
use pb::node_service_capability::rpc::Type as RpcType;
use pb::volume_capability::access_mode::Mode;
use pb::volume_capability::{AccessMode, AccessType, MountVolume};

/// Deadline of the probe calls.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of one stage/publish/unpublish/unstage call (upstream waits two
/// minutes: network storage can take that long to attach).
const VOLUME_CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// A CSI call that did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("endpoint {0:?} is not a unix socket (unix:///path or /path)")]
    Endpoint(String),
    #[error("{call}: {message} ({code:?})")]
    Call {
        call: &'static str,
        code: Code,
        message: String,
    },
    #[error("{0}: no answer within {1:?}")]
    Timeout(&'static str, Duration),
    #[error("the plugin reports it is not ready yet")]
    NotReady,
}

/// The socket path of a CSI endpoint: `unix:///path`, `unix:/path` or `/path`.
/// CSI plugins serve on unix sockets; anything else is refused.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, PluginError> {
    let e = endpoint.trim();
    let path = e
        .strip_prefix("unix://")
        .or_else(|| e.strip_prefix("unix:"))
        .unwrap_or(e);
    if path.starts_with('/') && !path.contains('\0') {
        Ok(PathBuf::from(path))
    } else {
        Err(PluginError::Endpoint(endpoint.to_string()))
    }
}

/// What a successful probe learnt about a plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginInfo {
    /// The name the plugin reports (GetPluginInfo).
    pub name: String,
    pub vendor_version: String,
    /// The plugin needs NodeStageVolume before NodePublishVolume.
    pub stage_unstage: bool,
}

/// A lazily connecting client for one plugin socket; cloning shares the channel.
#[derive(Debug, Clone)]
pub struct Plugin {
    socket: PathBuf,
    channel: Channel,
}

/// SINGLE_NODE_WRITER on a mounted filesystem: a container's read-write volume.
fn mount_capability() -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

impl Plugin {
    pub fn new(endpoint: &str) -> Result<Plugin, PluginError> {
        let socket = socket_path(endpoint)?;
        let path = socket.clone();
        // The authority is never used: the connector dials the socket.
        let channel = Endpoint::from_static("http://[::]")
            .connect_timeout(Duration::from_secs(5))
            .connect_with_connector_lazy(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }));
        Ok(Plugin { socket, channel })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Probe, GetPluginInfo and NodeGetCapabilities, as upstream registers a
    /// plugin: any failure means the plugin is not usable now.
    pub async fn probe(&self) -> Result<PluginInfo, PluginError> {
        let mut identity = IdentityClient::new(self.channel.clone());
        let ready = call("Probe", PROBE_TIMEOUT, identity.probe(pb::ProbeRequest {}))
            .await?
            .ready;
        // Unset means ready (CSI spec); false means still initialising.
        if ready == Some(false) {
            return Err(PluginError::NotReady);
        }
        let info = call(
            "GetPluginInfo",
            PROBE_TIMEOUT,
            identity.get_plugin_info(pb::GetPluginInfoRequest {}),
        )
        .await?;
        let mut node = NodeClient::new(self.channel.clone());
        let caps = call(
            "NodeGetCapabilities",
            PROBE_TIMEOUT,
            node.node_get_capabilities(pb::NodeGetCapabilitiesRequest {}),
        )
        .await?;
        let stage_unstage = caps.capabilities.iter().any(|c| {
            matches!(
                &c.r#type,
                Some(pb::node_service_capability::Type::Rpc(r))
                    if r.r#type == RpcType::StageUnstageVolume as i32
            )
        });
        Ok(PluginInfo {
            name: info.name,
            vendor_version: info.vendor_version,
            stage_unstage,
        })
    }

    pub async fn stage(
        &self,
        volume_id: &str,
        staging: &Path,
        context: &HashMap<String, String>,
    ) -> Result<(), PluginError> {
        let mut node = NodeClient::new(self.channel.clone());
        call(
            "NodeStageVolume",
            VOLUME_CALL_TIMEOUT,
            node.node_stage_volume(pb::NodeStageVolumeRequest {
                volume_id: volume_id.to_string(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(mount_capability()),
                volume_context: context.clone(),
                ..Default::default()
            }),
        )
        .await
        .map(drop)
    }

    pub async fn publish(
        &self,
        volume_id: &str,
        staging: Option<&Path>,
        target: &Path,
        context: &HashMap<String, String>,
    ) -> Result<(), PluginError> {
        let mut node = NodeClient::new(self.channel.clone());
        call(
            "NodePublishVolume",
            VOLUME_CALL_TIMEOUT,
            node.node_publish_volume(pb::NodePublishVolumeRequest {
                volume_id: volume_id.to_string(),
                staging_target_path: staging.map(|s| s.display().to_string()).unwrap_or_default(),
                target_path: target.display().to_string(),
                volume_capability: Some(mount_capability()),
                readonly: false,
                volume_context: context.clone(),
                ..Default::default()
            }),
        )
        .await
        .map(drop)
    }

    pub async fn unpublish(&self, volume_id: &str, target: &Path) -> Result<(), PluginError> {
        let mut node = NodeClient::new(self.channel.clone());
        call(
            "NodeUnpublishVolume",
            VOLUME_CALL_TIMEOUT,
            node.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                volume_id: volume_id.to_string(),
                target_path: target.display().to_string(),
            }),
        )
        .await
        .map(drop)
    }

    pub async fn unstage(&self, volume_id: &str, staging: &Path) -> Result<(), PluginError> {
        let mut node = NodeClient::new(self.channel.clone());
        call(
            "NodeUnstageVolume",
            VOLUME_CALL_TIMEOUT,
            node.node_unstage_volume(pb::NodeUnstageVolumeRequest {
                volume_id: volume_id.to_string(),
                staging_target_path: staging.display().to_string(),
            }),
        )
        .await
        .map(drop)
    }
}

/// One unary call with a deadline; the answer's message, or an error naming the call.
async fn call<T>(
    name: &'static str,
    timeout: Duration,
    fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, PluginError> {
    match tokio::time::timeout(timeout, fut).await {
        Err(_) => Err(PluginError::Timeout(name, timeout)),
        Ok(Err(s)) => Err(PluginError::Call {
            call: name,
            code: s.code(),
            message: s.message().to_string(),
        }),
        Ok(Ok(r)) => Ok(r.into_inner()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            socket_path("unix:///var/lib/oakestra/csi/hostpath.sock").ok(),
            Some(PathBuf::from("/var/lib/oakestra/csi/hostpath.sock"))
        );
        assert_eq!(
            socket_path("/run/csi.sock").ok(),
            Some(PathBuf::from("/run/csi.sock"))
        );
        assert_eq!(
            socket_path("unix:/run/csi.sock").ok(),
            Some(PathBuf::from("/run/csi.sock"))
        );
        for bad in ["tcp://1.2.3.4:10000", "csi.sock", "", "unix://relative"] {
            assert!(socket_path(bad).is_err(), "{bad} accepted");
        }
    }
}
