//! The node document (docs/contract.md §1.4): sent once with the registration and every 2 s
//! on `nodes/<id>/information`.
//!
//! The cluster validates the JSON types (integer `memory`, `vcpus`, `vgpus`; float
//! `cpu_percent`; string `port`), so the struct below fixes them; every field is
//! always present, in upstream's order.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::{Arc, RwLock};

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

/// What `gpu_driver` says when the node has no (NVIDIA) GPU, as upstream.
pub const NO_GPU_DRIVER: &str = "-";

/// GPU figures from `nvidia-smi`, or upstream's values for "no GPU".
#[derive(Debug, Clone, PartialEq)]
pub struct GpuInfo {
    pub driver: String,
    pub usage: f64,
    pub count: u64,
    pub temp: f64,
    pub vram_percent: f64,
    /// Total video memory of all GPUs, MiB (upstream's `vram`).
    pub vram_total_mib: f64,
}

impl Default for GpuInfo {
    fn default() -> Self {
        GpuInfo {
            driver: NO_GPU_DRIVER.into(),
            usage: 0.0,
            count: 0,
            temp: 0.0,
            vram_percent: 0.0,
            vram_total_mib: 0.0,
        }
    }
}

/// The node's current `ip`, shared by the node report (which refreshes it)
/// and the status reports (whose `publicip` is the same, as upstream).
#[derive(Debug, Clone, Default)]
pub struct NodeIp(Arc<RwLock<String>>);

impl NodeIp {
    pub fn get(&self) -> String {
        self.0.read().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn set(&self, ip: &str) {
        if let Ok(mut s) = self.0.write()
            && *s != ip
        {
            *s = ip.to_string();
        }
    }
}

/// `/proc/meminfo` figures, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MemoryFigures {
    pub total: u64,
    pub free: u64,
    pub buffers: u64,
    pub cached: u64,
    pub sreclaimable: u64,
    pub available: u64,
}

impl MemoryFigures {
    pub fn parse(meminfo: &str) -> MemoryFigures {
        let mut m = MemoryFigures::default();
        for line in meminfo.lines() {
            let mut words = line.split_whitespace();
            let (Some(key), Some(value)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(kib) = value.parse::<u64>() else {
                continue;
            };
            let slot = match key {
                "MemTotal:" => &mut m.total,
                "MemFree:" => &mut m.free,
                "Buffers:" => &mut m.buffers,
                "Cached:" => &mut m.cached,
                "SReclaimable:" => &mut m.sreclaimable,
                "MemAvailable:" => &mut m.available,
                _ => continue,
            };
            *slot = kib.saturating_mul(1024);
        }
        m
    }

    pub fn read() -> Option<MemoryFigures> {
        std::fs::read_to_string("/proc/meminfo")
            .ok()
            .map(|t| MemoryFigures::parse(&t))
    }

    /// Upstream's `memory_percent` (gopsutil's used percent): what is neither
    /// free nor buffers nor page cache (reclaimable slab included), of the total.
    pub fn used_percent(&self) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let cache = self.buffers + self.cached + self.sreclaimable;
        self.total.saturating_sub(self.free).saturating_sub(cache) as f64 * 100.0
            / self.total as f64
    }

    /// Upstream's `memory`: available memory in MiB.
    pub fn available_mib(&self) -> u64 {
        self.available >> 20
    }
}

/// Logical CPUs online (upstream's `vcpus` and its divisor of CPU use).
pub fn cpu_count() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    u64::try_from(n).ok().filter(|n| *n > 0).unwrap_or(1)
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
    /// The public address to report instead of the machine's (`public_ip`).
    public_ip: Option<String>,
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
            public_ip: None,
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

    /// Reports `ip` as the node's address from now on (`None`: the machine's).
    pub fn set_public_ip(&mut self, ip: Option<String>) {
        self.public_ip = ip;
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
            ip: self.public_ip.clone().unwrap_or_else(primary_ipv4),
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
            vram: gpu.vram_total_mib,
            virtualization: self.facts.virtualization.clone(),
            supported_addons: self.facts.supported_addons.clone(),
            csi_drivers: self.csi_drivers(),
        }
    }

    fn cpu_and_memory(&mut self) -> (f64, u64, f64, u64) {
        let (cpu, cores) = match self.sys.as_mut() {
            Some(sys) => {
                sys.refresh_cpu_all();
                (f64::from(sys.global_cpu_usage()), sys.cpus().len() as u64)
            }
            None => (0.0, cpu_count()),
        };
        let mem = MemoryFigures::read().unwrap_or_default();
        (cpu, cores, mem.used_percent(), mem.available_mib())
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

/// The first non-loopback IPv4 address in interface-index order, as
/// upstream takes it (Go's `net.InterfaceAddrs`); read anew at every call.
pub fn primary_ipv4() -> String {
    let mut candidates: Vec<(u32, std::net::Ipv4Addr)> = ipv4_addresses()
        .into_iter()
        .filter(|(_, a)| !a.is_loopback())
        .map(|(name, a)| (if_index(&name), a))
        .collect();
    // Stable: addresses of one interface keep the kernel's order.
    candidates.sort_by_key(|(index, _)| *index);
    candidates
        .first()
        .map(|(_, a)| a.to_string())
        .unwrap_or_default()
}

/// Every IPv4 address of the network namespace we run in, with its
/// interface's name (getifaddrs asks the kernel over netlink, so the
/// answer is the current namespace's even where /sys shows another one).
fn ipv4_addresses() -> Vec<(String, std::net::Ipv4Addr)> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, alive
        // until freeifaddrs; its name is a NUL-terminated string and an
        // AF_INET address is a sockaddr_in.
        unsafe {
            let ifa = &*cur;
            if !ifa.ifa_addr.is_null() && i32::from((*ifa.ifa_addr).sa_family) == libc::AF_INET {
                let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                let addr = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                let name = std::ffi::CStr::from_ptr(ifa.ifa_name)
                    .to_string_lossy()
                    .into_owned();
                out.push((name, addr));
            }
            cur = ifa.ifa_next;
        }
    }
    // SAFETY: the list getifaddrs allocated, freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

/// The kernel's index of an interface (0, sorting first, if it vanished).
fn if_index(name: &str) -> u32 {
    let Ok(c) = std::ffi::CString::new(name) else {
        return 0;
    };
    // SAFETY: a valid NUL-terminated string; the call only reads it.
    unsafe { libc::if_nametoindex(c.as_ptr()) }
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

/// `nvidia-smi --query-gpu=<fields>` as CSV without header and units, one
/// line per GPU; `None` when it cannot tell.
pub(crate) fn nvidia_smi_query(fields: &str) -> Option<String> {
    let out = Command::new("nvidia-smi")
        .arg(format!("--query-gpu={fields}"))
        .arg("--format=csv,noheader,nounits")
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Figures over all GPUs `nvidia-smi` lists.
fn query_nvidia_smi() -> Option<GpuInfo> {
    let text = nvidia_smi_query(
        "driver_version,utilization.gpu,temperature.gpu,memory.used,memory.total",
    )?;
    parse_nvidia_smi(&text)
}

/// Averages usage and temperature, sums the video memory; `None` (upstream's
/// "-" driver and zeros) when no GPU is listed.
fn parse_nvidia_smi(text: &str) -> Option<GpuInfo> {
    let mut info = GpuInfo::default();
    let mut used = 0.0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        if f.len() < 5 {
            continue;
        }
        let num = |s: &str| s.parse::<f64>().unwrap_or(0.0);
        info.driver = f[0].to_string();
        info.usage += num(f[1]);
        info.temp += num(f[2]);
        used += num(f[3]);
        info.vram_total_mib += num(f[4]);
        info.count += 1;
    }
    if info.count == 0 {
        return None;
    }
    let n = info.count as f64;
    info.usage /= n;
    info.temp /= n;
    info.vram_percent = if info.vram_total_mib > 0.0 {
        used * 100.0 / info.vram_total_mib
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
        let g = parse_nvidia_smi("535.1, 50, 60, 1000, 4000\n535.1, 30, 40, 1000, 4000\n")
            .expect("parses");
        assert_eq!(g.count, 2);
        assert_eq!(g.usage, 40.0);
        assert_eq!(g.vram_percent, 25.0);
        assert_eq!(g.vram_total_mib, 8000.0);
        assert_eq!(g.driver, "535.1");
        assert_eq!(parse_nvidia_smi(""), None);
        assert_eq!(GpuInfo::default().driver, "-");
    }

    #[test]
    fn memory_as_upstream_computes_it() {
        let m = MemoryFigures::parse(
            "MemTotal:       1000000 kB\nMemFree:         100000 kB\nMemAvailable:    600000 kB\n\
             Buffers:          50000 kB\nCached:          300000 kB\nSwapCached: 0 kB\n\
             SReclaimable:     50000 kB\n",
        );
        // used = total - free - buffers - cached - sreclaimable = 500000 kB
        assert_eq!(m.used_percent(), 50.0);
        assert_eq!(m.available_mib(), (600000 * 1024) >> 20);
    }
}
