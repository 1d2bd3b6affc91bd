#!/bin/sh
# One cell of the VM matrix, run inside the guest by `cargo xtask vm-test` (see
# scripts/test.sh): the test executables given as arguments, in $BACKLOG_MODE.
# If the tracer refuses that mode on this kernel (exit 3: its probes found the kernel
# lacks what the mode needs), the modes test proves the refusal is one line that the
# automatic choice repeats, and the cell is reported unsupported with that line
# (exit $BACKLOG_VM_UNSUPPORTED, reason in $BACKLOG_VM_OUT/unsupported).
#   usage: vm-guest.sh MODES_TEST TEST...
set -u
modes_test=$1
shift
bin=${BACKLOG_TRACE_BIN:-target/release/backlog-trace}
"$bin" --mode "$BACKLOG_MODE" --duration 1 >/dev/null 2>"$BACKLOG_VM_OUT/mode-probe.err"
rc=$?
if [ "$rc" -eq 3 ]; then
    cat "$BACKLOG_VM_OUT/mode-probe.err"
    "$modes_test" --test-threads=1 || exit 1
    sed 's/^backlog-trace: //' "$BACKLOG_VM_OUT/mode-probe.err" >"$BACKLOG_VM_OUT/unsupported"
    exit "$BACKLOG_VM_UNSUPPORTED"
fi
if [ "$rc" -ne 0 ]; then
    echo "vm-guest: backlog-trace --mode $BACKLOG_MODE failed to start (exit $rc):"
    cat "$BACKLOG_VM_OUT/mode-probe.err"
    exit 1
fi
# Every executable runs even after one fails, so one run reports every failure.
rc=0
for t in "$@"; do
    "$t" --test-threads=1 || rc=1
done
exit $rc
