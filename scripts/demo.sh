#!/usr/bin/env bash
# The main job on the bundled sample, from a fresh Debian 12 machine: install what is
# needed, build, then run local mode — the operator's policy with the build in a real
# cgroup memory limit — and serve the finished index, printing an example query.
#   scripts/demo.sh                 # serve on 127.0.0.1:8080 until Ctrl-C
#   ADDR=0.0.0.0:9000 scripts/demo.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked -p indexer -p operator
state="${STATE_DIR:-$here/.imageindex-demo}"
exec "${CARGO_TARGET_DIR:-target}/release/operator" local -f samples/imageindex.yaml \
    --state-dir "$state" --status-out "$state/status.json" \
    --serve "${ADDR:-127.0.0.1:8080}"
