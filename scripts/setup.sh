#!/usr/bin/env bash
# Installs everything meshlane's build, tests and demo need on a Debian bookworm machine, as root.
# Idempotent: each step checks first and does nothing when its part is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[setup] %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
  echo "setup.sh: run as root (it installs packages and mounts bpffs)" >&2
  exit 1
fi

# Debian packages: command -> package.
declare -A pkgs=(
  [iptables]=iptables        # istio-init's capture rules in the test pods (nft backend)
  [ip]=iproute2              # network namespaces and veth pairs as pods
  [nsenter]=util-linux       # enter a pod's netns without remounting /sys (bpffs stays visible)
  [tcpdump]=tcpdump          # handy when a capture test fails; not needed by the tests themselves
  [python3]=python3
  [cc]=gcc
)
missing=()
for cmd in "${!pkgs[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${pkgs[$cmd]}")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! command -v rustup >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/rustup" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v rustup >/dev/null 2>&1; then
  echo "setup.sh: rustup is required (this machine kind ships it); install it, then rerun" >&2
  exit 1
fi
# rust-toolchain.toml pins the compiler; make sure it and rust-src (for -Z build-std) are present.
channel=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)
if ! rustup component list --toolchain "$channel" --installed 2>/dev/null | grep -q '^rust-src'; then
  log "rustup toolchain $channel with rust-src, clippy, rustfmt"
  rustup toolchain install "$channel" --profile minimal -c rust-src -c clippy -c rustfmt >/dev/null
fi

# bpf-linker 0.10.3 links with rustc's own LLVM (no apt LLVM needed).
if ! bpf-linker --version 2>/dev/null | grep -q '0\.10\.3'; then
  log "cargo install bpf-linker@0.10.3 (a minute or two)"
  cargo install bpf-linker@0.10.3 --locked --quiet
fi

if ! mountpoint -q /sys/fs/bpf; then
  log "mount bpffs at /sys/fs/bpf"
  mount -t bpf bpf /sys/fs/bpf
fi
log "ready"
