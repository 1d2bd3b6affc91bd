#!/usr/bin/env bash
# Installs what `cargo xtask bench` runs besides the tracer: nginx (the server under
# load), wrk (the load), bpftrace (the peer tracer), bpftool (per-program costs) and
# iproute2 (the flood's namespaces). Idempotent: does nothing when all are present.
set -euo pipefail

. "$(dirname "$0")/lib/apt.sh"

missing=()
need nginx:nginx wrk:wrk bpftrace:bpftrace bpftool:bpftool ip:iproute2
[ ${#missing[@]} -gt 0 ] || exit 0
# --no-install-recommends: binaries only. The bench starts its own nginx with its own
# config on 127.0.0.1, so the packaged service (port 80) is stopped if apt started it.
apt_install bench-deps --no-install-recommends -- "${missing[@]}"
stop_packaged_service nginx
