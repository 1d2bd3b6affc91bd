#!/bin/sh
# Guest self-check for `cargo xtask vm-test -- sh xtask/vm-smoke.sh`: proves a booted
# kernel offers what backlog-trace and its tests need (BTF, kprobes that fire, fentry,
# network namespaces with module autoloading, nftables, sysctl in a namespace).
set -eu
t=/sys/kernel/tracing
step() { echo "smoke: $*"; }

step "kernel $(uname -r), mode ${BACKLOG_MODE:-unset}"
test -s /sys/kernel/btf/vmlinux
step "BTF present"

n=$(grep -c ' tcp_conn_request$' /proc/kallsyms)
[ "$n" -gt 0 ]
step "tcp_conn_request in kallsyms ($n)"

# One loopback connection: a SYN that reaches tcp_conn_request.
cat > /tmp/connect.py <<'EOF'
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen()
c = socket.create_connection(s.getsockname())
s.accept()
EOF

echo 'p:bt_probe tcp_conn_request' >> $t/kprobe_events
echo 1 > $t/events/kprobes/bt_probe/enable
python3 /tmp/connect.py
echo 0 > $t/events/kprobes/bt_probe/enable
hits=$(grep -c 'bt_probe:' $t/trace || true)
echo '-:bt_probe' >> $t/kprobe_events
if grep -q bt_probe $t/kprobe_events; then step "bt_probe not removed"; exit 1; fi
[ "$hits" -gt 0 ]
step "kprobe_events accepted p:bt_probe tcp_conn_request, fired $hits time(s), removed"

# fentry (kfunc), only where the host has bpftrace.
if command -v bpftrace >/dev/null; then
    timeout 120 bpftrace --unsafe -e '
        kfunc:tcp_conn_request { printf("fentry fired\n"); exit(); }
        BEGIN { system("python3 /tmp/connect.py"); }' \
        > /tmp/fentry.out 2>&1 || true
    grep -q 'fentry fired' /tmp/fentry.out || { cat /tmp/fentry.out; exit 1; }
    step "fentry on tcp_conn_request fired (bpftrace kfunc)"
else
    step "bpftrace not on the host: fentry not checked"
fi

# veth is a module: creating one exercises the kernel's autoloader inside the guest.
ip netns add smoke
ip -n smoke link add v0 type veth peer name v1
grep -q "^veth " /proc/modules
ip -n smoke link set lo up
ip netns exec smoke sysctl -qw net.core.somaxconn=64
nft add table inet smoke && nft delete table inet smoke
ip netns del smoke
step "netns, veth (autoloaded), sysctl in netns, nftables"
step "ok"
