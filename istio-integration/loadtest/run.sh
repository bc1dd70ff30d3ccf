#!/usr/bin/env bash
# One side of a before/after measurement of meshlane in a cluster, with fortio (Istio's own load
# tool). Run it once without meshlane (or with its mode off) and once with it, on the same nodes,
# then compare the two with compare.py:
#
#   istio-integration/loadtest/run.sh before results/     # meshlane not installed, or mode off
#   helm install meshlane istio-integration/chart -n meshlane --create-namespace ...
#   istio-integration/loadtest/run.sh after results/
#   istio-integration/loadtest/compare.py results/before results/after
#
# Per placement (PLACEMENTS, default "same-node other-node": the client pod on the server's node,
# or on another one; see client-*.yaml) it runs, from the client pod with `kubectl exec`:
#   max:   fortio load -qps 0 -c 1 -t $DURATION        one connection as fast as it goes
#   fixed: fortio load -qps $FIXED_QPS -c $FIXED_CONNS -t $DURATION   the same load both times,
#          so latency is compared at equal throughput
# after a warm-up run that is thrown away. fortio's JSON goes to OUT/LABEL/PLACEMENT-KIND.json,
# its log beside it. Both Deployments are restarted first, so every connection, Envoy's pooled
# upstream ones included, is opened under the state being measured: meshlane accelerates only
# connections opened while it is attached. Where meshlane runs, each node's `meshlane status
# --json` is saved too (OUT/LABEL/meshlane-status-NODE.json), to show the pods were accelerated.
# Needs kubectl with access to the cluster, and Istio injecting sidecars (namespace.yaml).
set -euo pipefail

if [ $# -ne 2 ]; then
  echo "usage: $0 LABEL OUTDIR   (LABEL e.g. before or after)" >&2
  exit 2
fi
label=$1
out=$2/$label
here=$(cd "$(dirname "$0")" && pwd)
ns=meshlane-loadtest
duration=${DURATION:-60s}
fixed_qps=${FIXED_QPS:-1000}
fixed_conns=${FIXED_CONNS:-4}
placements=${PLACEMENTS:-same-node other-node}
percentiles=50,90,99,99.9
url=http://fortio-server.$ns.svc.cluster.local:8080/echo
mkdir -p "$out"

say() { printf '[loadtest] %s\n' "$*" >&2; }

kubectl apply -f "$here/namespace.yaml" -f "$here/server.yaml"
for p in $placements; do kubectl apply -f "$here/client-$p.yaml"; done
say "restarting the pods so every connection is opened under '$label'"
kubectl -n "$ns" rollout restart deployment/fortio-server
kubectl -n "$ns" rollout status deployment/fortio-server --timeout=5m
for p in $placements; do
  kubectl -n "$ns" rollout restart "deployment/fortio-client-$p"
  kubectl -n "$ns" rollout status "deployment/fortio-client-$p" --timeout=5m
done

# fortio load in the client pod; stdout is the JSON (kubectl exec keeps it apart from the log).
load() {
  local p=$1 kind=$2
  shift 2
  say "$p $kind: fortio load $*"
  kubectl -n "$ns" exec "deployment/fortio-client-$p" -c fortio -- \
    fortio load -p "$percentiles" -labels "$label $p $kind" -json - "$@" "$url" \
    >"$out/$p-$kind.json" 2>"$out/$p-$kind.log"
}
for p in $placements; do
  kubectl -n "$ns" exec "deployment/fortio-client-$p" -c fortio -- \
    fortio load -qps 0 -c 1 -t 10s "$url" >/dev/null 2>&1 # warm-up, discarded
  load "$p" max -qps 0 -c 1 -t "$duration"
  load "$p" fixed -qps "$fixed_qps" -c "$fixed_conns" -t "$duration"
done

kubectl -n "$ns" get pods -o wide >"$out/pods.txt"
# meshlane's own view of each node the pods ran on, when it is installed (chart labels).
for node in $(kubectl -n "$ns" get pods -o jsonpath='{.items[*].spec.nodeName}' | tr ' ' '\n' | sort -u); do
  pod=$(kubectl get pods -A -l app.kubernetes.io/name=meshlane --field-selector "spec.nodeName=$node" \
    -o jsonpath='{.items[0].metadata.namespace}/{.items[0].metadata.name}' 2>/dev/null || true)
  if [ -n "$pod" ] && [ "$pod" != / ]; then
    kubectl -n "${pod%%/*}" exec "${pod#*/}" -c meshlane -- meshlane status --json \
      >"$out/meshlane-status-$node.json" || say "meshlane status on $node failed"
  fi
done
say "results in $out; compare with: $here/compare.py <before dir> <after dir>"
