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
import os
import socket
import statistics
import struct
import sys

from bpfsys import bpf_stats, daemon, map_lookup, map_update, obj_get, prog_stats_by_name

CONTROL_READ_HINTS = 8  # meshlane_common::CONTROL_READ_HINTS
TRACER = "meshlane_recv"  # the raw tracepoint program (fexit is meshlane_recv_e...)


def control(fd: int, value: int | None = None) -> int:
    """Reads ML_CONTROL's flags word, or writes `value` to it."""
    if value is None:
        return struct.unpack("I", map_lookup(fd, struct.pack("I", 0), 4))[0]
    map_update(fd, struct.pack("I", 0), struct.pack("I", value))
    return value


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
    try:
        with bpf_stats(), daemon(args.meshlane, "meshlane-read-hints-ab") as (pin_dir, metrics):
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
                    runs0, ns0 = prog_stats_by_name(TRACER)
                    reads(args.reads)
                    runs1, ns1 = prog_stats_by_name(TRACER)
                    res[phase].append((ns1 - ns0) / max(runs1 - runs0, 1))
                    print(f"round {r + 1} hints {phase:>3}: {res[phase][-1]:6.1f} ns/run "
                          f"({runs1 - runs0} runs)", flush=True)
            control(fd, control(fd) | CONTROL_READ_HINTS)
            os.close(fd)
    except RuntimeError as e:
        print(f"read_hints_ab: {e}", file=sys.stderr)
        return 1
    for phase, v in res.items():
        print(f"hints {phase:>3}: median {statistics.median(v):.1f} ns/run "
              f"[{min(v):.1f}..{max(v):.1f}] over {len(v)} rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
