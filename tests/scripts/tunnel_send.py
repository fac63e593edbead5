"""Sends one Oakestra tunnel datagram the way an upstream NetManager does:
from a plain UDP socket (ephemeral source port, kernel routing), the inner
IPv4/UDP packet as the whole payload. Too large for the path MTU, the
kernel fragments it; with --options the outer IPv4 header carries options.

Usage: tunnel_send.py TO PORT INNER_SRC INNER_DST INNER_DPORT SIZE [--options]
Prints the SHA-256 of the inner UDP payload it sent."""
import hashlib
import ipaddress
import socket
import struct
import sys


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def inner_packet(src, dst, dport, payload):
    s, d = ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed
    udp = struct.pack("!HHHH", 7000, dport, 8 + len(payload), 0) + payload
    c = checksum(s + d + struct.pack("!BBH", 0, 17, len(udp)) + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", c) + udp[8:]
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0x4000, 64, 17, 0, s, d)
    hdr = hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]
    return hdr + udp


to, port, src, dst, dport, size = sys.argv[1:7]
options = "--options" in sys.argv[7:]
payload = bytes((i * 31 + 7) % 251 for i in range(int(size)))
packet = inner_packet(src, dst, int(dport), payload)
family = socket.AF_INET6 if ":" in to else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
if family == socket.AF_INET:
    # Let the kernel fragment rather than refuse (DF off).
    s.setsockopt(socket.IPPROTO_IP, 10, 0)  # IP_MTU_DISCOVER = IP_PMTUDISC_DONT
    if options:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, bytes([1, 1, 1, 0]))
s.sendto(packet, (to, int(port)))
print(hashlib.sha256(payload).hexdigest())
