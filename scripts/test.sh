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

# Each step's header says how much disk is left: a full disk fails a build with an error far from
# its cause (CI once died in the kernel matrix's static build with "No space left on device").
target_dir="${CARGO_TARGET_DIR:-target}"
step() {
  printf '\n== %s\n' "$*" >&2
  df -h --output=avail,target . 2>/dev/null | tail -n 1 | awk '{print "   (disk: " $1 " free on " $2 ")"}' >&2 || true
}

# A clean build of everything here (the workspace, fuzz, the kernel matrix's static build) is about
# 18 GB with incremental state and full debug info. CI builds each thing once, so it keeps neither:
# about half the disk. Backtraces still carry file and line.
if [ "${CI:-}" = true ]; then
  export CARGO_INCREMENTAL=0
  export CARGO_PROFILE_DEV_DEBUG=line-tables-only
fi
avail_kib=$(df -Pk . | awk 'NR == 2 {print $4}')
if [ "${avail_kib:-0}" -lt $((20 * 1024 * 1024)) ]; then
  printf 'test.sh: warning: only %s GiB free here; a clean run needs about 10 GiB in CI mode, 18 otherwise\n' \
    "$((avail_kib / 1024 / 1024))" >&2
fi

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
"$target_dir/debug/meshlane-bench" --smoke --out "$target_dir/bench-smoke"

step "benchmark tables in the READMEs: regenerated from the committed results.json files, must match"
"$target_dir/debug/meshlane-bench" --check-readme

step "kernel matrix: the datapath tests and the probe on 6.1, 6.12 and 7.x under QEMU, and natively"
python3 -m unittest discover -s scripts/kernel-matrix
./scripts/kernel-matrix/run.py --check-readme

step "nothing left behind"
./scripts/leftovers.sh
