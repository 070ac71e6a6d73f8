#!/usr/bin/env bash
# Smoke test of a control plane started by up.sh: CRD + custom resource (the
# reflect2 crash), Deployment -> ReplicaSet -> Pods, garbage collection, PV/PVC
# binding, RBAC for a static-token user.
#
# Usage: smoke.sh STATE_DIR
#   The cluster must have been started with EXTRA_TOKENS_FILE containing
#   $SMOKE_OPERATOR_TOKEN (default: smoke-operator-token) for user
#   system:serviceaccount:imageindex-system:imageindex-operator, e.g.
#     smoke-operator-token,system:serviceaccount:imageindex-system:imageindex-operator,op,"system:serviceaccounts"
#   (smoke.sh --print-tokens prints that line.)
# Needs kubectl (any version from 1.20 on; Debian: apt-get install kubernetes-client) and curl.
# Leaves the objects it creates behind (the cluster is throw-away).
set -euo pipefail

OP_USER=system:serviceaccount:imageindex-system:imageindex-operator
OP_TOKEN="${SMOKE_OPERATOR_TOKEN:-smoke-operator-token}"
if [ "${1:-}" = --print-tokens ]; then
    printf '%s,%s,imageindex-operator-uid,"system:serviceaccounts,system:serviceaccounts:imageindex-system"\n' "$OP_TOKEN" "$OP_USER"
    exit 0
fi
[ $# -eq 1 ] || { echo "usage: $0 STATE_DIR | --print-tokens" >&2; exit 2; }
STATE="$1"
command -v kubectl >/dev/null || { echo "kubectl not found (apt-get install kubernetes-client)" >&2; exit 2; }

# shellcheck source=/dev/null
. "$STATE/env"
export KUBECONFIG
K=(kubectl --request-timeout=20s)
OP=(kubectl --request-timeout=20s --kubeconfig /dev/null --server "$APISERVER_URL"
    --certificate-authority "$CA_CERT" --token "$OP_TOKEN")

PASS=0
FAIL=0
ok() { PASS=$((PASS + 1)); echo "ok: $*"; }
nok() { FAIL=$((FAIL + 1)); echo "FAILED: $*"; }
check() { # DESCRIPTION CMD...
    local d=$1
    shift
    if "$@" >/tmp/smoke.$$.out 2>&1; then ok "$d"; else nok "$d"; sed 's/^/    /' /tmp/smoke.$$.out; fi
}
eventually() { # SECONDS DESCRIPTION CMD...
    local t=$1 d=$2 i
    shift 2
    for ((i = 0; i < t * 2; i++)); do
        if "$@" >/dev/null 2>&1; then ok "$d (after ~$((i / 2)) s)"; return 0; fi
        sleep 0.5
    done
    nok "$d (not within $t s)"
}
trap 'rm -f /tmp/smoke.$$.out' EXIT
kq() { "${K[@]}" "$@" 2>/dev/null; } # drop version-skew warnings

NS=smoke-$$
check "kubectl get ns" "${K[@]}" get ns
check "create namespace $NS" "${K[@]}" create ns "$NS"

# ---- CRD with status subresource + printer columns, and a custom resource
check "apply CRD widgets.example.dev" "${K[@]}" apply -f - <<'EOF'
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.example.dev
spec:
  group: example.dev
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, shortNames: [wd]}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    additionalPrinterColumns:
    - {name: Size, type: integer, jsonPath: .spec.size}
    - {name: Phase, type: string, jsonPath: .status.phase}
    - {name: Age, type: date, jsonPath: .metadata.creationTimestamp}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size: {type: integer, minimum: 1}
              color: {type: string}
          status:
            type: object
            properties:
              phase: {type: string}
EOF
check "CRD established" "${K[@]}" wait --for condition=established --timeout=30s crd/widgets.example.dev
check "create Widget w1" "${K[@]}" -n "$NS" apply -f - <<'EOF'
apiVersion: example.dev/v1
kind: Widget
metadata: {name: w1}
spec: {size: 3, color: blue}
EOF
check "patch Widget status subresource" curl -fsS --cacert "$CA_CERT" -H "Authorization: Bearer $ADMIN_TOKEN" \
    -X PATCH -H 'Content-Type: application/merge-patch+json' -d '{"status":{"phase":"Ready"}}' \
    "$APISERVER_URL/apis/example.dev/v1/namespaces/$NS/widgets/w1/status"
printer_columns_ok() { kq -n "$NS" get widgets | grep -qE '^w1 +3 +Ready'; }
check "printer columns show Phase=Ready" printer_columns_ok
if "${K[@]}" -n "$NS" apply -f - >/dev/null 2>&1 <<'EOF'; then nok "schema rejects size=0"; else ok "schema rejects size=0"; fi
apiVersion: example.dev/v1
kind: Widget
metadata: {name: bad}
spec: {size: 0}
EOF
check "apiserver still alive after custom resources" kill -0 "$(cat "$APISERVER_PID_FILE")"

# ---- Deployment -> ReplicaSet -> Pods (Pending: no scheduler/kubelet)
check "create Deployment web" "${K[@]}" -n "$NS" create deployment web --image=registry.invalid/web:1 --replicas=2
rs_exists() { [ -n "$(kq -n "$NS" get rs -l app=web -o name)" ]; }
two_pods() { [ "$(kq -n "$NS" get pods -l app=web -o name | wc -l)" -eq 2 ]; }
eventually 30 "ReplicaSet created" rs_exists
eventually 30 "2 Pods created" two_pods
check "create Service web" "${K[@]}" -n "$NS" expose deployment web --port 80
eventually 30 "Endpoints web created by endpoints controller" "${K[@]}" -n "$NS" get endpoints web
check "delete Deployment web" "${K[@]}" -n "$NS" delete deployment web
no_rs_nor_pods() { [ -z "$(kq -n "$NS" get rs,pods -o name)" ]; }
eventually 30 "GC deletes ReplicaSet and Pods" no_rs_nor_pods

# ---- ConfigMap owned by the custom resource is garbage-collected
WUID="$(kq -n "$NS" get widget w1 -o jsonpath='{.metadata.uid}')"
check "create ConfigMap owned by Widget w1" "${K[@]}" -n "$NS" apply -f - <<EOF
apiVersion: v1
kind: ConfigMap
metadata:
  name: w1-owned
  ownerReferences:
  - {apiVersion: example.dev/v1, kind: Widget, name: w1, uid: "$WUID", controller: true, blockOwnerDeletion: true}
data: {a: b}
EOF
check "delete Widget w1" "${K[@]}" -n "$NS" delete widget w1
# The GC only watches a new CRD's kind after its discovery resync, which is
# hard-wired to every 30 s in 1.20: allow well over that.
cm_gone() { ! kq -n "$NS" get cm w1-owned >/dev/null; }
eventually 90 "GC deletes the owned ConfigMap" cm_gone

# ---- PV + matching PVC bind
check "create PV + PVC" "${K[@]}" apply -f - <<EOF
apiVersion: v1
kind: PersistentVolume
metadata: {name: smoke-pv-$$, labels: {smoke: "$$"}}
spec:
  capacity: {storage: 1Gi}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: ""
  hostPath: {path: /tmp/smoke-pv-$$}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: data, namespace: $NS}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: ""
  resources: {requests: {storage: 500Mi}}
  selector: {matchLabels: {smoke: "$$"}}
EOF
pvc_bound() { [ "$(kq -n "$NS" get pvc data -o jsonpath='{.status.phase}')" = Bound ]; }
eventually 60 "PVC bound" pvc_bound

# ---- RBAC for a static-token user in group system:serviceaccounts (per-run namespace)
canI() { [ "$("${OP[@]}" auth can-i "$@" 2>/dev/null)" = yes ]; }
op_authenticated() { ! "${OP[@]}" -n "$NS" get widgets 2>&1 | grep -q Unauthorized; }
check "token user authenticates (no Unauthorized)" op_authenticated
if canI list widgets.example.dev -n "$NS"; then nok "can-i denied before RoleBinding"; else ok "can-i denied before RoleBinding"; fi
create_rbac() {
    "${K[@]}" -n "$NS" create role operator --verb=get,list,watch \
        --resource=widgets.example.dev,configmaps &&
        "${K[@]}" -n "$NS" create rolebinding operator --role=operator --user="$OP_USER"
}
check "create Role + RoleBinding" create_rbac
eventually 10 "can-i allowed after RoleBinding" canI list widgets.example.dev -n "$NS"
if canI list widgets.example.dev -n kube-system; then nok "still denied in kube-system"; else ok "still denied in kube-system"; fi
check "operator can list configmaps in $NS" "${OP[@]}" -n "$NS" get configmaps

for f in "$ETCD_PID_FILE" "$APISERVER_PID_FILE" "$CONTROLLER_MANAGER_PID_FILE"; do
    check "$(basename "$f" .pid) still running" kill -0 "$(cat "$f")"
done

echo "smoke: $PASS passed, $FAIL failed"
[ "$FAIL" -eq 0 ]
