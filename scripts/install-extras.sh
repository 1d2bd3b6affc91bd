#!/usr/bin/env bash
# Installs backlog-trace's shell completions (bash, zsh, fish) and man pages, which
# the binary generates from its own clap definitions, under PREFIX (default
# /usr/local): share/bash-completion/completions, share/zsh/site-functions,
# share/fish/vendor_completions.d and share/man/man1.
#   scripts/install-extras.sh BIN [PREFIX]
# Idempotent: a file is written only when its content changed, and each one
# written is named on stderr.
set -euo pipefail

bin=${1:?usage: install-extras.sh BIN [PREFIX]}
prefix=${2:-/usr/local}
share=$prefix/share
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

"$bin" completions bash >"$tmp/backlog-trace.bash"
"$bin" completions zsh >"$tmp/_backlog-trace"
"$bin" completions fish >"$tmp/backlog-trace.fish"
mkdir "$tmp/man"
"$bin" man "$tmp/man" >/dev/null

place() {
    if ! cmp -s "$1" "$2"; then
        install -D -m 0644 "$1" "$2"
        printf 'install-extras: installed %s\n' "$2" >&2
    fi
}
place "$tmp/backlog-trace.bash" "$share/bash-completion/completions/backlog-trace"
place "$tmp/_backlog-trace" "$share/zsh/site-functions/_backlog-trace"
place "$tmp/backlog-trace.fish" "$share/fish/vendor_completions.d/backlog-trace.fish"
for page in "$tmp"/man/*.1; do
    place "$page" "$share/man/man1/$(basename "$page")"
done
