#!/usr/bin/env bash
# Build kube-apiserver and kube-controller-manager v1.20.2 from Debian's
# kubernetes source package and cache them outside the repository.
#
# Usage: build.sh [--node]
#   --node  also the node's binaries, from the same source: kubelet, kube-scheduler,
#           kube-proxy and the pause container's `pause` (build/pause/linux/pause.c,
#           compiled with gcc -static). tests/node/ runs them.
#
# Idempotent: if every binary asked for is already in the cache, only the (cheap)
# runtime-package check runs and the script exits. Only the missing binaries are built.
#
# Environment:
#   IMAGEINDEX_KUBE_CACHE   cache dir (default /var/cache/imageindex/kube-v1.20.2);
#                           binaries end up in $IMAGEINDEX_KUBE_CACHE/bin/
#   IMAGEINDEX_KUBE_WORKDIR parent dir for the temporary source tree (default /var/tmp)
#   IMAGEINDEX_KUBE_KEEP_SRC=1  keep the source tree after a successful build
set -euo pipefail

KUBE_VERSION=v1.20.2
DEB_SRC_VERSION='1.20.5+really1.20.2-1.1+deb12u1'
CACHE_DIR="${IMAGEINDEX_KUBE_CACHE:-/var/cache/imageindex/kube-${KUBE_VERSION}}"
BIN_DIR="${CACHE_DIR}/bin"
WORK_PARENT="${IMAGEINDEX_KUBE_WORKDIR:-/var/tmp}"
BINARIES=(kube-apiserver kube-controller-manager)
NODE_BINARIES=(kubelet kube-scheduler kube-proxy)
case "${1:-}" in
    --node) WANT_NODE=1 ;;
    "") WANT_NODE=0 ;;
    *) printf 'usage: %s [--node]\n' "$0" >&2; exit 2 ;;
esac
GO_BINARIES=("${BINARIES[@]}")
if [ "$WANT_NODE" = 1 ]; then
    GO_BINARIES+=("${NODE_BINARIES[@]}")
fi
# Packages needed at run time by up.sh / down.sh.
RUNTIME_PKGS=(etcd-server openssl curl ca-certificates)
# Packages needed only to build.
BUILD_PKGS=(dpkg-dev rsync make golang-1.19-go golang-github-modern-go-reflect2-dev)
# To build the pause binary statically (libc6-dev has glibc's static libraries).
NODE_BUILD_PKGS=(gcc libc6-dev)
GO_BIN=/usr/lib/go-1.19/bin
REFLECT2_SYSTEM=/usr/share/gocode/src/github.com/modern-go/reflect2

export DEBIAN_FRONTEND=noninteractive
APT_GET=(apt-get -y -q -o DPkg::Lock::Timeout=600)

log() { printf '[controlplane/build %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing_pkgs() {
    local p
    for p in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
            printf '%s\n' "$p"
        fi
    done
}

APT_UPDATED=0
apt_update_once() {
    if [ "$APT_UPDATED" -eq 0 ]; then
        log "apt-get update"
        as_root "${APT_GET[@]}" update
        APT_UPDATED=1
    fi
}

ensure_pkgs() {
    local missing=()
    mapfile -t missing < <(missing_pkgs "$@")
    if [ "${#missing[@]}" -eq 0 ]; then
        return 0
    fi
    log "installing Debian packages: ${missing[*]}"
    apt_update_once
    as_root "${APT_GET[@]}" install --no-install-recommends "${missing[@]}"
}

# The Go binaries asked for that are not cached yet, one per line.
missing_binaries() {
    local b
    for b in "${GO_BINARIES[@]}"; do
        [ -x "${BIN_DIR}/${b}" ] || printf '%s\n' "$b"
    done
}
have_binaries() {
    [ -z "$(missing_binaries)" ] || return 1
    [ "$WANT_NODE" = 0 ] || [ -x "${BIN_DIR}/pause" ]
}

# Add a deb-src copy of the deb822 Debian sources (idempotent).
enable_deb_src() {
    local src=/etc/apt/sources.list.d/debian.sources
    local dst=/etc/apt/sources.list.d/debian-src.sources
    if [ -f "$dst" ]; then
        return 0
    fi
    if grep -rqsE '^(Types:.*deb-src|deb-src )' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        return 0
    fi
    [ -f "$src" ] || die "$src not found; enable deb-src for Debian bookworm by hand"
    log "enabling deb-src in $dst"
    sed -E 's/^Types:.*/Types: deb-src/' "$src" | as_root tee "$dst.tmp" >/dev/null
    as_root mv "$dst.tmp" "$dst"
    APT_UPDATED=0
}

# ---------------------------------------------------------------------------

ensure_pkgs "${RUNTIME_PKGS[@]}"

if have_binaries; then
    log "cached binaries present in ${BIN_DIR}; nothing to build"
    exit 0
fi

as_root mkdir -p "$BIN_DIR"

# Serialise concurrent builds into the same cache.
exec 9>"${CACHE_DIR}/.build.lock"
if ! flock -n 9; then
    log "another build holds ${CACHE_DIR}/.build.lock; waiting for it"
    flock 9
fi
if have_binaries; then
    log "binaries were built by a concurrent run; nothing to do"
    exit 0
fi

START=$(date +%s)

enable_deb_src
apt_update_once
ensure_pkgs "${BUILD_PKGS[@]}"
if [ "$WANT_NODE" = 1 ]; then
    ensure_pkgs "${NODE_BUILD_PKGS[@]}"
fi
mapfile -t TO_BUILD < <(missing_binaries)
[ -x "${GO_BIN}/go" ] || die "${GO_BIN}/go missing after installing golang-1.19-go"
[ -d "$REFLECT2_SYSTEM" ] || die "$REFLECT2_SYSTEM missing after installing golang-github-modern-go-reflect2-dev"

mkdir -p "$WORK_PARENT"
WORK="$(mktemp -d "${WORK_PARENT}/imageindex-kube-build.XXXXXX")"
# (apt-get source warns "Download is performed unsandboxed as root" here: harmless.)
log "work dir: $WORK"
on_exit() {
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        log "build FAILED (exit $rc); source tree kept for inspection in $WORK"
        rm -rf "${BIN_DIR}.tmp."* 2>/dev/null || true
    fi
}
trap on_exit EXIT

log "fetching source: kubernetes=${DEB_SRC_VERSION}"
(cd "$WORK" && apt-get source -q "kubernetes=${DEB_SRC_VERSION}")

SRC=""
for d in "$WORK"/kubernetes-*/; do
    if [ -f "${d}Makefile" ] || [ -e "${d}build/root/Makefile" ]; then
        SRC="${d%/}"
        break
    fi
done
[ -n "$SRC" ] || die "unpacked source tree not found in $WORK"
log "source tree: $SRC"

# The vendored reflect2 (v1.0.1) segfaults under Go 1.19 (e.g. when a custom
# resource is created); use Debian's Go-1.19-compatible copy instead.
VENDOR_R2="$SRC/vendor/github.com/modern-go/reflect2"
[ -d "$VENDOR_R2" ] || die "expected vendored reflect2 at $VENDOR_R2"
log "replacing vendored reflect2 with $REFLECT2_SYSTEM"
rm -rf "$VENDOR_R2"
mkdir -p "$VENDOR_R2"
# -L: Debian's gocode tree may contain symlinks; copy the files themselves.
cp -rL "$REFLECT2_SYSTEM"/. "$VENDOR_R2"/
rm -f "$VENDOR_R2/go.mod" "$VENDOR_R2/go.sum"
find "$VENDOR_R2" -name '*_test.go' -delete

TMP_BIN="$(mktemp -d "${BIN_DIR}.tmp.XXXXXX")"
if [ "${#TO_BUILD[@]}" -gt 0 ]; then
    log "building ${TO_BUILD[*]} (takes several minutes on 2 cores)"
    WHAT=""
    for b in "${TO_BUILD[@]}"; do WHAT="${WHAT:+$WHAT }cmd/$b"; done
    (
        cd "$SRC"
        export PATH="${GO_BIN}:${PATH}"
        export CGO_ENABLED=0 KUBE_GIT_VERSION="$KUBE_VERSION" KUBE_GIT_TREE_STATE=clean
        export GOCACHE="$WORK/gocache" GOFLAGS="${GOFLAGS:-}"
        go version
        nice -n 10 make WHAT="$WHAT"
    )
    OUT="$SRC/_output/local/bin/linux/amd64"
    [ -d "$OUT" ] || OUT="$SRC/_output/bin"
    for b in "${TO_BUILD[@]}"; do
        [ -x "$OUT/$b" ] || die "build finished but $OUT/$b is missing"
        cp "$OUT/$b" "$TMP_BIN/$b"
        chmod 0755 "$TMP_BIN/$b"
        "$TMP_BIN/$b" --version
    done
fi
if [ "$WANT_NODE" = 1 ] && [ ! -x "${BIN_DIR}/pause" ]; then
    # The pause container's process, as upstream's build/pause/Makefile builds it.
    PAUSE_C="$SRC/build/pause/linux/pause.c"
    [ -f "$PAUSE_C" ] || die "$PAUSE_C not found in the source package"
    log "compiling $PAUSE_C (gcc -static)"
    gcc -Os -Wall -Werror -static -DVERSION="${KUBE_VERSION}-imageindex" -o "$TMP_BIN/pause" "$PAUSE_C"
    strip "$TMP_BIN/pause"
fi
# Move each binary into place with rename(2) (same filesystem: atomic).
for f in "$TMP_BIN"/*; do
    [ -e "$f" ] || continue
    mv -f "$f" "$BIN_DIR/$(basename "$f")"
done
rmdir "$TMP_BIN"

END=$(date +%s)
log "built ${TO_BUILD[*]}$([ "$WANT_NODE" = 1 ] && echo ' pause') in $((END - START)) s; binaries in $BIN_DIR"

if [ "${IMAGEINDEX_KUBE_KEEP_SRC:-0}" = 1 ]; then
    log "keeping source tree in $WORK"
else
    log "removing source tree $WORK"
    rm -rf "$WORK"
fi
