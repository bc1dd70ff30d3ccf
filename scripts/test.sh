#!/usr/bin/env bash
# Runs every test of meshlane: formatting and lints, unit tests, and the privileged tests on the
# real kernel (network namespaces, iptables, cgroups, BPF), a smoke run of the benchmark, the
# kernel matrix (the datapath tests on other kernels under QEMU) and a check that nothing was
# left on the machine. Run as root on Debian bookworm; installs what it
# needs first (scripts/setup.sh). With CI=true a privileged test that cannot run fails loudly.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"

step() { printf '\n== %s\n' "$*" >&2; }

step "the unprivileged checks: format, lints, shellcheck, unit tests (scripts/check.sh)"
./scripts/check.sh

step "tests (unit + privileged, real kernel)"
cargo test --locked

step "fuzz: every parser of outside input, mutated real documents (bolero; fuzz/README.md)"
# Seconds per target; a failure prints BOLERO_RANDOM_SEED to replay it.
BOLERO_RANDOM_TEST_TIME_MS="${MESHLANE_FUZZ_MS:-20000}" \
  cargo test --manifest-path fuzz/Cargo.toml --locked --target-dir target

step "the meshlane.v1 API: buf lint, buf format, buf breaking against the baseline"
./scripts/lint-proto.sh

step "deployment: Dockerfile and bake file, Helm chart, rendered manifest, istioctl overlay, load test (real linters)"
./scripts/lint-deploy.sh

step "the chart's capability set, against the real daemon on this kernel"
istio-integration/check-capabilities.sh target/debug/meshlane

step "benchmark smoke run (tiny counts, A/B/C through real Envoy and the daemon; measures nothing)"
cargo build --locked -p meshlane -p meshlane-benchmarks
"${CARGO_TARGET_DIR:-target}/debug/meshlane-bench" --smoke --out "${CARGO_TARGET_DIR:-target}/bench-smoke"

step "benchmark tables in the READMEs: regenerated from the committed results.json files, must match"
"${CARGO_TARGET_DIR:-target}/debug/meshlane-bench" --check-readme

step "kernel matrix: the datapath tests and the probe on 6.1, 6.12 and 7.x under QEMU, and natively"
python3 -m unittest discover -s scripts/kernel-matrix
./scripts/kernel-matrix/run.py --check-readme

step "nothing left behind"
./scripts/leftovers.sh
