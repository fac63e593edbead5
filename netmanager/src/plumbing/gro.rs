//! GRO on the container end of a veth, through the ethtool ioctl: what lets
//! the XDP uplink program redirect into it (`--uplink-hook xdp-redirect`).
//!
//! A veth accepts redirected XDP frames (`ndo_xdp_xmit`) only when its peer
//! -- here the container's `eth0` -- polls with NAPI, and a veth has NAPI
//! when it runs an XDP program or, since Linux 5.13, has GRO enabled
//! (drivers/net/veth.c, `veth_gro_requested`). GRO needs no program of ours
//! in the container's namespace and merges the redirected frames back
//! into large packets before the container's stack sees them. Without it
//! the kernel drops every redirected frame (`veth_xdp_xmit`: -ENXIO).

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{Context, Result, anyhow};

/// `ETHTOOL_SGRO` (linux/ethtool.h).
const ETHTOOL_SGRO: u32 = 0x2c;

/// `struct ethtool_value`.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// `struct ifreq` with the `ifr_data` member.
#[repr(C)]
struct IfreqData {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    /// The rest of the union (`struct ifmap` is the largest member).
    _pad: [u8; 16],
}

/// Enables GRO on `ifname` in the calling thread's network namespace.
pub fn enable(ifname: &str) -> Result<()> {
    let name = CString::new(ifname).context("interface name with a NUL byte")?;
    let bytes = name.as_bytes_with_nul();
    if bytes.len() > libc::IFNAMSIZ {
        return Err(anyhow!("interface name {ifname} is too long"));
    }
    let mut value = EthtoolValue {
        cmd: ETHTOOL_SGRO,
        data: 1,
    };
    let mut req = IfreqData {
        name: [0; libc::IFNAMSIZ],
        data: (&raw mut value).cast(),
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
    // SAFETY: `req` and the `value` it points to live across the call.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &raw mut req) };
    if r < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("enabling GRO on {ifname} (ETHTOOL_SGRO)"));
    }
    Ok(())
}
