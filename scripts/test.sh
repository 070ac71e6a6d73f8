#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine: installs what it needs (packages,
# Python tools, helm/kubectl, a real kube-apiserver, kubelet, kube-proxy and kube-scheduler
# built from Debian's source package, cached), builds the binaries the end-to-end tests run
# and the container images the real node runs (scripts/images.sh, cached by their inputs),
# then runs every test.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
scripts/setup.sh
# kubectl and helm from the tools scripts/setup.sh installs (a fresh machine may have none).
export PATH="${IMAGEINDEX_TOOLS:-/var/cache/imageindex/tools}/bin:$HOME/.cargo/bin:$PATH"
tests/controlplane/build.sh --node
cargo build --workspace --bins --locked
# The operator and indexer images for tests/tests/cluster_e2e.rs (outside the clone).
export IMAGEINDEX_IMAGES_DIR="${IMAGEINDEX_IMAGES_DIR:-/var/cache/imageindex/images/out}"
scripts/images.sh "$IMAGEINDEX_IMAGES_DIR"
# End-to-end tests start real processes under real cgroup limits; two at a time keeps
# timing-sensitive ones (kill -9 points, OOM kills) honest on a 2-core machine.
cargo test --workspace --locked -- --test-threads=2
