#!/usr/bin/env bash
# A one-node Kubernetes v1.20.2 cluster on this machine, for the end-to-end tests: the control
# plane of tests/controlplane (etcd, kube-apiserver, kube-controller-manager) plus a real node:
# containerd + runc (Debian's), CNI bridge networking (Debian's containernetworking-plugins),
# kubelet, kube-proxy (iptables mode) and kube-scheduler built from the same Debian source
# package as the API server (tests/controlplane/build.sh --node), and a pause image made from
# that source's build/pause. Container images to run are imported into containerd's k8s.io
# namespace from image archives (scripts/images.sh writes them).
#
# Usage: up.sh STATE_DIR        stop with tests/node/down.sh STATE_DIR
#
# Environment (all optional):
#   IMAGEINDEX_IMAGES_DIR  import every *.tar in it (docker-archive or OCI archive)
#   NODE_NAME              the Node's name (default imageindex-node)
#   UP_TIMEOUT             seconds to wait for each part to be ready (default 120)
#   NODE_LOCK_TIMEOUT      seconds to wait for another real node on this machine (default 900)
#   IMAGEINDEX_KUBE_CACHE, KUBE_BIN_DIR, KUBE_CONTROLLER_MANAGER_EXTRA_ARGS,
#   KUBE_APISERVER_EXTRA_ARGS, EXTRA_TOKENS_FILE: passed to tests/controlplane/up.sh
#
# One real node per machine at a time: kube-proxy owns the host's KUBE-* iptables chains and
# the kubelet sets machine-wide sysctls, so up.sh waits for the lock /run/imageindex-node.lock
# (released by down.sh). The sysctls the kubelet and kube-proxy change are saved and restored
# by down.sh.
#
# What differs from a production node, and why (test-harness concessions):
# - containerd's CRI option restrict_oom_score_adj: root on this CI machine lacks
#   CAP_SYS_RESOURCE, so the negative oom_score_adj a kubelet gives guaranteed pods and
#   sandboxes (-997/-998) cannot be set (runc fails "can't get final child's PID from pipe");
#   containerd clamps it to its own score (0) instead. The kubelet's and kube-proxy's own
#   oom-score-adj are 0 for the same reason.
# - The kubelet and kube-proxy authenticate with the admin token (system:masters); the
#   kubelet's own API allows anonymous requests but listens on the node's bridge address only.
# - kube-apiserver listens on every address (pods reach it through the `kubernetes`
#   Service, which kube-proxy maps to the node's bridge address), with the ServiceAccount
#   admission plugin on (pods get their token as on any cluster).
# - No DNS add-on: pods resolve names with the host's /etc/resolv.conf; tests reach Services
#   by ClusterIP (kube-proxy) or pod addresses (the bridge is the host's).
#
# Writes STATE_DIR/node.env (sourceable, like the control plane's env) and logs in
# STATE_DIR/node/*.log.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"

log() { printf '[node/up %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ $# -eq 1 ] || die "usage: $0 STATE_DIR"
[ "$(id -u)" -eq 0 ] || die "a node needs root (containerd, cgroups, network namespaces, iptables)"
mkdir -p "$1"
STATE="$(cd "$1" && pwd)"
NODE_DIR="$STATE/node"
TIMEOUT="${UP_TIMEOUT:-120}"
NODE_NAME="${NODE_NAME:-imageindex-node}"
KUBE_CACHE="${IMAGEINDEX_KUBE_CACHE:-/var/cache/imageindex/kube-v1.20.2}"
KUBE_BIN_DIR="${KUBE_BIN_DIR:-$KUBE_CACHE/bin}"
LOCK=/run/imageindex-node.lock
SERVICE_CIDR=10.0.0.0/24

for b in kube-apiserver kube-controller-manager kubelet kube-scheduler kube-proxy pause; do
    [ -x "$KUBE_BIN_DIR/$b" ] || die "$KUBE_BIN_DIR/$b not found; run tests/controlplane/build.sh --node"
done
for tool in containerd containerd-shim-runc-v2 runc ctr iptables ip sha256sum tar; do
    command -v "$tool" >/dev/null || die "$tool not found; run scripts/setup.sh (containerd, runc, iptables, iproute2)"
done
for plugin in bridge host-local loopback; do
    [ -x "/usr/lib/cni/$plugin" ] || die "CNI plugin $plugin not found in /usr/lib/cni; apt-get install containernetworking-plugins"
done

# --------------------------------------------------------------------------- the machine lock
lock_owner_alive() {
    local owner
    owner="$(cat "$LOCK/state" 2>/dev/null)" || return 1
    [ -f "$owner/node.pids" ] || return 1
    local pid
    while read -r pid; do
        [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && return 0
    done <"$owner/node.pids"
    return 1
}
take_lock() {
    local deadline=$(($(date +%s) + ${NODE_LOCK_TIMEOUT:-900})) said=0
    until mkdir "$LOCK" 2>/dev/null; do
        if ! lock_owner_alive; then
            # An owner that died without down.sh (kill -9 of a test): clean up after it.
            local stale
            stale="$(cat "$LOCK/state" 2>/dev/null || true)"
            if [ -n "$stale" ] && [ -d "$stale" ]; then
                log "the lock's owner $stale is gone; tearing down what it left"
                "$HERE/down.sh" "$stale" >&2 || true
            fi
            rm -rf "$LOCK"
            continue
        fi
        [ "$said" = 1 ] || log "another real node runs on this machine ($(cat "$LOCK/state" 2>/dev/null)); waiting for $LOCK"
        said=1
        [ "$(date +%s)" -lt "$deadline" ] || die "timed out waiting for $LOCK"
        sleep 2
    done
    printf '%s\n' "$STATE" >"$LOCK/state"
}
take_lock
mkdir -p "$NODE_DIR"
: >"$STATE/node.pids"

fail() {
    log "ERROR: $1"
    local f
    for f in "$NODE_DIR"/*.log; do
        [ -f "$f" ] || continue
        log "---- last 25 lines of $f ----"
        tail -n 25 "$f" >&2 || true
    done
    log "stopping what was started"
    "$HERE/down.sh" "$STATE" >&2 || true
    exit 1
}

# --------------------------------------------------------------------------- addresses, ports
port_busy() {
    ss -Htln "sport = :$1" 2>/dev/null | grep -q . && return 0
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    return 1
}
PICKED=" "
pick_port() {
    local p i
    for i in $(seq 1 500); do
        p=$((20000 + (RANDOM * 32768 + RANDOM) % 12000))
        case "$PICKED" in *" $p "*) continue ;; esac
        if ! port_busy "$p"; then
            PICKED="$PICKED$p "
            echo "$p"
            return 0
        fi
        : "$i"
    done
    die "no free port found"
}
# A 10.245.N.0/24 no route or address uses yet.
POD_NET=""
for n in $(seq 0 254); do
    if [ -z "$(ip -4 route show "10.245.$n.0/24" 2>/dev/null)" ] \
        && ! ip -4 -o addr show | grep -q " 10\.245\.$n\."; then
        POD_NET="10.245.$n"
        break
    fi
done
[ -n "$POD_NET" ] || fail "every 10.245.N.0/24 is in use"
POD_CIDR="$POD_NET.0/24"
NODE_IP="$POD_NET.1"
ID="$(printf '%s' "$STATE" | sha256sum | cut -c1-8)"
BRIDGE="iix$ID"
NETWORK="imageindex-$ID"
CGROUP_ROOT="/imageindex-$ID"
KUBELET_PORT="$(pick_port)"
KUBELET_HEALTHZ_PORT="$(pick_port)"
PROXY_METRICS_PORT="$(pick_port)"
PROXY_HEALTHZ_PORT="$(pick_port)"
SOCK="$NODE_DIR/containerd/containerd.sock"
PAUSE_IMAGE="localhost/imageindex/pause:v1.20.2"

# Written first: down.sh needs these to clean up whatever was started, even on failure.
{
    printf '# written by %s\n' "$0"
    for v in NODE_NAME:"$NODE_NAME" NODE_IP:"$NODE_IP" POD_CIDR:"$POD_CIDR" BRIDGE:"$BRIDGE" \
        CNI_NETWORK:"$NETWORK" CGROUP_ROOT:"$CGROUP_ROOT" CONTAINERD_SOCK:"$SOCK" \
        KUBELET_PORT:"$KUBELET_PORT" KUBELET_HEALTHZ_PORT:"$KUBELET_HEALTHZ_PORT" \
        PROXY_METRICS_PORT:"$PROXY_METRICS_PORT" PROXY_HEALTHZ_PORT:"$PROXY_HEALTHZ_PORT" \
        SERVICE_CIDR:"$SERVICE_CIDR" PAUSE_IMAGE:"$PAUSE_IMAGE" KUBE_BIN_DIR:"$KUBE_BIN_DIR"; do
        printf '%s=%q\n' "${v%%:*}" "${v#*:}"
    done
} >"$STATE/node.env"

# Sysctls the kubelet (setupKernelTunables) and kube-proxy (route_localnet) set, saved for
# down.sh to put back.
SYSCTLS=(vm/overcommit_memory vm/panic_on_oom kernel/panic kernel/panic_on_oops
    kernel/keys/root_maxkeys kernel/keys/root_maxbytes net/ipv4/conf/all/route_localnet
    net/bridge/bridge-nf-call-iptables)
if [ ! -s "$NODE_DIR/sysctls.saved" ]; then
    for s in "${SYSCTLS[@]}"; do
        [ -r "/proc/sys/$s" ] && printf '%s %s\n' "$s" "$(cat "/proc/sys/$s")"
    done >"$NODE_DIR/sysctls.saved"
fi

# Machine directories the kubelet creates if missing (down.sh removes them again if so).
for d in /var/log/pods /var/log/containers; do
    [ -d "$d" ] && printf '%s\n' "$d"
done >"$NODE_DIR/preexisting"

start_bg() { # NAME CMD...
    local name=$1
    shift
    setsid "$@" >"$NODE_DIR/$name.log" 2>&1 </dev/null &
    local pid=$!
    echo "$pid" >"$NODE_DIR/$name.pid"
    echo "$pid" >>"$STATE/node.pids"
    log "started $name (pid $pid, log $NODE_DIR/$name.log)"
}
wait_for() { # DESCRIPTION NAME-OF-PROCESS CHECK-CMD...
    local what=$1 name=$2 deadline=$(($(date +%s) + TIMEOUT))
    shift 2
    until "$@" >/dev/null 2>&1; do
        if [ -n "$name" ] && ! kill -0 "$(cat "$NODE_DIR/$name.pid")" 2>/dev/null; then
            fail "$name exited during start-up (see $NODE_DIR/$name.log)"
        fi
        [ "$(date +%s)" -lt "$deadline" ] || fail "timed out after ${TIMEOUT}s waiting for $what"
        sleep 0.5
    done
}

# --------------------------------------------------------------------------- control plane
# The bridge first, with the node's address: the API server advertises it as the endpoint
# of the `kubernetes` Service, which is how pods reach it.
ip link add "$BRIDGE" type bridge || fail "cannot create bridge $BRIDGE"
ip addr add "$NODE_IP/24" dev "$BRIDGE"
ip link set "$BRIDGE" up

log "control plane (tests/controlplane/up.sh)"
if ! KUBE_APISERVER_EXTRA_ARGS="--bind-address 0.0.0.0 --advertise-address $NODE_IP --endpoint-reconciler-type lease --kubelet-preferred-address-types InternalIP ${KUBE_APISERVER_EXTRA_ARGS:-}" \
    KUBE_APISERVER_DISABLE_ADMISSION_PLUGINS="" KUBE_BIN_DIR="$KUBE_BIN_DIR" \
    "$REPO/tests/controlplane/up.sh" "$STATE" >/dev/null; then
    fail "tests/controlplane/up.sh failed"
fi
for f in etcd kube-apiserver kube-controller-manager; do cat "$STATE/$f.pid" >>"$STATE/node.pids"; done
# shellcheck source=/dev/null
. "$STATE/env"
KUBECTL=(kubectl --kubeconfig "$KUBECONFIG" --request-timeout=10s)
command -v kubectl >/dev/null || fail "kubectl not found (scripts/setup.sh installs it into /var/cache/imageindex/tools/bin)"

# --------------------------------------------------------------------------- containerd
mkdir -p "$NODE_DIR/containerd" "$NODE_DIR/cni/net.d" "$NODE_DIR/cni/ipam"
cat >"$NODE_DIR/containerd/config.toml" <<EOF
version = 2
root = "$NODE_DIR/containerd/root"
state = "$NODE_DIR/containerd/state"
oom_score = 0
# Keep everything of this node in STATE_DIR.
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "$SOCK"
[ttrpc]
  address = "$NODE_DIR/containerd/containerd.sock.ttrpc"
[debug]
  level = "info"
[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "$NODE_DIR/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  # Test-harness concession (see the header): no CAP_SYS_RESOURCE here.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  max_container_log_line_size = 16384
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$NODE_DIR/cni/net.d"
    max_conf_num = 1
EOF
cat >"$NODE_DIR/cni/net.d/10-imageindex.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "$NETWORK",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$NODE_DIR/cni/ipam",
        "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$NODE_IP"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    }
  ]
}
EOF
start_bg containerd containerd --config "$NODE_DIR/containerd/config.toml"
CTR=(ctr --address "$SOCK" --namespace k8s.io)
wait_for "containerd at $SOCK" containerd "${CTR[@]}" version

# --------------------------------------------------------------------------- images
# The pause image: the static pause binary from the Kubernetes source (build.sh --node) as a
# one-layer OCI image archive, run as 65535 like upstream's.
make_pause_image() { # OUT.tar
    local d="$NODE_DIR/pause-image" layer config manifest ls cs ms
    rm -rf "$d"
    mkdir -p "$d/root" "$d/oci/blobs/sha256"
    install -m 0755 "$KUBE_BIN_DIR/pause" "$d/root/pause"
    tar --owner=0 --group=0 --numeric-owner --mtime=@0 -cf "$d/layer.tar" -C "$d/root" pause
    layer="$(sha256sum "$d/layer.tar" | cut -d' ' -f1)"
    ls="$(stat -c %s "$d/layer.tar")"
    mv "$d/layer.tar" "$d/oci/blobs/sha256/$layer"
    printf '{"architecture":"amd64","os":"linux","config":{"User":"65535:65535","Entrypoint":["/pause"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' "$layer" >"$d/config.json"
    config="$(sha256sum "$d/config.json" | cut -d' ' -f1)"
    cs="$(stat -c %s "$d/config.json")"
    mv "$d/config.json" "$d/oci/blobs/sha256/$config"
    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
        "$config" "$cs" "$layer" "$ls" >"$d/manifest.json"
    manifest="$(sha256sum "$d/manifest.json" | cut -d' ' -f1)"
    ms="$(stat -c %s "$d/manifest.json")"
    mv "$d/manifest.json" "$d/oci/blobs/sha256/$manifest"
    printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"v1.20.2"}}]}' \
        "$manifest" "$ms" "$PAUSE_IMAGE" >"$d/oci/index.json"
    printf '{"imageLayoutVersion":"1.0.0"}' >"$d/oci/oci-layout"
    tar --owner=0 --group=0 --numeric-owner --mtime=@0 -cf "$1" -C "$d/oci" oci-layout index.json blobs
    rm -rf "$d"
}
make_pause_image "$NODE_DIR/pause.tar"
"${CTR[@]}" images import "$NODE_DIR/pause.tar" >/dev/null || fail "ctr images import of the pause image failed"
if [ -n "${IMAGEINDEX_IMAGES_DIR:-}" ]; then
    for archive in "$IMAGEINDEX_IMAGES_DIR"/*.tar; do
        [ -f "$archive" ] || continue
        t0=$(date +%s)
        "${CTR[@]}" images import "$archive" >"$NODE_DIR/import.log" 2>&1 \
            || fail "ctr images import $archive failed: $(cat "$NODE_DIR/import.log")"
        log "imported $(basename "$archive") in $(($(date +%s) - t0)) s"
    done
fi
"${CTR[@]}" images ls -q >"$NODE_DIR/images.txt"
log "images in containerd's k8s.io namespace: $(grep -v '^sha256:' "$NODE_DIR/images.txt" | tr '\n' ' ')"

# --------------------------------------------------------------------------- kubelet
# The kubelet's cgroup root must exist in every hierarchy (v1) or the tree (v2); a new
# cpuset group starts with no CPUs and memory nodes: give it its parent's.
make_cgroup_root() {
    local h
    if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
        mkdir -p "/sys/fs/cgroup$CGROUP_ROOT"
        return
    fi
    for h in /sys/fs/cgroup/*/; do
        [ -f "${h}cgroup.procs" ] || continue
        mkdir -p "${h}${CGROUP_ROOT#/}"
        if [ -f "${h}cpuset.cpus" ]; then
            cat "${h}cpuset.cpus" >"${h}${CGROUP_ROOT#/}/cpuset.cpus"
            cat "${h}cpuset.mems" >"${h}${CGROUP_ROOT#/}/cpuset.mems"
        fi
    done
}
make_cgroup_root || fail "cannot make the cgroup root $CGROUP_ROOT"
mkdir -p "$NODE_DIR/kubelet"
cat >"$NODE_DIR/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTHZ_PORT
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization:
  mode: AlwaysAllow
cgroupDriver: cgroupfs
cgroupRoot: $CGROUP_ROOT
cgroupsPerQOS: true
failSwapOn: false
enforceNodeAllocatable: []
oomScoreAdj: 0
makeIPTablesUtilChains: false
volumePluginDir: $NODE_DIR/kubelet/volume-plugins
# The tests' images are imported, never pulled: image GC must not remove them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: 50Mi
  nodefs.available: 1%
  nodefs.inodesFree: 1%
  imagefs.available: 1%
syncFrequency: 10s
nodeStatusUpdateFrequency: 5s
serializeImagePulls: false
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
EOF
start_bg kubelet "$KUBE_BIN_DIR/kubelet" \
    --config "$NODE_DIR/kubelet/config.yaml" \
    --kubeconfig "$KUBECONFIG" \
    --container-runtime remote \
    --container-runtime-endpoint "unix://$SOCK" \
    --containerd "$SOCK" \
    --root-dir "$NODE_DIR/kubelet" \
    --cert-dir "$NODE_DIR/kubelet/pki" \
    --hostname-override "$NODE_NAME" \
    --node-ip "$NODE_IP" \
    --pod-infra-container-image "$PAUSE_IMAGE" \
    --v 1

# --------------------------------------------------------------------------- kube-proxy, scheduler
# --conntrack-*=0: leave the machine's conntrack settings as they are.
start_bg kube-proxy "$KUBE_BIN_DIR/kube-proxy" \
    --kubeconfig "$KUBECONFIG" \
    --hostname-override "$NODE_NAME" \
    --proxy-mode iptables \
    --cluster-cidr "$POD_CIDR" \
    --oom-score-adj 0 \
    --conntrack-max-per-core 0 \
    --conntrack-tcp-timeout-established 0 \
    --conntrack-tcp-timeout-close-wait 0 \
    --metrics-bind-address "127.0.0.1:$PROXY_METRICS_PORT" \
    --healthz-bind-address "127.0.0.1:$PROXY_HEALTHZ_PORT" \
    --v 1
start_bg kube-scheduler "$KUBE_BIN_DIR/kube-scheduler" \
    --kubeconfig "$KUBECONFIG" \
    --leader-elect=false \
    --port 0 \
    --secure-port 0 \
    --v 1

node_ready() {
    [ "$("${KUBECTL[@]}" get node "$NODE_NAME" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}')" = True ]
}
wait_for "node $NODE_NAME to be Ready" kubelet node_ready
proxy_ready() { curl -fsS --max-time 2 "http://127.0.0.1:$PROXY_HEALTHZ_PORT/healthz"; }
wait_for "kube-proxy's healthz" kube-proxy proxy_ready
# Pods get the token of their ServiceAccount: wait for default/default's token secret.
sa_token() { [ -n "$("${KUBECTL[@]}" get serviceaccount default -o 'jsonpath={.secrets[0].name}')" ]; }
wait_for "the token of serviceaccount default/default" "" sa_token

for f in containerd kubelet kube-proxy kube-scheduler; do
    printf '%s_PID_FILE=%q\n' "$(printf '%s' "$f" | tr '[:lower:]-' '[:upper:]_')" "$NODE_DIR/$f.pid"
done >>"$STATE/node.env"
log "node $NODE_NAME Ready (pods on $POD_CIDR via $BRIDGE, kubelet on $NODE_IP:$KUBELET_PORT); stop with $HERE/down.sh $STATE"
