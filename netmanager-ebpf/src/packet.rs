//! Parsing of Ethernet + IPv4/IPv6 + TCP/UDP/ICMP echo headers at a given
//! offset, and the address rewrites with their checksum updates.
//!
//! Everything goes through the skb load/store helpers rather than direct
//! packet access: offsets vary (IPv4 options, decapsulated packets) and the
//! helpers keep the verifier happy for any of them.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::bpf_csum_diff,
    programs::TcContext,
};
use netmanager_common::{Addr, Config, FlowKey};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
const IPV6_FRAGMENT_HDR: u8 = 44;

/// What a packet is, as far as the overlay cares.
#[derive(Clone, Copy, Default)]
pub struct Packet {
    pub v6: bool,
    /// Offset of the IP header.
    pub l3: usize,
    /// Offset of the L4 header.
    pub l4: usize,
    pub proto: u8,
    pub src: Addr,
    pub dst: Addr,
    /// Network order; for ICMP echo see [`flow_ports`].
    pub sport: u16,
    pub dport: u16,
    pub ttl: u8,
    /// Length of the IP packet (header included) per its header.
    pub ip_len: u32,
    /// IPv4 DF bit (always true for IPv6, which never fragments en route).
    pub dont_fragment: bool,
    /// Offset of the L4 checksum, 0 when it has none we maintain.
    pub csum_off: usize,
}

pub enum ParseError {
    /// Not IPv4/IPv6: not our business.
    NotIp,
    Malformed,
    Fragment,
    Unsupported,
}

/// Parses the IP packet starting at `l3` (`ethertype` says which family)
/// into `p`. An out parameter, not a return value: BPF-to-BPF calls return
/// scalars, and the caller's 512-byte stack has room for one `Packet` only.
#[inline(never)]
pub fn parse(ctx: &TcContext, l3: usize, ethertype: u16, p: &mut Packet) -> Result<(), ParseError> {
    match ethertype {
        ETH_P_IP => parse_v4(ctx, l3, p),
        ETH_P_IPV6 => parse_v6(ctx, l3, p),
        _ => Err(ParseError::NotIp),
    }
}

#[inline(always)]
pub fn ethertype(ctx: &TcContext) -> Result<u16, ParseError> {
    let t: u16 = ctx.load(12).map_err(|_| ParseError::Malformed)?;
    Ok(u16::from_be(t))
}

#[inline(always)]
fn parse_v4(ctx: &TcContext, l3: usize, p: &mut Packet) -> Result<(), ParseError> {
    let hdr: [u8; 20] = ctx.load(l3).map_err(|_| ParseError::Malformed)?;
    if hdr[0] >> 4 != 4 {
        return Err(ParseError::Malformed);
    }
    let ihl = ((hdr[0] & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Err(ParseError::Malformed);
    }
    let ip_len = u16::from_be_bytes([hdr[2], hdr[3]]) as u32;
    if (ip_len as usize) < ihl || (l3 as u32 + ip_len) > ctx.len() {
        return Err(ParseError::Malformed);
    }
    let frag = u16::from_be_bytes([hdr[6], hdr[7]]);
    p.v6 = false;
    p.l3 = l3;
    p.l4 = l3 + ihl;
    p.proto = hdr[9];
    p.src = Addr::from_v4_octets([hdr[12], hdr[13], hdr[14], hdr[15]]);
    p.dst = Addr::from_v4_octets([hdr[16], hdr[17], hdr[18], hdr[19]]);
    p.ttl = hdr[8];
    p.ip_len = ip_len;
    p.dont_fragment = frag & 0x4000 != 0;
    // More-fragments or a fragment offset: no ports to key a flow on.
    if frag & 0x3fff != 0 {
        return Err(ParseError::Fragment);
    }
    parse_l4(ctx, p)
}

#[inline(always)]
fn parse_v6(ctx: &TcContext, l3: usize, p: &mut Packet) -> Result<(), ParseError> {
    let hdr: [u8; 40] = ctx.load(l3).map_err(|_| ParseError::Malformed)?;
    if hdr[0] >> 4 != 6 {
        return Err(ParseError::Malformed);
    }
    let payload = u16::from_be_bytes([hdr[4], hdr[5]]) as u32;
    if l3 as u32 + 40 + payload > ctx.len() {
        return Err(ParseError::Malformed);
    }
    p.v6 = true;
    p.l3 = l3;
    p.l4 = l3 + 40;
    p.proto = hdr[6];
    p.src.bytes.copy_from_slice(&hdr[8..24]);
    p.dst.bytes.copy_from_slice(&hdr[24..40]);
    p.ttl = hdr[7];
    p.ip_len = 40 + payload;
    p.dont_fragment = true;
    if p.proto == IPV6_FRAGMENT_HDR {
        return Err(ParseError::Fragment);
    }
    parse_l4(ctx, p)
}

/// Fills ports and the checksum offset. TCP, UDP and ICMP echo are the
/// protocols the overlay translates; anything else is `Unsupported`.
#[inline(always)]
fn parse_l4(ctx: &TcContext, p: &mut Packet) -> Result<(), ParseError> {
    match p.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let ports: [u16; 2] = ctx.load(p.l4).map_err(|_| ParseError::Malformed)?;
            p.sport = ports[0];
            p.dport = ports[1];
            p.csum_off = if p.proto == IPPROTO_TCP {
                p.l4 + 16
            } else {
                p.l4 + 6
            };
            // The checksum field itself must be inside the packet.
            if p.proto == IPPROTO_TCP && p.l4 + 20 > ctx.len() as usize {
                return Err(ParseError::Malformed);
            }
            Ok(())
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let h: [u8; 8] = ctx.load(p.l4).map_err(|_| ParseError::Malformed)?;
            let (request, reply) = if p.v6 { (128, 129) } else { (8, 0) };
            // Only echo carries an identifier to key a flow on.
            let id = u16::from_ne_bytes([h[4], h[5]]);
            if h[0] == request {
                p.sport = id;
            } else if h[0] == reply {
                p.dport = id;
            } else {
                return Err(ParseError::Unsupported);
            }
            if (p.proto == IPPROTO_ICMP) == p.v6 {
                return Err(ParseError::Unsupported);
            }
            p.csum_off = p.l4 + 2;
            Ok(())
        }
        _ => Err(ParseError::Unsupported),
    }
}

impl Packet {
    /// The flow key of this packet as it stands.
    #[inline(always)]
    pub fn key(&self) -> FlowKey {
        FlowKey {
            src: self.src,
            dst: self.dst,
            src_port: self.sport,
            dst_port: self.dport,
            proto: self.proto,
            _pad: [0; 3],
        }
    }

    fn src_off(&self) -> usize {
        if self.v6 { self.l3 + 8 } else { self.l3 + 12 }
    }

    fn dst_off(&self) -> usize {
        if self.v6 { self.l3 + 24 } else { self.l3 + 16 }
    }
}

/// The key a reply to the flow `fwd` carries once the backend's node has
/// rewritten its source to the backend's instance address.
#[inline(always)]
pub fn reverse_key(fwd: &FlowKey, backend_instance: Addr) -> FlowKey {
    FlowKey {
        src: backend_instance,
        dst: fwd.src,
        src_port: fwd.dst_port,
        dst_port: fwd.src_port,
        proto: fwd.proto,
        _pad: [0; 3],
    }
}

/// Whether `a` falls in one of the configured service ranges.
#[inline(always)]
pub fn in_service_range(cfg: &Config, a: &Addr) -> bool {
    let mut i = 0;
    while i < netmanager_common::MAX_SERVICE_RANGES {
        if (i as u32) < cfg.n_ranges
            && prefix_match(&cfg.service_ranges[i].addr, cfg.service_ranges[i].len, a)
        {
            return true;
        }
        i += 1;
    }
    false
}

#[inline(always)]
fn prefix_match(prefix: &Addr, len: u32, a: &Addr) -> bool {
    let mut w = 0;
    while w < 4 {
        let bits = len.saturating_sub(w as u32 * 32).min(32);
        if bits > 0 {
            let mask = u32::MAX << (32 - bits);
            let pw = u32::from_be_bytes([
                prefix.bytes[w * 4],
                prefix.bytes[w * 4 + 1],
                prefix.bytes[w * 4 + 2],
                prefix.bytes[w * 4 + 3],
            ]);
            let aw = u32::from_be_bytes([
                a.bytes[w * 4],
                a.bytes[w * 4 + 1],
                a.bytes[w * 4 + 2],
                a.bytes[w * 4 + 3],
            ]);
            if (pw ^ aw) & mask != 0 {
                return false;
            }
        }
        w += 1;
    }
    true
}

/// Rewrites the source address, keeping both checksums right.
#[inline(never)]
pub fn set_src(ctx: &TcContext, p: &mut Packet, new: &Addr) -> Result<(), ()> {
    let off = p.src_off();
    let old = p.src;
    rewrite_addr(ctx, p, off, &old, new)?;
    p.src = *new;
    Ok(())
}

/// Rewrites the destination address, keeping both checksums right.
#[inline(never)]
pub fn set_dst(ctx: &TcContext, p: &mut Packet, new: &Addr) -> Result<(), ()> {
    let off = p.dst_off();
    let old = p.dst;
    rewrite_addr(ctx, p, off, &old, new)?;
    p.dst = *new;
    Ok(())
}

#[inline(always)]
fn rewrite_addr(ctx: &TcContext, p: &Packet, off: usize, old: &Addr, new: &Addr) -> Result<(), ()> {
    if p.v6 {
        rewrite_addr_v6(ctx, p, off, old, new)
    } else {
        rewrite_addr_v4(ctx, p, off, old, new)
    }
}

#[inline(always)]
fn rewrite_addr_v4(
    ctx: &TcContext,
    p: &Packet,
    off: usize,
    old: &Addr,
    new: &Addr,
) -> Result<(), ()> {
    let o = [old.bytes[12], old.bytes[13], old.bytes[14], old.bytes[15]];
    let n = [new.bytes[12], new.bytes[13], new.bytes[14], new.bytes[15]];
    let from = u32::from_ne_bytes(o) as u64;
    let to = u32::from_ne_bytes(n) as u64;
    // ICMPv4's checksum has no pseudo header; TCP and UDP include the addresses.
    if p.proto != IPPROTO_ICMP && p.csum_off != 0 {
        let mut flags = BPF_F_PSEUDO_HDR as u64 | 4;
        if p.proto == IPPROTO_UDP {
            // A zero UDP checksum means "none" and must stay zero.
            flags |= BPF_F_MARK_MANGLED_0 as u64;
        }
        ctx.l4_csum_replace(p.csum_off, from, to, flags)
            .map_err(|_| ())?;
    }
    ctx.l3_csum_replace(p.l3 + 10, from, to, 4)
        .map_err(|_| ())?;
    ctx.store(off, &n, 0).map_err(|_| ())
}

#[inline(always)]
fn rewrite_addr_v6(
    ctx: &TcContext,
    p: &Packet,
    off: usize,
    old: &Addr,
    new: &Addr,
) -> Result<(), ()> {
    let mut from = old.bytes;
    let mut to = new.bytes;
    // SAFETY: both buffers are 16 bytes on the stack, as the sizes say.
    let diff = unsafe {
        bpf_csum_diff(
            from.as_mut_ptr() as *mut u32,
            16,
            to.as_mut_ptr() as *mut u32,
            16,
            0,
        )
    };
    if diff < 0 {
        return Err(());
    }
    if p.csum_off != 0 {
        // All three (TCP, UDP, ICMPv6) cover the IPv6 pseudo header.
        ctx.l4_csum_replace(p.csum_off, 0, diff as u64, BPF_F_PSEUDO_HDR as u64)
            .map_err(|_| ())?;
    }
    ctx.store(off, &new.bytes, 0).map_err(|_| ())
}

/// Decrements the IPv4 TTL / IPv6 hop limit: the overlay forwards like a router.
#[inline(never)]
pub fn decrement_ttl(ctx: &TcContext, p: &mut Packet) -> Result<(), ()> {
    let new = p.ttl - 1;
    if p.v6 {
        ctx.store(p.l3 + 7, &new, 0).map_err(|_| ())?;
    } else {
        let from = u16::from_be_bytes([p.ttl, p.proto]).to_be() as u64;
        let to = u16::from_be_bytes([new, p.proto]).to_be() as u64;
        ctx.l3_csum_replace(p.l3 + 10, from, to, 2)
            .map_err(|_| ())?;
        ctx.store(p.l3 + 8, &new, 0).map_err(|_| ())?;
    }
    p.ttl = new;
    Ok(())
}

/// Folds a 32-bit one's-complement sum to the 16-bit checksum field value.
/// `bpf_csum_diff` sums native-endian words, so store the result with
/// `to_ne_bytes` (RFC 1071's byte-order independence).
#[inline(always)]
pub fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// One's-complement sum of a buffer whose length is a multiple of 4.
#[inline(always)]
pub fn csum(buf: &mut [u8], seed: u32) -> u64 {
    // SAFETY: the pointer and size describe `buf` exactly.
    let s = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            buf.as_mut_ptr() as *mut u32,
            buf.len() as u32,
            seed,
        )
    };
    (s as u64) & 0xffff_ffff
}

/// Addresses only, for packets the overlay forwards without translating
/// (fragments, other protocols between instances). Written field by field
/// into `out`: a local `Packet` here cost 232 bytes of stack, which pushed
/// the uplink program's deepest call chain past the 512 bytes older
/// verifiers (6.1) allow once every frame is rounded up to 32.
#[inline(never)]
pub fn parse_addresses(
    ctx: &TcContext,
    l3: usize,
    ethertype: u16,
    out: &mut Packet,
) -> Result<(), ()> {
    out.v6 = ethertype == ETH_P_IPV6;
    out.l3 = l3;
    out.l4 = 0;
    out.proto = 0;
    out.sport = 0;
    out.dport = 0;
    out.ttl = 0;
    out.ip_len = 0;
    out.dont_fragment = false;
    out.csum_off = 0;
    if out.v6 {
        let a: [u8; 32] = ctx.load(l3 + 8).map_err(|_| ())?;
        out.src.bytes.copy_from_slice(&a[..16]);
        out.dst.bytes.copy_from_slice(&a[16..]);
    } else {
        let a: [u8; 8] = ctx.load(l3 + 12).map_err(|_| ())?;
        out.src = Addr::from_v4_octets([a[0], a[1], a[2], a[3]]);
        out.dst = Addr::from_v4_octets([a[4], a[5], a[6], a[7]]);
    }
    Ok(())
}
