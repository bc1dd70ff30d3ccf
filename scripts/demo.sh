#!/usr/bin/env bash
# The demo: builds meshlane and runs a before/after latency comparison on a local Istio-shaped node
# (two pods as network namespaces with istio-init's iptables capture and a uid-1337 sidecar
# stand-in each), about a minute, then prints the table. Everything it creates is removed at the
# end, also on Ctrl-C. Run as root on Debian bookworm; installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
echo "[demo] building (release)" >&2
cargo build --release --locked -p meshlane -p meshlane-benchmarks
echo "[demo] plain vs meshlane, interleaved rounds; Ctrl-C stops and cleans up" >&2
./target/release/meshlane-bench --rounds "${ROUNDS:-7}" --pingpongs "${PINGPONGS:-5000}" \
  --connects 300 --out benchmarks/out "$@"
./scripts/leftovers.sh
