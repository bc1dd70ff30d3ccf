#!/usr/bin/env python3
"""What the node-wide read tracer costs a read of a socket meshlane never paired, with the read
hints on (the tracer stops at the socket's empty hint slot) and off (it looks the socket up in
ML_UNREAD, as every build before the hints did): the same loaded programs, the control bit
CONTROL_READ_HINTS flipped between phases, interleaved over rounds (docs/DESIGN.md, "The read
tracer"). Only meaningful where the daemon attaches the tracepoint (a kernel that refuses fexit);
with fexit the tracer never runs for these reads and there is nothing to measure.

usage (root): benchmarks/tools/read_hints_ab.py [--rounds 7] [--reads 50000] MESHLANE_BINARY

Starts `meshlane run` on a cgroup and pin directory of its own (removed at exit, with the
previous kernel.bpf_stats_enabled value), then per round and phase makes one loopback TCP
connection in this process, outside any pod, and reads it one byte at a time. Prints ns per run
of the tracer (kernel bpf_stats) per phase and round, then the median and range. A report, not a
test: nothing here fails on a number."""
import argparse
import ctypes
import ctypes.util
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import time
import urllib.request

LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
SYS_BPF = 321  # x86_64
BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_OBJ_GET = 1, 2, 7
BPF_PROG_GET_NEXT_ID, BPF_PROG_GET_FD_BY_ID, BPF_OBJ_GET_INFO_BY_FD = 11, 13, 15
CONTROL_READ_HINTS = 8  # meshlane_common::CONTROL_READ_HINTS
TRACER = "meshlane_recv"  # the raw tracepoint program (fexit is meshlane_recv_e...)


def bpf(cmd: int, attr: bytes) -> int:
    buf = ctypes.create_string_buffer(attr, 128)
    r = LIBC.syscall(SYS_BPF, cmd, buf, 128)
    if r < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf({cmd}): {os.strerror(err)}")
    return r


def obj_get(path: str) -> int:
    p = ctypes.create_string_buffer(path.encode())
    return bpf(BPF_OBJ_GET, struct.pack("QII", ctypes.addressof(p), 0, 0))


def control(fd: int, value: int | None = None) -> int:
    key, val = ctypes.c_uint32(0), ctypes.c_uint32(0)
    attr = struct.pack("IIQQQ", fd, 0, ctypes.addressof(key), ctypes.addressof(val), 0)
    if value is None:
        bpf(BPF_MAP_LOOKUP_ELEM, attr)
        return val.value
    val.value = value
    bpf(BPF_MAP_UPDATE_ELEM, attr)
    return value


def prog_stats(name: str) -> tuple[int, int]:
    """(run_cnt, run_time_ns) of the loaded program called `name`."""
    prog_id = 0
    while True:
        try:
            buf = ctypes.create_string_buffer(struct.pack("II", prog_id, 0), 128)
            if LIBC.syscall(SYS_BPF, BPF_PROG_GET_NEXT_ID, buf, 128) < 0:
                raise LookupError(f"no loaded BPF program {name}")
            prog_id = struct.unpack_from("II", buf.raw)[1]
            fd = bpf(BPF_PROG_GET_FD_BY_ID, struct.pack("I", prog_id))
        except OSError:
            continue
        info = ctypes.create_string_buffer(256)
        try:
            bpf(BPF_OBJ_GET_INFO_BY_FD, struct.pack("IIQ", fd, 256, ctypes.addressof(info)))
        finally:
            os.close(fd)
        if info.raw[64:80].split(b"\0")[0].decode() == name:
            run_ns, run_cnt = struct.unpack_from("QQ", info.raw, 192)
            return run_cnt, run_ns


def reads(n: int) -> None:
    with socket.create_server(("127.0.0.1", 0)) as ls:
        with socket.create_connection(ls.getsockname()) as c:
            s, _ = ls.accept()
            with s:
                for _ in range(n):
                    c.send(b"x")
                    s.recv(1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("meshlane", help="the meshlane binary (target/release/meshlane)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reads", type=int, default=50000, help="reads per phase and round")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("read_hints_ab: run as root", file=sys.stderr)
        return 2
    tag = f"meshlane-read-hints-ab-{os.getpid()}"
    cgroup = next(
        f"{root}/{tag}"
        for root in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup")
        if os.path.exists(f"{root}/cgroup.controllers")
    )
    pin_dir, api = f"/sys/fs/bpf/{tag}", f"/tmp/{tag}.sock"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stats_path = "/proc/sys/kernel/bpf_stats_enabled"
    stats_before = open(stats_path).read().strip()
    os.mkdir(cgroup)
    log = open(f"/tmp/{tag}.log", "w")
    daemon = subprocess.Popen(
        [args.meshlane, "run", "--discovery", "none", "--pin-dir", pin_dir, "--cgroup", cgroup,
         "--api-socket", api, "--metrics-addr", f"127.0.0.1:{port}", "--detach-on-exit"],
        stdout=log, stderr=log)
    try:
        open(stats_path, "w").write("1")
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    metrics = r.read().decode()
                if "meshlane_read_hints" in metrics or "meshlane_read_tracer{" in metrics:
                    break
            except OSError:
                pass
            if daemon.poll() is not None or time.monotonic() > deadline:
                print(f"read_hints_ab: the daemon did not come up (log: {log.name})", file=sys.stderr)
                return 1
            time.sleep(0.5)
        if 'attachment="tracepoint"' not in metrics:
            print("read_hints_ab: the read tracer is not the tracepoint here: nothing to measure")
            return 0
        fd = obj_get(f"{pin_dir}/ML_CONTROL")
        res: dict[str, list[float]] = {"on": [], "off": []}
        for r in range(args.rounds):
            for phase in ("on", "off") if r % 2 == 0 else ("off", "on"):
                flags = control(fd)
                on = flags | CONTROL_READ_HINTS
                control(fd, on if phase == "on" else flags & ~CONTROL_READ_HINTS)
                runs0, ns0 = prog_stats(TRACER)
                reads(args.reads)
                runs1, ns1 = prog_stats(TRACER)
                res[phase].append((ns1 - ns0) / max(runs1 - runs0, 1))
                print(f"round {r + 1} hints {phase:>3}: {res[phase][-1]:6.1f} ns/run "
                      f"({runs1 - runs0} runs)", flush=True)
        control(fd, control(fd) | CONTROL_READ_HINTS)
        for phase, v in res.items():
            print(f"hints {phase:>3}: median {statistics.median(v):.1f} ns/run "
                  f"[{min(v):.1f}..{max(v):.1f}] over {len(v)} rounds")
        return 0
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
        open(stats_path, "w").write(stats_before)
        os.rmdir(cgroup)
        shutil.rmtree(pin_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
