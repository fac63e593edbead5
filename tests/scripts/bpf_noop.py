#!/usr/bin/env python3
"""Loads a do-nothing BPF program (`r0 = VERDICT; exit`) and pins it, for
measuring the floor of a hook: what the kernel's BPF statistics report for
a program that does nothing at all.

Usage: bpf_noop.py xdp|tc PIN_PATH
  xdp: an XDP program returning XDP_PASS (attach: ip link set dev IF xdpgeneric|xdpdrv pinned PIN_PATH)
  tc:  a SCHED_CLS program returning TC_ACT_OK
No compiler needed: two instructions through the bpf(2) system call."""
import ctypes
import struct
import sys

SYS_BPF = 321  # x86_64
BPF_PROG_LOAD, BPF_OBJ_PIN = 5, 6
PROG_TYPE = {"xdp": (6, 2), "tc": (3, 0)}  # (prog type, verdict)

kind, path = sys.argv[1], sys.argv[2]
prog_type, verdict = PROG_TYPE[kind]
libc = ctypes.CDLL(None, use_errno=True)
insns = struct.pack("<BBhi", 0xB7, 0, 0, verdict) + struct.pack("<BBhi", 0x95, 0, 0, 0)
insn_buf = ctypes.create_string_buffer(insns, len(insns))
license = ctypes.create_string_buffer(b"GPL")
attr = ctypes.create_string_buffer(128)
struct.pack_into("<IIQQ", attr, 0, prog_type, 2, ctypes.addressof(insn_buf), ctypes.addressof(license))
struct.pack_into("16s", attr, 48, b"noop_" + kind.encode())
fd = libc.syscall(SYS_BPF, BPF_PROG_LOAD, attr, 128)
if fd < 0:
    sys.exit("BPF_PROG_LOAD: errno %d" % ctypes.get_errno())
pin = ctypes.create_string_buffer(path.encode())
attr = ctypes.create_string_buffer(128)
struct.pack_into("<QI", attr, 0, ctypes.addressof(pin), fd)
if libc.syscall(SYS_BPF, BPF_OBJ_PIN, attr, 128) < 0:
    sys.exit("BPF_OBJ_PIN: errno %d" % ctypes.get_errno())
