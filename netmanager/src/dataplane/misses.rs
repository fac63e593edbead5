//! Misses: the programs hand packets for unknown addresses to us through a
//! ring buffer (frame included), and once the address is resolved we send
//! the frame through the programs again: a container's frame goes in at
//! `oakinj0` and meets the container program on `oakinj1`; a held tunnel
//! datagram goes in at the slow-path device and meets the receive path,
//! sender check included, in `slow_path_ingress`. A TCP connect to a
//! never-seen service -- or from a never-seen node -- thus completes
//! without waiting for a SYN retransmit.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use aya::Ebpf;
use aya::maps::{MapData, RingBuf};
use netmanager_common::{Addr, MISS_FRAME_MAX, MissReason, maps};
use tokio::io::unix::AsyncFd;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::addr::from_addr;
use super::devices::VethPair;
use super::{DataplaneError, Miss, Result};

/// Name of our end of the reinjection pair (frames are written here) and of
/// the end the container program watches.
pub const INJECT_DEVICE: &str = "oakinj0";
pub const INJECT_PEER: &str = "oakinj1";

pub struct MissSource(RingBuf<MapData>);

impl MissSource {
    pub fn take(ebpf: &mut Ebpf) -> Result<MissSource> {
        Ok(MissSource(super::tables::take(ebpf, maps::MISSES)?))
    }

    /// Needs a running tokio runtime (the ring buffer is polled with epoll).
    pub fn into_receiver(self) -> Result<MissReceiver> {
        // AsyncFd owns the RingBuf, which owns the descriptor: it cannot be
        // closed behind the registration's back, the case `new` is
        // deprecated for.
        #[allow(deprecated)]
        let fd = AsyncFd::new(self.0)
            .map_err(|e| DataplaneError::bpf("registering the MISSES ring buffer", e))?;
        Ok(MissReceiver {
            fd,
            queue: VecDeque::new(),
        })
    }
}

pub struct MissReceiver {
    fd: AsyncFd<RingBuf<MapData>>,
    queue: VecDeque<Miss>,
}

impl MissReceiver {
    /// Next miss; None when the dataplane is gone.
    pub async fn recv(&mut self) -> Option<Miss> {
        loop {
            if let Some(m) = self.queue.pop_front() {
                return Some(m);
            }
            let mut guard = self.fd.readable_mut().await.ok()?;
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                match decode(&item) {
                    Some(m) => self.queue.push_back(m),
                    None => {
                        tracing::warn!("ignoring a malformed miss event ({} bytes)", item.len())
                    }
                }
            }
            guard.clear_ready();
        }
    }
}

/// Decodes a `MissEvent` record (layout in netmanager-common).
pub fn decode(raw: &[u8]) -> Option<Miss> {
    const FRAME_AT: usize = 32;
    if raw.len() < FRAME_AT {
        return None;
    }
    let word = |at: usize| u32::from_ne_bytes([raw[at], raw[at + 1], raw[at + 2], raw[at + 3]]);
    let reason = MissReason::try_from(word(0)).ok()?;
    let mut addr = Addr::ZERO;
    addr.bytes.copy_from_slice(&raw[8..24]);
    let frame_len = word(24) as usize;
    let frame = if frame_len > 0 && frame_len <= MISS_FRAME_MAX && raw.len() >= FRAME_AT + frame_len
    {
        let mut f = raw[FRAME_AT..FRAME_AT + frame_len].to_vec();
        match reason {
            MissReason::Peer => super::checksum::complete_tunnel(&mut f),
            _ => super::checksum::complete(&mut f),
        }
        Some(f)
    } else {
        None
    };
    let peer = match reason {
        MissReason::Peer => frame.as_deref().and_then(outer_source),
        _ => None,
    };
    Some(Miss {
        reason,
        addr: from_addr(&addr),
        peer,
        ifindex: word(4),
        frame,
    })
}

/// Source address of the IPv4 or IPv6 packet in an Ethernet frame.
fn outer_source(frame: &[u8]) -> Option<IpAddr> {
    match u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]) {
        0x0800 => {
            let a: [u8; 4] = frame.get(26..30)?.try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(a)))
        }
        0x86dd => {
            let a: [u8; 16] = frame.get(22..38)?.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(a)))
        }
        _ => None,
    }
}

/// Writes frames into the reinjection device.
pub struct Reinjector {
    socket: OwnedFd,
}

impl Reinjector {
    pub fn open(device: &str) -> Result<Reinjector> {
        let ifindex = super::tables::ifindex(device)?;
        // SAFETY: plain socket(2); the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        if fd < 0 {
            return Err(DataplaneError::bpf(
                "opening the reinjection packet socket",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: fd is a fresh descriptor we own.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_ll is valid; we fill what bind needs.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: sll is a properly sized sockaddr_ll.
        let r = unsafe {
            libc::bind(
                socket.as_raw_fd(),
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r < 0 {
            return Err(DataplaneError::bpf(
                format!("binding the reinjection socket to {device}"),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Reinjector { socket })
    }

    pub fn send(&self, frame: &[u8]) -> Result<()> {
        // SAFETY: the buffer is valid for frame.len() bytes.
        let n = unsafe {
            libc::send(
                self.socket.as_raw_fd(),
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
            )
        };
        if n < 0 {
            return Err(DataplaneError::bpf(
                "reinjecting a held frame",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }
}

/// The reinjection pair. Its first end's GSO limit of one segment also
/// serves the programs: a GSO packet for a node on an IPv6 underlay is sent
/// into it to come back as segments (docs/dataplane.md, "IPv6 underlay").
pub static INJECT_PAIR: VethPair = VethPair {
    name: INJECT_DEVICE,
    peer: INJECT_PEER,
    gso_max_segs: Some(1),
    mtu: None,
};
