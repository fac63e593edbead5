//! A small but real CSI node plugin for the tests: the Identity and Node
//! services (generated from the same vendored csi.proto as the daemon's
//! client, server side) on a unix socket, backed by host directories.
//!
//! A volume is the directory `<backing>/<volume_id>`, created with a file
//! `hello.txt` in it. With staging enabled NodeStageVolume bind-mounts it at
//! the staging path and NodePublishVolume bind-mounts the staging path at the
//! target; otherwise publish binds the directory directly. Unpublish and
//! unstage unmount. Every call is recorded for the test to check.

#![allow(dead_code)]

use std::collections::HashMap;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/with_server/csi.v1.rs"));
}

use pb::identity_server::{Identity, IdentityServer};
use pb::node_server::{Node, NodeServer};

/// One recorded call: (RPC, volume id, path it named).
pub type Call = (String, String, PathBuf);

#[derive(Clone)]
struct State {
    name: String,
    stage: bool,
    backing: PathBuf,
    calls: Arc<Mutex<Vec<Call>>>,
}

impl State {
    fn record(&self, rpc: &str, volume: &str, path: &str) {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).push((
            rpc.into(),
            volume.into(),
            PathBuf::from(path),
        ));
    }
}

/// The running plugin; stops serving when dropped.
pub struct CsiPlugin {
    pub socket: PathBuf,
    pub backing: PathBuf,
    calls: Arc<Mutex<Vec<Call>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CsiPlugin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CsiPlugin {
    /// Serves plugin `name` on `socket`; volumes live under `backing`.
    pub fn start(name: &str, socket: &Path, backing: &Path, stage: bool) -> CsiPlugin {
        std::fs::create_dir_all(backing).expect("backing dir");
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket).expect("bind the plugin socket");
        let calls = Arc::new(Mutex::new(Vec::new()));
        let state = State {
            name: name.into(),
            stage,
            backing: backing.to_path_buf(),
            calls: calls.clone(),
        };
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(IdentityServer::new(state.clone()))
                .add_service(NodeServer::new(state))
                .serve_with_incoming(UnixListenerStream::new(listener))
                .await;
        });
        CsiPlugin {
            socket: socket.to_path_buf(),
            backing: backing.to_path_buf(),
            calls,
            task,
        }
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The paths `rpc` was called with for `volume`.
    pub fn paths(&self, rpc: &str, volume: &str) -> Vec<PathBuf> {
        self.calls()
            .into_iter()
            .filter(|(r, v, _)| r == rpc && v == volume)
            .map(|(_, _, p)| p)
            .collect()
    }
}

fn cstr(p: &Path) -> Result<CString, Status> {
    CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| Status::invalid_argument("path with NUL"))
}

fn bind(source: &Path, target: &Path) -> Result<(), Status> {
    let (s, t) = (cstr(source)?, cstr(target)?);
    // SAFETY: plain mount(2) with valid C strings.
    let rc = unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(Status::internal(format!(
            "bind {} on {}: {}",
            source.display(),
            target.display(),
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

fn unmount(target: &Path) -> Result<(), Status> {
    let t = cstr(target)?;
    // SAFETY: plain umount2(2) with a valid C string.
    let rc = unsafe { libc::umount2(t.as_ptr(), 0) };
    let err = std::io::Error::last_os_error();
    // Not mounted (EINVAL) or gone (ENOENT): already unpublished, success.
    if rc != 0 && !matches!(err.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) {
        return Err(Status::internal(format!(
            "umount {}: {err}",
            target.display()
        )));
    }
    Ok(())
}

impl State {
    /// The volume's backing directory, created with its marker file.
    fn volume_dir(&self, volume_id: &str) -> Result<PathBuf, Status> {
        if volume_id.is_empty() || volume_id.contains('/') || volume_id.starts_with('.') {
            return Err(Status::invalid_argument("volume id"));
        }
        let dir = self.backing.join(volume_id);
        std::fs::create_dir_all(&dir).map_err(|e| Status::internal(e.to_string()))?;
        let hello = dir.join("hello.txt");
        if !hello.exists() {
            std::fs::write(&hello, format!("hello from csi volume {volume_id}\n"))
                .map_err(|e| Status::internal(e.to_string()))?;
        }
        Ok(dir)
    }
}

#[tonic::async_trait]
impl Identity for State {
    async fn get_plugin_info(
        &self,
        _: Request<pb::GetPluginInfoRequest>,
    ) -> Result<Response<pb::GetPluginInfoResponse>, Status> {
        Ok(Response::new(pb::GetPluginInfoResponse {
            name: self.name.clone(),
            vendor_version: "0.1.0-test".into(),
            manifest: HashMap::new(),
        }))
    }

    async fn probe(
        &self,
        _: Request<pb::ProbeRequest>,
    ) -> Result<Response<pb::ProbeResponse>, Status> {
        self.record("Probe", "", "");
        Ok(Response::new(pb::ProbeResponse { ready: Some(true) }))
    }
}

#[tonic::async_trait]
impl Node for State {
    async fn node_get_capabilities(
        &self,
        _: Request<pb::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<pb::NodeGetCapabilitiesResponse>, Status> {
        use pb::node_service_capability::{Rpc, Type, rpc::Type as RpcType};
        let capabilities = if self.stage {
            vec![pb::NodeServiceCapability {
                r#type: Some(Type::Rpc(Rpc {
                    r#type: RpcType::StageUnstageVolume as i32,
                })),
            }]
        } else {
            Vec::new()
        };
        Ok(Response::new(pb::NodeGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<pb::NodeGetInfoRequest>,
    ) -> Result<Response<pb::NodeGetInfoResponse>, Status> {
        Ok(Response::new(pb::NodeGetInfoResponse {
            node_id: "test-node".into(),
            ..Default::default()
        }))
    }

    async fn node_stage_volume(
        &self,
        r: Request<pb::NodeStageVolumeRequest>,
    ) -> Result<Response<pb::NodeStageVolumeResponse>, Status> {
        let r = r.into_inner();
        self.record("NodeStageVolume", &r.volume_id, &r.staging_target_path);
        if r.volume_capability.is_none() {
            return Err(Status::invalid_argument("no volume capability"));
        }
        let dir = self.volume_dir(&r.volume_id)?;
        bind(&dir, Path::new(&r.staging_target_path))?;
        Ok(Response::new(pb::NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        r: Request<pb::NodeUnstageVolumeRequest>,
    ) -> Result<Response<pb::NodeUnstageVolumeResponse>, Status> {
        let r = r.into_inner();
        self.record("NodeUnstageVolume", &r.volume_id, &r.staging_target_path);
        unmount(Path::new(&r.staging_target_path))?;
        Ok(Response::new(pb::NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        r: Request<pb::NodePublishVolumeRequest>,
    ) -> Result<Response<pb::NodePublishVolumeResponse>, Status> {
        let r = r.into_inner();
        self.record("NodePublishVolume", &r.volume_id, &r.target_path);
        let source = if self.stage {
            if r.staging_target_path.is_empty() {
                return Err(Status::failed_precondition("not staged"));
            }
            PathBuf::from(&r.staging_target_path)
        } else {
            self.volume_dir(&r.volume_id)?
        };
        bind(&source, Path::new(&r.target_path))?;
        Ok(Response::new(pb::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        r: Request<pb::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<pb::NodeUnpublishVolumeResponse>, Status> {
        let r = r.into_inner();
        self.record("NodeUnpublishVolume", &r.volume_id, &r.target_path);
        unmount(Path::new(&r.target_path))?;
        Ok(Response::new(pb::NodeUnpublishVolumeResponse {}))
    }
}
