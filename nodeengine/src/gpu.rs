//! NVIDIA GPUs for jobs with `vgpus`, as upstream passes them (containerd's
//! NVIDIA support): up to `vgpus` devices, those with the most free memory
//! first (GPU 0 when they cannot be queried), handed to the container by
//! `nvidia-container-cli` from a prestart hook that `containerd oci-hook`
//! runs with the container's pid and root filesystem, with every driver
//! capability.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::node_report::{self, find_on_path};

/// The NVIDIA container library's command line tool.
pub const NVIDIA_CLI: &str = "nvidia-container-cli";

/// Every capability the driver offers a container ("all").
const CAPABILITIES: &[&str] = &[
    "compute", "compat32", "graphics", "utility", "video", "display",
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GpuError {
    #[error(
        "the job asks for {0} GPU(s) but nvidia-container-cli (libnvidia-container-tools) \
         is not installed on this node"
    )]
    NoNvidiaCli(u64),
    #[error("the job asks for GPUs but containerd, which runs the GPU hook, is not on PATH")]
    NoContainerd,
}

/// GPU indices by free memory, most first, from
/// `nvidia-smi --query-gpu=index,memory.free --format=csv,noheader,nounits`.
fn parse_free_memory(text: &str) -> Vec<(u32, u64)> {
    let mut gpus: Vec<(u32, u64)> = text
        .lines()
        .filter_map(|l| {
            let (i, free) = l.split_once(',')?;
            Some((i.trim().parse().ok()?, free.trim().parse().ok()?))
        })
        .collect();
    gpus.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    gpus
}

/// Up to `wanted` devices, most free memory first; GPU 0 when nvidia-smi
/// cannot tell (upstream's fallback).
pub fn select_devices(wanted: u64, nvidia_smi_output: Option<&str>) -> Vec<u32> {
    let gpus = nvidia_smi_output.map(parse_free_memory).unwrap_or_default();
    if gpus.is_empty() {
        return vec![0];
    }
    let n = usize::try_from(wanted)
        .unwrap_or(usize::MAX)
        .min(gpus.len());
    gpus.into_iter().take(n.max(1)).map(|(i, _)| i).collect()
}

/// The ldconfig the NVIDIA tool runs in the container's root (`@` means
/// "of the host"); Ubuntu's real binary is `ldconfig.real`.
fn ldconfig() -> &'static str {
    if Path::new("/sbin/ldconfig.real").exists() {
        "@/sbin/ldconfig.real"
    } else {
        "@/sbin/ldconfig"
    }
}

/// The OCI prestart hook for these devices.
pub fn prestart_hook(containerd: &Path, nvidia_cli: &Path, devices: &[u32]) -> Value {
    let list: Vec<String> = devices.iter().map(u32::to_string).collect();
    let mut args: Vec<String> = vec![
        "containerd".into(),
        "oci-hook".into(),
        "--".into(),
        nvidia_cli.display().to_string(),
        // loads the kernel modules the devices need
        "--load-kmods".into(),
        "configure".into(),
        format!("--device={}", list.join(",")),
    ];
    args.extend(CAPABILITIES.iter().map(|c| format!("--{c}")));
    args.push(format!("--ldconfig={}", ldconfig()));
    // `containerd oci-hook` fills these in from the container's state.
    args.push("--pid={{pid}}".into());
    args.push("{{rootfs}}".into());
    let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    json!({
        "path": containerd.display().to_string(),
        "args": args,
        "env": [format!("PATH={path}")]
    })
}

/// The hook giving a job its `vgpus` GPUs, or why it cannot have them.
pub fn hook_for(vgpus: u64) -> Result<Value, GpuError> {
    let cli: PathBuf = find_on_path(NVIDIA_CLI).ok_or(GpuError::NoNvidiaCli(vgpus))?;
    let containerd = find_on_path("containerd").ok_or(GpuError::NoContainerd)?;
    let free = node_report::nvidia_smi_query("index,memory.free");
    let devices = select_devices(vgpus, free.as_deref());
    tracing::info!(?devices, "NVIDIA GPUs for the container");
    Ok(prestart_hook(&containerd, &cli, &devices))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_with_most_free_memory_first() {
        let smi = "0, 1000\n1, 8000\n2, 4000\n";
        assert_eq!(select_devices(2, Some(smi)), [1, 2]);
        assert_eq!(select_devices(9, Some(smi)), [1, 2, 0]);
        assert_eq!(select_devices(1, None), [0]);
        assert_eq!(select_devices(3, Some("garbage")), [0]);
    }

    #[test]
    fn hook_runs_nvidia_container_cli_through_containerd() {
        let h = prestart_hook(
            Path::new("/usr/bin/containerd"),
            Path::new("/usr/bin/nvidia-container-cli"),
            &[1, 0],
        );
        assert_eq!(h["path"], "/usr/bin/containerd");
        let args: Vec<&str> = h["args"]
            .as_array()
            .expect("args")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(
            &args[..7],
            [
                "containerd",
                "oci-hook",
                "--",
                "/usr/bin/nvidia-container-cli",
                "--load-kmods",
                "configure",
                "--device=1,0"
            ]
        );
        for c in [
            "--compute",
            "--utility",
            "--video",
            "--graphics",
            "--display",
            "--compat32",
        ] {
            assert!(args.contains(&c), "{c} missing: {args:?}");
        }
        assert_eq!(&args[args.len() - 2..], ["--pid={{pid}}", "{{rootfs}}"]);
    }
}
