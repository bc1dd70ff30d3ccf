#!/bin/busybox sh
# shellcheck shell=dash # busybox ash; dash is shellcheck's nearest dialect
# PID 1 of a kernel-matrix guest (scripts/kernel-matrix/run.py packs it as /init).
# Sets up what a node has (proc, sysfs, cgroup2, bpffs, loopback, the netfilter and veth
# modules), then runs `meshlane probe --json` and each privileged test on its own, printing
# markers the runner reads from the serial console. QEMU's exit status says nothing about the
# guest, so the last line is always a GUEST-EXIT marker, then the machine powers off.
# busybox's applets come last in PATH: the host's ip, nsenter and iptables must win.
/bin/busybox mkdir -p /busybox
/bin/busybox --install -s /busybox
export PATH=/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin:/busybox
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
# Privileged tests must fail, never skip, when they cannot run.
export CI=true RUST_BACKTRACE=1 HOME=/root TMPDIR=/tmp

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
# /tmp stays on the (writable) initramfs: nothing may be mounted over it, because the tests look
# for meshlane at the path cargo built it under, which may be in /tmp (a CI checkout).
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
ip link set lo up
# A node's container runtime gives daemons a high open-file limit; PID 1's default of 1024 is
# too low for the port-reuse test's hundreds of live connections (each one is four sockets).
ulimit -n 65536

# Modules in dependency order (the runner computed it from each module's .modinfo).
while read -r m; do
  insmod "/matrix/modules/$m.ko" 2>/tmp/insmod.err || echo "MATRIX-MODULE-FAILED $m $(cat /tmp/insmod.err)"
done </matrix/modules.order

per_test=$(cat /matrix/per-test-timeout)
[ -x "$(cat /matrix/meshlane-path)" ] || echo "MATRIX-SETUP-FAILED meshlane is not at $(cat /matrix/meshlane-path)"
echo "MATRIX-KERNEL $(uname -r)"

echo "MATRIX-PROBE-BEGIN"
timeout "$per_test" /matrix/bin/meshlane probe --json >/tmp/probe.json 2>/tmp/probe.err
rc=$?
cat /tmp/probe.json
echo
echo "MATRIX-PROBE-END rc=$rc"
sed 's/^/probe stderr: /' /tmp/probe.err

for bin in /matrix/tests/*; do
  suite=${bin##*/}
  "$bin" --list 2>/dev/null | sed -n 's/: test$//p' >/tmp/tests.list
  while read -r t; do
    case "$suite::$t" in *"$(cat /matrix/filter)"*) ;; *) continue ;; esac
    echo "MATRIX-TEST-BEGIN $suite::$t"
    start=$(date +%s)
    dmesg -c >/dev/null
    timeout "$per_test" "$bin" --exact "$t" --test-threads=1 --nocapture </dev/null 2>&1
    rc=$?
    # What the kernel said during a failed test (console loglevel hides most of it).
    [ "$rc" = 0 ] || dmesg | tail -n 30 | sed 's/^/dmesg: /'
    echo "MATRIX-TEST-END $suite::$t rc=$rc s=$(($(date +%s) - start))"
  done </tmp/tests.list
done

echo "GUEST-EXIT rc=0"
sync
poweroff -f
