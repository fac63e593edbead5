#!/bin/sh
# Per-packet cost of the uplink hooks under real traffic, from the kernel's
# BPF run-time statistics (run_time_ns / run_cnt): the TC program alone,
# the XDP program in front of it (generic and native), and the floor of
# each XDP mode (a do-nothing XDP program, `oak-bench-floor --xdp`, built
# next to oak-static-dataplane, in front of the TC program). docs/dataplane.md, "The uplink hook: TC or XDP".
#
# The topology of real_prog_cost.sh: two namespace nodes on a private
# underlay (198.51.100.0/24 inside namespaces only), a container behind
# each, oak-static-dataplane on both. Node 2's dataplane is restarted with
# each uplink configuration (adopting its pins, as NetManager does); the
# traffic is iperf3 from container 1 to container 2's service address:
# TCP (one stream) and UDP with 64-byte payloads. Node 2's uplink receives
# it. A third run per configuration sends forged tunnel datagrams from a
# host on the underlay (what XDP drops) with a UDP flood tool.
#
# The xdp-redirect configurations deliver in XDP (--uplink-hook
# xdp-redirect): container 2's eth0 gets GRO first, as NetManager gives it,
# so its veth has NAPI for the redirected frames.
#
# Usage (root): tests/scripts/xdp_uplink_cost.sh path/to/oak-static-dataplane [SECONDS]
# CONFIGS (environment) picks configurations by label, e.g. "tc xdp-native";
# TRAFFIC the runs per configuration (default "tcp udp forged"); ROUNDS
# (default 1) repeats the whole set, configurations interleaved, so a busy
# machine's noise spreads over all of them. WIRE_CSUM=1: see below.
# Names carry the shell's pid. kernel.bpf_stats_enabled is restored on exit.
set -eu
BIN=${1:?usage: $0 path/to/oak-static-dataplane [SECONDS]}
SECS=${2:-10}
HERE=$(cd "$(dirname "$0")" && pwd)
P=oakxc$$
PIN=/sys/fs/bpf/$P
STATS_BEFORE=$(sysctl -n kernel.bpf_stats_enabled)
PIDS=""
DP2=""

HOSTS=a
. "$HERE/two_nodes.sh"

ethtool_set() { # ns ifname command value: one legacy ethtool ioctl (no ethtool binary needed)
    nsx "$1" python3 -c 'import ctypes, fcntl, socket, struct, sys
v = ctypes.create_string_buffer(struct.pack("II", int(sys.argv[2], 0), int(sys.argv[3])))
fcntl.ioctl(socket.socket(), 0x8946, struct.pack("16sP16x", sys.argv[1].encode(), ctypes.addressof(v)))' "$2" "$3" "$4"
}
# ETHTOOL_SGRO, what NetManager does to a container end (plumbing/gro.rs).
gro_on() { ethtool_set "$1" "$2" 0x2c 1; }

cleanup() {
    for p in $PIDS $DP2; do kill "$p" 2>/dev/null || true; done
    sleep 0.3
    rm -rf "$PIN-noop"
    two_nodes_down
    sysctl -qw kernel.bpf_stats_enabled="$STATS_BEFORE"
}
trap cleanup EXIT INT TERM

two_nodes
if [ "${WIRE_CSUM:-0}" = 1 ]; then
    # Node 1's uplink computes checksums in software (ETHTOOL_STXCSUM off,
    # which takes TSO with it): node 2 receives MTU-sized datagrams whose
    # inner checksums are complete, as from a physical wire, instead of
    # GSO packets carrying checksum seeds (CHECKSUM_PARTIAL), which only
    # an skb can carry through a redirect.
    ethtool_set "$P-n1" eth0 0x17 0
fi

table n1 198.51.100.1 10.18.0.2 10.30.0.3 veth-c1 "[2,0,10,18,0,2]" 10.18.0.66 10.30.0.5 198.51.100.2 tc auto
start_dp n1
PIDS=$(cat "/tmp/$P-n1.pid")

prog_at() { # pinned link -> program id
    bpftool -j link show pinned "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["prog_id"])'
}
xdp_id() { # ns ifname -> id of the XDP program there, or nothing
    nsx "$1" bpftool -j net show dev "$2" | python3 -c 'import json,sys
for e in json.load(sys.stdin):
    for x in e.get("xdp", []):
        print(x["id"])'
}
stat_of() { # id -> "run_time_ns run_cnt"
    [ -n "$1" ] || { echo "0 0"; return; }
    bpftool -j prog show id "$1" | python3 -c 'import json,sys
p=json.load(sys.stdin); print(p.get("run_time_ns",0), p.get("run_cnt",0))'
}

# A host on the underlay that is no node sends tunnel datagrams whose inner
# source node 2's tables place on node 1, for no container there: forged.
FORGE=/tmp/$P-forge.py
cat >"$FORGE" <<'PY'
import socket, struct, sys, time
end = time.time() + float(sys.argv[1])
inner = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 29, 1, 0x4000, 64, 17, 0,
                    socket.inet_aton("10.30.0.3"), socket.inet_aton("10.18.0.99"))
inner += struct.pack("!HHHH", 1, 9, 9, 0) + b"x"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("198.51.100.3", 50103))
n = 0
while time.time() < end:
    for _ in range(1000):
        s.sendto(inner, ("198.51.100.2", 50103))
    n += 1000
print(n)
PY

measure() { # config label traffic
    xdp=$(xdp_id "$P-n2" eth0)
    tcid=$(prog_at "$PIN-n2/links/uplink_ingress@eth0")
    case "$3" in
        forged) ;;
        # Bounded: a configuration that loses the control connection must
        # not leave a server behind.
        *) nsx "$P-c2" timeout $((SECS + 20)) iperf3 -s -1 >/dev/null 2>&1 &
           sleep 0.5 ;;
    esac
    sysctl -qw kernel.bpf_stats_enabled=1
    x0=$(stat_of "$xdp"); t0=$(stat_of "$tcid")
    case "$3" in
        tcp) nsx "$P-c1" timeout $((SECS + 15)) iperf3 -c 10.30.55.56 -t "$SECS" --connect-timeout 3000 -J >"/tmp/$P-iperf.json" || true ;;
        udp) nsx "$P-c1" timeout $((SECS + 15)) iperf3 -c 10.30.55.56 -t "$SECS" --connect-timeout 3000 -u -b 0 -l 64 -J >"/tmp/$P-iperf.json" || true ;;
        forged) echo '{}' >"/tmp/$P-iperf.json"; nsx "$P-a" python3 "$FORGE" "$SECS" >/dev/null ;;
    esac
    x1=$(stat_of "$xdp"); t1=$(stat_of "$tcid")
    sysctl -qw kernel.bpf_stats_enabled="$STATS_BEFORE"
    python3 - "$1" "$2" "$x0" "$x1" "$t0" "$t1" "/tmp/$P-iperf.json" <<'PY'
import json, sys
cfg, label = sys.argv[1], sys.argv[2]
def per(b, a):
    t0, n0 = map(int, b.split()); t1, n1 = map(int, a.split())
    n = n1 - n0
    return ((t1 - t0) / n if n else 0.0), n
try:
    end = json.load(open(sys.argv[7])).get("end", {})
    s = end.get("sum_received") or end.get("sum") or {}
    rate = "%.2f Gbit/s" % (s.get("bits_per_second", 0) / 1e9) if s else "-"
    if "lost_packets" in s and s.get("seconds"):
        # UDP: what the server received per second.
        rate += " %.0f kpps" % ((s["packets"] - s["lost_packets"]) / s["seconds"] / 1e3)
except Exception as e:
    rate = "iperf3 failed: %s" % e
xns, xn = per(sys.argv[3], sys.argv[4])
tns, tn = per(sys.argv[5], sys.argv[6])
print("%-22s %-8s xdp %6.1f ns x %9d   tc %6.1f ns x %9d   %s" % (cfg, label, xns, xn, tns, tn, rate))
PY
}

counters() { # node 2's non-zero counters (index: packets), summed over CPUs
    bpftool -j map dump pinned "$PIN-n2/COUNTERS" | python3 -c 'import json,sys
out = []
for e in json.load(sys.stdin):
    n = sum(v["value"]["packets"] if isinstance(v["value"], dict) else int.from_bytes(bytes(int(b, 16) for b in v["value"][:8]), "little") for v in e["values"])
    if n:
        out.append("%s:%d" % (e["key"], n))
print("  node 2 counters (index:packets):", " ".join(out))'
}

run_config() { # label hook xdp-mode noop(generic|native|"")
    [ -n "$DP2" ] && kill "$DP2" && sleep 0.5
    for m in xdpgeneric xdpdrv; do nsx "$P-n2" ip link set dev eth0 "$m" off 2>/dev/null || true; done
    table n2 198.51.100.2 10.18.0.66 10.30.0.5 veth-c2 "[2,0,10,18,0,66]" 10.18.0.2 10.30.0.3 198.51.100.1 "$2" "$3"
    start_dp n2
    DP2=$(cat "/tmp/$P-n2.pid")
    if [ -n "$4" ]; then
        rm -f "$PIN-noop"
        "$(dirname "$BIN")/oak-bench-floor" --xdp "$PIN-noop" >/dev/null
        case "$4" in generic) m=xdpgeneric ;; *) m=xdpdrv ;; esac
        # nsenter, not ip netns exec: that remounts /sys, bpffs with it.
        nsenter --net="/run/netns/$P-n2" ip link set dev eth0 "$m" pinned "$PIN-noop"
    fi
    case "$2" in xdp-redirect) gro_on "$P-c2" eth0 ;; esac
    nsx "$P-c1" busybox ping -c 1 -W 2 10.30.55.56 >/dev/null || true
    for t in ${TRAFFIC:-tcp udp forged}; do measure "$1" "$t" "$t"; done
    counters
    if [ -n "$4" ]; then nsx "$P-n2" ip link set dev eth0 "$m" off; fi
}


want() { [ -z "${CONFIGS:-}" ] || case " $CONFIGS " in *" $1 "*) ;; *) return 1 ;; esac; }
round=0
while [ "$round" -lt "${ROUNDS:-1}" ]; do
    round=$((round + 1))
    echo "round $round"
    ! want tc || run_config "tc" tc auto ""
    ! want tc+noop-xdp-generic || run_config "tc+noop-xdp-generic" tc auto generic
    ! want tc+noop-xdp-native || run_config "tc+noop-xdp-native" tc auto native
    ! want xdp-generic || run_config "xdp-generic" xdp generic ""
    ! want xdp-native || run_config "xdp-native" xdp native ""
    ! want xdp-redirect-generic || run_config "xdp-redirect-generic" xdp-redirect generic ""
    ! want xdp-redirect-native || run_config "xdp-redirect-native" xdp-redirect native ""
done
