#!/usr/bin/env bash
# Installs what `cargo xtask vm-test` needs on the host: qemu-system-x86 (TCG guests),
# busybox-static (the guest's init and tools), kmod (depmod, and modprobe in the guest),
# and the decompressors for kernel packages. Idempotent: does nothing when all are present.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/apt.sh

log() { printf 'vm-deps: %s\n' "$*" >&2; }

missing=()
need qemu-system-x86_64:qemu-system-x86
dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
have depmod || [ -x /sbin/depmod ] || missing+=(kmod)
# Kernel images and modules come xz- or zstd-compressed.
need xz:xz-utils zstd:zstd
if [ ${#missing[@]} -gt 0 ]; then
    # qemu-system-x86 comes from <codename>-backports: the stable one would downgrade the
    # preinstalled qemu-utils (a backport) by pulling a mismatched qemu-system-common.
    # The machine's sources may lack backports: xtask (xtask/src/apt.rs, which also
    # finds the kernels' suites) writes a private sources dir and lists under
    # /var/cache/backlog-vm-deps and says which apt-get options use them.
    need_root vm-deps "${missing[@]}"
    opts=$(cargo xtask apt-backports --dir /var/cache/backlog-vm-deps)
    mapfile -t apt_opts <<<"$opts"
    apt_install vm-deps "${apt_opts[@]}" --no-install-recommends -- "${missing[@]}"
fi
log "ready: $(qemu-system-x86_64 --version | head -n1), busybox-static, kmod, xz, zstd"
