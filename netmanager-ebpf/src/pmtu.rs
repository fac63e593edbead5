//! Path-MTU feedback: an inner packet too large for the tunnel is turned, in
//! place, into an ICMP fragmentation-needed (IPv4) or packet-too-big (IPv6)
//! addressed back to its sender, so the sender's stack lowers its MTU
//! instead of the packet vanishing.

use aya_ebpf::{
    helpers::{bpf_skb_change_tail, bpf_skb_load_bytes, bpf_skb_store_bytes},
    programs::TcContext,
};

use crate::maps::SCRATCH;

use crate::packet::{ETH_HLEN, IPPROTO_ICMP, IPPROTO_ICMPV6, Packet, csum, fold};
use crate::tunnel::ipv4_header;

/// Bytes of the offending packet quoted in the error (IP header and more;
/// RFC 1812 and RFC 4443 ask for as much as fits).
const QUOTE_V4: usize = 68;
const QUOTE_V6: usize = 88;

/// Rewrites the packet into the ICMP error. The caller sends it back out of
/// the interface it came in on.
#[inline(always)]
pub fn to_icmp_too_big(ctx: &TcContext, p: &Packet, mtu: u16) -> Result<(), ()> {
    let eth: [u8; 12] = ctx.load(0).map_err(|_| ())?;
    if p.v6 {
        too_big_v6(ctx, p, mtu, &eth)
    } else {
        frag_needed_v4(ctx, p, mtu, &eth)
    }
}

#[inline(always)]
fn swapped_macs(eth: &[u8; 12]) -> [u8; 12] {
    let mut m = [0u8; 12];
    m[..6].copy_from_slice(&eth[6..12]);
    m[6..].copy_from_slice(&eth[..6]);
    m
}

#[inline(always)]
fn scratch() -> Result<&'static mut [u8; 256], ()> {
    let p = SCRATCH.get_ptr_mut(0).ok_or(())?;
    // SAFETY: per-CPU slot, used by this program invocation only.
    Ok(unsafe { &mut *p })
}

/// Copies exactly `dst.len()` packet bytes (a constant at every call site,
/// which the verifier needs; `TcContext::load_bytes` clamps to the packet and
/// so may ask for zero bytes).
#[inline(always)]
fn load_exact(ctx: &TcContext, off: usize, dst: &mut [u8]) -> Result<(), ()> {
    // SAFETY: pointer and length describe `dst`.
    let r = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const core::ffi::c_void,
            off as u32,
            dst.as_mut_ptr() as *mut core::ffi::c_void,
            dst.len() as u32,
        )
    };
    if r == 0 { Ok(()) } else { Err(()) }
}

#[inline(always)]
fn store_slice(ctx: &TcContext, off: usize, data: &[u8]) -> Result<(), ()> {
    // SAFETY: pointer and length describe `data`.
    let r = unsafe {
        bpf_skb_store_bytes(
            ctx.skb.skb,
            off as u32,
            data.as_ptr() as *const core::ffi::c_void,
            data.len() as u32,
            0,
        )
    };
    if r == 0 { Ok(()) } else { Err(()) }
}

#[inline(never)]
fn frag_needed_v4(ctx: &TcContext, p: &Packet, mtu: u16, eth: &[u8; 12]) -> Result<(), ()> {
    let buf = scratch()?;
    // Layout: ip header (20) | icmp header (8) | quote.
    let msg_len = 8 + QUOTE_V4;
    load_exact(ctx, p.l3, &mut buf[28..28 + QUOTE_V4])?;
    let m = mtu.to_be_bytes();
    buf[20] = 3; // destination unreachable
    buf[21] = 4; // fragmentation needed and DF set
    buf[22] = 0;
    buf[23] = 0;
    buf[24] = 0;
    buf[25] = 0;
    buf[26] = m[0];
    buf[27] = m[1];
    let c = fold(csum(&mut buf[20..20 + msg_len], 0)).to_ne_bytes();
    buf[22] = c[0];
    buf[23] = c[1];

    let total = (20 + msg_len) as u16;
    let (src, dst) = (p.dst.v4_octets().ok_or(())?, p.src.v4_octets().ok_or(())?);
    // TOS 0xc0 (network control), as Linux sends its own ICMP errors.
    let ip = ipv4_header(total, 0xc0, 0, IPPROTO_ICMP, &src, &dst);
    buf[..20].copy_from_slice(&ip);

    resize(ctx, ETH_HLEN + total as usize)?;
    ctx.store(0, &swapped_macs(eth), 0).map_err(|_| ())?;
    store_slice(ctx, ETH_HLEN, &buf[..total as usize])
}

#[inline(never)]
fn too_big_v6(ctx: &TcContext, p: &Packet, mtu: u16, eth: &[u8; 12]) -> Result<(), ()> {
    let buf = scratch()?;
    // Layout: pseudo header / then ip header (40) | icmp header (8) | quote.
    let icmp_len = 8 + QUOTE_V6;
    load_exact(ctx, p.l3, &mut buf[48..48 + QUOTE_V6])?;
    // The pseudo header first, for the checksum ...
    buf[..16].copy_from_slice(&p.dst.bytes);
    buf[16..32].copy_from_slice(&p.src.bytes);
    buf[32..36].copy_from_slice(&(icmp_len as u32).to_be_bytes());
    buf[36] = 0;
    buf[37] = 0;
    buf[38] = 0;
    buf[39] = IPPROTO_ICMPV6;
    buf[40] = 2; // packet too big
    buf[41] = 0;
    buf[42] = 0;
    buf[43] = 0;
    buf[44..48].copy_from_slice(&(mtu as u32).to_be_bytes());
    let c = fold(csum(&mut buf[..40 + icmp_len], 0)).to_ne_bytes();
    buf[42] = c[0];
    buf[43] = c[1];
    // ... then the real IPv6 header over it.
    buf[0] = 0x60;
    buf[1] = 0;
    buf[2] = 0;
    buf[3] = 0;
    buf[4..6].copy_from_slice(&(icmp_len as u16).to_be_bytes());
    buf[6] = IPPROTO_ICMPV6;
    buf[7] = 64;
    buf[8..24].copy_from_slice(&p.dst.bytes);
    buf[24..40].copy_from_slice(&p.src.bytes);

    resize(ctx, ETH_HLEN + 40 + icmp_len)?;
    ctx.store(0, &swapped_macs(eth), 0).map_err(|_| ())?;
    store_slice(ctx, ETH_HLEN, &buf[..40 + icmp_len])
}

#[inline(always)]
fn resize(ctx: &TcContext, len: usize) -> Result<(), ()> {
    // SAFETY: plain helper call on our own context.
    let r = unsafe { bpf_skb_change_tail(ctx.skb.skb, len as u32, 0) };
    if r == 0 { Ok(()) } else { Err(()) }
}
