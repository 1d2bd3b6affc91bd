#!/usr/bin/env bash
# The whole test suite, as CI runs it: set-up, build, unit tests, the integration
# tests on this kernel (root, eBPF, network namespaces they create), and the kernel
# matrix under qemu. Ends with one line "tests: N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "test: the suite loads eBPF programs and creates network namespaces: run it as root (sudo scripts/test.sh)" >&2
    exit 1
fi

bash scripts/setup.sh
bash scripts/vm-deps.sh
bash scripts/test-deps-prometheus.sh
# The stress step's loads: nginx, wrk, bpftrace.
bash scripts/bench-deps.sh

log=$(mktemp)
trap 'rm -f "$log"' EXIT
run() {
    echo "== $*" >&2
    # Keep going after a failing step so one run reports every failure.
    if ! "$@" 2>&1 | tee -a "$log"; then
        failed_steps+=("$*")
    fi
}
failed_steps=()

run cargo build --release --workspace --exclude backlog-ebpf
export BACKLOG_TRACE_BIN=$PWD/target/release/backlog-trace
# Unit tests of the pure parts (the BTF tests read this machine's kernel BTF).
run cargo test --release --workspace --exclude backlog-ebpf --exclude backlog-tests
# Integration tests: one at a time, since each drives the shared kernel counters of
# the namespaces it creates and loads the tracer.
run cargo test --release -p backlog-tests -- --test-threads=1
# Stress, short: each exact-count drop test once under each concurrent load (second
# tracer, tracers restarted during the run, bpftrace, nginx+wrk, listener churn, CPU
# hogs, all at once), every drop required detected. It ends with a line in cargo test's
# format, so each of its runs counts as a test below.
run cargo xtask stress --runs 1 --tracer "$BACKLOG_TRACE_BIN"

# Kernel matrix: the exact-count drop tests and the accept-wait tests inside stock
# Debian kernels (newest 6.1, 6.12 and 7.x) under qemu, in every mode they support.
# This host's kernel has neither fentry nor kprobes, so this is where those modes are
# proven; tracepoint mode runs there too, on verifiers and skb paths older than ours.
vm_tests=$(cargo test --release -p backlog-tests --test drops --test accept --no-run --message-format=json 2>/dev/null \
    | grep -E '"profile":\{[^}]*"test":true' | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p')
if [ "$(echo "$vm_tests" | grep -c .)" -ne 2 ]; then
    failed_steps+=("building the drop and accept test executables for the VM matrix")
fi
rm -rf target/vm/results
# Every executable runs even after one fails, so one run reports every failure.
run cargo xtask vm-test --kernel all --mode fentry,kprobe,tracepoint -- \
    sh -c 'rc=0; for t in "$@"; do "$t" --test-threads=1 || rc=1; done; exit $rc' sh $vm_tests
# The guests' cargo test summaries land in their console logs, not on our stdout.
cat target/vm/results/*/*/console.log 2>/dev/null | sed 's/\x1b\[[0-9;]*m//g; s/\x1b(B//g' \
    | grep -E '^test result:' >> "$log" || true

passed=$(grep -Eo 'test result: [a-zA-Z]+\. [0-9]+ passed' "$log" | awk '{s+=$4} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed;' "$log" | awk '{s+=$1} END {print s+0}')
if [ ${#failed_steps[@]} -gt 0 ]; then
    printf 'test: step failed: %s\n' "${failed_steps[@]}" >&2
    [ "$failed" -gt 0 ] || failed=${#failed_steps[@]}
fi
echo "tests: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
