#!/usr/bin/env bash
# Installs what `cargo xtask bench` runs besides the tracer: nginx (the server under
# load), wrk (the load), bpftrace (the peer tracer), bpftool (per-program costs) and
# iproute2 (the flood's namespaces). Idempotent: does nothing when all are present.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }

missing=()
for pair in nginx:nginx wrk:wrk bpftrace:bpftrace bpftool:bpftool ip:iproute2; do
    have "${pair%%:*}" || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "bench-deps: installing ${missing[*]} needs root; rerun with sudo" >&2
    exit 1
fi
echo "bench-deps: installing Debian packages: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
# --no-install-recommends: binaries only. The bench starts its own nginx with its own
# config on 127.0.0.1, so the packaged service (port 80) is stopped if apt started it.
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
if have systemctl && systemctl is-active --quiet nginx 2>/dev/null; then
    systemctl stop nginx
    systemctl disable --quiet nginx
fi
