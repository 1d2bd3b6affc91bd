#!/usr/bin/env bash
# Installs the Prometheus server that tests/tests/record.rs starts on loopback to
# scrape `backlog-trace --prometheus`, and promtool (same package), with which
# tests/tests/prometheus.rs checks and unit-tests contrib/prometheus's rules.
# Idempotent: does nothing when both are present.
set -euo pipefail

. "$(dirname "$0")/lib/apt.sh"

missing=()
need prometheus:prometheus promtool:prometheus
[ ${#missing[@]} -gt 0 ] || exit 0
# --no-install-recommends: the server binary only, not the node exporter and friends.
# The package's service is not wanted either; the tests start their own server.
apt_install test-deps-prometheus --no-install-recommends -- "${missing[@]}"
stop_packaged_service prometheus
