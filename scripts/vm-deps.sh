#!/usr/bin/env bash
# Installs what `cargo xtask vm-test` needs on the host: qemu-system-x86 (TCG guests),
# busybox-static (the guest's init and tools), kmod (depmod, and modprobe in the guest),
# the decompressors for kernel images and modules, and virtiofsd (the guest's root on kernels
# built without 9p: Debian's -cloud flavour). Idempotent: does nothing when all are present.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/apt.sh

log() { printf 'vm-deps: %s\n' "$*" >&2; }

missing=()
need qemu-system-x86_64:qemu-system-x86
dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
have depmod || [ -x /sbin/depmod ] || missing+=(kmod)
# Kernel images and modules come xz-, zstd- or (-cloud's image) lz4-compressed.
need xz:xz-utils zstd:zstd lz4:lz4
# virtiofsd is in no Debian suite this machine can install from: it is built from
# crates.io, against libseccomp and libcap-ng.
virtiofsd=${CARGO_HOME:-$HOME/.cargo}/bin/virtiofsd
if [ ! -x "$virtiofsd" ]; then
    dpkg -s libseccomp-dev >/dev/null 2>&1 || missing+=(libseccomp-dev)
    dpkg -s libcap-ng-dev >/dev/null 2>&1 || missing+=(libcap-ng-dev)
fi
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
if [ ! -x "$virtiofsd" ]; then
    log "building virtiofsd 1.14.0 (a few minutes)"
    cargo install --locked --quiet virtiofsd --version 1.14.0 >/dev/null
fi
log "ready: $(qemu-system-x86_64 --version | head -n1), busybox-static, kmod, xz, zstd, lz4, virtiofsd $("$virtiofsd" --version | awk '{print $NF}')"
