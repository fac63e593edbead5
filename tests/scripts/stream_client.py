"""Sends N random bytes to ADDR:PORT, half-closes, and checks the server's
"<bytes> <sha256>" answer. Prints "ok" and the rate, or "MISMATCH" and exits 1."""
import hashlib
import os
import socket
import sys
import time

addr, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = os.urandom(size)
start = time.time()
c = socket.create_connection((addr, port), timeout=30)
c.sendall(data)
c.shutdown(socket.SHUT_WR)
answer = b""
while True:
    d = c.recv(1000)
    if not d:
        break
    answer += d
expected = f"{len(data)} {hashlib.sha256(data).hexdigest()}"
if answer.decode() != expected:
    print("MISMATCH", answer.decode())
    sys.exit(1)
print("ok", f"{size / (time.time() - start) / 1e6:.1f} MB/s")
