#!/usr/bin/env bash
# Sets up the toolchain (first run only), builds backlog-trace and runs it with the
# given arguments, e.g.: sudo scripts/run.sh --port 80
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release -q -p backlog-user
exec target/release/backlog-trace "$@"
