//! containerd over its gRPC API: images, snapshots, containers and tasks.
//!
//! Everything lives in one containerd namespace (`oakestra` by default). Containers
//! we create carry labels naming the job, so a restarted daemon can recognise and
//! adopt them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use containerd_client::services::v1::container::Runtime;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
    UsageRequest,
};
use containerd_client::services::v1::{
    ApplyRequest, Container, CreateContainerRequest, CreateTaskRequest, DeleteContainerRequest,
    DeleteTaskRequest, GetImageRequest, GetRequest, KillRequest, ListContainersRequest,
    ReadContentRequest, StartRequest, TransferRequest, WaitRequest,
};
use containerd_client::services::v1::{
    containers_client::ContainersClient, content_client::ContentClient, diff_client::DiffClient,
    images_client::ImagesClient, leases_client::LeasesClient, snapshots::snapshots_client,
    tasks_client::TasksClient, transfer_client::TransferClient,
};
use containerd_client::tonic::transport::{Channel, Endpoint};
use containerd_client::tonic::{Code, Request, Status};
use containerd_client::types::{Descriptor, Mount, Platform};
use futures::StreamExt;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::oci_spec::ImageDefaults;

pub const DEFAULT_SOCKET: &str = "/run/containerd/containerd.sock";
pub const DEFAULT_NAMESPACE: &str = "oakestra";
/// Same variables `ctr` reads, so an operator can point both at the same daemon.
pub const SOCKET_ENV: &str = "CONTAINERD_ADDRESS";
pub const NAMESPACE_ENV: &str = "CONTAINERD_NAMESPACE";

const SNAPSHOTTER: &str = "overlayfs";
pub const RUNC_RUNTIME: &str = "io.containerd.runc.v2";
const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
/// Manifests and configs are small; a larger blob is not what we asked for.
const MAX_METADATA_BLOB: usize = 8 << 20;

pub const LABEL_JOB: &str = "oakestra.io/job-name";
pub const LABEL_INSTANCE: &str = "oakestra.io/instance";
pub const LABEL_VIRT: &str = "oakestra.io/virtualization";
pub const LABEL_ONE_SHOT: &str = "oakestra.io/one-shot";

/// Where to find containerd (`nodeengined --containerd-address/--containerd-namespace`).
#[derive(Debug, Clone)]
pub struct ContainerdSettings {
    pub socket: PathBuf,
    pub namespace: String,
}

/// An image resolved to what a container needs.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    pub name: String,
    pub defaults: ImageDefaults,
    pub layers: Vec<Descriptor>,
    pub diff_ids: Vec<String>,
    pub config_digest: String,
}

impl ResolvedImage {
    pub fn chain_id(&self) -> String {
        chain_ids(&self.diff_ids).pop().unwrap_or_default()
    }
}

/// What containerd knows about one of our containers.
#[derive(Debug, Clone)]
pub struct ContainerInfo {
    pub id: String,
    pub labels: HashMap<String, String>,
    /// `Some(pid)` when its task is running.
    pub running_pid: Option<u32>,
}

/// Container creation parameters.
pub struct NewContainer<'a> {
    pub id: &'a str,
    pub image: &'a ResolvedImage,
    pub spec: serde_json::Value,
    pub runtime: &'a RuntimeChoice,
    pub labels: HashMap<String, String>,
}

/// The containerd shim that runs a container, and for runc-compatible
/// runtimes the binary runc's shim should run instead of `runc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeChoice {
    pub shim: String,
    pub binary: Option<PathBuf>,
}

impl Default for RuntimeChoice {
    /// containerd's default: runc.
    fn default() -> Self {
        RuntimeChoice {
            shim: RUNC_RUNTIME.to_string(),
            binary: None,
        }
    }
}

/// `containerd.runc.v1.Options` (api/types/runc/options/oci.proto): only
/// the field we set; the runc shim reads the rest as defaults.
#[derive(Clone, PartialEq, prost::Message)]
struct RuncOptions {
    #[prost(string, tag = "6")]
    binary_name: String,
}

const RUNC_OPTIONS_TYPE_URL: &str = "containerd.runc.v1.Options";

impl RuntimeChoice {
    fn to_runtime(&self) -> Runtime {
        use prost::Message;
        Runtime {
            name: self.shim.clone(),
            options: self.binary.as_ref().map(|b| prost_types::Any {
                type_url: RUNC_OPTIONS_TYPE_URL.into(),
                value: RuncOptions {
                    binary_name: b.display().to_string(),
                }
                .encode_to_vec(),
            }),
        }
    }
}

/// What a registry that speaks only plain HTTP answers a TLS client (Go's
/// net/http wording, which containerd and ctr pass on); upstream retries
/// such pulls over HTTP.
const PLAIN_HTTP_ONLY: &str = "server gave HTTP response to HTTPS client";

#[derive(Clone)]
pub struct ContainerdRuntime {
    channel: Channel,
    settings: ContainerdSettings,
    /// Two deployments of one image must not unpack the same layers concurrently.
    unpack_lock: std::sync::Arc<tokio::sync::Mutex<()>>,
}

/// chainID(L0) = diffID(L0); chainID(Ln) = sha256(chainID(Ln-1) + " " + diffID(Ln)).
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => {
                let h = Sha256::digest(format!("{prev} {d}").as_bytes());
                format!("sha256:{}", hex(&h))
            }
        };
        out.push(next);
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Docker-style short names: `busybox` -> `docker.io/library/busybox:latest`.
pub fn normalize_image_name(name: &str) -> String {
    let name = name.trim();
    let (repo_part, first) = match name.split_once('/') {
        Some((first, _)) => (name.to_string(), Some(first)),
        None => (name.to_string(), None),
    };
    let has_registry =
        first.is_some_and(|f| f.contains('.') || f.contains(':') || f == "localhost");
    let mut full = match (has_registry, first) {
        (true, _) => repo_part,
        (false, Some(_)) => format!("docker.io/{repo_part}"),
        (false, None) => format!("docker.io/library/{repo_part}"),
    };
    let last = full.rsplit('/').next().unwrap_or_default();
    if !last.contains(':') && !last.contains('@') {
        full.push_str(":latest");
    }
    full
}

/// `linux/amd64` style platform from the job, or this machine's.
pub fn platform_of(job_platform: &str) -> Platform {
    let mut parts = job_platform.split('/').filter(|p| !p.is_empty());
    let os = parts.next().unwrap_or("linux").to_string();
    let architecture = parts
        .next()
        .map(str::to_string)
        .unwrap_or_else(crate::node_report::go_arch);
    let variant = parts.next().unwrap_or_default().to_string();
    Platform {
        os,
        architecture,
        variant,
        os_version: String::new(),
    }
}

#[derive(Deserialize, Default)]
struct OciPlatform {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
}

#[derive(Deserialize)]
struct OciDescriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: i64,
    #[serde(default)]
    platform: Option<OciPlatform>,
}

#[derive(Deserialize)]
struct OciIndexOrManifest {
    #[serde(default)]
    manifests: Vec<OciDescriptor>,
    #[serde(default)]
    config: Option<OciDescriptor>,
    #[serde(default)]
    layers: Vec<OciDescriptor>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct OciImageRunConfig {
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
}

#[derive(Deserialize, Default)]
struct OciRootfs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

#[derive(Deserialize)]
struct OciImageConfig {
    #[serde(default)]
    config: Option<OciImageRunConfig>,
    #[serde(default)]
    rootfs: OciRootfs,
}

fn is_not_found(s: &Status) -> bool {
    s.code() == Code::NotFound
}

impl ContainerdRuntime {
    /// Creates a lazily connecting client: containerd may start after us, and tonic
    /// reconnects by itself when containerd restarts.
    pub fn new(settings: ContainerdSettings) -> Result<Self> {
        let path = settings.socket.clone();
        let channel = Endpoint::try_from("http://[::]")
            .context("containerd endpoint")?
            .connect_timeout(Duration::from_secs(5))
            .connect_with_connector_lazy(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }));
        Ok(ContainerdRuntime {
            channel,
            settings,
            unpack_lock: Default::default(),
        })
    }

    pub fn settings(&self) -> &ContainerdSettings {
        &self.settings
    }

    fn req<T>(&self, msg: T) -> Request<T> {
        self.req_with_lease(msg, None)
    }

    fn req_with_lease<T>(&self, msg: T, lease: Option<&str>) -> Request<T> {
        let mut r = Request::new(msg);
        // Namespace and lease ids are ours (validated names), so parsing cannot fail;
        // if it somehow did, containerd answers with a clear error instead.
        if let Ok(v) = self.settings.namespace.parse() {
            r.metadata_mut().insert("containerd-namespace", v);
        }
        if let Some(l) = lease.and_then(|l| l.parse().ok()) {
            r.metadata_mut().insert("containerd-lease", l);
        }
        r
    }

    /// Fails unless containerd answers.
    pub async fn ping(&self) -> Result<()> {
        let mut v = containerd_client::services::v1::version_client::VersionClient::new(
            self.channel.clone(),
        );
        v.version(Request::new(()))
            .await
            .with_context(|| format!("containerd at {}", self.settings.socket.display()))?;
        Ok(())
    }

    // ----------------------------------------------------------------- images

    async fn read_blob(&self, digest: &str) -> Result<Vec<u8>> {
        let mut content = ContentClient::new(self.channel.clone());
        let mut stream = content
            .read(self.req(ReadContentRequest {
                digest: digest.to_string(),
                offset: 0,
                size: 0,
            }))
            .await
            .with_context(|| format!("reading blob {digest}"))?
            .into_inner();
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.with_context(|| format!("reading blob {digest}"))?;
            out.extend_from_slice(&chunk.data);
            if out.len() > MAX_METADATA_BLOB {
                bail!("blob {digest} is larger than {MAX_METADATA_BLOB} bytes");
            }
        }
        Ok(out)
    }

    /// Looks the image up under its given and its normalised name.
    async fn find_image(&self, name: &str) -> Result<Option<(String, Descriptor)>> {
        let mut images = ImagesClient::new(self.channel.clone());
        let mut candidates = vec![name.to_string()];
        let norm = normalize_image_name(name);
        if norm != name {
            candidates.push(norm);
        }
        for c in candidates {
            match images
                .get(self.req(GetImageRequest { name: c.clone() }))
                .await
            {
                Ok(resp) => {
                    if let Some(target) = resp.into_inner().image.and_then(|i| i.target) {
                        return Ok(Some((c, target)));
                    }
                }
                Err(s) if is_not_found(&s) => {}
                Err(s) => return Err(anyhow!(s).context(format!("looking up image {c}"))),
            }
        }
        Ok(None)
    }

    /// Resolves the image (pulling it when absent) and makes sure its layers are
    /// unpacked into the snapshotter.
    pub async fn ensure_image(&self, name: &str, platform: &Platform) -> Result<ResolvedImage> {
        if name.trim().is_empty() {
            bail!("the job names no image");
        }
        let found = match self.find_image(name).await? {
            Some(f) => f,
            None => {
                self.pull(name, platform).await?;
                self.find_image(name)
                    .await?
                    .ok_or_else(|| anyhow!("image {name} still absent after pulling it"))?
            }
        };
        let image = self.resolve(&found.0, &found.1, platform).await?;
        self.ensure_unpacked(&image).await?;
        Ok(image)
    }

    async fn resolve(
        &self,
        name: &str,
        target: &Descriptor,
        platform: &Platform,
    ) -> Result<ResolvedImage> {
        let mut digest = target.digest.clone();
        // Follow at most a couple of index levels to the manifest for our platform.
        for _ in 0..3 {
            let raw = self.read_blob(&digest).await?;
            let doc: OciIndexOrManifest = serde_json::from_slice(&raw)
                .with_context(|| format!("image {name}: blob {digest} is not a manifest"))?;
            if let Some(cfg) = doc.config {
                return self.resolve_manifest(name, cfg, doc.layers).await;
            }
            let chosen = doc
                .manifests
                .iter()
                .find(|m| {
                    m.platform.as_ref().is_none_or(|p| {
                        p.os == platform.os && p.architecture == platform.architecture
                    })
                })
                .ok_or_else(|| {
                    anyhow!(
                        "image {name} has no manifest for {}/{}",
                        platform.os,
                        platform.architecture
                    )
                })?;
            digest = chosen.digest.clone();
        }
        bail!("image {name}: too many nested indexes")
    }

    async fn resolve_manifest(
        &self,
        name: &str,
        cfg: OciDescriptor,
        layers: Vec<OciDescriptor>,
    ) -> Result<ResolvedImage> {
        let raw = self.read_blob(&cfg.digest).await?;
        let config: OciImageConfig = serde_json::from_slice(&raw)
            .with_context(|| format!("image {name}: config {} is not valid", cfg.digest))?;
        if config.rootfs.diff_ids.len() != layers.len() {
            bail!(
                "image {name}: {} layers but {} diff ids",
                layers.len(),
                config.rootfs.diff_ids.len()
            );
        }
        let run = config.config.unwrap_or_default();
        Ok(ResolvedImage {
            name: name.to_string(),
            defaults: ImageDefaults {
                env: run.env.unwrap_or_default(),
                entrypoint: run.entrypoint.unwrap_or_default(),
                cmd: run.cmd.unwrap_or_default(),
                working_dir: run.working_dir.unwrap_or_default(),
                user: run.user.unwrap_or_default(),
            },
            layers: layers
                .into_iter()
                .map(|l| Descriptor {
                    media_type: l.media_type,
                    digest: l.digest,
                    size: l.size,
                    annotations: HashMap::new(),
                })
                .collect(),
            diff_ids: config.rootfs.diff_ids,
            config_digest: cfg.digest,
        })
    }

    /// Pulls through containerd's Transfer service (containerd >= 1.7). Older
    /// containerd has no Transfer service; then `ctr` (same daemon, same namespace)
    /// pulls, since implementing a registry client here would duplicate containerd.
    /// A registry that only speaks plain HTTP is tried again over HTTP, with a
    /// warning, as upstream does.
    async fn pull(&self, name: &str, platform: &Platform) -> Result<()> {
        let reference = normalize_image_name(name);
        tracing::info!(image = %reference, "pulling image");
        match self.pull_once(&reference, platform, false).await {
            Err(e) if format!("{e:#}").contains(PLAIN_HTTP_ONLY) => {
                tracing::warn!(
                    image = %reference,
                    "the registry speaks only plain HTTP: pulling without TLS, so the \
                     image is neither encrypted nor authenticated in transit"
                );
                self.pull_once(&reference, platform, true).await
            }
            other => other,
        }
    }

    async fn pull_once(
        &self,
        reference: &str,
        platform: &Platform,
        plain_http: bool,
    ) -> Result<()> {
        match self
            .pull_with_transfer(reference, platform, plain_http)
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Code::Unimplemented => {
                self.pull_with_ctr(reference, platform, plain_http).await
            }
            Err(e) => Err(anyhow!("pulling {reference}: {}", e.message())),
        }
    }

    async fn pull_with_transfer(
        &self,
        reference: &str,
        platform: &Platform,
        plain_http: bool,
    ) -> std::result::Result<(), Status> {
        use containerd_client::types::transfer::{
            ImageStore, OciRegistry, RegistryResolver, UnpackConfiguration,
        };
        let source = OciRegistry {
            reference: reference.to_string(),
            resolver: plain_http.then(|| RegistryResolver {
                default_scheme: "http".into(),
                ..Default::default()
            }),
        };
        let destination = ImageStore {
            name: reference.to_string(),
            platforms: vec![platform.clone()],
            unpacks: vec![UnpackConfiguration {
                platform: Some(platform.clone()),
                snapshotter: SNAPSHOTTER.into(),
            }],
            ..Default::default()
        };
        let mut transfer = TransferClient::new(self.channel.clone());
        transfer
            .transfer(self.req(TransferRequest {
                source: Some(containerd_client::to_any(&source)),
                destination: Some(containerd_client::to_any(&destination)),
                options: None,
            }))
            .await
            .map(|_| ())
    }

    async fn pull_with_ctr(
        &self,
        reference: &str,
        platform: &Platform,
        plain_http: bool,
    ) -> Result<()> {
        let ctr = crate::node_report::find_on_path("ctr").ok_or_else(|| {
            anyhow!(
                "image {reference} is not present, containerd has no Transfer service \
                 (needs containerd >= 1.7) and `ctr` is not installed to pull it"
            )
        })?;
        let plat = format!("{}/{}", platform.os, platform.architecture);
        let mut cmd = tokio::process::Command::new(ctr);
        cmd.arg("-a").arg(&self.settings.socket).args([
            "-n",
            &self.settings.namespace,
            "images",
            "pull",
        ]);
        if plain_http {
            cmd.arg("--plain-http");
        }
        let out = cmd
            .arg("--platform")
            .arg(&plat)
            .arg(reference)
            .kill_on_drop(true)
            .output()
            .await
            .context("running ctr images pull")?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let last = err.lines().last().unwrap_or("no output").trim();
            bail!("pulling {reference} failed: {last}");
        }
        Ok(())
    }

    async fn snapshot_exists(&self, key: &str) -> Result<bool> {
        let mut snaps = snapshots_client::SnapshotsClient::new(self.channel.clone());
        match snaps
            .stat(self.req(StatSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: key.to_string(),
            }))
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if is_not_found(&s) => Ok(false),
            Err(s) => Err(anyhow!(s).context(format!("stat snapshot {key}"))),
        }
    }

    /// Unpacks missing layers (e.g. an image imported without unpacking) under a
    /// lease, so containerd's garbage collector cannot take them mid-way.
    async fn ensure_unpacked(&self, image: &ResolvedImage) -> Result<()> {
        if image.diff_ids.is_empty() {
            bail!("image {} has no layers", image.name);
        }
        if self.snapshot_exists(&image.chain_id()).await? {
            return Ok(());
        }
        let _unpacking = self.unpack_lock.lock().await;
        // Another deployment may have unpacked it while we waited.
        if self.snapshot_exists(&image.chain_id()).await? {
            return Ok(());
        }
        let lease = format!("nodeengine-unpack-{}", unique_suffix());
        let mut leases = LeasesClient::new(self.channel.clone());
        leases
            .create(self.req(containerd_client::services::v1::CreateRequest {
                id: lease.clone(),
                labels: HashMap::new(),
            }))
            .await
            .context("creating a containerd lease")?;
        let result = self.unpack_layers(image, &lease).await;
        let _ = leases
            .delete(self.req(containerd_client::services::v1::DeleteRequest {
                id: lease,
                sync: false,
            }))
            .await;
        result
    }

    async fn unpack_layers(&self, image: &ResolvedImage, lease: &str) -> Result<()> {
        let chains = chain_ids(&image.diff_ids);
        let mut snaps = snapshots_client::SnapshotsClient::new(self.channel.clone());
        let mut diff = DiffClient::new(self.channel.clone());
        let mut parent = String::new();
        for (layer, chain) in image.layers.iter().zip(chains.iter()) {
            if !self.snapshot_exists(chain).await? {
                let key = format!("extract-{}-{chain}", unique_suffix());
                let mounts = snaps
                    .prepare(self.req_with_lease(
                        PrepareSnapshotRequest {
                            snapshotter: SNAPSHOTTER.into(),
                            key: key.clone(),
                            parent: parent.clone(),
                            labels: HashMap::new(),
                        },
                        Some(lease),
                    ))
                    .await
                    .with_context(|| format!("preparing snapshot for layer {}", layer.digest))?
                    .into_inner()
                    .mounts;
                diff.apply(self.req_with_lease(
                    ApplyRequest {
                        diff: Some(layer.clone()),
                        mounts,
                        payloads: HashMap::new(),
                        sync_fs: false,
                    },
                    Some(lease),
                ))
                .await
                .with_context(|| format!("applying layer {}", layer.digest))?;
                let committed = snaps
                    .commit(self.req_with_lease(
                        CommitSnapshotRequest {
                            snapshotter: SNAPSHOTTER.into(),
                            name: chain.clone(),
                            key: key.clone(),
                            labels: HashMap::new(),
                        },
                        Some(lease),
                    ))
                    .await;
                match committed {
                    Ok(_) => {}
                    // Unpacked meanwhile by someone else (e.g. ctr): theirs is as good.
                    Err(s) if s.code() == Code::AlreadyExists => {
                        let _ = snaps
                            .remove(self.req(RemoveSnapshotRequest {
                                snapshotter: SNAPSHOTTER.into(),
                                key,
                            }))
                            .await;
                    }
                    Err(s) => {
                        return Err(
                            anyhow!(s).context(format!("committing layer {}", layer.digest))
                        );
                    }
                }
            }
            parent = chain.clone();
        }
        self.label_config_for_gc(image).await
    }

    /// The image keeps its unpacked snapshot alive through this label on its config
    /// blob (what containerd's own unpacker sets).
    async fn label_config_for_gc(&self, image: &ResolvedImage) -> Result<()> {
        use containerd_client::services::v1::{Info, UpdateRequest};
        let label = format!("containerd.io/gc.ref.snapshot.{SNAPSHOTTER}");
        let mut content = ContentClient::new(self.channel.clone());
        let info = Info {
            digest: image.config_digest.clone(),
            labels: HashMap::from([(label.clone(), image.chain_id())]),
            ..Default::default()
        };
        content
            .update(self.req(UpdateRequest {
                info: Some(info),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec![format!("labels.{label}")],
                }),
            }))
            .await
            .context("labelling the image config for garbage collection")?;
        Ok(())
    }

    // ------------------------------------------------------------- containers

    /// Creates the container record and its writable snapshot; returns its rootfs.
    pub async fn create_container(&self, c: NewContainer<'_>) -> Result<Vec<Mount>> {
        let spec = serde_json::to_vec(&c.spec).context("encoding the OCI spec")?;
        let container = Container {
            id: c.id.to_string(),
            labels: c.labels,
            image: c.image.name.clone(),
            runtime: Some(c.runtime.to_runtime()),
            spec: Some(prost_types::Any {
                type_url: SPEC_TYPE_URL.into(),
                value: spec,
            }),
            snapshotter: SNAPSHOTTER.into(),
            snapshot_key: c.id.to_string(),
            ..Default::default()
        };
        // The container record is created first: it references the snapshot key, which
        // protects the snapshot from garbage collection once it exists.
        let mut containers = ContainersClient::new(self.channel.clone());
        containers
            .create(self.req(CreateContainerRequest {
                container: Some(container),
            }))
            .await
            .map_err(|s| anyhow!("creating container {}: {}", c.id, s.message()))?;
        let mut snaps = snapshots_client::SnapshotsClient::new(self.channel.clone());
        let prepared = snaps
            .prepare(self.req(PrepareSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: c.id.to_string(),
                parent: c.image.chain_id(),
                labels: HashMap::new(),
            }))
            .await;
        match prepared {
            Ok(r) => Ok(r.into_inner().mounts),
            Err(s) => {
                let _ = self.delete_container_record(c.id).await;
                Err(anyhow!(
                    "preparing the root filesystem of {}: {}",
                    c.id,
                    s.message()
                ))
            }
        }
    }

    /// Replaces the OCI spec of a container that has no task yet.
    pub async fn update_spec(&self, id: &str, spec: &serde_json::Value) -> Result<()> {
        use containerd_client::services::v1::UpdateContainerRequest;
        let spec = serde_json::to_vec(spec).context("encoding the OCI spec")?;
        let mut containers = ContainersClient::new(self.channel.clone());
        containers
            .update(self.req(UpdateContainerRequest {
                container: Some(Container {
                    id: id.to_string(),
                    spec: Some(prost_types::Any {
                        type_url: SPEC_TYPE_URL.into(),
                        value: spec,
                    }),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["spec".into()],
                }),
            }))
            .await
            .map_err(|s| anyhow!("updating container {id}: {}", s.message()))?;
        Ok(())
    }

    /// Creates the task (the process exists but does not run yet); returns its pid.
    pub async fn create_task(&self, id: &str, rootfs: Vec<Mount>, log: &Path) -> Result<u32> {
        // The shim appends both streams to this file (its `file://` IO scheme).
        let uri = format!("file://{}", log.display());
        let mut tasks = TasksClient::new(self.channel.clone());
        let resp = tasks
            .create(self.req(CreateTaskRequest {
                container_id: id.to_string(),
                rootfs,
                stdin: String::new(),
                stdout: uri.clone(),
                stderr: uri,
                terminal: false,
                ..Default::default()
            }))
            .await
            .map_err(|s| anyhow!("creating task {id}: {}", s.message()))?;
        Ok(resp.into_inner().pid)
    }

    pub async fn start_task(&self, id: &str) -> Result<()> {
        let mut tasks = TasksClient::new(self.channel.clone());
        tasks
            .start(self.req(StartRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
            }))
            .await
            .map_err(|s| anyhow!("starting task {id}: {}", s.message()))?;
        Ok(())
    }

    /// Blocks until the task exits; returns its exit code.
    pub async fn wait_task(&self, id: &str) -> std::result::Result<u32, Status> {
        let mut tasks = TasksClient::new(self.channel.clone());
        let r = tasks
            .wait(self.req(WaitRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
            }))
            .await?;
        Ok(r.into_inner().exit_status)
    }

    /// Pid of the running task, `None` when there is no running task.
    pub async fn task_pid(&self, id: &str) -> Result<Option<u32>> {
        use containerd_client::types::v1::Status as TaskStatus;
        let mut tasks = TasksClient::new(self.channel.clone());
        match tasks
            .get(self.req(GetRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
            }))
            .await
        {
            Ok(r) => Ok(r.into_inner().process.and_then(|p| {
                let running =
                    p.status == TaskStatus::Running as i32 || p.status == TaskStatus::Paused as i32;
                running.then_some(p.pid)
            })),
            Err(s) if is_not_found(&s) => Ok(None),
            Err(s) => Err(anyhow!(s).context(format!("task {id}"))),
        }
    }

    async fn kill(&self, id: &str, signal: u32) -> std::result::Result<(), Status> {
        let mut tasks = TasksClient::new(self.channel.clone());
        tasks
            .kill(self.req(KillRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
                signal,
                all: true,
            }))
            .await
            .map(|_| ())
    }

    /// Stops the task (SIGTERM, then SIGKILL after `grace`) and deletes it.
    pub async fn stop_and_delete_task(&self, id: &str, grace: Duration) -> Result<()> {
        if self.task_pid(id).await?.is_some() {
            let term = libc::SIGTERM as u32;
            if let Err(s) = self.kill(id, term).await
                && !is_not_found(&s)
            {
                tracing::warn!(id, error = %s.message(), "SIGTERM failed");
            }
            if tokio::time::timeout(grace, self.wait_task(id))
                .await
                .is_err()
            {
                let _ = self.kill(id, libc::SIGKILL as u32).await;
                let _ = tokio::time::timeout(Duration::from_secs(10), self.wait_task(id)).await;
            }
        }
        let mut tasks = TasksClient::new(self.channel.clone());
        match tasks
            .delete(self.req(DeleteTaskRequest {
                container_id: id.to_string(),
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if is_not_found(&s) => Ok(()),
            Err(s) => Err(anyhow!("deleting task {id}: {}", s.message())),
        }
    }

    async fn delete_container_record(&self, id: &str) -> Result<()> {
        let mut containers = ContainersClient::new(self.channel.clone());
        match containers
            .delete(self.req(DeleteContainerRequest { id: id.to_string() }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if is_not_found(&s) => Ok(()),
            Err(s) => Err(anyhow!("deleting container {id}: {}", s.message())),
        }
    }

    /// Removes task, container and snapshot; missing pieces are not errors.
    pub async fn remove(&self, id: &str, grace: Duration) -> Result<()> {
        self.stop_and_delete_task(id, grace).await?;
        self.delete_container_record(id).await?;
        let mut snaps = snapshots_client::SnapshotsClient::new(self.channel.clone());
        match snaps
            .remove(self.req(RemoveSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: id.to_string(),
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if is_not_found(&s) => Ok(()),
            Err(s) => Err(anyhow!("removing snapshot {id}: {}", s.message())),
        }
    }

    /// Our containers (those carrying the job label) and whether they run.
    pub async fn list_ours(&self) -> Result<Vec<ContainerInfo>> {
        let mut containers = ContainersClient::new(self.channel.clone());
        let list = containers
            .list(self.req(ListContainersRequest {
                filters: vec![format!("labels.\"{LABEL_JOB}\"")],
            }))
            .await
            .context("listing containers")?
            .into_inner()
            .containers;
        let mut out = Vec::new();
        for c in list {
            let running_pid = self.task_pid(&c.id).await?;
            out.push(ContainerInfo {
                id: c.id,
                labels: c.labels,
                running_pid,
            });
        }
        Ok(out)
    }

    /// Bytes used by the container's writable layer.
    pub async fn disk_usage(&self, id: &str) -> Option<i64> {
        let mut snaps = snapshots_client::SnapshotsClient::new(self.channel.clone());
        snaps
            .usage(self.req(UsageRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: id.to_string(),
            }))
            .await
            .ok()
            .map(|r| r.into_inner().size)
    }
}

fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{}-{nanos}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(
            normalize_image_name("busybox"),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(normalize_image_name("a/b:1"), "docker.io/a/b:1");
        assert_eq!(
            normalize_image_name("docker.io/curlimages/curl:7.82.0"),
            "docker.io/curlimages/curl:7.82.0"
        );
        assert_eq!(
            normalize_image_name("localhost:5000/x"),
            "localhost:5000/x:latest"
        );
    }

    #[test]
    fn chain_id_matches_the_spec_example_shape() {
        let ids = vec!["sha256:a".to_string(), "sha256:b".to_string()];
        let c = chain_ids(&ids);
        assert_eq!(c[0], "sha256:a");
        let expected = format!("sha256:{}", hex(&Sha256::digest(b"sha256:a sha256:b")));
        assert_eq!(c[1], expected);
    }

    #[test]
    fn platform_parse() {
        let p = platform_of("linux/arm64/v8");
        assert_eq!(
            (p.os.as_str(), p.architecture.as_str(), p.variant.as_str()),
            ("linux", "arm64", "v8")
        );
        assert_eq!(platform_of("").os, "linux");
    }
}
