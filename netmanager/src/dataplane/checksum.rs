//! Completing the L4 checksum of a held frame before it is reinjected.
//!
//! Frames from a container's veth usually carry CHECKSUM_PARTIAL: the
//! checksum field holds only the pseudo-header sum and the kernel (or NIC)
//! finishes it on the way out. A frame copied out by the program and written
//! back through a packet socket has lost that offload state, so the receiver
//! would see a wrong checksum and drop the packet -- the very first-packet
//! loss the hold exists to avoid. Recomputing the checksum from the bytes is
//! correct whether the field was partial or already complete.

const ETH_HLEN: usize = 14;

/// Recomputes the TCP, UDP or ICMPv6 checksum of an Ethernet frame in place.
/// Frames it does not understand (or that are truncated) are left untouched.
pub fn complete(frame: &mut [u8]) {
    if frame.len() < ETH_HLEN {
        return;
    }
    match u16::from_be_bytes([frame[12], frame[13]]) {
        0x0800 => complete_v4(&mut frame[ETH_HLEN..]),
        0x86dd => complete_v6(&mut frame[ETH_HLEN..]),
        _ => {}
    }
}

/// Like [`complete`] for a held tunnel datagram: the inner packet's
/// checksum first (a datagram that crossed only veths may still carry the
/// sender's partial one), then the outer UDP checksum that covers it.
pub fn complete_tunnel(frame: &mut [u8]) {
    if frame.len() < ETH_HLEN + 1 {
        return;
    }
    // Outer IPv4 without options or IPv6 without extension headers, then
    // UDP: the only shapes the programs take for tunnel datagrams.
    let inner_at = match u16::from_be_bytes([frame[12], frame[13]]) {
        0x0800 => ETH_HLEN + 28,
        0x86dd => ETH_HLEN + 48,
        _ => return,
    };
    if let Some(inner) = frame.get_mut(inner_at..) {
        match inner.first().map(|b| b >> 4) {
            Some(4) => complete_v4(inner),
            Some(6) => complete_v6(inner),
            _ => {}
        }
    }
    complete(frame);
}

fn complete_v4(ip: &mut [u8]) {
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return;
    }
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    // Fragments other than the first carry no L4 header.
    if ihl < 20
        || total < ihl
        || total > ip.len()
        || u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0
    {
        return;
    }
    let mut pseudo = [0u8; 12];
    pseudo[..8].copy_from_slice(&ip[12..20]);
    pseudo[9] = ip[9];
    pseudo[10..12].copy_from_slice(&((total - ihl) as u16).to_be_bytes());
    let proto = ip[9];
    complete_l4(proto, &pseudo, &mut ip[ihl..total], false);
}

fn complete_v6(ip: &mut [u8]) {
    if ip.len() < 40 || ip[0] >> 4 != 6 {
        return;
    }
    let payload = u16::from_be_bytes([ip[4], ip[5]]) as usize;
    if 40 + payload > ip.len() {
        return;
    }
    let mut pseudo = [0u8; 40];
    pseudo[..32].copy_from_slice(&ip[8..40]);
    pseudo[32..36].copy_from_slice(&(payload as u32).to_be_bytes());
    pseudo[39] = ip[6];
    let proto = ip[6];
    complete_l4(proto, &pseudo, &mut ip[40..40 + payload], true);
}

fn complete_l4(proto: u8, pseudo: &[u8], l4: &mut [u8], v6: bool) {
    let at = match proto {
        6 if l4.len() >= 20 => 16,
        // A zero UDP checksum over IPv4 means "none": keep it that way.
        17 if l4.len() >= 8 && (v6 || l4[6..8] != [0, 0]) => 6,
        58 if v6 && l4.len() >= 4 => 2,
        _ => return,
    };
    l4[at] = 0;
    l4[at + 1] = 0;
    let mut c = fold(sum(pseudo) + sum(l4));
    if proto == 17 && c == 0 {
        c = 0xffff;
    }
    l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

fn sum(data: &[u8]) -> u64 {
    data.chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u64)
        .sum()
}

fn fold(mut s: u64) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TCP SYN from 10.18.0.2:40000 to 10.30.55.56:80 with a correct checksum.
    fn syn() -> Vec<u8> {
        let mut f = vec![0u8; 14];
        f[12] = 0x08;
        let mut ip = vec![
            0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, 10, 18, 0, 2, 10, 30, 55, 56,
        ];
        let tcp = [
            0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xfa, 0xf0, 0, 0, 0, 0,
        ];
        ip.extend_from_slice(&tcp);
        f.extend_from_slice(&ip);
        complete(&mut f);
        f
    }

    fn verify(frame: &[u8]) -> bool {
        let ip = &frame[14..];
        let mut pseudo = [0u8; 12];
        pseudo[..8].copy_from_slice(&ip[12..20]);
        pseudo[9] = 6;
        pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
        fold(sum(&pseudo) + sum(&ip[20..])) == 0
    }

    #[test]
    fn partial_checksum_is_completed() {
        let good = syn();
        assert!(verify(&good));
        // What a CHECKSUM_PARTIAL frame carries: the pseudo-header sum only.
        let mut partial = good.clone();
        partial[14 + 20 + 16] = 0x12;
        partial[14 + 20 + 17] = 0x34;
        assert!(!verify(&partial));
        complete(&mut partial);
        assert_eq!(partial, good);
    }

    #[test]
    fn zero_udp_checksum_and_garbage_are_left_alone() {
        let mut udp = vec![0u8; 14];
        udp[12] = 0x08;
        udp.extend_from_slice(&[
            0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2, 0, 1, 0, 2, 0, 8,
            0, 0,
        ]);
        let before = udp.clone();
        complete(&mut udp);
        assert_eq!(udp, before);
        let mut junk = vec![0xffu8; 9];
        complete(&mut junk);
        assert_eq!(junk, vec![0xff; 9]);
    }
}
