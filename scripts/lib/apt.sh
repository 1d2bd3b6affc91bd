# Shared by the install scripts (setup.sh, vm-deps.sh, bench-deps.sh,
# test-deps-prometheus.sh): `. "$(dirname "$0")/lib/apt.sh"`, then
#   missing=(); need CMD:PACKAGE ...   # adds PACKAGE when CMD is not on PATH
#   apt_install NAME [APT-OPTION...] -- PACKAGE...
# Each script stays idempotent: with nothing missing, apt_install does nothing.

# Whether a command is on PATH.
have() { command -v "$1" >/dev/null 2>&1; }

# Appends to the caller's `missing` array the package of each CMD:PACKAGE pair whose
# command is absent.
need() {
    local pair
    for pair in "$@"; do
        have "${pair%%:*}" || missing+=("${pair#*:}")
    done
}

# need_root NAME PACKAGE...: exits 1 with a hint unless this runs as root.
need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "$1: installing ${*:2} needs root; rerun with sudo" >&2
        exit 1
    fi
}

# apt_install NAME [APT-OPTION...] -- PACKAGE...: updates the package lists and
# installs the packages non-interactively, quietly, as root (exits 1 with a hint
# otherwise). NAME prefixes the messages. The options go to `apt-get install`, and
# the -o ones (a private sources dir, lists) to `apt-get update` too: update rejects a
# -t SUITE whose lists it has yet to fetch. No packages: nothing happens.
apt_install() {
    local name=$1 opts=() update_opts=()
    shift
    while [ $# -gt 0 ] && [ "$1" != -- ]; do
        if [ "$1" = -o ] && [ $# -gt 1 ]; then
            update_opts+=(-o "$2")
            opts+=(-o "$2")
            shift
        else
            opts+=("$1")
        fi
        shift
    done
    [ $# -gt 0 ] && shift
    [ $# -gt 0 ] || return 0
    need_root "$name" "$@"
    echo "$name: installing Debian packages: $*" >&2
    DEBIAN_FRONTEND=noninteractive apt-get "${update_opts[@]}" update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get "${opts[@]}" install -y -qq "$@" >/dev/null
}

# Stops (and keeps from starting at boot) a service that a package's install started:
# the tests and the bench start their own instances on loopback.
stop_packaged_service() {
    if have systemctl && systemctl is-active --quiet "$1" 2>/dev/null; then
        systemctl stop "$1" || true
        systemctl disable --quiet "$1" 2>/dev/null || true
    fi
}
