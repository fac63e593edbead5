//! The slow path: a real UDP socket on the tunnel port, on every address,
//! for what the receive program leaves to the kernel -- outer datagrams that
//! arrived fragmented (the kernel reassembles them), with IPv4 options or
//! IPv6 extension headers, or on an interface without the program. Each
//! datagram is written back, under a plain outer header rebuilt from the
//! socket's addresses, into the slow-path device, whose far end runs
//! `slow_path_ingress`: the fast path's decapsulation, checks, translation
//! and counters, so both paths treat a datagram alike.
//!
//! The socket also completes the kernel's path-MTU discovery for the
//! tunnel: an ICMP "fragmentation needed" about one of our datagrams is
//! matched to it, the route learns the lower MTU, and the send path's FIB
//! lookup then answers oversized packets with that MTU.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;

use super::address_watch::NodeAddressSet;
use super::devices::VethPair;
use super::misses::Reinjector;
pub use super::slow_path_frame::frame;

/// Frames are written into the first end; the program runs on the second.
/// The MTU takes any datagram a socket can receive.
pub static SLOW_PAIR: VethPair = VethPair {
    name: "oakslow0",
    peer: "oakslow1",
    gso_max_segs: None,
    mtu: Some(65535),
};

/// Largest UDP payload a socket hands over.
const MAX_DATAGRAM: usize = 65535;
/// Source MAC of rebuilt frames (locally administered; never on a wire).
pub(super) const FRAME_SOURCE_MAC: [u8; 6] = [0x02, 0x6f, 0x61, 0x6b, 0x00, 0x01];

/// What the slow path has done, for `NetManager status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlowPathStatus {
    /// Datagrams the socket received.
    pub received: u64,
    /// Written back through the slow-path device (the program's counters
    /// say what became of them).
    pub reinjected: u64,
    /// Addressed to something other than a node address (e.g. the
    /// containers' gateway): refused.
    pub not_for_node: u64,
    /// Not an IP packet inside, or too large to write back.
    pub malformed: u64,
    /// Writing back failed.
    pub failed: u64,
}

#[derive(Default)]
pub struct SlowPathCounters {
    received: AtomicU64,
    reinjected: AtomicU64,
    not_for_node: AtomicU64,
    malformed: AtomicU64,
    failed: AtomicU64,
}

impl SlowPathCounters {
    pub fn status(&self) -> SlowPathStatus {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SlowPathStatus {
            received: get(&self.received),
            reinjected: get(&self.reinjected),
            not_for_node: get(&self.not_for_node),
            malformed: get(&self.malformed),
            failed: get(&self.failed),
        }
    }

    fn add(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

pub struct SlowPath {
    pub socket: OwnedFd,
    pub tunnel_port: u16,
    pub reinjector: Reinjector,
    /// MAC of the slow-path device's far end: frames for its stack must be
    /// addressed to it.
    pub peer_mac: [u8; 6],
    pub addresses: NodeAddressSet,
    pub counters: Arc<SlowPathCounters>,
}

/// A UDP socket on `port` of every local address, IPv6 and IPv4 (one
/// dual-stack socket; IPv4 alone where IPv6 is disabled), reporting each
/// datagram's destination address.
pub fn open_socket(port: u16) -> io::Result<OwnedFd> {
    match open_socket_v6(port) {
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => open_socket_v4(port),
        other => other,
    }
}

fn socket(family: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn set_int(fd: &OwnedFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: value is an int of the size given.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            &value as *const i32 as *const libc::c_void,
            size_of::<i32>() as u32,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn bind(fd: &OwnedFd, addr: *const libc::sockaddr, len: usize) -> io::Result<()> {
    // SAFETY: addr points to a sockaddr of `len` bytes.
    if unsafe { libc::bind(fd.as_raw_fd(), addr, len as u32) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn open_socket_v6(port: u16) -> io::Result<OwnedFd> {
    let fd = socket(libc::AF_INET6)?;
    set_int(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0)?;
    // IPV6_PKTINFO also reports IPv4 destinations (as v4-mapped addresses).
    set_int(&fd, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1)?;
    // Room for bursts while this thread is busy; best effort.
    let _ = set_int(&fd, libc::SOL_SOCKET, libc::SO_RCVBUF, 4 << 20);
    // SAFETY: an all-zero sockaddr_in6 is the unspecified address.
    let mut sa: libc::sockaddr_in6 = unsafe { zeroed() };
    sa.sin6_family = libc::AF_INET6 as u16;
    sa.sin6_port = port.to_be();
    bind(
        &fd,
        &sa as *const libc::sockaddr_in6 as *const libc::sockaddr,
        size_of::<libc::sockaddr_in6>(),
    )?;
    Ok(fd)
}

fn open_socket_v4(port: u16) -> io::Result<OwnedFd> {
    let fd = socket(libc::AF_INET)?;
    set_int(&fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1)?;
    let _ = set_int(&fd, libc::SOL_SOCKET, libc::SO_RCVBUF, 4 << 20);
    // SAFETY: an all-zero sockaddr_in is the unspecified address.
    let mut sa: libc::sockaddr_in = unsafe { zeroed() };
    sa.sin_family = libc::AF_INET as u16;
    sa.sin_port = port.to_be();
    bind(
        &fd,
        &sa as *const libc::sockaddr_in as *const libc::sockaddr,
        size_of::<libc::sockaddr_in>(),
    )?;
    Ok(fd)
}

/// One received datagram's addresses.
struct Received {
    peer: SocketAddr,
    /// The destination address of the datagram (one of ours).
    local: IpAddr,
    len: usize,
}

impl SlowPath {
    /// Serves the socket until the runtime stops.
    pub async fn run(self) {
        let SlowPath {
            socket,
            tunnel_port,
            reinjector,
            peer_mac,
            addresses,
            counters,
        } = self;
        // SAFETY: the AsyncFd owns the socket, so the descriptor cannot be
        // closed while registered.
        let fd = match unsafe { AsyncFd::register(socket) } {
            Ok(fd) => fd,
            Err(e) => {
                tracing::error!("slow path: registering the tunnel socket: {e}");
                return;
            }
        };
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            let mut guard = match fd.readable().await {
                Ok(g) => g,
                Err(e) => {
                    tracing::error!("slow path: waiting on the tunnel socket: {e}");
                    return;
                }
            };
            loop {
                match receive(fd.get_ref(), &mut buf) {
                    Ok(Some(d)) => {
                        SlowPathCounters::add(&counters.received);
                        let ours = addresses
                            .read()
                            .unwrap_or_else(|p| p.into_inner())
                            .contains(&d.local);
                        if !ours {
                            SlowPathCounters::add(&counters.not_for_node);
                            continue;
                        }
                        let Some(frame) =
                            frame(peer_mac, d.peer, d.local, tunnel_port, &buf[..d.len])
                        else {
                            SlowPathCounters::add(&counters.malformed);
                            continue;
                        };
                        match reinjector.send(&frame) {
                            Ok(()) => SlowPathCounters::add(&counters.reinjected),
                            Err(e) => {
                                SlowPathCounters::add(&counters.failed);
                                tracing::debug!("slow path: {e}");
                            }
                        }
                    }
                    Ok(None) => {
                        guard.clear_ready();
                        break;
                    }
                    Err(e) => {
                        // A queued ICMP error (e.g. port unreachable for an
                        // earlier send) surfaces here; the socket goes on.
                        tracing::debug!("slow path: receiving: {e}");
                    }
                }
            }
        }
    }
}

/// Reads one datagram; None when there is none waiting.
fn receive(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<Option<Received>> {
    // SAFETY: zeroed sockaddr_storage / msghdr are valid initial values.
    let mut from: libc::sockaddr_storage = unsafe { zeroed() };
    let mut control = [0u64; 16];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_name = &mut from as *mut libc::sockaddr_storage as *mut libc::c_void;
    msg.msg_namelen = size_of::<libc::sockaddr_storage>() as u32;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = size_of::<[u64; 16]>();
    // SAFETY: msg describes buffers that live across the call.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            return Ok(None);
        }
        return Err(e);
    }
    if msg.msg_flags & libc::MSG_TRUNC != 0 {
        return Err(io::Error::other("datagram larger than the buffer"));
    }
    let peer = socket_addr(&from).ok_or_else(|| io::Error::other("sender of unknown family"))?;
    let local = destination(&msg).ok_or_else(|| io::Error::other("no destination address"))?;
    Ok(Some(Received {
        peer,
        local,
        len: n as usize,
    }))
}

fn socket_addr(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match s.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let a = unsafe { &*(s as *const _ as *const libc::sockaddr_in) };
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::new(IpAddr::V4(ip), u16::from_be(a.sin_port)))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let a = unsafe { &*(s as *const _ as *const libc::sockaddr_in6) };
            let ip = IpAddr::V6(Ipv6Addr::from(a.sin6_addr.s6_addr)).to_canonical();
            Some(SocketAddr::new(ip, u16::from_be(a.sin6_port)))
        }
        _ => None,
    }
}

/// The datagram's destination address from its IP(V6)_PKTINFO.
fn destination(msg: &libc::msghdr) -> Option<IpAddr> {
    // SAFETY: walking the control messages the kernel wrote into `msg`.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            let h = &*c;
            if h.cmsg_level == libc::IPPROTO_IPV6 && h.cmsg_type == libc::IPV6_PKTINFO {
                let info = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::in6_pktinfo);
                return Some(IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)).to_canonical());
            }
            if h.cmsg_level == libc::IPPROTO_IP && h.cmsg_type == libc::IP_PKTINFO {
                let info = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::in_pktinfo);
                return Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    info.ipi_addr.s_addr,
                ))));
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    None
}
