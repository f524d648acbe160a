#!/bin/sh
# Build memberguard's Go dqlite helpers, offline, against Debian's go-dqlite
# sources (golang-github-canonical-go-dqlite-dev, GOPATH mode, cgo):
#
#   build/bin/memberguard-dqlite-node   <- coordinator/dqlite/testnode
#   build/bin/memberguard-dqlite-bench  <- coordinator/dqlite/gobench
#
# Works from any cwd. A binary is rebuilt only when it is missing or older than
# one of its sources (or this script); use --force to rebuild anyway.
# Environment: GO (go binary, default "go"), GOCODE (GOPATH root holding the
# Debian sources, default /usr/share/gocode), GOCACHE (default build/go-cache).
set -eu

here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
root=$(CDPATH= cd -- "$here/../.." && pwd)
bin="$root/build/bin"
GO=${GO:-go}
GOCODE=${GOCODE:-/usr/share/gocode}

force=0
case "${1:-}" in
    --force) force=1 ;;
    "") ;;
    *) echo "usage: $0 [--force]" >&2; exit 2 ;;
esac

die() { echo "build-go.sh: $*" >&2; exit 1; }

command -v "$GO" >/dev/null 2>&1 ||
    die "Go toolchain not found ('$GO'); install it with: apt-get install golang-go"
for pkg in app client driver; do
    [ -d "$GOCODE/src/github.com/canonical/go-dqlite/$pkg" ] ||
        die "go-dqlite sources not found under $GOCODE/src/github.com/canonical/go-dqlite; install: apt-get install golang-github-canonical-go-dqlite-dev libdqlite-dev libsqlite3-dev"
done
command -v "${CC:-gcc}" >/dev/null 2>&1 || die "C compiler '${CC:-gcc}' not found (cgo is required)"

mkdir -p "$bin"

# GOPATH mode, no module proxy. go-dqlite's cgo directive carries
# "-Wl,-z,now", which cgo rejects unless explicitly allowed.
export GO111MODULE=off GOPROXY=off GOFLAGS= CGO_ENABLED=1
export GOPATH="$GOCODE"
export GOCACHE="${GOCACHE:-$root/build/go-cache}"
export CGO_LDFLAGS_ALLOW="${CGO_LDFLAGS_ALLOW:+$CGO_LDFLAGS_ALLOW|}-Wl,-z,now"

# build SRC_DIR OUTPUT
build() {
    src="$here/$1"
    out="$bin/$2"
    if [ "$force" -eq 0 ] && [ -x "$out" ] &&
        [ -z "$(find "$src" "$here/build-go.sh" -newer "$out" -print 2>/dev/null | head -n 1)" ]; then
        echo "build-go.sh: $2 is up to date"
        return 0
    fi
    echo "build-go.sh: building $2"
    # Build to a temporary name and rename, so a failed build never leaves
    # a half-written binary that looks up to date.
    (cd "$src" && "$GO" build -trimpath -o "$out.tmp.$$" .) || {
        rm -f "$out.tmp.$$"
        die "go build failed for $1"
    }
    mv -f "$out.tmp.$$" "$out"
}

build testnode memberguard-dqlite-node
build gobench memberguard-dqlite-bench
