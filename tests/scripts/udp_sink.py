"""Receives datagrams on UDP PORT (IPv4 and IPv6) and appends one line per
datagram, "<length> <sha256>", to OUTFILE as it arrives. Prints "ready"
once bound; stops after COUNT datagrams or 60 s.

Usage: udp_sink.py PORT COUNT OUTFILE"""
import hashlib
import socket
import sys

port, count, outfile = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", port))
s.settimeout(60)
print("ready", flush=True)
with open(outfile, "a") as f:
    for _ in range(count):
        d, _ = s.recvfrom(65535)
        f.write(f"{len(d)} {hashlib.sha256(d).hexdigest()}\n")
        f.flush()
