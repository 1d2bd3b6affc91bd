#!/usr/bin/env bash
# Installs what `cargo xtask vm-test` needs on the host: qemu-system-x86 (TCG guests),
# busybox-static (the guest's init and tools), kmod (depmod, and modprobe in the guest)
# and the decompressors for kernel packages. Idempotent: does nothing when all are present.
set -euo pipefail

log() { printf 'vm-deps: %s\n' "$*" >&2; }
have() { command -v "$1" >/dev/null 2>&1; }

missing=()
have qemu-system-x86_64 || missing+=(qemu-system-x86)
dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
have depmod || [ -x /sbin/depmod ] || missing+=(kmod)
# Kernel images and modules come xz- or zstd-compressed.
have xz || missing+=(xz-utils)
have zstd || missing+=(zstd)
if [ ${#missing[@]} -eq 0 ]; then
    log "qemu-system-x86_64, busybox-static, kmod, xz and zstd present"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "vm-deps: installing ${missing[*]} needs root; rerun with sudo" >&2
    exit 1
fi

# qemu-system-x86 comes from <codename>-backports: the stable one would downgrade the
# preinstalled qemu-utils (a backport) by pulling a mismatched qemu-system-common.
# The machine's sources may lack backports, so apt runs with a private sources list
# (the machine's Debian entries plus backports on the same mirror) and private lists,
# leaving /etc/apt and /var/lib/apt/lists untouched.
. /etc/os-release
codename=${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}
state=/var/cache/backlog-vm-deps
mkdir -p "$state/lists/partial" "$state/sources.list.d"
rm -f "$state/sources.list.d/"*
cp /etc/apt/sources.list.d/*.sources "$state/sources.list.d/" 2>/dev/null || true
cp /etc/apt/sources.list.d/*.list "$state/sources.list.d/" 2>/dev/null || true
[ -f /etc/apt/sources.list ] && cp /etc/apt/sources.list "$state/sources.list.d/base.list"

# The URI that serves the plain codename suite is the Debian mirror in use.
mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk -v c="$codename" '
    /^$/ { if (hit && uri) { print uri; exit } hit=0; uri="" }
    /^URIs:/ { uri=$2 }
    /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == c) hit=1 }
    END { if (hit && uri) print uri }' | head -n1)
if [ -z "$mirror" ]; then
    mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
        awk -v c="$codename" '$1 == "deb" { sub(/\[[^]]*\] */, ""); if ($3 == c) { print $2; exit } }')
fi
if [ -z "$mirror" ]; then
    echo "vm-deps: no apt source serves '$codename'; add the Debian mirror to /etc/apt/sources.list.d" >&2
    exit 1
fi
cat >"$state/sources.list.d/zz-backports.sources" <<EOF
Types: deb
URIs: $mirror
Suites: $codename-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF

apt_opts=(-o "Dir::Etc::SourceList=/dev/null"
          -o "Dir::Etc::SourceParts=$state/sources.list.d"
          -o "Dir::State::Lists=$state/lists")
log "installing ${missing[*]} (qemu from $codename-backports)"
DEBIAN_FRONTEND=noninteractive apt-get "${apt_opts[@]}" update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get "${apt_opts[@]}" install -y -qq --no-install-recommends \
    -t "$codename-backports" "${missing[@]}" >/dev/null
log "ready: $(qemu-system-x86_64 --version | head -n1)"
