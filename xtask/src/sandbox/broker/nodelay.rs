//! TCP_NODELAY for the embedded broker's connections. rumqttd 0.20 has no
//! setting for it and leaves Nagle's algorithm on: a table result then
//! waits behind the unacknowledged PUBACK for the worker's delayed ACK
//! (~40 ms per miss; docs/performance.md, "First connect and Nagle"), as
//! with mosquitto's default. Linux copies TCP_NODELAY from a listening
//! socket to every socket it accepts, so setting it on rumqttd's listener,
//! which lives in this process, covers all its connections.

use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Waits up to `timeout` for this process's TCP listener(s) on `port` and
/// sets TCP_NODELAY on them. Other embedded brokers of this process (in
/// other namespaces, same port) get it too, which is what they want.
pub fn on_listener(port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if set_on_listeners(port)? > 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("the embedded broker did not listen on port {port} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Sets TCP_NODELAY on every listening TCP socket on `port` among this
/// process's descriptors; how many it found.
fn set_on_listeners(port: u16) -> Result<usize> {
    let mut found = 0;
    for entry in std::fs::read_dir("/proc/self/fd").context("listing /proc/self/fd")? {
        let Ok(entry) = entry else { continue };
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        else {
            continue;
        };
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"));
        // The descriptor may have been closed (and its number reused) since
        // the listing: the checks below look at whatever it is now.
        if is_socket && is_tcp_listener_on(fd, port) {
            set_int(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1).with_context(|| {
                format!("setting TCP_NODELAY on the broker's listener (fd {fd})")
            })?;
            found += 1;
        }
    }
    Ok(found)
}

fn is_tcp_listener_on(fd: RawFd, port: u16) -> bool {
    get_int(fd, libc::SOL_SOCKET, libc::SO_PROTOCOL) == Some(libc::IPPROTO_TCP)
        && get_int(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN) == Some(1)
        && local_port(fd) == Some(port)
}

fn get_int(fd: RawFd, level: i32, name: i32) -> Option<i32> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: v and len are valid for the size passed; a bad fd only fails.
    let r = unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(v)
}

fn set_int(fd: RawFd, level: i32, name: i32, v: libc::c_int) -> std::io::Result<()> {
    // SAFETY: v is valid for the size passed.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The local port of an IPv4 or IPv6 socket.
fn local_port(fd: RawFd) -> Option<u16> {
    // SAFETY: an all-zero sockaddr_storage is valid; getsockname fills at
    // most `len` bytes of it.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: addr and len are valid for the size passed.
    let r = unsafe {
        libc::getsockname(
            fd,
            (&mut addr as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return None;
    }
    match addr.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let a =
                unsafe { &*(&addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(u16::from_be(a.sin_port))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let a =
                unsafe { &*(&addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(u16::from_be(a.sin6_port))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    /// What the module relies on: a socket accepted from a listener with
    /// TCP_NODELAY has it too; and the listener is found by its port.
    #[test]
    fn accepted_sockets_inherit_nodelay_from_the_listener() {
        use std::os::fd::AsRawFd;
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        assert!(is_tcp_listener_on(listener.as_raw_fd(), port));
        assert_eq!(set_on_listeners(port).expect("set"), 1);
        let _client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let (accepted, _) = listener.accept().expect("accept");
        assert!(accepted.nodelay().expect("nodelay"));
        assert!(!is_tcp_listener_on(accepted.as_raw_fd(), port));
    }
}
