#!/usr/bin/env bash
# Fetches the openly licensed photos that samples/make_photo_catalogue.py cuts its benchmark
# catalogue from, into one directory (default /var/cache/imageindex/photo-sources), and the
# Python packages the generator runs on into a venv beside it. Idempotent: a package already
# unpacked at its pinned version is left alone.
#
# The photos come from packages only, through their ordinary clients:
#   * Debian bookworm packages: `apt-get download` + `dpkg-deb -x` into DEST/deb/<package>/
#     (unpacked, not installed: nothing on the system changes and no dependency is pulled in);
#   * the scikit-image wheel from PyPI: `pip download --no-deps` into DEST/pypi/ (its
#     skimage/data/ photos are read straight from the wheel).
# Every photo's licence is read from the package's own copyright/credits files at generation
# time and written into the catalogue's manifest.
#
# Usage: samples/install_photo_sources.sh [DEST]
#   PHOTOS_VENV  the generator's venv (default /var/cache/imageindex/photos-venv)
#   PYTHON       interpreter that creates it (default python3)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEST="${1:-/var/cache/imageindex/photo-sources}"
VENV="${PHOTOS_VENV:-/var/cache/imageindex/photos-venv}"
PYTHON="${PYTHON:-python3}"

log() { printf '[photo-sources] %s\n' "$*" >&2; }

# package=version, as in Debian 12 (bookworm). Keep in sync with DEBIAN_PACKAGES in
# samples/photo_sources.py.
debs=(
    plasma-workspace-wallpapers=4:5.27.5-2
    mate-backgrounds=1.26.0-1
    lomiri-wallpapers-16.04=20.04.0-2
    lomiri-wallpapers-20.04=20.04.0-2
    palapeli-data=4:22.12.3-1
    gcompris-qt-data=3.1-2
    opencv-doc=4.6.0+dfsg-12
    stellarium-data=0.22.2-1
    xfdesktop4-data=4.18.1-1
    libelementary-data=1.26.3-1
)
wheels=(scikit-image==0.26.0)

mkdir -p "$DEST/deb" "$DEST/pypi"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
updated=0

for spec in "${debs[@]}"; do
    pkg="${spec%%=*}"
    ver="${spec#*=}"
    if [ "$(cat "$DEST/deb/$pkg.version" 2>/dev/null)" = "$ver" ]; then
        continue
    fi
    log "fetching $pkg $ver"
    if ! (cd "$tmp" && apt-get download -q "$pkg=$ver" >/dev/null 2>&1); then
        if [ "$updated" = 0 ]; then
            log "apt-get update"
            apt-get update -qq
            updated=1
        fi
        (cd "$tmp" && apt-get download -q "$pkg=$ver" >/dev/null)
    fi
    rm -rf "$DEST/deb/$pkg"
    dpkg-deb -x "$tmp/${pkg}_"*.deb "$DEST/deb/$pkg"
    rm -f "$tmp/${pkg}_"*.deb
    echo "$ver" >"$DEST/deb/$pkg.version"
done

for spec in "${wheels[@]}"; do
    name="${spec%%==*}"
    ver="${spec#*==}"
    if ls "$DEST/pypi/${name//-/_}-$ver-"*.whl >/dev/null 2>&1; then
        continue
    fi
    log "fetching the $name $ver wheel"
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$DEST/pypi" "$spec"
done

if ! "$VENV/bin/python" -c "import cv2, numpy, PIL" 2>/dev/null; then
    log "creating the generator's venv in $VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q -r "$here/requirements-photos.txt"
fi
log "ready: sources in $DEST, generator venv in $VENV"
