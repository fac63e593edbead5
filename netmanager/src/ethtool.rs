//! The two ethtool requests NetManager makes, through the legacy ethtool
//! ioctl (no ethtool binary, no genetlink family), in the calling thread's
//! network namespace: GRO on a container's end of its veth, and the driver
//! behind an uplink.
//!
//! Both serve `--uplink-hook xdp-redirect`. A veth accepts redirected XDP
//! frames (`ndo_xdp_xmit`) only when its peer -- the container's `eth0` --
//! polls with NAPI, and a veth has NAPI when it runs an XDP program or,
//! since Linux 5.13, has GRO enabled (drivers/net/veth.c,
//! `veth_gro_requested`); without it the kernel drops every frame
//! redirected natively (generic XDP transmits an skb and needs none). GRO
//! needs no program of ours in the container's namespace and merges the
//! redirected frames back into large packets before the container's stack
//! sees them. The driver tells whether an uplink is itself a veth, where
//! native XDP is the wrong choice for delivery (docs/dataplane.md, "The
//! uplink hook").

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{Context, Result, anyhow};

/// `ETHTOOL_GDRVINFO`, `ETHTOOL_SGRO` (linux/ethtool.h).
const ETHTOOL_GDRVINFO: u32 = 0x03;
const ETHTOOL_SGRO: u32 = 0x2c;

/// `struct ethtool_value`.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// `struct ethtool_drvinfo`.
#[repr(C)]
struct EthtoolDrvinfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    counts: [u32; 5],
}

/// `struct ifreq` with the `ifr_data` member.
#[repr(C)]
struct IfreqData {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    /// The rest of the union (`struct ifmap` is the largest member).
    _pad: [u8; 16],
}

/// Enables GRO on `ifname`.
pub fn enable_gro(ifname: &str) -> Result<()> {
    let mut value = EthtoolValue {
        cmd: ETHTOOL_SGRO,
        data: 1,
    };
    request(ifname, (&raw mut value).cast())
        .with_context(|| format!("enabling GRO on {ifname} (ETHTOOL_SGRO)"))
}

/// The name of the driver behind `ifname` (`veth`, `virtio_net`, ...).
pub fn driver(ifname: &str) -> Result<String> {
    let mut info = EthtoolDrvinfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        version: [0; 32],
        fw_version: [0; 32],
        bus_info: [0; 32],
        erom_version: [0; 32],
        reserved2: [0; 12],
        counts: [0; 5],
    };
    request(ifname, (&raw mut info).cast())
        .with_context(|| format!("asking for the driver of {ifname} (ETHTOOL_GDRVINFO)"))?;
    let end = info.driver.iter().position(|b| *b == 0).unwrap_or(32);
    Ok(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// One `SIOCETHTOOL` request on `ifname` with `data` (an ethtool command
/// structure that outlives the call).
fn request(ifname: &str, data: *mut libc::c_void) -> Result<()> {
    let name = CString::new(ifname).context("interface name with a NUL byte")?;
    let bytes = name.as_bytes_with_nul();
    if bytes.len() > libc::IFNAMSIZ {
        return Err(anyhow!("interface name {ifname} is too long"));
    }
    let mut req = IfreqData {
        name: [0; libc::IFNAMSIZ],
        data,
        _pad: [0; 16],
    };
    for (d, s) in req.name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: a plain socket call; the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket for the ethtool ioctl");
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `req` and the structure it points to live across the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &raw mut req) } < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_missing_interface_has_no_driver() {
        // Not an empty name that could pass for one.
        assert!(super::driver("oak-no-such-if0").is_err());
    }
}
