# Sourced by real_prog_cost.sh and xdp_uplink_cost.sh: two namespace nodes
# on a private underlay (198.51.100.0/24 inside namespaces only), a
# container behind each, and oak-static-dataplane tables for them.
#
# The caller sets P (name prefix, carrying its pid), PIN (bpffs prefix)
# and BIN (oak-static-dataplane), and may set HOSTS to underlay hosts that
# are no nodes (named after n1 and n2, numbered on from .3).

nsx() { ns=$1; shift; ip netns exec "$ns" "$@"; }

# Namespaces u (the underlay bridge), n1, n2, $HOSTS, c1 and c2.
two_nodes() {
    for n in u n1 n2 ${HOSTS:-} c1 c2; do ip netns add "$P-$n"; nsx "$P-$n" ip link set lo up; done
    nsx "$P-u" ip link add br0 type bridge
    nsx "$P-u" ip link set br0 up
    i=1
    for n in n1 n2 ${HOSTS:-}; do
        ip link add eth0 netns "$P-$n" type veth peer name "u-$n" netns "$P-u"
        nsx "$P-u" ip link set "u-$n" master br0 up
        nsx "$P-$n" ip addr add "198.51.100.$i/24" dev eth0
        nsx "$P-$n" ip link set eth0 up
        i=$((i + 1))
    done
    for n in n1 n2; do
        nsx "$P-$n" sysctl -qw net.ipv4.ip_forward=1
        nsx "$P-$n" ip link add goProxyBridge type bridge
        nsx "$P-$n" ip link set goProxyBridge up
    done
    nsx "$P-n1" ip addr add 10.18.0.1/26 dev goProxyBridge
    nsx "$P-n2" ip addr add 10.18.0.65/26 dev goProxyBridge
    container n1 c1 10.18.0.2 10.18.0.1 02
    container n2 c2 10.18.0.66 10.18.0.65 42
}

# Removes what two_nodes made (and the tables and pid files).
two_nodes_down() {
    rm -rf "$PIN-n1" "$PIN-n2" "/tmp/$P-"*
    for n in c1 c2 n1 n2 ${HOSTS:-} u; do ip netns del "$P-$n" 2>/dev/null || true; done
}

container() { # node ns ip gw last-octet
    ip link add "veth-$2" netns "$P-$1" type veth peer name eth0 netns "$P-$2"
    nsx "$P-$1" ip link set "veth-$2" master goProxyBridge up
    nsx "$P-$2" ip link set eth0 address "02:00:0a:12:00:$5" mtu 1450 up
    nsx "$P-$2" ip addr add "$3/26" dev eth0
    nsx "$P-$2" ip route add default via "$4"
}

# The table of node $1; the uplink hook and XDP mode default to tc, auto.
table() { # node node-ip local-ns local-inst local-veth local-mac remote-ns remote-inst remote-node [hook [mode]]
    cat >"/tmp/$P-$1.json" <<JSON
{"pin_dir": "$PIN-$1", "uplink": "eth0", "node_ip": "$2",
 "uplink_hook": "${10:-tc}", "xdp_mode": "${11:-auto}",
 "service_ranges": [["10.30.0.0", 16], ["fdff::", 16]],
 "instances": [
   {"ns_ip": "$3", "instance_ip": "$4", "node_ip": "$2", "veth": "$5", "mac": $6},
   {"ns_ip": "$7", "instance_ip": "$8", "node_ip": "$9"}],
 "services": [
   {"ip": "10.30.55.56", "kind": "RR", "backends": ["10.18.0.66"]},
   {"ip": "10.30.0.3", "kind": "instance_ip", "backends": ["10.18.0.2"]},
   {"ip": "10.30.0.5", "kind": "instance_ip", "backends": ["10.18.0.66"]}]}
JSON
}

# Starts the dataplane of node $1 and waits until it is ready; its pid
# goes to /tmp/$P-$1.pid.
start_dp() { # node
    fifo=/tmp/$P-$1.ready
    mkfifo "$fifo"
    nsenter --net="/run/netns/$P-$1" "$BIN" "/tmp/$P-$1.json" >"$fifo" &
    pid=$!
    read -r line <"$fifo"
    rm -f "$fifo"
    [ "$line" = ready ] || { echo "dataplane on $1 did not start" >&2; exit 1; }
    echo "$pid" >"/tmp/$P-$1.pid"
}
