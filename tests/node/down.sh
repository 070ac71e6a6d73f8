#!/usr/bin/env bash
# Stops the one-node cluster of tests/node/up.sh and removes every trace of it from the
# machine: processes (kubelet, kube-proxy, kube-scheduler, containerd, its shims, every
# container), mounts under STATE_DIR (container root filesystems, volumes, network
# namespaces), the kubelet's cgroups, the bridge, kube-proxy's iptables rules, the pod log
# directories in /var/log/pods, and the sysctls the kubelet and kube-proxy changed. Then the
# control plane (tests/controlplane/down.sh) and the machine lock.
#
# Idempotent; works on a half-started node. Ends by checking what is left: lists it and exits
# 3 if anything is (a process, mount, cgroup, network namespace, the bridge or a KUBE-*
# iptables chain).
#
# Usage: down.sh STATE_DIR
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
log() { printf '[node/down %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

[ $# -eq 1 ] || { log "usage: $0 STATE_DIR"; exit 2; }
if [ ! -d "$1" ]; then
    log "$1 does not exist; nothing to stop"
    exit 0
fi
STATE="$(cd "$1" && pwd)"
NODE_DIR="$STATE/node"
GRACE="${DOWN_GRACE_SECONDS:-10}"
LOCK=/run/imageindex-node.lock

if [ ! -f "$STATE/node.env" ]; then
    log "no node in $STATE; stopping the control plane only"
    "$REPO/tests/controlplane/down.sh" "$STATE"
    exit 0
fi
# shellcheck source=/dev/null
. "$STATE/node.env"

# Whether PID still runs the program NAME (pids get reused).
pid_is() { # PID NAME
    local exe
    exe="$({ tr '\0' '\n' <"/proc/$1/cmdline"; } 2>/dev/null | head -n 1)" || return 1
    [ -n "$exe" ] && [ "$(basename -- "$exe")" = "$2" ]
}
stop() { # NAME [PID-FILE] (default: NODE_DIR/NAME.pid)
    local f="${2:-$NODE_DIR/$1.pid}" pid deadline
    [ -s "$f" ] || return 0
    pid="$(cat "$f")"
    if pid_is "$pid" "$1"; then
        log "stopping $1 (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        deadline=$(($(date +%s) + GRACE))
        while pid_is "$pid" "$1"; do
            if [ "$(date +%s)" -ge "$deadline" ]; then
                log "$1 (pid $pid) still running after ${GRACE}s; SIGKILL"
                kill -KILL "$pid" 2>/dev/null || true
            fi
            sleep 0.2
        done
    fi
    rm -f "$f"
}

# The cgroup directories of the node (every v1 hierarchy, or the v2 tree), deepest first.
cgroup_dirs() {
    local h
    for h in /sys/fs/cgroup/*/ /sys/fs/cgroup/; do
        [ -d "${h}${CGROUP_ROOT#/}" ] || continue
        find "${h}${CGROUP_ROOT#/}" -depth -type d 2>/dev/null
    done
}
# Every process in the node's cgroups: the containers, their pause processes.
cgroup_pids() {
    local d
    cgroup_dirs | while read -r d; do cat "$d/cgroup.procs" 2>/dev/null || true; done | sort -u
}
# containerd's shims (they run outside the pods' cgroups): processes started with this
# node's containerd address.
shim_pids() {
    local p
    for p in /proc/[0-9]*; do
        if { tr '\0' ' ' <"$p/cmdline"; } 2>/dev/null | grep -q -- "-address $CONTAINERD_SOCK "; then
            basename "$p"
        fi
    done
}
# Mount points under STATE_DIR, deepest first.
mounts_under_state() {
    awk -v s="$STATE/" '{ p = $5; gsub(/\\040/, " ", p); if (index(p, s) == 1) print p }' /proc/self/mountinfo | sort -r -u
}

# 1. The node's daemons. The kubelet first, so it starts nothing new.
stop kubelet
stop kube-scheduler
stop kube-proxy
# 2. Every container process.
for round in 1 2 3 4 5 6 7 8 9 10; do
    pids="$(cgroup_pids)"
    [ -n "$pids" ] || break
    [ "$round" = 1 ] && log "killing $(printf '%s\n' "$pids" | wc -l) container processes"
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    sleep 0.3
done
# 3. containerd, then the shims it leaves (each waits for a task delete that will not come).
stop containerd
shims="$(shim_pids)"
if [ -n "$shims" ]; then
    log "killing containerd shims: $(printf '%s' "$shims" | tr '\n' ' ')"
    # shellcheck disable=SC2086
    kill -KILL $shims 2>/dev/null || true
    sleep 0.3
fi
# 4. kube-proxy's rules (all KUBE-* chains in the filter and nat tables).
# (Saved first: `iptables-save | grep -q` fails under pipefail when grep stops reading early.)
rules="$(iptables-save 2>/dev/null || true)"
if [ -x "${KUBE_BIN_DIR:-}/kube-proxy" ] && grep -q '^:KUBE-' <<<"$rules"; then
    log "removing kube-proxy's iptables rules (kube-proxy --cleanup)"
    "$KUBE_BIN_DIR/kube-proxy" --cleanup >"$NODE_DIR/kube-proxy-cleanup.log" 2>&1 || true
fi
# kube-proxy 1.20's --cleanup leaves its canary chains and KUBE-MARK-DROP/-MASQ: remove every
# KUBE-* chain that is left (one real node per machine, so they are this node's), the jumps
# to them first.
remove_kube_chains() {
    local table chains chain rule
    for table in filter nat mangle; do
        chains="$(iptables-save -t "$table" 2>/dev/null | sed -n 's/^:\(KUBE-[^ ]*\) .*/\1/p')"
        [ -n "$chains" ] || continue
        { iptables-save -t "$table" | grep -E '^-A [A-Z]+ .*-j KUBE-' || true; } \
            | while read -r rule; do
                # A saved rule is shell-quoted (comments): eval re-splits it into its words.
                eval "iptables -t \"\$table\" -D ${rule#-A }" 2>/dev/null || true
            done
        for chain in $chains; do iptables -t "$table" -F "$chain" 2>/dev/null || true; done
        for chain in $chains; do iptables -t "$table" -X "$chain" 2>/dev/null || true; done
    done
}
remove_kube_chains
# 5. Mounts: container root filesystems, volumes (tmpfs of secrets, projected tokens), the
#    network namespaces (netns_mounts_under_state_dir).
for round in 1 2 3; do
    mounts="$(mounts_under_state)"
    [ -n "$mounts" ] || break
    [ "$round" = 1 ] && log "unmounting $(printf '%s\n' "$mounts" | wc -l) mounts under $STATE"
    while read -r m; do
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done <<<"$mounts"
done
# 6. cgroups (empty now), the bridge (the pods' veths went with their network namespaces).
cgroup_dirs | while read -r d; do rmdir "$d" 2>/dev/null || true; done
if ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link delete "$BRIDGE" || true
fi
# 7. Files outside STATE_DIR: the pods' log directories (/var/log/pods/<ns>_<pod>_<uid>, the
#    kubelet's fixed path, and their links in /var/log/containers), CNI's result cache.
if [ -d "$NODE_DIR/kubelet/pods" ]; then
    for uid_dir in "$NODE_DIR"/kubelet/pods/*/; do
        [ -d "$uid_dir" ] || continue
        uid="$(basename "$uid_dir")"
        for d in /var/log/pods/*_"$uid"; do
            [ -d "$d" ] || continue
            find /var/log/containers -maxdepth 1 -type l -lname "$d/*" -delete 2>/dev/null || true
            rm -rf "$d"
        done
    done
fi
rm -f /var/lib/cni/results/"$CNI_NETWORK"-* 2>/dev/null || true
# The kubelet made these directories if they were not there before up.sh.
for d in /var/log/pods /var/log/containers; do
    if ! grep -qx "$d" "$NODE_DIR/preexisting" 2>/dev/null; then rmdir "$d" 2>/dev/null || true; fi
done
# 8. Sysctls back as they were.
if [ -s "$NODE_DIR/sysctls.saved" ]; then
    while read -r key value; do
        if [ "$(cat "/proc/sys/$key" 2>/dev/null)" != "$value" ]; then
            printf '%s\n' "$value" >"/proc/sys/$key" 2>/dev/null || log "cannot restore $key=$value"
        fi
    done <"$NODE_DIR/sysctls.saved"
fi
# 9. The control plane: the API server before etcd (it removes its endpoint lease on the way
#    out, and waits for etcd to do so), then the rest.
stop kube-controller-manager "$STATE/kube-controller-manager.pid"
stop kube-apiserver "$STATE/kube-apiserver.pid"
"$REPO/tests/controlplane/down.sh" "$STATE"

# What is left (there should be nothing).
left=()
p="$(cgroup_pids)"; [ -z "$p" ] || left+=("processes in $CGROUP_ROOT: $(printf '%s' "$p" | tr '\n' ' ')")
p="$(shim_pids)"; [ -z "$p" ] || left+=("containerd shims: $(printf '%s' "$p" | tr '\n' ' ')")
p="$(mounts_under_state)"; [ -z "$p" ] || left+=("mounts: $(printf '%s' "$p" | tr '\n' ' ')")
p="$(cgroup_dirs)"; [ -z "$p" ] || left+=("cgroups: $(printf '%s' "$p" | tr '\n' ' ')")
if ip link show "$BRIDGE" >/dev/null 2>&1; then left+=("bridge $BRIDGE"); fi
p="$(ip -o link show 2>/dev/null | awk -F': ' -v b="master $BRIDGE" 'index($0, b) { print $2 }')"
[ -z "$p" ] || left+=("veths on $BRIDGE: $p")
p="$(iptables-save 2>/dev/null | grep '^:KUBE-' | cut -d' ' -f1 | tr '\n' ' ' || true)"
[ -z "$p" ] || left+=("iptables chains: $p")
for f in "$NODE_DIR"/*.pid; do
    [ -e "$f" ] || continue
    pid_is "$(cat "$f")" "$(basename "$f" .pid)" && left+=("$(basename "$f" .pid) still runs")
done

if [ "$(cat "$LOCK/state" 2>/dev/null || true)" = "$STATE" ]; then
    rm -rf "$LOCK"
fi
if [ "${#left[@]}" -gt 0 ]; then
    log "LEFT BEHIND:"
    printf '  %s\n' "${left[@]}" >&2
    exit 3
fi
log "stopped; nothing left behind"
