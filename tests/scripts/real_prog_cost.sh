#!/bin/sh
# Per-packet cost of the overlay programs under real traffic, from the
# kernel's BPF run-time statistics (run_time_ns / run_cnt).
#
# Two namespace nodes on a private underlay (198.51.100.0/24 inside
# namespaces only), one container behind each, oak-static-dataplane on both
# (the real programs, the daemon's default map sizes), then:
#   - iperf3 TCP, one stream, container 1 -> service IP -> container 2;
#   - iperf3 UDP, 64-byte payloads, same path.
# For each run: ns/packet of container_egress on node 1 (translate +
# encapsulate + redirect, the data direction) and uplink_ingress on node 2
# (decapsulate + checks + redirect), beside the floor: a do-nothing TC
# program (oak-bench-floor, built next to oak-static-dataplane) attached
# first on each measured hook, measured over the same packets, so the
# ratios come from one run.
#
# Usage (root): tests/scripts/real_prog_cost.sh path/to/oak-static-dataplane [SECONDS]
# Names carry the shell's pid, so parallel runs do not collide. The
# statistics switch (kernel.bpf_stats_enabled) is global: it is restored to
# its previous value on exit.
set -eu
BIN=${1:?usage: $0 path/to/oak-static-dataplane [SECONDS]}
SECS=${2:-10}
P=oakrc$$
PIN=/sys/fs/bpf/$P
STATS_BEFORE=$(sysctl -n kernel.bpf_stats_enabled)
PIDS=""

HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/two_nodes.sh"

cleanup() {
    for p in $PIDS; do kill "$p" 2>/dev/null || true; done
    sleep 0.3
    two_nodes_down
    sysctl -qw kernel.bpf_stats_enabled="$STATS_BEFORE"
}
trap cleanup EXIT INT TERM

two_nodes
table n1 198.51.100.1 10.18.0.2 10.30.0.3 veth-c1 "[2,0,10,18,0,2]" 10.18.0.66 10.30.0.5 198.51.100.2
table n2 198.51.100.2 10.18.0.66 10.30.0.5 veth-c2 "[2,0,10,18,0,66]" 10.18.0.2 10.30.0.3 198.51.100.1
for n in n1 n2; do
    start_dp $n
    PIDS="$PIDS $(cat "/tmp/$P-$n.pid")"
done

# The program behind a link NetManager pinned: <pin dir>/links/<program>@<interface>.
prog_id() { # node program interface
    bpftool -j link show pinned "$PIN-$1/links/$2@$3" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["prog_id"])'
}
stat_of() { # id -> "run_time_ns run_cnt"
    bpftool -j prog show id "$1" | python3 -c 'import json,sys
p=json.load(sys.stdin); print(p.get("run_time_ns",0), p.get("run_cnt",0))'
}
# The floor, first on every measured hook (its link pinned with the maps;
# nsenter, not `ip netns exec`, which mounts a bpffs-less /sys).
FLOOR=$(dirname "$BIN")/oak-bench-floor
FL1=$(nsenter --net="/run/netns/$P-n1" "$FLOOR" veth-c1 "$PIN-n1/floor-veth-c1")
FL2=$(nsenter --net="/run/netns/$P-n2" "$FLOOR" eth0 "$PIN-n2/floor-eth0")
FL3=$(nsenter --net="/run/netns/$P-n2" "$FLOOR" veth-c2 "$PIN-n2/floor-veth-c2")
FL4=$(nsenter --net="/run/netns/$P-n1" "$FLOOR" eth0 "$PIN-n1/floor-eth0")
EG1=$(prog_id n1 container_egress veth-c1)
IN2=$(prog_id n2 uplink_ingress eth0)
EG2=$(prog_id n2 container_egress veth-c2)
IN1=$(prog_id n1 uplink_ingress eth0)

nsx "$P-c1" busybox ping -c 1 -W 2 10.30.55.56 >/dev/null

measure() { # label iperf3-args
    nsx "$P-c2" iperf3 -s -D -1 >/dev/null 2>&1 || true
    sleep 0.3
    sysctl -qw kernel.bpf_stats_enabled=1
    set -- "$1" "$2" "$(stat_of "$EG1")" "$(stat_of "$IN2")" "$(stat_of "$EG2")" "$(stat_of "$IN1")" \
        "$(stat_of "$FL1")" "$(stat_of "$FL2")" "$(stat_of "$FL3")" "$(stat_of "$FL4")"
    nsx "$P-c1" iperf3 -c 10.30.55.56 -t "$SECS" $2 -J >"/tmp/$P-iperf.json" || true
    a=$(stat_of "$EG1"); b=$(stat_of "$IN2"); c=$(stat_of "$EG2"); d=$(stat_of "$IN1")
    e=$(stat_of "$FL1"); f=$(stat_of "$FL2"); g=$(stat_of "$FL3"); h=$(stat_of "$FL4")
    sysctl -qw kernel.bpf_stats_enabled="$STATS_BEFORE"
    python3 - "$1" "$3" "$a" "$4" "$b" "$5" "$c" "$6" "$d" "/tmp/$P-iperf.json" \
        "$7" "$e" "$8" "$f" "$9" "$g" "${10}" "$h" <<'EOF'
import json, sys
label = sys.argv[1]
def per(before, after):
    t0, n0 = map(int, before.split()); t1, n1 = map(int, after.split())
    n = n1 - n0
    return ((t1 - t0) / n if n else 0.0), n
rows = [("node1 container_egress (data: translate+encap)", sys.argv[2], sys.argv[3]),
        ("node2 uplink_ingress (data: decap+checks)", sys.argv[4], sys.argv[5]),
        ("node2 container_egress (replies)", sys.argv[6], sys.argv[7]),
        ("node1 uplink_ingress (replies: decap+reverse)", sys.argv[8], sys.argv[9])]
try:
    end = json.load(open(sys.argv[10]))["end"]
    s = end.get("sum_received") or end.get("sum") or {}
    rate = "%.2f Gbit/s" % (s.get("bits_per_second", 0) / 1e9)
except Exception as e:
    rate = "iperf3 failed: %s" % e
floors = [per(sys.argv[i], sys.argv[i + 1])[0] for i in (11, 13, 15, 17)]
print("== %s (%s)" % (label, rate))
for (name, b, a), fl in zip(rows, floors):
    ns, n = per(b, a)
    ratio = "%.1fx" % (ns / fl) if fl else "-"
    print("  %-48s %7.0f ns/packet over %d packets; floor %4.0f ns, %s"
          % (name, ns, n, fl, ratio))
EOF
}
measure "TCP, 1 stream" ""
measure "UDP, 64-byte payloads" "-u -b 0 -l 64"
