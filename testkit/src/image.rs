//! A one-layer OCI image built offline from busybox-static: the sandbox's
//! sample services run in it, and so do nodeengine's containerd tests.

use std::path::Path;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

/// Name the sandbox imports its image under.
pub const SANDBOX_IMAGE: &str = "docker.io/library/oak-sandbox-busybox:latest";

/// Busybox applets the sample services and tests call by name.
pub const APPLETS: &[&str] = &[
    "sh", "sleep", "echo", "cat", "env", "hostname", "ls", "true", "false", "httpd", "wget", "nc",
    "mkdir", "date", "ping",
];

/// What goes into the image besides busybox.
pub struct ImageSpec<'a> {
    pub name: &'a str,
    pub applets: &'a [&'a str],
    pub env: &'a [&'a str],
    pub cmd: &'a [&'a str],
    /// The image config's `Entrypoint` (empty: none).
    pub entrypoint: &'a [&'a str],
    /// Extra files (path inside the image, content), e.g. `etc/passwd`.
    pub files: &'a [(&'a str, &'a [u8])],
    /// The image config's `User` (empty: none).
    pub user: &'a str,
}

impl Default for ImageSpec<'_> {
    fn default() -> Self {
        ImageSpec {
            name: SANDBOX_IMAGE,
            applets: APPLETS,
            env: &["PATH=/bin"],
            cmd: &["sh"],
            entrypoint: &[],
            files: &[],
            user: "",
        }
    }
}

/// GOARCH spelling of this machine's architecture (OCI image configs use it).
pub fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        other => other,
    }
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_size(size);
    h.set_mode(mode);
    h.set_entry_type(kind);
    // Fixed mtime: the same inputs give the same digests.
    h.set_mtime(0);
    h
}

fn add_file(b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8], mode: u32) -> Result<()> {
    let mut h = header(tar::EntryType::Regular, data.len() as u64, mode);
    b.append_data(&mut h, name, data)
        .with_context(|| format!("adding {name}"))
}

fn layer(applets: &[&str], files: &[(&str, &[u8])]) -> Result<Vec<u8>> {
    let busybox =
        std::fs::read("/bin/busybox").context("reading /bin/busybox (install busybox-static)")?;
    let mut b = tar::Builder::new(Vec::new());
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "www"] {
        let mut h = header(tar::EntryType::Directory, 0, 0o755);
        b.append_data(&mut h, d, std::io::empty())
            .with_context(|| format!("adding {d}/"))?;
    }
    add_file(&mut b, "bin/busybox", &busybox, 0o755)?;
    for applet in applets {
        let mut h = header(tar::EntryType::Symlink, 0, 0o777);
        b.append_link(&mut h, format!("bin/{applet}"), "busybox")
            .with_context(|| format!("adding applet {applet}"))?;
    }
    for (name, data) in files {
        add_file(&mut b, name, data, 0o644)?;
    }
    b.into_inner().context("finishing the layer")
}

/// Writes an OCI layout tarball (importable with `ctr images import`).
pub fn write_busybox_oci_tar(dest: &Path, spec: &ImageSpec) -> Result<()> {
    let layer = layer(spec.applets, spec.files)?;
    let layer_digest = format!("sha256:{}", sha256_hex(&layer));
    let mut run_config = serde_json::json!({"Env": spec.env, "Cmd": spec.cmd});
    if !spec.user.is_empty() {
        run_config["User"] = spec.user.into();
    }
    if !spec.entrypoint.is_empty() {
        run_config["Entrypoint"] = spec.entrypoint.into();
    }
    let config = serde_json::json!({
        "architecture": go_arch(),
        "os": "linux",
        "config": run_config,
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]}
    })
    .to_string()
    .into_bytes();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": format!("sha256:{}", sha256_hex(&config)), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest, "size": layer.len()}]
    })
    .to_string()
    .into_bytes();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": format!("sha256:{}", sha256_hex(&manifest)),
                       "size": manifest.len(),
                       "annotations": {"io.containerd.image.name": spec.name}}]
    })
    .to_string()
    .into_bytes();
    let mut out = tar::Builder::new(Vec::new());
    add_file(
        &mut out,
        "oci-layout",
        br#"{"imageLayoutVersion":"1.0.0"}"#,
        0o644,
    )?;
    for d in ["blobs", "blobs/sha256"] {
        let mut h = header(tar::EntryType::Directory, 0, 0o755);
        out.append_data(&mut h, d, std::io::empty())?;
    }
    for blob in [&layer, &config, &manifest] {
        add_file(
            &mut out,
            &format!("blobs/sha256/{}", sha256_hex(blob)),
            blob,
            0o644,
        )?;
    }
    add_file(&mut out, "index.json", &index, 0o644)?;
    let bytes = out.into_inner().context("finishing the OCI layout")?;
    std::fs::write(dest, bytes).with_context(|| format!("writing {}", dest.display()))
}
