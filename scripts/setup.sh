#!/usr/bin/env bash
# Installs what a fresh machine of this kind lacks to build and test backlog-trace.
# Idempotent: every step checks before it acts, so a second run costs seconds.
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }

need_root_pkgs=()
have() { command -v "$1" >/dev/null 2>&1; }

# Debian packages: bpftool (leak checks in tests), nftables (scenario shaping inside
# test namespaces), iproute2 (netns/veth), procps (sysctl).
for pair in bpftool:bpftool nft:nftables ip:iproute2 sysctl:procps; do
    bin=${pair%%:*}; pkg=${pair#*:}
    have "$bin" || need_root_pkgs+=("$pkg")
done
if [ ${#need_root_pkgs[@]} -gt 0 ]; then
    log "installing Debian packages: ${need_root_pkgs[*]}"
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: installing ${need_root_pkgs[*]} needs root; rerun with sudo" >&2
        exit 1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_root_pkgs[@]}" >/dev/null
fi

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
