//! The frame the slow path writes into its device for one received
//! datagram: Ethernet, a plain outer IPv4 or IPv6 header rebuilt from the
//! socket's addresses, UDP to the tunnel port, and the datagram's payload --
//! what `slow_path_ingress` expects, as if it had arrived on the uplink.

use std::net::{IpAddr, SocketAddr};

use super::slow_path::{FRAME_SOURCE_MAC, SLOW_PAIR};

/// The Ethernet frame that stands for a received datagram: outer IPv4 or
/// IPv6 (no options or extension headers) from `peer` to `local`, UDP to
/// `tunnel_port`, the datagram's payload. None when the payload is no IP
/// packet or the frame would not fit the device.
pub fn frame(
    dst_mac: [u8; 6],
    peer: SocketAddr,
    local: IpAddr,
    tunnel_port: u16,
    payload: &[u8],
) -> Option<Vec<u8>> {
    if !matches!(payload.first().map(|b| b >> 4), Some(4) | Some(6)) {
        return None;
    }
    let udp_len = u16::try_from(8 + payload.len()).ok()?;
    let mut f = Vec::with_capacity(14 + 48 + payload.len());
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&FRAME_SOURCE_MAC);
    match (peer.ip(), local) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = u16::try_from(20 + 8 + payload.len()).ok()?;
            f.extend_from_slice(&0x0800u16.to_be_bytes());
            let mut h = [0u8; 20];
            h[0] = 0x45;
            h[2..4].copy_from_slice(&total.to_be_bytes());
            h[8] = 64;
            h[9] = 17;
            h[12..16].copy_from_slice(&s.octets());
            h[16..20].copy_from_slice(&d.octets());
            let c = ipv4_checksum(&h);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            f.extend_from_slice(&h);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            f.extend_from_slice(&0x86ddu16.to_be_bytes());
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&udp_len.to_be_bytes());
            f.extend_from_slice(&[17, 64]);
            f.extend_from_slice(&s.octets());
            f.extend_from_slice(&d.octets());
        }
        _ => return None,
    }
    // The kernel verified the datagram's checksum before the socket had it,
    // and the program does not look at the outer one: zero.
    f.extend_from_slice(&peer.port().to_be_bytes());
    f.extend_from_slice(&tunnel_port.to_be_bytes());
    f.extend_from_slice(&udp_len.to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    // The device's MTU bounds what a packet socket may write.
    (f.len() - 14 <= SLOW_PAIR.mtu.unwrap_or(1500) as usize).then_some(f)
}

fn ipv4_checksum(h: &[u8; 20]) -> u16 {
    let mut s: u32 = h
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]) as u32)
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 9];

    fn inner() -> Vec<u8> {
        // An IPv4 header's first bytes are enough for the frame builder.
        let mut p = vec![0x45, 0, 0, 24];
        p.extend_from_slice(&[0; 20]);
        p
    }

    #[test]
    fn an_ipv4_datagram_becomes_a_plain_tunnel_frame() {
        let peer: SocketAddr = "198.51.100.2:41234".parse().unwrap();
        let local: IpAddr = "198.51.100.130".parse().unwrap();
        let f = frame(MAC, peer, local, 50103, &inner()).unwrap();
        assert_eq!(&f[..6], &MAC);
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        let ip = &f[14..34];
        assert_eq!(ip[0], 0x45);
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]) as usize, 20 + 8 + 24);
        assert_eq!(ip[9], 17);
        assert_eq!(&ip[12..16], &[198, 51, 100, 2]);
        assert_eq!(&ip[16..20], &[198, 51, 100, 130]);
        let mut h = [0u8; 20];
        h.copy_from_slice(ip);
        h[10] = 0;
        h[11] = 0;
        assert_eq!(u16::from_be_bytes([ip[10], ip[11]]), ipv4_checksum(&h));
        // UDP: the peer's (ephemeral) port, our tunnel port.
        assert_eq!(&f[34..42], &[0xa1, 0x12, 0xc3, 0xb7, 0, 32, 0, 0]);
        assert_eq!(&f[42..], &inner()[..]);
    }

    #[test]
    fn an_ipv6_datagram_keeps_its_family() {
        let peer: SocketAddr = "[2001:db8::2]:50103".parse().unwrap();
        let local: IpAddr = "2001:db8::1".parse().unwrap();
        let f = frame(MAC, peer, local, 50103, &inner()).unwrap();
        assert_eq!(&f[12..14], &[0x86, 0xdd]);
        assert_eq!(f[14] >> 4, 6);
        assert_eq!(u16::from_be_bytes([f[18], f[19]]), 8 + 24);
        assert_eq!(f[20], 17);
        assert_eq!(
            &f[22..38],
            &"2001:db8::2".parse::<Ipv6Addr>().unwrap().octets()
        );
        assert_eq!(
            &f[38..54],
            &"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets()
        );
        assert_eq!(&f[54..62], &[0xc3, 0xb7, 0xc3, 0xb7, 0, 32, 0, 0]);
    }

    #[test]
    fn non_ip_payloads_and_mixed_families_are_refused() {
        let peer: SocketAddr = "198.51.100.2:1".parse().unwrap();
        let local: IpAddr = "198.51.100.1".parse().unwrap();
        // Version nibble 1: no IP packet.
        assert!(frame(MAC, peer, local, 50103, &[0x10, 0, 0, 0]).is_none());
        assert!(frame(MAC, peer, local, 50103, &[]).is_none());
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert!(frame(MAC, peer, v6, 50103, &inner()).is_none());
    }
}
