#!/usr/bin/env bash
# Stop the control plane started by up.sh: SIGTERM, then SIGKILL after 10 s.
# Idempotent: missing/stale pid files are fine.
#
# Usage: down.sh STATE_DIR
set -euo pipefail

log() { printf '[controlplane/down] %s\n' "$*" >&2; }

[ $# -eq 1 ] || { log "usage: $0 STATE_DIR"; exit 2; }
STATE="$1"
GRACE="${DOWN_GRACE_SECONDS:-10}"

if [ ! -d "$STATE" ]; then
    log "$STATE does not exist; nothing to stop"
    exit 0
fi

# Only signal a pid if it still runs the program we started (pids get reused).
pid_is() { # PID NAME
    local exe
    # Zombies and vanished processes have no (readable) cmdline.
    exe="$({ tr '\0' '\n' <"/proc/$1/cmdline"; } 2>/dev/null | head -n 1)" || return 1
    [ -n "$exe" ] && [ "$(basename -- "$exe")" = "$2" ]
}

PIDS=()
# Stop clients before etcd so they don't log connection errors on the way out.
for name in kube-controller-manager kube-apiserver etcd; do
    f="$STATE/$name.pid"
    [ -s "$f" ] || continue
    pid="$(cat "$f")"
    if pid_is "$pid" "$name"; then
        log "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        PIDS+=("$pid:$name")
    fi
done

deadline=$(($(date +%s) + GRACE))
for entry in ${PIDS[@]+"${PIDS[@]}"}; do
    pid="${entry%%:*}"
    name="${entry#*:}"
    while pid_is "$pid" "$name"; do
        if [ "$(date +%s)" -ge "$deadline" ]; then
            log "$name (pid $pid) still running after ${GRACE}s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.2
            continue
        fi
        sleep 0.2
    done
done

for name in kube-controller-manager kube-apiserver etcd; do
    rm -f "$STATE/$name.pid"
done
log "stopped"
