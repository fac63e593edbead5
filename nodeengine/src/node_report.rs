//! The node document (contract 1.4): sent once with the registration and every 2 s
//! on `nodes/<id>/information`.
//!
//! The cluster validates the JSON types (integer `memory`, `vcpus`, `vgpus`; float
//! `cpu_percent`; string `port`), so the struct below fixes them; every field is
//! always present, in upstream's order.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::process::Command;

use serde::Serialize;
use sysinfo::{Disks, Networks, System};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SystemInfo {
    pub kernel_version: String,
    pub architecture: String,
    pub os_version: String,
    pub uptime: String,
    pub full_stats: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NodeDocument {
    pub id: String,
    pub host: String,
    pub ip: String,
    pub port: String,
    pub system_info: SystemInfo,
    pub cpu_percent: f64,
    pub vcpus: u64,
    pub architecture: String,
    pub memory_percent: f64,
    pub memory: u64,
    pub disk_info: BTreeMap<String, String>,
    pub network_info: BTreeMap<String, String>,
    pub gpu_driver: String,
    pub gpu_usage: f64,
    pub vgpus: u64,
    pub gpu_temp: f64,
    pub vram_percent: f64,
    pub vram: f64,
    pub virtualization: Vec<String>,
    pub supported_addons: Vec<String>,
    pub csi_drivers: Vec<serde_json::Value>,
}

/// GPU figures from `nvidia-smi`, or zero values when there is none.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuInfo {
    pub driver: String,
    pub usage: f64,
    pub count: u64,
    pub temp: f64,
    pub vram_percent: f64,
    pub vram_free_mib: f64,
}

/// What stays the same between two reports.
#[derive(Debug, Clone)]
pub struct StaticFacts {
    pub virtualization: Vec<String>,
    pub supported_addons: Vec<String>,
    pub csi_drivers: Vec<serde_json::Value>,
    pub port: String,
}

impl StaticFacts {
    /// `port` is what upstream reads from `MY_PORT` (see `DaemonArgs`).
    pub fn from_config(cfg: &crate::config::Config, port: &str) -> Self {
        StaticFacts {
            virtualization: cfg.active_runtimes(),
            supported_addons: cfg.active_addons(),
            // Only drivers that answer their probe are advertised: see
            // [`NodeSampler::with_csi`].
            csi_drivers: Vec::new(),
            port: port.to_string(),
        }
    }
}

/// Samples the machine. Keeps a `System` so CPU usage is measured between calls.
pub struct NodeSampler {
    sys: Option<System>,
    facts: StaticFacts,
    has_nvidia_smi: bool,
    /// The probed CSI drivers; replaces `facts.csi_drivers` when set.
    csi: Option<crate::csi::Registry>,
}

impl NodeSampler {
    pub fn new(facts: StaticFacts) -> Self {
        let mut sys = System::new().ok();
        if let Some(s) = sys.as_mut() {
            s.refresh_cpu_all();
            s.refresh_memory();
        }
        NodeSampler {
            sys,
            facts,
            has_nvidia_smi: which("nvidia-smi"),
            csi: None,
        }
    }

    /// Reports the drivers of `registry` that answered their last probe.
    pub fn with_csi(mut self, registry: crate::csi::Registry) -> Self {
        self.csi = Some(registry);
        self
    }

    fn csi_drivers(&self) -> Vec<serde_json::Value> {
        match &self.csi {
            Some(r) => r
                .advertised()
                .iter()
                .filter_map(|d| serde_json::to_value(d).ok())
                .collect(),
            None => self.facts.csi_drivers.clone(),
        }
    }

    /// A fresh node document for node `id` ("" for the registration).
    pub fn sample(&mut self, id: &str) -> NodeDocument {
        let (cpu_percent, vcpus, memory_percent, memory) = self.cpu_and_memory();
        let gpu = if self.has_nvidia_smi {
            query_nvidia_smi().unwrap_or_default()
        } else {
            GpuInfo::default()
        };
        NodeDocument {
            id: id.to_string(),
            host: System::host_name().unwrap_or_default(),
            ip: primary_ipv4(),
            port: self.facts.port.clone(),
            system_info: system_info(),
            cpu_percent,
            vcpus,
            architecture: go_arch(),
            memory_percent,
            memory,
            disk_info: disk_info(),
            network_info: network_info(),
            gpu_driver: gpu.driver,
            gpu_usage: gpu.usage,
            vgpus: gpu.count,
            gpu_temp: gpu.temp,
            vram_percent: gpu.vram_percent,
            vram: gpu.vram_free_mib,
            virtualization: self.facts.virtualization.clone(),
            supported_addons: self.facts.supported_addons.clone(),
            csi_drivers: self.csi_drivers(),
        }
    }

    fn cpu_and_memory(&mut self) -> (f64, u64, f64, u64) {
        let Some(sys) = self.sys.as_mut() else {
            return (0.0, 0, 0.0, 0);
        };
        sys.refresh_cpu_all();
        sys.refresh_memory();
        let total = sys.total_memory();
        let mem_percent = if total > 0 {
            sys.used_memory() as f64 * 100.0 / total as f64
        } else {
            0.0
        };
        (
            f64::from(sys.global_cpu_usage()),
            sys.cpus().len() as u64,
            mem_percent,
            sys.available_memory() >> 20,
        )
    }
}

/// Architecture as Go's GOARCH spells it, which is what job `arch` lists use.
pub fn go_arch() -> String {
    match std::env::consts::ARCH {
        "x86_64" => "amd64".into(),
        "aarch64" => "arm64".into(),
        "arm" => "arm".into(),
        "riscv64" => "riscv64".into(),
        other => other.into(),
    }
}

fn system_info() -> SystemInfo {
    let kernel_version = System::kernel_version().unwrap_or_default();
    let architecture = System::cpu_arch();
    let os_version = System::long_os_version().unwrap_or_default();
    let uptime = System::uptime().unwrap_or(0).to_string();
    let full_stats = format!(
        "{{\"hostname\":{:?},\"os\":{:?},\"kernelVersion\":{:?},\"kernelArch\":{:?},\"uptime\":{}}}",
        System::host_name().unwrap_or_default(),
        os_version,
        kernel_version,
        architecture,
        uptime
    );
    SystemInfo {
        kernel_version,
        architecture,
        os_version,
        uptime,
        full_stats,
    }
}

/// First non-loopback IPv4 address, as upstream reports it.
pub fn primary_ipv4() -> String {
    let Ok(nets) = Networks::new_with_refreshed_list() else {
        return String::new();
    };
    let mut names: Vec<_> = nets.keys().collect();
    names.sort();
    for name in names {
        let Some(data) = nets.get(name) else { continue };
        for ipn in data.ip_networks() {
            if let IpAddr::V4(v4) = ipn.addr
                && !v4.is_loopback()
                && !v4.is_link_local()
            {
                return v4.to_string();
            }
        }
    }
    String::new()
}

fn disk_info() -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Ok(disks) = Disks::new_with_refreshed_list() else {
        return out;
    };
    for (i, d) in disks.iter().enumerate() {
        let used_pct = if d.total_space() > 0 {
            100 - (d.available_space() * 100 / d.total_space())
        } else {
            0
        };
        if d.mount_point() == std::path::Path::new("/") {
            out.insert("/".into(), used_pct.to_string());
        }
        out.insert(
            format!("partition_{i}"),
            format!(
                "{{\"device\":{:?},\"mountpoint\":{:?},\"used_percent\":{used_pct}}}",
                d.name().to_string_lossy(),
                d.mount_point().display().to_string()
            ),
        );
    }
    out
}

fn network_info() -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Ok(nets) = Networks::new_with_refreshed_list() else {
        return out;
    };
    let mut names: Vec<_> = nets.keys().collect();
    names.sort();
    for (i, name) in names.into_iter().enumerate() {
        let Some(data) = nets.get(name) else { continue };
        let addrs: Vec<String> = data
            .ip_networks()
            .iter()
            .map(|n| format!("{}/{}", n.addr, n.prefix))
            .collect();
        out.insert(
            format!("interface_{i}"),
            format!(
                "{{\"name\":{:?},\"hardwareaddr\":\"{}\",\"addrs\":{:?}}}",
                name.to_string_lossy(),
                data.mac_address(),
                addrs
            ),
        );
    }
    out
}

pub(crate) fn which(bin: &str) -> bool {
    find_on_path(bin).is_some()
}

pub(crate) fn find_on_path(bin: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

/// Averages over all GPUs `nvidia-smi` lists.
fn query_nvidia_smi() -> Option<GpuInfo> {
    let out = Command::new("nvidia-smi")
        .args([
            "--query-gpu=driver_version,utilization.gpu,temperature.gpu,memory.used,memory.total,memory.free",
            "--format=csv,noheader,nounits",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    parse_nvidia_smi(&String::from_utf8_lossy(&out.stdout))
}

fn parse_nvidia_smi(text: &str) -> Option<GpuInfo> {
    let mut info = GpuInfo::default();
    let (mut used, mut total) = (0.0, 0.0);
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        if f.len() < 6 {
            continue;
        }
        let num = |s: &str| s.parse::<f64>().unwrap_or(0.0);
        info.driver = f[0].to_string();
        info.usage += num(f[1]);
        info.temp += num(f[2]);
        used += num(f[3]);
        total += num(f[4]);
        info.vram_free_mib += num(f[5]);
        info.count += 1;
    }
    if info.count == 0 {
        return None;
    }
    let n = info.count as f64;
    info.usage /= n;
    info.temp /= n;
    info.vram_percent = if total > 0.0 {
        used * 100.0 / total
    } else {
        0.0
    };
    Some(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_types_match_what_the_cluster_validates() {
        let mut s = NodeSampler::new(StaticFacts {
            virtualization: vec!["docker".into()],
            supported_addons: vec![],
            csi_drivers: vec![],
            port: "3000".into(),
        });
        let v = serde_json::to_value(s.sample("abc")).expect("serialise");
        assert!(v["memory"].is_u64());
        assert!(v["vcpus"].is_u64());
        assert!(v["vgpus"].is_u64());
        assert!(v["cpu_percent"].is_f64());
        assert!(v["port"].is_string());
        assert!(v["csi_drivers"].is_array());
        assert!(v["supported_addons"].is_array());
    }

    #[test]
    fn nvidia_smi_lines() {
        let g =
            parse_nvidia_smi("535.1, 50, 60, 1000, 4000, 3000\n535.1, 30, 40, 1000, 4000, 3000\n")
                .expect("parses");
        assert_eq!(g.count, 2);
        assert_eq!(g.usage, 40.0);
        assert_eq!(g.vram_percent, 25.0);
        assert_eq!(g.driver, "535.1");
    }
}
