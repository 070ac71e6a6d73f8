#!/usr/bin/env bash
# Builds the operator and indexer container images from operator/Dockerfile and
# indexer/Dockerfile with buildah, and writes each as an image archive (docker-archive:
# `docker load`, `podman load` and `ctr images import` all accept it).
#
# Usage: scripts/images.sh OUTDIR
#   writes OUTDIR/operator.tar, OUTDIR/indexer.tar (tagged imageindex/<name>:<appVersion>)
#   and OUTDIR/images.env (their names, image IDs and sizes, KEY=value lines).
#
# No registry is reachable from CI, so the base images the Dockerfiles name are made here,
# from Debian packages, and tagged with those names in a private image store:
#   debian:bookworm-slim  mmdebstrap --variant=minbase bookworm, with the slim image's
#                         dpkg excludes (no docs, man pages or locales)
#   rust:<X.Y>-bookworm   bookworm with a C/C++ toolchain (the official image's build
#                         tools that the workspace needs) and this machine's Rust toolchain
#                         (`rustc --print sysroot`, which must be <X.Y>.*) under
#                         /usr/local/rustup, its binaries linked into /usr/local/cargo/bin
# The Dockerfiles' own steps then run as they would for a user (apt-get from
# deb.debian.org, crates from crates.io), so the images hold what a user's build makes.
#
# Caches (outside the clone, all optional: without them everything is rebuilt):
#   $IMAGEINDEX_IMAGE_CACHE (default /var/cache/imageindex/images)
#     storage/      the image store (base images, the layer cache of `buildah bud --layers`,
#                   the Dockerfiles' cargo cache mounts); base images are rebuilt when the
#                   inputs they were made from (package lists, Rust version) change
#     archives/KEY/ the archives of a build whose inputs hash to KEY: the Dockerfiles, the
#                   build context's files, the base images' IDs; reused as they are
#   IMAGEINDEX_IMAGES_REBUILD=1  ignore archives/ (the layer and cargo caches still apply)
#
# Needs root, buildah and mmdebstrap (scripts/setup.sh installs them).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { printf '[images %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ $# -eq 1 ] || die "usage: $0 OUTDIR"
[ "$(id -u)" -eq 0 ] || die "run as root (buildah's image store and mmdebstrap's chroot need it)"
for tool in buildah mmdebstrap sha256sum; do
    command -v "$tool" >/dev/null || die "$tool not found; run scripts/setup.sh (apt-get install buildah mmdebstrap)"
done
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"
cd "$here"

CACHE="${IMAGEINDEX_IMAGE_CACHE:-/var/cache/imageindex/images}"
MIRROR="${IMAGEINDEX_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${IMAGEINDEX_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
TAG="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/imageindex-operator/Chart.yaml)"
[ -n "$TAG" ] || die "no appVersion in charts/imageindex-operator/Chart.yaml"
IMAGES=(operator indexer)

mkdir -p "$CACHE/storage" "$CACHE/archives" "$CACHE/tmp"
# A private image store, so the cache is one directory and other users of buildah or podman
# on the machine are not disturbed. TMPDIR: buildah keeps RUN --mount=type=cache there.
RUNROOT="/run/imageindex-images"
B=(buildah --root "$CACHE/storage" --runroot "$RUNROOT" --storage-driver overlay)
export TMPDIR="$CACHE/tmp"
# One run at a time per store.
exec 8>"$CACHE/.lock"
if ! flock -n 8; then
    log "another scripts/images.sh holds $CACHE/.lock; waiting"
    flock 8
fi

WORK="$(mktemp -d "$CACHE/tmp/work.XXXXXX")"
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT

# --------------------------------------------------------------------------- base images

# The Rust version the Dockerfiles' builder stage names (rust:<X.Y>-bookworm).
builder_versions="$(sed -n 's/^FROM rust:\([0-9.]*\)-bookworm .*/\1/p' operator/Dockerfile indexer/Dockerfile | sort -u)"
[ "$(printf '%s\n' "$builder_versions" | wc -l)" -eq 1 ] \
    || die "the Dockerfiles name different builder images: $builder_versions"
RUST_MINOR="$builder_versions"
RUSTC_VV="$(rustc -vV 2>/dev/null)" || die "rustc not found: the builder base image takes this machine's Rust toolchain"
RUST_RELEASE="$(printf '%s\n' "$RUSTC_VV" | sed -n 's/^release: //p')"
case "$RUST_RELEASE" in
    "$RUST_MINOR" | "$RUST_MINOR".*) ;;
    *) die "the Dockerfiles build with rust:${RUST_MINOR}-bookworm but this machine's rustc is $RUST_RELEASE" ;;
esac
SYSROOT="$(rustc --print sysroot)"
HOST_TRIPLE="$(printf '%s\n' "$RUSTC_VV" | sed -n 's/^host: //p')"

SLIM_NAME=docker.io/library/debian:bookworm-slim
RUST_NAME="docker.io/library/rust:${RUST_MINOR}-bookworm"
# What the official slim image leaves out (debuerreotype's slimify).
SLIM_DPKG_OPTS=(
    --dpkgopt='path-exclude=/usr/share/doc/*'
    --dpkgopt='path-include=/usr/share/doc/*/copyright'
    --dpkgopt='path-exclude=/usr/share/man/*'
    --dpkgopt='path-exclude=/usr/share/info/*'
    --dpkgopt='path-exclude=/usr/share/locale/*'
    --dpkgopt='path-include=/usr/share/locale/locale.alias'
    --dpkgopt='path-exclude=/usr/share/lintian/*'
)
# The build tools of the official rust image's base (buildpack-deps) that building the
# workspace uses: C and C++ compilers (the opencv crate's bindings, ring), make, pkg-config,
# git and curl for cargo.
RUST_PACKAGES=ca-certificates,curl,git,gcc,g++,libc6-dev,make,pkg-config,xz-utils,procps
# debian:bookworm-slim has no CA certificates either (operator/Dockerfile installs them).
SLIM_PACKAGES=""
BASE_RECIPE_VERSION=3

# Label on each base image: the inputs it was made from.
base_key() { # NAME
    case "$1" in
        slim) printf 'v%s minbase %s %s' "$BASE_RECIPE_VERSION" "$SLIM_PACKAGES" "${SLIM_DPKG_OPTS[*]}" ;;
        rust) printf 'v%s minbase %s %s %s' "$BASE_RECIPE_VERSION" "$RUST_PACKAGES" "$RUSTC_VV" "$(local_cas_digest)" ;;
    esac | sha256sum | cut -c1-16
}
image_label() { # IMAGE LABEL
    "${B[@]}" inspect --type image --format "{{index .OCIv1.Config.Labels \"$2\"}}" "$1" 2>/dev/null || true
}

# The official images' apt settings: no package caches or downloaded .debs kept in layers
# (debuerreotype's docker-clean), no translations.
cat >"$WORK/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
printf 'Acquire::Languages "none";\n' >"$WORK/docker-no-languages"

# mmdebstrap bookworm (+ updates + security, as the official image's sources) into a tar.
debootstrap_tar() { # OUT.tar PACKAGES
    local sources="deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb $SECURITY_MIRROR bookworm-security main"
    # merged-usr: /bin, /lib, ... are links into /usr, set up without the usrmerge package
    # (which would bring perl), as the official images are. ($1 in the hook is mmdebstrap's.)
    # shellcheck disable=SC2016
    nice -n 5 mmdebstrap --quiet --variant=minbase ${2:+--include="$2"} "${SLIM_DPKG_OPTS[@]}" \
        --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
        --aptopt='APT::Install-Recommends "false"' \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
        --customize-hook="upload $WORK/docker-clean /etc/apt/apt.conf.d/docker-clean" \
        --customize-hook="upload $WORK/docker-no-languages /etc/apt/apt.conf.d/docker-no-languages" \
        bookworm "$1" - <<<"$sources"
}

# A container from a root filesystem tar with config; committed as NAME with the key label.
commit_rootfs() { # TAR NAME KEY [buildah config args...]
    local tar=$1 name=$2 key=$3 ctr mnt
    shift 3
    ctr="$("${B[@]}" from --quiet scratch)"
    mnt="$("${B[@]}" mount "$ctr")"
    tar -xf "$tar" -C "$mnt" --numeric-owner
    if [ -n "${ROOTFS_HOOK:-}" ]; then "$ROOTFS_HOOK" "$mnt"; fi
    "${B[@]}" umount "$ctr" >/dev/null
    "${B[@]}" config --label "dev.imageindex.base-key=$key" --label "dev.imageindex.made-by=scripts/images.sh" \
        --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd bash "$@" "$ctr"
    "${B[@]}" commit --quiet --rm "$ctr" "$name" >/dev/null
}

# Local CA certificates of this machine (update-ca-certificates' extra directory). Where
# HTTPS goes through a TLS-inspecting egress, cargo in the builder needs them to reach
# crates.io, as this machine's own cargo does; only the builder base gets them.
LOCAL_CAS=/usr/local/share/ca-certificates
local_cas_digest() {
    find "$LOCAL_CAS" -type f -name '*.crt' -print0 2>/dev/null | sort -z | xargs -0 -r sha256sum
}

# Copies this machine's Rust toolchain into the rust image's root (as rustup lays it out),
# and its local CA certificates.
install_toolchain() { # ROOT
    local dest="$1/usr/local/rustup/toolchains/${RUST_RELEASE}-${HOST_TRIPLE}" b
    if [ -n "$(local_cas_digest)" ]; then
        mkdir -p "$1$LOCAL_CAS"
        cp "$LOCAL_CAS"/*.crt "$1$LOCAL_CAS/"
        TMPDIR=/tmp chroot "$1" update-ca-certificates >/dev/null
    fi
    mkdir -p "$dest" "$1/usr/local/cargo/bin"
    # bin and lib only: share/ is mostly the offline documentation.
    cp -a "$SYSROOT/bin" "$SYSROOT/lib" "$dest/"
    for b in "$dest"/bin/*; do
        ln -s "../../rustup/toolchains/${RUST_RELEASE}-${HOST_TRIPLE}/bin/$(basename "$b")" "$1/usr/local/cargo/bin/"
    done
}

ensure_base() { # slim|rust
    local which=$1 name key have t0
    case "$which" in
        slim) name=$SLIM_NAME ;;
        rust) name=$RUST_NAME ;;
    esac
    key="$(base_key "$which")"
    have="$(image_label "$name" dev.imageindex.base-key)"
    if [ "$have" = "$key" ]; then
        log "base $name is cached ($key)"
        return 0
    fi
    local old
    old="$("${B[@]}" images --noheading --format '{{.ID}}' "$name" 2>/dev/null || true)"
    t0=$(date +%s)
    log "making base $name with mmdebstrap (bookworm from $MIRROR)"
    case "$which" in
        slim)
            debootstrap_tar "$WORK/slim.tar" "$SLIM_PACKAGES"
            ROOTFS_HOOK="" commit_rootfs "$WORK/slim.tar" "$name" "$key"
            ;;
        rust)
            debootstrap_tar "$WORK/rust.tar" "$RUST_PACKAGES"
            ROOTFS_HOOK=install_toolchain commit_rootfs "$WORK/rust.tar" "$name" "$key" \
                --env RUSTUP_HOME=/usr/local/rustup --env CARGO_HOME=/usr/local/cargo \
                --env PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
                --env RUST_VERSION="$RUST_RELEASE"
            ;;
    esac
    rm -f "$WORK/$which.tar"
    # The replaced base (if no cached layer still needs it).
    if [ -n "$old" ]; then "${B[@]}" rmi "$old" >/dev/null 2>&1 || true; fi
    log "base $name made in $(($(date +%s) - t0)) s"
}

ensure_base slim
ensure_base rust

# --------------------------------------------------------------------------- the images

# What a build depends on: the Dockerfiles, every file of the build context that
# .dockerignore lets in (as the Dockerfiles COPY them), the base images, the tag.
inputs_key() {
    {
        printf 'tag %s\n' "$TAG"
        printf 'base %s\n' "$("${B[@]}" images --noheading --no-trunc --format '{{.ID}}' "$SLIM_NAME")"
        printf 'base %s\n' "$("${B[@]}" images --noheading --no-trunc --format '{{.ID}}' "$RUST_NAME")"
        find Cargo.toml Cargo.lock .cargo .dockerignore crds indexer operator tests \
            -name target -prune -o -type f -print0 | sort -z | xargs -0 sha256sum
    } | sha256sum | cut -c1-24
}
KEY="$(inputs_key)"
KEPT="$CACHE/archives/$KEY"

if [ "${IMAGEINDEX_IMAGES_REBUILD:-0}" != 1 ] && [ -s "$KEPT/images.env" ]; then
    log "inputs unchanged ($KEY): the archives built before, from $KEPT"
    for name in "${IMAGES[@]}"; do
        # Already the same file (a hard link from the last run): mv would refuse it.
        [ "$OUT/$name.tar" -ef "$KEPT/$name.tar" ] && continue
        # A hard link when on the same filesystem (the archives are never modified).
        ln -f "$KEPT/$name.tar" "$OUT/$name.tar.tmp" 2>/dev/null || cp "$KEPT/$name.tar" "$OUT/$name.tar.tmp"
        mv "$OUT/$name.tar.tmp" "$OUT/$name.tar"
    done
    cp "$KEPT/images.env" "$OUT/images.env"
    cat "$OUT/images.env" >&2
    exit 0
fi

# Checks an image as the cluster will run it: the configured user is not root and runs the
# binary by its name from PATH (the pods' `command: [indexer]`), with every library it needs.
check_image() { # NAME REF
    local name=$1 ref=$2 user ctr mnt
    user="$("${B[@]}" inspect --type image --format '{{.OCIv1.Config.User}}' "$ref")"
    case "$user" in
        "" | 0 | 0:* | root | root:*) die "$ref runs as root (USER ${user:-unset})" ;;
    esac
    ctr="$("${B[@]}" from --quiet --pull=never "$ref")"
    mnt="$("${B[@]}" mount "$ctr")"
    if ! chroot --userspec="$user" "$mnt" /usr/bin/env PATH=/usr/local/bin:/usr/bin:/bin "$name" --version >&2; then
        "${B[@]}" umount "$ctr" >/dev/null; "${B[@]}" rm "$ctr" >/dev/null
        die "$ref: \`$name --version\` as $user failed"
    fi
    "${B[@]}" umount "$ctr" >/dev/null
    "${B[@]}" rm "$ctr" >/dev/null
}

STAGE="$WORK/out"
mkdir -p "$STAGE"
{
    printf '# written by scripts/images.sh (inputs %s)\n' "$KEY"
    printf 'IMAGE_TAG=%s\n' "$TAG"
} >"$STAGE/images.env"
for name in "${IMAGES[@]}"; do
    ref="docker.io/imageindex/${name}:${TAG}"
    t0=$(date +%s)
    if [ "$name" = "${IMAGES[0]}" ]; then
        log "building $ref from $name/Dockerfile (its builder stage compiles both binaries in release; without cargo's cache: many minutes on 2 cores)"
    else
        log "building $ref from $name/Dockerfile (the same builder stage: from the layer cache)"
    fi
    # --network host: the build's apt-get and cargo reach deb.debian.org and crates.io
    # directly (no bridge network or IP forwarding needed on the build machine).
    nice -n 5 "${B[@]}" bud --layers --pull=never --network host \
        -f "$name/Dockerfile" -t "$ref" . >&2
    check_image "$name" "$ref"
    "${B[@]}" push --quiet "$ref" "docker-archive:$STAGE/$name.tar:imageindex/${name}:${TAG}" >&2
    id="$("${B[@]}" images --noheading --no-trunc --format '{{.ID}}' "$ref")"
    size="$(stat -c %s "$STAGE/$name.tar")"
    upper="$(printf '%s' "$name" | tr '[:lower:]' '[:upper:]')"
    {
        printf '%s_IMAGE=imageindex/%s:%s\n' "$upper" "$name" "$TAG"
        printf '%s_ARCHIVE=%s.tar\n' "$upper" "$name"
        printf '%s_IMAGE_ID=%s\n' "$upper" "$id"
        printf '%s_ARCHIVE_BYTES=%s\n' "$upper" "$size"
    } >>"$STAGE/images.env"
    log "$ref built in $(($(date +%s) - t0)) s: $(numfmt --to=iec "$size")B archive"
done

# Keep them for the next run with the same inputs (only the latest few).
mkdir -p "$KEPT.tmp"
cp "$STAGE"/*.tar "$STAGE/images.env" "$KEPT.tmp/"
rm -rf "$KEPT"
mv "$KEPT.tmp" "$KEPT"
# shellcheck disable=SC2012 # names are hex keys
ls -1t "$CACHE/archives" | tail -n +4 | while read -r old; do rm -rf "${CACHE:?}/archives/$old"; done

for name in "${IMAGES[@]}"; do
    mv "$STAGE/$name.tar" "$OUT/$name.tar"
done
mv "$STAGE/images.env" "$OUT/images.env"
cat "$OUT/images.env" >&2
