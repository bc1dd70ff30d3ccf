#!/usr/bin/env bash
# Fails if meshlane's tests, benchmarks or demo left anything on this machine: network
# namespaces, bpffs pins, test cgroups, or iptables rules in the root namespace.
set -uo pipefail
left=0
ns=$(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^ml-' || true)
[ -n "$ns" ] && { echo "left network namespaces: $ns" >&2; left=1; }
if mountpoint -q /sys/fs/bpf; then
  pins=$(find /sys/fs/bpf -mindepth 1 -maxdepth 1 -name 'meshlane*' -printf '%f ' 2>/dev/null)
  [ -n "$pins" ] && { echo "left bpffs pins: $pins" >&2; left=1; }
fi
for root in /sys/fs/cgroup/unified /sys/fs/cgroup /sys/fs/cgroup/memory; do
  [ -d "$root" ] || continue
  cg=$(find "$root" -mindepth 1 -maxdepth 1 -type d -name 'meshlane-*' 2>/dev/null)
  [ -n "$cg" ] && { echo "left cgroups: $cg" >&2; left=1; }
done
if command -v iptables-save >/dev/null 2>&1; then
  n=$(iptables-save 2>/dev/null | grep -c -E 'ISTIO|MESHLANE' || true)
  [ "${n:-0}" -gt 0 ] && { echo "left $n iptables rules mentioning ISTIO/MESHLANE in the root namespace" >&2; left=1; }
fi
[ "$left" = 0 ] && echo "nothing left behind" >&2
exit "$left"
