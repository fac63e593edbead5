//! Parsing of Ethernet + IPv4/IPv6 + TCP/UDP/ICMP echo headers at a given
//! offset, and the address rewrites with their checksum updates.
//!
//! Headers are read straight from the packet where they lie in its linear
//! part (they almost always do), through the load helper otherwise ([`read`]);
//! writes go through the store helper, fewest calls possible ([`rewrite`]).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::bpf_csum_diff,
    programs::{TcContext, XdpContext},
};
use core::mem::MaybeUninit;

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
#[derive(Clone, Copy)]
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
pub fn parse<C: Frame>(
    ctx: &C,
    l3: usize,
    ethertype: u16,
    p: &mut Packet,
) -> Result<(), ParseError> {
    match ethertype {
        ETH_P_IP => parse_v4(ctx, l3, p),
        ETH_P_IPV6 => parse_v6(ctx, l3, p),
        _ => Err(ParseError::NotIp),
    }
}

#[inline(always)]
pub fn ethertype(ctx: &TcContext) -> Result<u16, ParseError> {
    let t: [u8; 2] = read(ctx, 12).ok_or(ParseError::Malformed)?;
    Ok(u16::from_be_bytes(t))
}

/// `N` bytes at `off`: straight from the packet when they lie in its linear
/// part, through the load helper otherwise -- a helper call per field costs
/// more than the rest of a header's parsing.
#[inline(always)]
pub fn read<const N: usize>(ctx: &TcContext, off: usize) -> Option<[u8; N]> {
    direct::<N>(ctx.data(), ctx.data_end(), off).or_else(|| ctx.load(off).ok())
}

/// A frame the programs read headers from, whichever hook it arrived at
/// (TC's skb or XDP's buffer): the sender check runs on both.
pub trait Frame {
    /// `N` bytes at `off`, or None past what can be read.
    fn read<const N: usize>(&self, off: usize) -> Option<[u8; N]>;
    /// The frame's length in bytes, from the Ethernet header on.
    fn len(&self) -> u32;
}

impl Frame for TcContext {
    #[inline(always)]
    fn read<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        read::<N>(self, off)
    }

    #[inline(always)]
    fn len(&self) -> u32 {
        TcContext::len(self)
    }
}

impl Frame for XdpContext {
    /// From the frame's first buffer (headers are there).
    #[inline(always)]
    fn read<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        direct::<N>(self.data(), self.data_end(), off)
    }

    /// The first buffer's (the XDP program is single-buffer).
    #[inline(always)]
    fn len(&self) -> u32 {
        (self.data_end() - self.data()) as u32
    }
}

/// `N` bytes straight from a packet lying between `start` and `end`, or
/// None when they do not (TC's and XDP's reads alike).
#[inline(always)]
pub fn direct<const N: usize>(start: usize, end: usize, off: usize) -> Option<[u8; N]> {
    if start + off + N > end {
        return None;
    }
    // SAFETY: the N bytes lie between start (data) and end (data_end),
    // checked just above (the verifier checks it too).
    Some(unsafe { core::ptr::read_unaligned((start + off) as *const [u8; N]) })
}

/// Writes `bytes` straight into a packet lying between `start` and `end`
/// at `off`; None when they do not fit (XDP's writes: no skb to unclone).
#[inline(always)]
pub fn direct_write<const N: usize>(
    start: usize,
    end: usize,
    off: usize,
    bytes: &[u8; N],
) -> Option<()> {
    if start + off + N > end {
        return None;
    }
    // SAFETY: as in `direct`.
    unsafe { core::ptr::write_unaligned((start + off) as *mut [u8; N], *bytes) };
    Some(())
}

#[inline(always)]
fn parse_v4<C: Frame>(ctx: &C, l3: usize, p: &mut Packet) -> Result<(), ParseError> {
    let hdr = ctx.read::<20>(l3).ok_or(ParseError::Malformed)?;
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
fn parse_v6<C: Frame>(ctx: &C, l3: usize, p: &mut Packet) -> Result<(), ParseError> {
    let hdr = ctx.read::<40>(l3).ok_or(ParseError::Malformed)?;
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
fn parse_l4<C: Frame>(ctx: &C, p: &mut Packet) -> Result<(), ParseError> {
    match p.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let ports = ctx.read::<4>(p.l4).ok_or(ParseError::Malformed)?;
            // Network order, as the flow keys hold them.
            p.sport = u16::from_ne_bytes([ports[0], ports[1]]);
            p.dport = u16::from_ne_bytes([ports[2], ports[3]]);
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
            let h = ctx.read::<8>(p.l4).ok_or(ParseError::Malformed)?;
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
    /// Zeroes `slot` in place and hands it out as a packet, for [`parse`]
    /// to fill. In place and with volatile stores: LLVM turns any zeroed
    /// value it can see (`Packet::default()`, a copy of one) into a call to
    /// the byte-at-a-time `memset` subprogram on BPF -- with the other
    /// zeroings, a tenth of the receive path's time under perf.
    #[inline(always)]
    pub fn init(slot: &mut MaybeUninit<Packet>) -> &mut Packet {
        const WORDS: usize = core::mem::size_of::<Packet>() / 8;
        const _: () = assert!(
            core::mem::size_of::<Packet>() % 8 == 0 && core::mem::align_of::<Packet>() >= 8
        );
        let w = slot.as_mut_ptr() as *mut u64;
        let mut i = 0;
        while i < WORDS {
            // SAFETY: word i of the (8-byte aligned, 8-byte multiple) slot.
            unsafe { core::ptr::write_volatile(w.add(i), 0) };
            i += 1;
        }
        // SAFETY: every byte was written; all-zero is a valid Packet.
        unsafe { slot.assume_init_mut() }
    }

    /// The flow key of this packet as it stands.
    #[inline(always)]
    pub fn key(&self) -> FlowKey {
        flow_key(self.src, self.dst, self.sport, self.dport, self.proto)
    }
}

/// The key a reply to the flow `fwd` carries once the backend's node has
/// rewritten its source to the backend's instance address.
#[inline(always)]
pub fn reverse_key(fwd: &FlowKey, backend_instance: Addr) -> FlowKey {
    flow_key(
        backend_instance,
        fwd.src,
        fwd.dst_port,
        fwd.src_port,
        fwd.proto,
    )
}

/// A flow key. The protocol and the padding after it are written as one
/// 32-bit value: a zeroed padding field costs a `memset` call on BPF (see
/// [`Packet::init`]).
#[inline(always)]
fn flow_key(src: Addr, dst: Addr, src_port: u16, dst_port: u16, proto: u8) -> FlowKey {
    let mut k = MaybeUninit::<FlowKey>::uninit();
    let p = k.as_mut_ptr();
    // SAFETY: every byte of the slot is written before it is read; proto
    // and the 3 padding bytes are the last 4 bytes (little-endian: proto
    // first).
    unsafe {
        (*p).src = src;
        (*p).dst = dst;
        (*p).src_port = src_port;
        (*p).dst_port = dst_port;
        core::ptr::write_unaligned(&raw mut (*p).proto as *mut u32, proto as u32);
        k.assume_init()
    }
}

/// `*to = *from` in 64-bit words: a plain assignment between map values
/// (or a map value and the stack) compiles to a call of the byte-wise
/// `memmove` subprogram on BPF.
#[inline(always)]
pub fn copy<T: Copy>(from: &T, to: &mut T) {
    const { assert!(core::mem::size_of::<T>() % 8 == 0 && core::mem::align_of::<T>() >= 8) };
    let (f, t) = (from as *const T as *const u64, to as *mut T as *mut u64);
    let mut i = 0;
    while i < core::mem::size_of::<T>() / 8 {
        // SAFETY: word i of two valid, 8-byte aligned values of T.
        unsafe { t.add(i).write(f.add(i).read()) };
        i += 1;
    }
}

/// Zeroes an address slot in place (see [`Packet::init`] for why not
/// `Addr::ZERO`), for out parameters.
#[inline(always)]
pub fn init_addr(slot: &mut MaybeUninit<Addr>) -> &mut Addr {
    let b = slot.as_mut_ptr() as *mut u8;
    let mut i = 0;
    while i < 16 {
        // SAFETY: byte i of the 16-byte slot.
        unsafe { core::ptr::write_volatile(b.add(i), 0) };
        i += 1;
    }
    // SAFETY: every byte was written.
    unsafe { slot.assume_init_mut() }
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

/// The address rewrites of a translation, all at once: source and
/// destination (either may be the address the packet already carries) and,
/// when `dec_ttl`, the IPv4 TTL / IPv6 hop limit, as a router forwarding it
/// would. Two helper calls whatever changes: the header bytes from the TTL
/// to the destination are contiguous and go out in one store, with the
/// IPv4 header checksum updated by hand (RFC 1624); the L4 checksum takes
/// the pseudo header's change for both addresses in one `l4_csum_replace`
/// (which also keeps `skb->csum` right for CHECKSUM_COMPLETE and leaves a
/// CHECKSUM_PARTIAL seed as one). Byte for byte what one helper call per
/// field wrote before: one's-complement sums do not depend on the order
/// their terms are added in.
///
/// Stores, not direct packet writes: one direct write anywhere in a
/// program makes the kernel unclone every cloned skb it sees first, the
/// traffic it only passes on (a container's TCP to the internet) included.
#[inline(never)]
pub fn rewrite(
    ctx: &TcContext,
    p: &mut Packet,
    src: &Addr,
    dst: &Addr,
    dec_ttl: bool,
) -> Result<(), ()> {
    let ttl = if dec_ttl { p.ttl - 1 } else { p.ttl };
    if p.v6 {
        rewrite_v6(ctx, p, src, dst, ttl)?;
    } else {
        rewrite_v4(ctx, p, src, dst, ttl)?;
    }
    p.ttl = ttl;
    p.src = *src;
    p.dst = *dst;
    Ok(())
}

#[inline(always)]
fn rewrite_v4(ctx: &TcContext, p: &Packet, src: &Addr, dst: &Addr, ttl: u8) -> Result<(), ()> {
    // Bytes 8..20 of the header: TTL, protocol, checksum, source, destination.
    let mut h: [u8; 12] = read(ctx, p.l3 + 8).ok_or(())?;
    v4_header_rewritten(&mut h, src, dst, ttl);
    if let Some(diff) = l4_pseudo_diff(p, src, dst) {
        let mut flags = BPF_F_PSEUDO_HDR as u64;
        if zero_means_none(p) {
            flags |= BPF_F_MARK_MANGLED_0 as u64;
        }
        ctx.l4_csum_replace(p.csum_off, 0, diff, flags)
            .map_err(|_| ())?;
    }
    ctx.store(p.l3 + 8, &h, 0).map_err(|_| ())
}

#[inline(always)]
fn rewrite_v6(ctx: &TcContext, p: &Packet, src: &Addr, dst: &Addr, ttl: u8) -> Result<(), ()> {
    if let Some(diff) = l4_pseudo_diff(p, src, dst) {
        ctx.l4_csum_replace(p.csum_off, 0, diff, BPF_F_PSEUDO_HDR as u64)
            .map_err(|_| ())?;
    }
    ctx.store(p.l3 + 7, &v6_header_rewritten(src, dst, ttl), 0)
        .map_err(|_| ())
}

/// Bytes 8..20 of an IPv4 header (TTL, protocol, checksum, source,
/// destination) with the new TTL and addresses and the header checksum
/// updated by hand: TC's rewrite and XDP's share it.
#[inline(always)]
pub fn v4_header_rewritten(h: &mut [u8; 12], src: &Addr, dst: &Addr, ttl: u8) {
    let old_check = u16::from_be_bytes([h[2], h[3]]);
    // ~HC + ~m + m' over every changed 16-bit word (RFC 1624, eqn. 3).
    let mut sum = (!old_check) as u64
        + (!u16::from_be_bytes([h[0], h[1]])) as u64
        + u16::from_be_bytes([ttl, h[1]]) as u64;
    let mut i = 4;
    while i < 12 {
        sum += (!u16::from_be_bytes([h[i], h[i + 1]])) as u64;
        i += 2;
    }
    h[0] = ttl;
    h[4..8].copy_from_slice(&src.bytes[12..]);
    h[8..12].copy_from_slice(&dst.bytes[12..]);
    let mut i = 4;
    while i < 12 {
        sum += u16::from_be_bytes([h[i], h[i + 1]]) as u64;
        i += 2;
    }
    let check = (!fold16(sum)).to_be_bytes();
    h[2] = check[0];
    h[3] = check[1];
}

/// Bytes 7..40 of an IPv6 header: hop limit, source, destination.
#[inline(always)]
pub fn v6_header_rewritten(src: &Addr, dst: &Addr, ttl: u8) -> [u8; 33] {
    let mut h = [0u8; 33];
    h[0] = ttl;
    h[1..17].copy_from_slice(&src.bytes);
    h[17..].copy_from_slice(&dst.bytes);
    h
}

/// The change the new addresses make to the L4 checksum's pseudo header
/// (folded to 32 bits, as `bpf_l4_csum_replace` takes it), or None when
/// the checksum has no pseudo header (ICMPv4) or the packet no checksum we
/// maintain.
#[inline(always)]
pub fn l4_pseudo_diff(p: &Packet, src: &Addr, dst: &Addr) -> Option<u64> {
    if p.csum_off == 0 {
        return None;
    }
    if p.v6 {
        // All three (TCP, UDP, ICMPv6) cover the IPv6 pseudo header.
        return Some(fold32(
            addr_diff(&p.src.bytes, &src.bytes) + addr_diff(&p.dst.bytes, &dst.bytes),
        ));
    }
    // ICMPv4's checksum has no pseudo header; TCP and UDP include the addresses.
    if p.proto == IPPROTO_ICMP {
        return None;
    }
    Some(fold32(
        addr_diff(&p.src.bytes[12..], &src.bytes[12..])
            + addr_diff(&p.dst.bytes[12..], &dst.bytes[12..]),
    ))
}

/// Whether a zero L4 checksum means "none" and must stay zero (IPv4 UDP).
#[inline(always)]
pub fn zero_means_none(p: &Packet) -> bool {
    !p.v6 && p.proto == IPPROTO_UDP
}

/// The L4 checksum field (as it lies in the packet) after a change of
/// `diff`, computed as `bpf_l4_csum_replace` does for a packet whose field
/// holds the full checksum: XDP has no skb, so no `CHECKSUM_PARTIAL` seed to
/// keep. With `zero_means_none`, a zero field stays zero and a zero result
/// is written as 0xffff (`BPF_F_MARK_MANGLED_0`).
#[inline(always)]
pub fn checksum_changed(field: [u8; 2], diff: u64, zero_means_none: bool) -> [u8; 2] {
    let old = u16::from_ne_bytes(field);
    if zero_means_none && old == 0 {
        return field;
    }
    // csum_fold(csum_add(diff, ~csum_unfold(old))), in native order like
    // the kernel's.
    let new = !fold16(diff + (0xffff_0000 | (!old) as u64));
    if zero_means_none && new == 0 {
        return 0xffffu16.to_ne_bytes();
    }
    new.to_ne_bytes()
}

/// The change of a one's-complement sum when the bytes `old` become `new`
/// (a multiple of 4 long), in 32-bit words loaded the way the kernel's
/// checksum code loads them (native order), as `bpf_csum_diff` computes it.
#[inline(always)]
fn addr_diff(old: &[u8], new: &[u8]) -> u64 {
    let mut sum = 0u64;
    let mut i = 0;
    while i + 4 <= old.len() && i + 4 <= new.len() {
        sum += (!u32::from_ne_bytes([old[i], old[i + 1], old[i + 2], old[i + 3]])) as u64;
        sum += u32::from_ne_bytes([new[i], new[i + 1], new[i + 2], new[i + 3]]) as u64;
        i += 4;
    }
    sum
}

/// Folds a one's-complement sum of 32-bit words to 32 bits.
#[inline(always)]
fn fold32(mut s: u64) -> u64 {
    s = (s & 0xffff_ffff) + (s >> 32);
    s = (s & 0xffff_ffff) + (s >> 32);
    s
}

/// Folds a one's-complement sum of 16-bit words to 16 bits.
#[inline(always)]
pub fn fold16(mut s: u64) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
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
        let a: [u8; 32] = read(ctx, l3 + 8).ok_or(())?;
        out.src.bytes.copy_from_slice(&a[..16]);
        out.dst.bytes.copy_from_slice(&a[16..]);
    } else {
        let a: [u8; 8] = read(ctx, l3 + 12).ok_or(())?;
        out.src = Addr::from_v4_octets([a[0], a[1], a[2], a[3]]);
        out.dst = Addr::from_v4_octets([a[4], a[5], a[6], a[7]]);
    }
    Ok(())
}
