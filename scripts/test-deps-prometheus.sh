#!/usr/bin/env bash
# Installs the Prometheus server that tests/tests/record.rs starts on loopback to
# scrape `backlog-trace --prometheus`. Idempotent: does nothing when it is present.
set -euo pipefail

if command -v prometheus >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "test-deps-prometheus: installing the prometheus package needs root; rerun with sudo" >&2
    exit 1
fi
echo "test-deps-prometheus: installing Debian package prometheus" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
# --no-install-recommends: the server binary only, not the node exporter and friends.
# The package's service is not wanted either; the tests start their own server.
apt-get install -y -qq --no-install-recommends prometheus >/dev/null
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
    systemctl stop prometheus || true
fi
