#!/usr/bin/env bash
# Checks, on this machine's real kernel, that the chart's container settings are enough for the
# daemon and that each capability it asks for is needed where the values say so. It renders the
# chart and runs the meshlane binary with exactly the rendered capability set (setpriv bounding
# set, as a container runtime grants it to a root process):
#   1. `meshlane probe` passes with that set, and fails without SETUID (negative control);
#   2. the rendered `run` arguments (paths remapped to a private pin dir and cgroup) bring up the
#      datapath with the rendered ConfigMap's pods.toml, whose one pod is a uid-1337 process in
#      its own netns, named as /proc/<pid>/ns/net: the pod must reach the policy map, and without
#      SYS_PTRACE be refused (negative control); /readyz and /healthz must answer 200 if the
#      binary already serves them;
#   3. the rendered preStop command removes every pin.
# Not covered: seccomp and AppArmor profiles, mount propagation, the read-only root filesystem
# (no container runtime here). Leaves nothing behind: its cgroup, pins and processes are removed.
#
#   istio-integration/check-capabilities.sh [path/to/meshlane]   (as root; default target/release)
set -euo pipefail
cd "$(dirname "$0")/.."

bin=${1:-target/release/meshlane}
[ -x "$bin" ] || { echo "check-capabilities: no meshlane binary at $bin (cargo build --release -p meshlane)" >&2; exit 1; }
bin=$(realpath "$bin")
[ "$(id -u)" = 0 ] || { echo "check-capabilities: run as root" >&2; exit 1; }
./scripts/lint-deploy.sh --install-only >/dev/null 2>&1 || ./scripts/lint-deploy.sh --install-only
TOOLS=${MESHLANE_TOOLS_DIR:-/opt/meshlane-tools}
PY=$TOOLS/venv/bin/python
HELM=$TOOLS/bin/helm

cg_root=$(awk '{ split($0, p, " - "); split(p[1], l, " "); split(p[2], r, " ");
  if (r[1] == "cgroup2" && l[4] == "/") { print l[5]; exit } }' /proc/self/mountinfo)
[ -n "$cg_root" ] || { echo "check-capabilities: no cgroup v2 mount" >&2; exit 1; }
work=$(mktemp -d)
cg=$cg_root/meshlane-capcheck-$$
pins=/sys/fs/bpf/meshlane-capcheck-$$
sleeper=
pod_pid=
daemon=
cleanup() {
  set +e
  [ -n "$daemon" ] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null
  [ -n "$pod_pid" ] && kill "$pod_pid" 2>/dev/null
  [ -n "$sleeper" ] && kill "$sleeper" 2>/dev/null && wait "$sleeper" 2>/dev/null
  [ -e "$pins" ] && "$bin" detach --pin-dir "$pins" >/dev/null 2>&1
  [ -d "$cg" ] && rmdir "$cg"
  rm -rf "$work"
}
trap cleanup EXIT
mkdir "$cg"

failures=0
result() { # result PASS|FAIL text
  printf '%-4s  %s\n' "$1" "$2"
  [ "$1" = PASS ] || failures=$((failures + 1))
}

# A "pod": its own network namespace, its process running as the sidecar's uid, as in a real pod.
unshare --net --fork --kill-child setpriv --reuid 1337 --regid 1337 --clear-groups sleep 600 &
sleeper=$!

for _ in $(seq 50); do
  pod_pid=$(pgrep -P "$sleeper" -x sleep || true)
  [ -n "$pod_pid" ] && break
  sleep 0.1
done
[ -n "$pod_pid" ] || { echo "check-capabilities: the test pod did not start" >&2; exit 1; }

"$HELM" template meshlane istio-integration/chart --namespace meshlane \
  --set "discovery.local.pods[0].name=capcheck/pod" \
  --set "discovery.local.pods[0].netns=/proc/$pod_pid/ns/net" >"$work/rendered.yaml"
"$PY" - "$work" <<'EOF'
import json, sys, yaml
work = sys.argv[1]
docs = [d for d in yaml.safe_load_all(open(f"{work}/rendered.yaml")) if d]
ds = next(d for d in docs if d["kind"] == "DaemonSet")
c = next(c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == "meshlane")
cm = next(d for d in docs if d["kind"] == "ConfigMap")
open(f"{work}/pods.toml", "w").write(cm["data"]["pods.toml"])
json.dump({
    "caps": [x.lower() for x in c["securityContext"]["capabilities"]["add"]],
    "args": c["args"],
    "prestop": c["lifecycle"]["preStop"]["exec"]["command"],
}, open(f"{work}/chart.json", "w"))
EOF
field() { "$PY" -c 'import json, sys; v = json.load(open(sys.argv[1]))[sys.argv[2]]; print("\n".join(v))' "$work/chart.json" "$1"; }
mapfile -t caps < <(field caps)
echo "chart capabilities: ${caps[*]}"

# as_container CAPS CMD...: runs CMD as root limited to CAPS, inside the check's own cgroup.
# container CAPS: the same as an array prefix in $ctr, for a command started in the background
# (so that $! is the command itself: bash -c execs it).
container() {
  # shellcheck disable=SC2016 # $$, $0 and $@ belong to the inner bash
  ctr=(bash -c 'echo $$ >"$0/cgroup.procs"; exec "$@"' "$cg"
    setpriv --bounding-set "-all,+${1//,/,+}" --inh-caps -all)
}
as_container() {
  container "$1"
  shift
  "${ctr[@]}" "$@"
}
without() { local drop=$1; printf '%s\n' "${caps[@]}" | grep -vx "$drop" | paste -sd,; }
all=$(printf '%s\n' "${caps[@]}" | paste -sd,)

# 1. The start-up probe.
if as_container "$all" "$bin" probe --cgroup "$cg" >"$work/probe.txt" 2>&1; then
  result PASS "probe passes with the chart's capabilities ($(tail -n 1 "$work/probe.txt"))"
else
  result FAIL "probe with the chart's capabilities"
  sed 's/^/      | /' "$work/probe.txt"
fi
if as_container "$(without setuid)" "$bin" probe --cgroup "$cg" >"$work/probe-nosetuid.txt" 2>&1; then
  result FAIL "probe passed without SETUID: the negative control shows nothing"
else
  result PASS "probe fails without SETUID ($(grep -m1 FAIL "$work/probe-nosetuid.txt" | tr -s ' '))"
fi

# 2. The daemon with the rendered arguments.
mapfile -t rendered < <(field args)
mapfile -t run_help < <("$bin" run --help)
metrics=
args=()
i=0
while [ $i -lt ${#rendered[@]} ]; do
  a=${rendered[$i]}
  v=${rendered[$((i + 1))]:-}
  case "$a" in
    # The chart's `--mode auto` loads the datapath on every kernel measured so far: the reader
    # rule where apps cannot tell, else the sidecar hop alone.
    run | --log-format | --log-level | --resync | --discovery | --sidecar-hop | --mode | --max-sockets) args+=("$a"); [ "$a" = run ] || { args+=("$v"); i=$((i + 1)); } ;;
    --pin-dir) args+=("$a" "$pins"); i=$((i + 1)) ;;
    --cgroup) args+=("$a" "$cg"); i=$((i + 1)) ;;
    --config) args+=("$a" "$work/pods.toml"); i=$((i + 1)) ;;
    --api-socket | --metrics-addr)
      if printf '%s\n' "${run_help[@]}" | grep -q -- "$a"; then
        if [ "$a" = --metrics-addr ]; then metrics=127.0.0.1:19801; args+=("$a" "$metrics"); else args+=("$a" "$work/api.sock"); fi
      else
        echo "note: this meshlane binary has no $a yet; left out"
      fi
      i=$((i + 1))
      ;;
    *) echo "check-capabilities: unexpected rendered argument $a" >&2; exit 1 ;;
  esac
  i=$((i + 1))
done
echo "daemon: meshlane ${args[*]}"

run_daemon() { # run_daemon CAPS LOG: starts the daemon, waits until the pod list was applied
  container "$1"
  "${ctr[@]}" "$bin" "${args[@]}" >"$2" 2>&1 &
  daemon=$!
  for _ in $(seq 100); do
    [ -e "$pins" ] && break
    sleep 0.1
  done
  sleep 3 # one --resync (2s) and a margin: the pod list has been applied
}
stop_daemon() { kill -TERM "$daemon"; wait "$daemon" || true; daemon=; }

run_daemon "$all" "$work/run.log"
pods=$("$bin" status --pins --pin-dir "$pins" 2>/dev/null | sed -n 's/^pods: //p')
if [ "$pods" = 1 ] && ! grep -q 'netns not found' "$work/run.log"; then
  result PASS "run with the rendered arguments: datapath up, the uid-1337 pod in the policy map"
else
  result FAIL "run with the rendered arguments (pods listed: ${pods:-none})"
  sed 's/^/      | /' "$work/run.log" | tail -n 20
fi
if [ -n "$metrics" ]; then
  for path in /readyz /healthz; do
    code=$("$PY" -c 'import sys, urllib.request
try: print(urllib.request.urlopen(sys.argv[1], timeout=3).status)
except Exception as e: print(getattr(e, "code", e))' "http://$metrics$path")
    if [ "$code" = 200 ]; then result PASS "GET $path: 200"; else result FAIL "GET $path: $code"; fi
  done
fi

# 3. The rendered preStop hook.
mapfile -t prestop < <(field prestop)
for j in "${!prestop[@]}"; do [ "${prestop[$j]}" = --pin-dir ] && prestop[j + 1]=$pins; done
prestop[0]=$bin
if as_container "$all" "${prestop[@]}" >"$work/prestop.txt" 2>&1 && [ ! -e "$pins" ]; then
  result PASS "preStop (${prestop[*]:1}) removes every pin"
else
  result FAIL "preStop left $pins"
  sed 's/^/      | /' "$work/prestop.txt"
fi
stop_daemon

# Negative control for SYS_PTRACE: the pod's /proc/<pid>/ns/net belongs to another user.
run_daemon "$(without sys_ptrace)" "$work/run-noptrace.log"
if grep -q 'netns not found.*Permission denied' "$work/run-noptrace.log"; then
  result PASS "without SYS_PTRACE the pod's netns is refused (Permission denied)"
else
  result FAIL "without SYS_PTRACE the pod was not refused: the control shows nothing"
  tail -n 5 "$work/run-noptrace.log" | sed 's/^/      | /'
fi
stop_daemon
"$bin" detach --pin-dir "$pins" >/dev/null 2>&1 || true

[ "$failures" = 0 ] || { echo "check-capabilities: $failures check(s) failed" >&2; exit 1; }
echo "check-capabilities: all checks passed"
