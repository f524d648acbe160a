#!/bin/sh
# Build the Go programs memberguard's tests run, in module mode, with the
# versions pinned in the go.mod/go.sum beside each source:
#
#   module memberguard.test/lab (this directory; go-dqlite v1.11.5):
#     build/bin/memberguard-dqlite-node   <- testnode
#     build/bin/memberguard-dqlite-bench  <- gobench
#   module memberguard.test/lab/microcluster (canonical/microcluster v3's own
#   example daemon and CLI, as go.mod's tool directives name them; go-dqlite
#   v3, as microcluster pins it):
#     build/bin/microd, build/bin/microctl
#     build/bin/memberguard-microcluster-bench  <- mcbench
#
# usage: build.sh [--force] [dqlite] [microcluster]   (no name: both groups)
#
# Works from any cwd. A binary is rebuilt only when it is missing or older than
# its sources, its module's go.mod/go.sum or this script; --force rebuilds.
# Everything links Debian's libdqlite 1.11.1 and libsqlite3 (-tags libsqlite3:
# one SQLite in the process, the one libdqlite was built with). The modules
# come from the module proxy (or GOMODCACHE, so GOPROXY=off works once they
# are there); go.sum is never rewritten (-mod=readonly).
# Environment: GO (default /usr/local/go/bin/go, else go on PATH), GOCACHE
# (default: Go's own, outside the checkout, so that a fresh clone on the same
# machine builds warm), CC (default gcc).
set -eu

here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
root=$(CDPATH= cd -- "$here/../../.." && pwd)
bin="$root/build/bin"
me="$here/build.sh"

die() { echo "build.sh: $*" >&2; exit 1; }

force=0
groups=
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        dqlite | microcluster) groups="$groups $arg" ;;
        *) echo "usage: $0 [--force] [dqlite] [microcluster]" >&2; exit 2 ;;
    esac
done
groups=${groups:-dqlite microcluster}

# Debian's golang-go can put an older go first on PATH: the toolchain at
# /usr/local/go wins unless GO says otherwise.
if [ -z "${GO:-}" ]; then
    if [ -x /usr/local/go/bin/go ]; then GO=/usr/local/go/bin/go; else GO=go; fi
fi
command -v "$GO" >/dev/null 2>&1 ||
    die "no Go toolchain at '$GO' (GO, else /usr/local/go/bin/go, else go on PATH); Go >= 1.22 is required"

# go_at_least GOVERSION MIN: is goX.Y[.Z] at least MIN (X.Y[.Z])?
go_at_least() {
    echo "${1#go}" "$2" | awk '{
        split($1, have, /[^0-9]+/); split($2, want, ".")
        for (i = 1; i <= 3; i++) {
            if (have[i] + 0 > want[i] + 0) exit 0
            if (have[i] + 0 < want[i] + 0) exit 1
        }
        exit 0 }'
}
goversion=$("$GO" env GOVERSION 2>/dev/null) || goversion=unknown
go_at_least "$goversion" 1.22 ||
    die "$GO is $goversion; Go >= 1.22 is required (the toolchain at /usr/local/go/bin/go, or set GO)"

command -v "${CC:-gcc}" >/dev/null 2>&1 || die "C compiler '${CC:-gcc}' not found (cgo is required)"
[ -f /usr/include/dqlite.h ] && [ -f /usr/include/sqlite3.h ] ||
    die "libdqlite or libsqlite3 headers not found; install: apt-get install libdqlite-dev libsqlite3-dev"

# The go.mod files name the toolchain; GOTOOLCHAIN=local keeps the go command
# from fetching another one. go-dqlite's cgo directive carries "-Wl,-z,now",
# which cgo rejects unless explicitly allowed.
export GOTOOLCHAIN=local GOFLAGS="-mod=readonly -trimpath -buildvcs=false" CGO_ENABLED=1
export GOCACHE="${GOCACHE:-$("$GO" env GOCACHE)}"
export CGO_LDFLAGS_ALLOW="${CGO_LDFLAGS_ALLOW:+$CGO_LDFLAGS_ALLOW|}-Wl,-z,now"

mkdir -p "$bin"

# stale OUTPUT PATH...: should OUTPUT be (re)built?
stale() {
    out=$1
    shift
    [ "$force" -eq 1 ] || [ ! -x "$out" ] ||
        [ -n "$(find "$@" -newer "$out" -print 2>/dev/null | head -n 1)" ]
}

# build MODULE_DIR PACKAGE OUTPUT [go build flags...]
build() {
    dir=$1 pkg=$2 out="$bin/$3"
    shift 3
    echo "build.sh: building $(basename "$out")"
    # Build to a temporary name and rename, so a failed build never leaves
    # a half-written binary that looks up to date.
    (cd "$dir" && "$GO" build -tags libsqlite3 "$@" -o "$out.tmp.$$" "$pkg") || {
        rm -f "$out.tmp.$$"
        die "go build failed for $pkg"
    }
    mv -f "$out.tmp.$$" "$out"
}

build_dqlite() {
    for pair in testnode:memberguard-dqlite-node gobench:memberguard-dqlite-bench; do
        src=${pair%%:*} name=${pair#*:}
        if stale "$bin/$name" "$here/$src" "$here/go.mod" "$here/go.sum" "$me"; then
            build "$here" "./$src" "$name"
        else
            echo "build.sh: $name is up to date"
        fi
    done
}

# microcluster v3 builds on go-dqlite v3, whose bindings want libdqlite >= 1.17;
# Debian has 1.11.1. microcluster/include/dqlite.h declares, and
# microcluster/dqlite_compat.c defines, what 1.11.1 lacks (see that file).
# A subshell, so its cgo flags stay with microd and microctl.
build_microcluster() (
    mc="$here/microcluster"
    need=$(sed -n 's/^go \([0-9.]*\).*/\1/p' "$mc/go.mod")
    go_at_least "$goversion" "$need" ||
        die "$GO is $goversion; microcluster's module needs Go >= $need (its go.mod's go line)"
    inputs="$mc/go.mod $mc/go.sum $mc/dqlite_compat.c $mc/include/dqlite.h $me"
    bench=memberguard-microcluster-bench
    # shellcheck disable=SC2086  # inputs is a list of paths without spaces
    if stale "$bin/microd" $inputs || stale "$bin/microctl" $inputs; then daemons=1; else daemons=0; fi
    # shellcheck disable=SC2086
    if stale "$bin/$bench" "$mc/mcbench" $inputs; then benchmark=1; else benchmark=0; fi
    [ "$daemons" -eq 1 ] || echo "build.sh: microd and microctl are up to date"
    [ "$benchmark" -eq 1 ] || echo "build.sh: $bench is up to date"
    [ "$daemons" -eq 1 ] || [ "$benchmark" -eq 1 ] || return 0
    compat="$root/build/go-compat"
    mkdir -p "$compat"
    "${CC:-gcc}" -O2 -g -Wall -Wextra -Werror -I"$mc/include" -c "$mc/dqlite_compat.c" -o "$compat/dqlite_compat.o" ||
        die "compiling microcluster/dqlite_compat.c failed"
    rm -f "$compat/libmemberguard-dqlite-compat.a"
    ar rcs "$compat/libmemberguard-dqlite-compat.a" "$compat/dqlite_compat.o"
    # An archive, not the object: cgo repeats CGO_LDFLAGS for every cgo
    # package, and an archive's member is linked once however often it is
    # named. It precedes go-dqlite's -ldqlite, so its definitions win.
    export CGO_CFLAGS="-O2 -g -I$mc/include"
    export CGO_LDFLAGS="-O2 -g $compat/libmemberguard-dqlite-compat.a"
    if [ "$daemons" -eq 1 ]; then
        # microd refuses to start without a version; report the pinned module's.
        version=$(cd "$mc" && "$GO" list -m -f '{{.Version}}' github.com/canonical/microcluster/v3) ||
            die "cannot read microcluster's version from $mc/go.mod"
        for cmd in microd microctl; do
            build "$mc" "github.com/canonical/microcluster/v3/example/cmd/$cmd" "$cmd" \
                -ldflags "-X github.com/canonical/microcluster/v3/example/version.version=$version"
        done
    fi
    [ "$benchmark" -eq 0 ] || build "$mc" ./mcbench "$bench"
)

for group in $groups; do
    "build_$group"
done
