#!/usr/bin/env bash
# The demo: builds meshlane and runs the Envoy benchmark on a local Istio-shaped node: a client
# pod and a server pod (network namespaces with istio-init's iptables capture and a real Envoy
# sidecar each), compared with no mesh (A), the sidecars alone (B) and the sidecars with the
# meshlane daemon (C), which finds the Envoys itself (local discovery, no pod list). Scenarios
# are interleaved round by round; about two minutes; then the comparison table. Everything it
# creates (namespaces, rules, cgroup, programs, pins, processes) is removed at the end, also on
# Ctrl-C. Run as root on Debian bookworm; installs what it needs first.
# ROUNDS (default 7) and SCALE (default 2: request counts) trade time for tighter spreads.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
echo "[demo] building (release)" >&2
cargo build --release --locked -p meshlane -p meshlane-benchmarks
target="${CARGO_TARGET_DIR:-target}"
echo "[demo] A (no mesh) / B (Envoy) / C (Envoy + meshlane), interleaved; Ctrl-C stops and cleans up" >&2
start=$(date +%s)
status=0
"$target/release/meshlane-bench" --rounds "${ROUNDS:-7}" --scale "${SCALE:-2}" \
  --out benchmarks/out "$@" || status=$?
echo "[demo] benchmark took $(( $(date +%s) - start )) s; results in benchmarks/out" >&2
./scripts/leftovers.sh
exit "$status"
