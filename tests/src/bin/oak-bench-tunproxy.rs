//! Bench-only baseline (not part of the product): a userspace TUN + UDP
//! proxy with upstream Oakestra's architecture, so `cargo xtask bench` can
//! compare our eBPF overlay against the design it replaces.
//!
//! Like upstream's proxy it reads IP packets from a TUN device (service
//! range routed into it), looks the flow up (5-tuple cache, backend choice
//! from a service table), rewrites destination to the backend's namespace IP
//! and source to the sender's instance IP, fixes checksums and sends the
//! whole IP packet as one UDP datagram to the backend node's proxy port. The
//! reverse direction restores the dialled service address for flows this
//! node started and writes the packet to the TUN device.
//!
//! Deliberately lean (IPv4 TCP/UDP only, incremental checksum updates, no
//! packet re-serialisation, no expiry): upstream decodes and re-serialises
//! every packet, so this baseline is an optimistic bound on its cost.
//!
//! Usage: `oak-bench-tunproxy CONFIG.json`; prints `ready` once the TUN
//! device exists (the caller configures its address and routes).

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::FromRawFd;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

#[derive(Deserialize)]
struct Config {
    tun: String,
    listen: SocketAddr,
    instances: Vec<Instance>,
    /// Service address -> backend namespace address.
    services: Vec<(Ipv4Addr, Ipv4Addr)>,
}

#[derive(Deserialize, Clone)]
struct Instance {
    ns_ip: Ipv4Addr,
    instance_ip: Ipv4Addr,
    /// Proxy address of the node running it.
    node: SocketAddr,
}

/// (src, sport, dst, dport, proto)
type Key = (Ipv4Addr, u16, Ipv4Addr, u16, u8);

struct Tables {
    by_ns: HashMap<Ipv4Addr, Instance>,
    services: HashMap<Ipv4Addr, Ipv4Addr>,
    /// Sender flow -> chosen backend namespace address.
    flows: Mutex<HashMap<Key, Ipv4Addr>>,
    /// Expected reply 5-tuple -> the service address the client dialled.
    reverse: Mutex<HashMap<Key, Ipv4Addr>>,
}

fn main() -> Result<()> {
    let path = std::env::args()
        .nth(1)
        .context("usage: oak-bench-tunproxy CONFIG.json")?;
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let cfg: Config = serde_json::from_str(&text).with_context(|| format!("parsing {path}"))?;
    let mut services: HashMap<Ipv4Addr, Ipv4Addr> = cfg.services.iter().copied().collect();
    // Every instance IP is also a service address naming that one instance
    // (docs/contract.md §2.5: replies travel back through the sender path this way).
    for i in &cfg.instances {
        services.insert(i.instance_ip, i.ns_ip);
    }
    let tables = Arc::new(Tables {
        by_ns: cfg.instances.iter().map(|i| (i.ns_ip, i.clone())).collect(),
        services,
        flows: Mutex::new(HashMap::new()),
        reverse: Mutex::new(HashMap::new()),
    });
    let tun = open_tun(&cfg.tun)?;
    let sock = UdpSocket::bind(cfg.listen).with_context(|| format!("binding {}", cfg.listen))?;
    println!("ready");

    // One thread per direction, as upstream runs one goroutine per direction.
    let (t2, tun2, sock2) = (tables.clone(), tun.try_clone()?, sock.try_clone()?);
    std::thread::spawn(move || {
        if let Err(e) = from_tunnel(&t2, tun2, sock2) {
            eprintln!("tunnel -> TUN: {e:#}");
            std::process::exit(1);
        }
    });
    to_tunnel(&tables, tun, sock)
}

/// TUN -> translate -> UDP to the backend's node.
fn to_tunnel(t: &Tables, mut tun: File, sock: UdpSocket) -> Result<()> {
    let mut buf = vec![0u8; 65536];
    loop {
        let n = tun.read(&mut buf).context("reading the TUN device")?;
        let pkt = &mut buf[..n];
        let Some(k) = parse(pkt) else { continue };
        let (src, sport, dst, dport, proto) = k;
        let Some(sender) = t.by_ns.get(&src) else {
            continue;
        };
        let backend = {
            let mut flows = t.flows.lock().expect("flows lock");
            match flows.get(&k) {
                Some(b) => *b,
                None => {
                    let Some(b) = t.services.get(&dst).copied() else {
                        continue;
                    };
                    flows.insert(k, b);
                    if let Some(bi) = t.by_ns.get(&b) {
                        t.reverse
                            .lock()
                            .expect("reverse lock")
                            .insert((bi.instance_ip, dport, src, sport, proto), dst);
                    }
                    b
                }
            }
        };
        let Some(node) = t.by_ns.get(&backend).map(|i| i.node) else {
            continue;
        };
        rewrite(pkt, 12, sender.instance_ip);
        rewrite(pkt, 16, backend);
        // A full socket buffer drops the packet, as upstream's proxy does.
        let _ = sock.send_to(pkt, node);
    }
}

/// UDP datagram -> restore the service address for our flows -> TUN.
fn from_tunnel(t: &Tables, mut tun: File, sock: UdpSocket) -> Result<()> {
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, _) = sock.recv_from(&mut buf).context("receiving a datagram")?;
        let pkt = &mut buf[..n];
        let Some(k) = parse(pkt) else { continue };
        let service = t.reverse.lock().expect("reverse lock").get(&k).copied();
        if let Some(s) = service {
            rewrite(pkt, 12, s);
        }
        let _ = tun.write(pkt);
    }
}

fn parse(p: &[u8]) -> Option<Key> {
    if p.len() < 20 || p[0] >> 4 != 4 {
        return None;
    }
    let ihl = ((p[0] & 0xf) as usize) * 4;
    let proto = p[9];
    let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
    let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
    let (sport, dport) = if (proto == 6 || proto == 17) && p.len() >= ihl + 4 {
        (
            u16::from_be_bytes([p[ihl], p[ihl + 1]]),
            u16::from_be_bytes([p[ihl + 2], p[ihl + 3]]),
        )
    } else {
        (0, 0)
    };
    Some((src, sport, dst, dport, proto))
}

/// Replaces the IPv4 address at `off` (12 = source, 16 = destination) and
/// updates the IP and TCP/UDP checksums incrementally (RFC 1624).
fn rewrite(p: &mut [u8], off: usize, new: Ipv4Addr) {
    let old: [u8; 4] = p[off..off + 4].try_into().expect("4 bytes");
    let new = new.octets();
    if old == new {
        return;
    }
    p[off..off + 4].copy_from_slice(&new);
    update(p, 10, &old, &new);
    let ihl = ((p[0] & 0xf) as usize) * 4;
    match p[9] {
        6 if p.len() >= ihl + 18 => update(p, ihl + 16, &old, &new),
        // UDP checksum 0 means "none" and must stay 0.
        17 if p.len() >= ihl + 8 && p[ihl + 6..ihl + 8] != [0, 0] => update(p, ihl + 6, &old, &new),
        _ => {}
    }
}

fn update(p: &mut [u8], at: usize, old: &[u8; 4], new: &[u8; 4]) {
    let mut sum = !u16::from_be_bytes([p[at], p[at + 1]]) as u32;
    for c in old.chunks(2) {
        sum += !u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    for c in new.chunks(2) {
        sum += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[at..at + 2].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

/// Creates (or attaches to) TUN device `name`, without packet information
/// headers, in the caller's network namespace.
fn open_tun(name: &str) -> Result<File> {
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    if name.len() >= 16 {
        bail!("interface name {name} is too long");
    }
    // SAFETY: a NUL-terminated literal path; the result is checked.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("opening /dev/net/tun");
    }
    // SAFETY: fd is a fresh descriptor we own.
    let file = unsafe { File::from_raw_fd(fd) };
    let mut req = IfReq {
        name: [0; 16],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: req is a valid, properly sized ifreq for TUNSETIFF.
    if unsafe { libc::ioctl(fd, TUNSETIFF as _, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("TUNSETIFF {name}"));
    }
    Ok(file)
}
