#!/usr/bin/env bash
# Start a throw-away Kubernetes v1.20.2 control plane (etcd + kube-apiserver +
# kube-controller-manager) on loopback. No scheduler, no kubelet: Pods stay
# Pending, but Deployments/ReplicaSets/Jobs create Pods, the endpoints,
# garbage-collector, PV binder, namespace and serviceaccount controllers run.
#
# Usage: up.sh STATE_DIR
#
# Needs the binaries from build.sh and Debian's etcd-server, openssl, curl.
#
# Environment (all optional):
#   APISERVER_PORT, ETCD_PORT, ETCD_PEER_PORT  fixed ports (default: free random ports)
#   EXTRA_TOKENS_FILE   file of extra token-file CSV lines (token,user,uid,"group1,group2")
#   IMAGEINDEX_KUBE_CACHE  cache dir of build.sh (binaries in $IMAGEINDEX_KUBE_CACHE/bin)
#   KUBE_BIN_DIR        directory holding kube-apiserver and kube-controller-manager
#   ETCD_BIN            etcd binary (default: etcd from PATH, i.e. Debian's /usr/bin/etcd)
#   KUBE_APISERVER_EXTRA_ARGS, KUBE_CONTROLLER_MANAGER_EXTRA_ARGS  extra flags (word-split)
#   KUBE_APISERVER_DISABLE_ADMISSION_PLUGINS  default ServiceAccount (no kubelet mounts
#                       tokens); empty: every default admission plugin on (tests/node/up.sh)
#   UP_TIMEOUT          seconds to wait for readiness (default 60)
#
# Writes into STATE_DIR: ca.crt, admin.kubeconfig, env (sourceable), *.log, *.pid.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

log() { printf '[controlplane/up] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ $# -eq 1 ] || die "usage: $0 STATE_DIR"
mkdir -p "$1"
STATE="$(cd "$1" && pwd)"

CACHE_DIR="${IMAGEINDEX_KUBE_CACHE:-/var/cache/imageindex/kube-v1.20.2}"
KUBE_BIN_DIR="${KUBE_BIN_DIR:-${CACHE_DIR}/bin}"
APISERVER_BIN="${KUBE_BIN_DIR}/kube-apiserver"
KCM_BIN="${KUBE_BIN_DIR}/kube-controller-manager"
ETCD_BIN="${ETCD_BIN:-$(command -v etcd || true)}"
TIMEOUT="${UP_TIMEOUT:-60}"

if [ ! -x "$APISERVER_BIN" ] || [ ! -x "$KCM_BIN" ]; then
    die "kube binaries not found in ${KUBE_BIN_DIR}; run ${HERE}/build.sh first"
fi
if [ -z "$ETCD_BIN" ] || [ ! -x "$ETCD_BIN" ]; then
    die "etcd not found; run ${HERE}/build.sh (installs etcd-server) or apt-get install etcd-server"
fi
for tool in openssl curl base64; do
    command -v "$tool" >/dev/null || die "$tool not found; run ${HERE}/build.sh"
done

ETCD_PID_FILE="$STATE/etcd.pid"
APISERVER_PID_FILE="$STATE/kube-apiserver.pid"
KCM_PID_FILE="$STATE/kube-controller-manager.pid"

# True if PID runs (not a zombie: those have an empty cmdline).
# Alive: signalable and not a zombie. (Not "has a cmdline": while a process execs a large
# binary its cmdline reads empty for a moment, which under load looked like an exit.)
pid_alive() {
    [ -n "$1" ] && kill -0 "$1" 2>/dev/null || return 1
    local state
    state="$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)"
    [ -n "$state" ] && [ "$state" != Z ]
}

# Refuse to start over a running cluster.
for f in "$ETCD_PID_FILE" "$APISERVER_PID_FILE" "$KCM_PID_FILE"; do
    if [ -s "$f" ] && pid_alive "$(cat "$f")"; then
        die "a control plane is already running in $STATE (pid file $f); run ${HERE}/down.sh $STATE first"
    fi
done

# --------------------------------------------------------------------------- ports
CHOSEN_PORTS=" "
port_busy() {
    local p=$1
    case "$CHOSEN_PORTS" in *" $p "*) return 0 ;; esac
    if command -v ss >/dev/null; then
        ss -Htln "sport = :$p" 2>/dev/null | grep -q . && return 0
    fi
    # A successful connect means somebody listens there.
    (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && return 0
    return 1
}
pick_port() {
    local p i
    for i in $(seq 1 500); do
        p=$((20000 + (RANDOM * 32768 + RANDOM) % 12000)) # 20000-31999, below the ephemeral range
        if ! port_busy "$p"; then
            CHOSEN_PORTS="${CHOSEN_PORTS}${p} "
            echo "$p"
            return 0
        fi
        : "$i"
    done
    die "no free port found"
}
use_port() { # use_port NAME VALUE-or-empty
    local name=$1 val=$2
    if [ -n "$val" ]; then
        port_busy "$val" && die "$name=$val is already in use"
        CHOSEN_PORTS="${CHOSEN_PORTS}${val} "
        printf '%s\n' "$val"
    else
        pick_port
    fi
}
APISERVER_PORT="$(use_port APISERVER_PORT "${APISERVER_PORT:-}")"
CHOSEN_PORTS="${CHOSEN_PORTS}${APISERVER_PORT} "
ETCD_PORT="$(use_port ETCD_PORT "${ETCD_PORT:-}")"
CHOSEN_PORTS="${CHOSEN_PORTS}${ETCD_PORT} "
ETCD_PEER_PORT="$(use_port ETCD_PEER_PORT "${ETCD_PEER_PORT:-}")"

APISERVER_URL="https://127.0.0.1:${APISERVER_PORT}"
ETCD_URL="http://127.0.0.1:${ETCD_PORT}"

# --------------------------------------------------------------------------- cleanup on failure
STARTED_PIDS=()
fail() { # MESSAGE [NAME-OF-COMPONENT-THAT-FAILED]
    log "ERROR: $1"
    local f n culprit="${2:-}"
    # Show the other logs briefly, then the culprit's (or all) in full at the end.
    for f in etcd kube-apiserver kube-controller-manager; do
        [ -f "$STATE/$f.log" ] || continue
        if [ -n "$culprit" ] && [ "$f" = "$culprit" ]; then continue; fi
        n=40
        [ -n "$culprit" ] && n=10
        log "---- last $n lines of $STATE/$f.log ----"
        tail -n "$n" "$STATE/$f.log" >&2 || true
    done
    if [ -n "$culprit" ] && [ -f "$STATE/$culprit.log" ]; then
        log "---- last 40 lines of $STATE/$culprit.log ----"
        tail -n 40 "$STATE/$culprit.log" >&2 || true
    fi
    if [ "${#STARTED_PIDS[@]}" -gt 0 ]; then
        log "stopping what was started"
        "$HERE/down.sh" "$STATE" >&2 || true
    fi
    log "ERROR: $1"
    exit 1
}

# --------------------------------------------------------------------------- PKI + tokens
log "state dir: $STATE"
rm -rf "$STATE/etcd-data" "$STATE/pki"
rm -f "$STATE"/*.log "$STATE/env" "$STATE/admin.kubeconfig" "$STATE/kube-controller-manager.kubeconfig"
PKI="$STATE/pki"
mkdir -p "$PKI"
chmod 700 "$PKI"

openssl_q() { openssl "$@" 2>>"$STATE/openssl.log" || fail "openssl $1 failed (see $STATE/openssl.log)"; }

cat >"$PKI/ca.cnf" <<'EOF'
[req]
distinguished_name = dn
prompt = no
x509_extensions = v3_ca
[dn]
CN = imageindex-test-ca
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign, digitalSignature
subjectKeyIdentifier = hash
EOF
cat >"$PKI/apiserver.ext" <<'EOF'
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = IP:127.0.0.1, DNS:localhost, DNS:kubernetes, DNS:kubernetes.default, DNS:kubernetes.default.svc, DNS:kubernetes.default.svc.cluster.local, IP:10.0.0.1
EOF

openssl_q genrsa -out "$PKI/ca.key" 2048
openssl_q req -x509 -new -key "$PKI/ca.key" -sha256 -days 3650 -config "$PKI/ca.cnf" -out "$PKI/ca.crt"
openssl_q genrsa -out "$PKI/apiserver.key" 2048
openssl_q req -new -key "$PKI/apiserver.key" -subj "/CN=kube-apiserver" -out "$PKI/apiserver.csr"
openssl_q x509 -req -in "$PKI/apiserver.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
    -sha256 -days 3650 -extfile "$PKI/apiserver.ext" -out "$PKI/apiserver.crt"
openssl_q genrsa -out "$PKI/sa.key" 2048
openssl_q rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub"
cp "$PKI/ca.crt" "$STATE/ca.crt"

ADMIN_TOKEN="$(openssl rand -hex 24)"
KCM_TOKEN="$(openssl rand -hex 24)"
TOKENS="$PKI/tokens.csv"
{
    printf '%s,admin,admin,"system:masters"\n' "$ADMIN_TOKEN"
    # The controller-manager runs all controllers with its own credentials
    # (--use-service-account-credentials=false), so it gets full rights.
    printf '%s,system:kube-controller-manager,system:kube-controller-manager,"system:masters"\n' "$KCM_TOKEN"
    if [ -n "${EXTRA_TOKENS_FILE:-}" ]; then
        [ -r "$EXTRA_TOKENS_FILE" ] || fail "EXTRA_TOKENS_FILE=$EXTRA_TOKENS_FILE is not readable"
        # Drop blank lines and comments; make sure the last line ends with a newline.
        grep -vE '^[[:space:]]*(#|$)' "$EXTRA_TOKENS_FILE" || true
    fi
} >"$TOKENS"
chmod 600 "$TOKENS"

write_kubeconfig() { # FILE TOKEN USER
    local ca_data
    ca_data="$(base64 -w0 <"$PKI/ca.crt")"
    cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: imageindex-test
  cluster:
    server: ${APISERVER_URL}
    certificate-authority-data: ${ca_data}
users:
- name: $3
  user:
    token: $2
contexts:
- name: imageindex-test
  context:
    cluster: imageindex-test
    user: $3
    namespace: default
current-context: imageindex-test
EOF
    chmod 600 "$1"
}
write_kubeconfig "$STATE/admin.kubeconfig" "$ADMIN_TOKEN" admin
write_kubeconfig "$STATE/kube-controller-manager.kubeconfig" "$KCM_TOKEN" system:kube-controller-manager

# --------------------------------------------------------------------------- start helpers
start_bg() { # start_bg NAME PIDFILE CMD...
    local name=$1 pidfile=$2
    shift 2
    # setsid: own session, so a Ctrl-C / process-group kill of the caller
    # doesn't take the daemons down half-way; down.sh stops them.
    setsid "$@" >"$STATE/$name.log" 2>&1 </dev/null &
    local pid=$!
    echo "$pid" >"$pidfile"
    STARTED_PIDS+=("$pid")
    log "started $name (pid $pid, log $STATE/$name.log)"
}

START_TS=$(date +%s.%N)
deadline=$(($(date +%s) + TIMEOUT))
alive_or_fail() { # NAME PIDFILE
    pid_alive "$(cat "$2")" || fail "$1 exited during start-up" "$1"
}
wait_for() { # DESCRIPTION CHECK-CMD...
    local what=$1
    shift
    until "$@" >/dev/null 2>&1; do
        for p in etcd:"$ETCD_PID_FILE" kube-apiserver:"$APISERVER_PID_FILE" kube-controller-manager:"$KCM_PID_FILE"; do
            [ -f "${p#*:}" ] && alive_or_fail "${p%%:*}" "${p#*:}"
        done
        [ "$(date +%s)" -lt "$deadline" ] || fail "timed out after ${TIMEOUT}s waiting for $what"
        sleep 0.5
    done
}
rm -f "$ETCD_PID_FILE" "$APISERVER_PID_FILE" "$KCM_PID_FILE"

# --------------------------------------------------------------------------- etcd
# ETCD_PORT & co would be read by etcd as (unknown) ETCD_* settings: drop them.
start_bg etcd "$ETCD_PID_FILE" env -u ETCD_PORT -u ETCD_PEER_PORT -u ETCD_BIN \
    "$ETCD_BIN" \
    --name imageindex \
    --data-dir "$STATE/etcd-data" \
    --listen-client-urls "$ETCD_URL" \
    --advertise-client-urls "$ETCD_URL" \
    --listen-peer-urls "http://127.0.0.1:${ETCD_PEER_PORT}" \
    --initial-advertise-peer-urls "http://127.0.0.1:${ETCD_PEER_PORT}" \
    --initial-cluster "imageindex=http://127.0.0.1:${ETCD_PEER_PORT}" \
    --initial-cluster-state new \
    --logger zap --log-outputs stderr
wait_for "etcd health at $ETCD_URL/health" curl -fsS --max-time 2 "$ETCD_URL/health"

# --------------------------------------------------------------------------- kube-apiserver
# --endpoint-reconciler-type none: the default reconciler writes the advertise
# address into default/kubernetes Endpoints, and Endpoints validation rejects
# loopback IPs ("may not be in the loopback range"), logged every 10 s. The
# default/kubernetes Service is still created (10.0.0.1), without Endpoints.
DISABLE_ADMISSION="${KUBE_APISERVER_DISABLE_ADMISSION_PLUGINS-ServiceAccount}"
# shellcheck disable=SC2086 # extra args are meant to be word-split
start_bg kube-apiserver "$APISERVER_PID_FILE" "$APISERVER_BIN" \
    --etcd-servers "$ETCD_URL" \
    --bind-address 127.0.0.1 \
    --advertise-address 127.0.0.1 \
    --endpoint-reconciler-type none \
    --secure-port "$APISERVER_PORT" \
    --insecure-port 0 \
    --cert-dir "$PKI" \
    --tls-cert-file "$PKI/apiserver.crt" \
    --tls-private-key-file "$PKI/apiserver.key" \
    --client-ca-file "$PKI/ca.crt" \
    --token-auth-file "$TOKENS" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$PKI/sa.pub" \
    --service-account-signing-key-file "$PKI/sa.key" \
    --service-cluster-ip-range 10.0.0.0/24 \
    --authorization-mode RBAC \
    ${DISABLE_ADMISSION:+--disable-admission-plugins "$DISABLE_ADMISSION"} \
    --allow-privileged=true \
    --profiling=false \
    --v 1 \
    ${KUBE_APISERVER_EXTRA_ARGS:-}

readyz() {
    curl -fsS --max-time 3 --cacert "$PKI/ca.crt" -H "Authorization: Bearer $ADMIN_TOKEN" \
        "$APISERVER_URL/readyz"
}
wait_for "kube-apiserver $APISERVER_URL/readyz" readyz
READY_TS=$(date +%s.%N)

# --------------------------------------------------------------------------- kube-controller-manager
# --port 0 / --secure-port 0: serve nothing (no port clashes between clusters).
# --flex-volume-plugin-dir: otherwise it creates /usr/libexec/kubernetes/...
# --use-service-account-credentials=false: all controllers use the kubeconfig
#   identity (a system:masters token), so no per-controller SA tokens are needed.
# shellcheck disable=SC2086
start_bg kube-controller-manager "$KCM_PID_FILE" "$KCM_BIN" \
    --kubeconfig "$STATE/kube-controller-manager.kubeconfig" \
    --leader-elect=false \
    --port 0 \
    --secure-port 0 \
    --controllers '*' \
    --use-service-account-credentials=false \
    --service-account-private-key-file "$PKI/sa.key" \
    --root-ca-file "$PKI/ca.crt" \
    --cluster-signing-cert-file "$PKI/ca.crt" \
    --cluster-signing-key-file "$PKI/ca.key" \
    --service-cluster-ip-range 10.0.0.0/24 \
    --flex-volume-plugin-dir "$STATE/flexvolume" \
    --v 1 \
    ${KUBE_CONTROLLER_MANAGER_EXTRA_ARGS:-}

# The serviceaccount controller creating default/default is a cheap sign that
# the controller-manager is connected and running its controllers.
kcm_ready() {
    curl -fsS --max-time 3 --cacert "$PKI/ca.crt" -H "Authorization: Bearer $ADMIN_TOKEN" \
        "$APISERVER_URL/api/v1/namespaces/default/serviceaccounts/default"
}
wait_for "kube-controller-manager (serviceaccount default/default)" kcm_ready
KCM_TS=$(date +%s.%N)

# --------------------------------------------------------------------------- env file
{
    printf '# written by %s\n' "$0"
    for v in STATE_DIR:"$STATE" APISERVER_URL:"$APISERVER_URL" APISERVER_PORT:"$APISERVER_PORT" \
        ETCD_URL:"$ETCD_URL" ETCD_PORT:"$ETCD_PORT" ETCD_PEER_PORT:"$ETCD_PEER_PORT" \
        KUBECONFIG:"$STATE/admin.kubeconfig" ADMIN_TOKEN:"$ADMIN_TOKEN" CA_CERT:"$STATE/ca.crt" \
        ETCD_PID_FILE:"$ETCD_PID_FILE" APISERVER_PID_FILE:"$APISERVER_PID_FILE" \
        CONTROLLER_MANAGER_PID_FILE:"$KCM_PID_FILE"; do
        printf '%s=%q\n' "${v%%:*}" "${v#*:}"
    done
} >"$STATE/env.tmp"
mv "$STATE/env.tmp" "$STATE/env"

log "$(awk -v s="$START_TS" -v r="$READY_TS" -v k="$KCM_TS" \
    'BEGIN { printf "apiserver ready after %.1f s, controller-manager ready after %.1f s", r - s, k - s }')"
log "kubeconfig: $STATE/admin.kubeconfig; env: $STATE/env; stop with: $HERE/down.sh $STATE"
echo "$APISERVER_URL"
