//! Addons the node advertises in `supported_addons` (docs/contract.md §1.4):
//!
//! - `image-builder` builds images for other architectures, so it is
//!   advertised only where qemu-user-static is installed, checked as
//!   upstream checks it (dpkg's status of the package).
//! - `FLOps-learner` needs the ML data server sidecar next to the learners;
//!   it is started at daemon start as upstream starts it (image, name, port
//!   11027, data volume), on containerd instead of Docker.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::config::{ADDON_FLOPS, ADDON_IMAGE_BUILDER, Config};
use crate::containerd_runtime::{self, ContainerdRuntime, NewContainer};
use crate::node_report::find_on_path;
use crate::oci_spec::{self, SidecarSpec};

/// The ML data server upstream runs for FLOps learners.
pub const FLOPS_DATA_SERVER_IMAGE: &str = "ghcr.io/oakestra/addon-flops/ml-data-server:latest";
/// Its container name (upstream's `--name=ml_data_server`).
pub const FLOPS_DATA_SERVER_NAME: &str = "ml_data_server";
/// Where the learners reach it (upstream publishes 11027:11027).
pub const FLOPS_DATA_SERVER_PORT: u16 = 11027;
/// Its data, kept across restarts (upstream's `ml_data_server_volume`).
const FLOPS_VOLUME_MOUNT: &str = "/ml_data_server_volume";
/// Marks the sidecar so reconciliation never takes it for a job.
pub const LABEL_ADDON: &str = "oakestra.io/addon";

/// Why the imageBuilder addon cannot work here, if it cannot: upstream asks
/// dpkg whether `qemu-user-static` is "ok installed". Without dpkg (not a
/// Debian system) the emulators themselves are looked for.
pub fn qemu_user_static_missing() -> Option<String> {
    const WHY: &str = "the package qemu-user-static is not installed \
                       (apt-get install qemu-user-static)";
    match Command::new("dpkg")
        .args(["-s", "qemu-user-static"])
        .output()
    {
        Ok(out) => {
            let installed = out.status.success()
                && String::from_utf8_lossy(&out.stdout).contains("ok installed");
            (!installed).then(|| WHY.to_string())
        }
        Err(_) => {
            let any = [
                "qemu-aarch64-static",
                "qemu-x86_64-static",
                "qemu-arm-static",
            ]
            .iter()
            .any(|b| find_on_path(b).is_some());
            (!any).then(|| WHY.to_string())
        }
    }
}

/// The addons this node advertises: the active ones that can work here.
/// `flops_running` says whether the FLOps sidecar is up.
pub fn advertised(cfg: &Config, flops_running: bool) -> Vec<String> {
    cfg.active_addons()
        .into_iter()
        .filter(|name| match name.as_str() {
            ADDON_IMAGE_BUILDER => match qemu_user_static_missing() {
                None => true,
                Some(why) => {
                    tracing::error!("addon image-builder is on but {why}; not advertised");
                    false
                }
            },
            ADDON_FLOPS => flops_running,
            _ => true,
        })
        .collect()
}

/// Starts the FLOps ML data server unless it already runs: the image
/// (pulled when absent), named `ml_data_server`, on the host's network so
/// it listens on port 11027 as upstream's published port does, with its
/// data in `<state_dir>/flops/ml_data_server_volume`.
pub async fn start_flops_data_server(rt: &ContainerdRuntime, state_dir: &Path) -> Result<()> {
    let id = FLOPS_DATA_SERVER_NAME;
    if rt.task_pid(id).await?.is_some() {
        tracing::info!("FLOps data server {id:?} already runs");
        return Ok(());
    }
    // A stopped leftover is replaced, as upstream's `docker run --rm` leaves none.
    rt.remove(id, std::time::Duration::from_secs(5)).await?;
    let volume = state_dir.join("flops").join("ml_data_server_volume");
    std::fs::create_dir_all(&volume).with_context(|| format!("creating {}", volume.display()))?;
    let platform = containerd_runtime::platform_of("");
    let image = rt
        .ensure_image(FLOPS_DATA_SERVER_IMAGE, &platform)
        .await
        .context("the FLOps ML data server image")?;
    let spec = oci_spec::sidecar_spec(&SidecarSpec {
        namespace: &rt.settings().namespace,
        id,
        image: &image.defaults,
        volume: (&volume, FLOPS_VOLUME_MOUNT),
    });
    let log = sidecar_log(state_dir);
    let rootfs = rt
        .create_container(NewContainer {
            id,
            image: &image,
            spec,
            runtime: &containerd_runtime::RuntimeChoice::default(),
            labels: HashMap::from([(LABEL_ADDON.to_string(), ADDON_FLOPS.to_string())]),
        })
        .await?;
    let started = async {
        rt.create_task(id, rootfs, &log).await?;
        rt.start_task(id).await
    }
    .await;
    if let Err(e) = started {
        let _ = rt.remove(id, std::time::Duration::from_secs(1)).await;
        return Err(e);
    }
    tracing::info!(port = FLOPS_DATA_SERVER_PORT, "FLOps data server started");
    Ok(())
}

fn sidecar_log(state_dir: &Path) -> PathBuf {
    state_dir.join("flops").join("ml_data_server.log")
}
