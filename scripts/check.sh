#!/usr/bin/env bash
# The checks a contributor runs before pushing, without root and without touching the kernel:
# formatting, clippy (host crates, the eBPF programs for their own target, the fuzz targets),
# the shell-script lint and the unit tests (`--lib --bins`: no netns, BPF or iptables). The privileged
# tests and the rest of CI are scripts/test.sh (root). Needs what scripts/setup.sh installs
# (rustup's toolchain from rust-toolchain.toml with rust-src, bpf-linker, shellcheck); a user
# without root installs them with rustup, `cargo install bpf-linker` and the distribution's
# package of the shell linter.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

step() { printf '\n== %s\n' "$*" >&2; }

step "format"
cargo fmt --all --check
cargo fmt --manifest-path fuzz/Cargo.toml --check

step "lints (host crates, then the eBPF programs for their own target, then the fuzz targets)"
cargo clippy --workspace --all-targets --exclude meshlane-ebpf --locked -- -D warnings
RUSTC_BOOTSTRAP=1 cargo clippy -p meshlane-ebpf --target bpfel-unknown-none -Z build-std=core \
  --release --locked -- -D warnings
cargo clippy --manifest-path fuzz/Cargo.toml --all-targets --locked --target-dir target -- -D warnings

step "shellcheck"
mapfile -t scripts < <(git ls-files '*.sh' .ci/run)
shellcheck "${scripts[@]}"

step "unit tests (no privileges needed)"
cargo test --workspace --exclude meshlane-ebpf --lib --bins --locked
