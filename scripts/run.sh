#!/usr/bin/env bash
# Sets up the toolchain (first run only), builds backlog-trace, installs its shell
# completions and man pages (scripts/install-extras.sh, only what changed) and runs it
# with the given arguments, e.g.: sudo scripts/run.sh --port 80
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release -q -p backlog-user
# Completions and man pages are a convenience: failing to install them (no root for
# /usr/local) is said in one line and does not stop the tracer.
bash scripts/install-extras.sh target/release/backlog-trace ||
    echo "run.sh: completions and man pages not installed (see above); the tracer runs anyway" >&2
exec target/release/backlog-trace "$@"
