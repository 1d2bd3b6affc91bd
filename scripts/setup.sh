#!/usr/bin/env bash
# Installs what a fresh machine of this kind lacks to build and test backlog-trace.
# Idempotent: every step checks before it acts, so a second run costs seconds.
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }

. "$(dirname "$0")/lib/apt.sh"

# Debian packages: bpftool (leak checks in tests), nftables (scenario shaping inside
# test namespaces), iproute2 (netns/veth), procps (sysctl).
missing=()
need bpftool:bpftool nft:nftables ip:iproute2 sysctl:procps
apt_install setup -- "${missing[@]}"

# The eBPF crate is built with nightly's -Z build-std=core, which needs rust-src.
if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
    log "adding rust-src to the nightly toolchain"
    rustup component add rust-src --toolchain nightly >/dev/null
fi

# bpf-linker 0.13 must link the very LLVM that nightly rustc ships, because no
# system LLVM 22 exists on Debian 12. It looks for libLLVM.so under $LLVM_PREFIX/lib,
# so give it a prefix whose lib/ points at the sysroot's copy.
if ! bpf-linker --version >/dev/null 2>&1; then
    sysroot=$(rustc +nightly --print sysroot)
    libllvm=$(cd "$sysroot/lib" && ls libLLVM.so.* 2>/dev/null | head -n1)
    if [ -z "$libllvm" ]; then
        echo "setup: no libLLVM.so.* in $sysroot/lib; reinstall the nightly toolchain" >&2
        exit 1
    fi
    major=$(printf '%s' "$libllvm" | sed -E 's/^libLLVM\.so\.([0-9]+).*/\1/')
    # Outside target/ so `cargo clean` cannot break the installed linker (its rpath points here).
    prefix=${CARGO_HOME:-$HOME/.cargo}/bpf-linker-llvm
    mkdir -p "$prefix/lib"
    ln -sf "$sysroot/lib/$libllvm" "$prefix/lib/libLLVM.so"
    ln -sf "$sysroot/lib/$libllvm" "$prefix/lib/$libllvm"
    prefix=$(cd "$prefix" && pwd)
    log "building bpf-linker 0.13.0 against rustc's LLVM $major (about a minute)"
    LLVM_PREFIX=$prefix cargo +nightly install --locked bpf-linker --version 0.13.0 \
        --no-default-features --features "llvm-$major" >/dev/null 2>&1 || {
        echo "setup: building bpf-linker failed; run: LLVM_PREFIX=$prefix cargo +nightly install bpf-linker --version 0.13.0 --no-default-features --features llvm-$major" >&2
        exit 1
    }
fi
log "toolchain ready"
