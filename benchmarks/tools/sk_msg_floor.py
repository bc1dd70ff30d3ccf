#!/usr/bin/env python3
"""What any sk_msg verdict costs per message on this kernel, before meshlane's own logic: the
floor under issue 13's "sk_msg <= 150 ns" budget (docs/DESIGN.md, "What the datapath costs").

Each variant is a few hand-assembled BPF instructions, loaded with bpf(2) from here, attached to
a sockhash of its own that holds one loopback client socket; its accepted peer sits in a map
with no program, as meshlane's sidecar ends do under the reader rule. Per round and variant a
fresh connection makes a 64 B ping-pong: the client's send runs the verdict (and, where it
redirects, lands in the peer's receive queue), the echo comes back on plain TCP. Variants, all
interleaved over rounds in a rotating order:

  empty            return SK_PASS: the kernel's dispatch (and bpf_stats' own clock reads)
  storage          bpf_sk_storage_get of the sender's state, then SK_PASS
  redirect_hash    bpf_msg_redirect_hash to the peer, key a constant (what meshlane does)
  redirect_map     bpf_msg_redirect_map to the peer at a constant sockmap index
  storage+hash     state lookup, then redirect_hash with the peer's key read from the state:
                   the least any exact design does (the peer is known only from the socket's
                   state, never from addresses)
  storage+map      the same with the peer at a sockmap index read from the state

usage (root): benchmarks/tools/sk_msg_floor.py [--rounds 7] [--messages 20000] [--evict MIB]
                [--variants a,b] [--meshlane target/release/meshlane]

With --meshlane it also runs meshlane's own sk_msg (a throwaway daemon's pins, its state written
as sock_ops writes it for a paired app socket under the reader rule). With --evict it writes that
much memory before each message, so every variant runs on cold caches.

Prints ns per run (kernel bpf_stats, run_time_ns / run_cnt of each variant's program) per
round, then the median and range, and checks each redirecting variant really redirected (the
echo is only sent after the peer read the message, and the client's TCP segment count must not
move). Cleans up every fd and restores kernel.bpf_stats_enabled. A report, not a test."""
import argparse
import ctypes
import os
import socket
import statistics
import struct
import sys

from bpfsys import (BTF_LOAD, MAP_CREATE, PROG_ATTACH, PROG_LOAD, bpf, bpf_stats, daemon,
                    map_update, obj_get, prog_stats)

MAP_SOCKMAP, MAP_SOCKHASH, MAP_SK_STORAGE = 15, 18, 24
PROG_SK_MSG, SK_MSG_VERDICT = 16, 7
F_NO_PREALLOC, F_INGRESS = 1, 1
# Helper ids (enum bpf_func_id).
MSG_REDIRECT_MAP, MSG_REDIRECT_HASH, SK_STORAGE_GET = 60, 71, 107
SK_DROP, SK_PASS = 0, 1
SK_MSG_MD_SK = 72  # offsetof(struct sk_msg_md, sk)
SO_COOKIE = 57
TARGET_KEY = 0  # the peer's key in the target map (meshlane keys by cookie; a constant here)
# meshlane_common: an app hop's sending end under the reader rule, paired, its peer known.
ROLE_OUT_APP = 1
SOCK_IN_MAP, SOCK_READER_RULE, SOCK_PEER_KNOWN = 8, 16, 32


def map_create(kind: int, key: int, value: int, entries: int, flags: int = 0, btf: tuple = ()) -> int:
    attr = struct.pack("IIIIIII16sI", kind, key, value, entries, flags, 0, 0, b"", 0)
    if btf:
        attr += struct.pack("III", *btf)
    return bpf(MAP_CREATE, attr)


def storage_btf() -> int:
    """BTF for an sk_storage map: an `int` key (required) and an 8-byte value."""
    strings = b"\0int\0long\0"
    kind_int = 1 << 24
    types = struct.pack("IIII", 1, kind_int, 4, 32 | 1 << 24)  # [1] int, signed, 32 bits
    types += struct.pack("IIII", 5, kind_int, 8, 64)  # [2] long, 64 bits
    blob = struct.pack("HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    blob = ctypes.create_string_buffer(blob + types + strings)
    return bpf(BTF_LOAD, struct.pack("QQIII", ctypes.addressof(blob), 0, len(blob.raw) - 1, 0, 0))


def insn(op: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", op, src << 4 | dst, off, imm)


def ld_map(dst: int, fd: int) -> bytes:
    return insn(0x18, dst, 1, 0, fd) + insn(0)  # ld_imm64 with BPF_PSEUDO_MAP_FD


def ld_imm64(dst: int, v: int) -> bytes:
    return insn(0x18, dst, 0, 0, v & 0xFFFFFFFF) + insn(0, imm=v >> 32)


MOV_K, MOV_X, EXIT, CALL, STX_DW, LDX_DW, JEQ_K = 0xB7, 0xBF, 0x95, 0x85, 0x7B, 0x79, 0x15


def ret(v: int) -> bytes:
    return insn(MOV_K, 0, imm=v) + insn(EXIT)


def redirect(kind: str, target_fd: int, key_from_r0: bool = False) -> bytes:
    """Call the redirect helper on ctx (r6) with the key at fp-8; its result is the verdict."""
    code = b""
    if key_from_r0:
        code += insn(LDX_DW, 1, 0, 0)  # r1 = *(u64 *)state: the peer's key
    else:
        code += ld_imm64(1, TARGET_KEY)
    code += insn(STX_DW, 10, 1, -8)
    code += insn(MOV_X, 1, 6) + ld_map(2, target_fd) + insn(MOV_X, 3, 10)
    code += insn(0x07, 3, imm=-8)  # r3 = fp - 8
    if kind == "hash":
        return code + insn(MOV_K, 4, imm=F_INGRESS) + insn(CALL, imm=MSG_REDIRECT_HASH) + insn(EXIT)
    # redirect_map takes the index by value, not a pointer.
    return code + insn(LDX_DW, 3, 10, -8) + insn(MOV_K, 4, imm=F_INGRESS) + insn(
        CALL, imm=MSG_REDIRECT_MAP) + insn(EXIT)


def storage_get(storage_fd: int, miss_jump: int) -> bytes:
    """r0 = this socket's state; without one, jump `miss_jump` instructions past the end."""
    return (insn(LDX_DW, 2, 6, SK_MSG_MD_SK) + insn(JEQ_K, 2, off=miss_jump + 6, imm=0)
            + ld_map(1, storage_fd) + insn(MOV_K, 3) + insn(MOV_K, 4) + insn(CALL, imm=SK_STORAGE_GET)
            + insn(JEQ_K, 0, off=miss_jump, imm=0))


def program(variant: str, fds: dict[str, int]) -> bytes:
    code = insn(MOV_X, 6, 1)  # r6 = ctx
    if variant == "empty":
        return code + ret(SK_PASS)
    if variant == "redirect_hash":
        return code + redirect("hash", fds["targets_hash"])
    if variant == "redirect_map":
        return code + redirect("map", fds["targets_map"])
    if variant == "storage":
        tail = ret(SK_PASS)
    elif variant == "storage+hash":
        tail = redirect("hash", fds["targets_hash"], True)
    else:
        tail = redirect("map", fds["targets_map"], True)
    # No state drops the message: the send fails (EACCES) and the tool stops, so a variant that
    # never found its state cannot pass for one that did.
    miss = ret(SK_DROP)
    return code + storage_get(fds["storage"], len(tail) // 8) + tail + miss


def prog_load(code: bytes, name: str) -> int:
    c, lic = ctypes.create_string_buffer(code), ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(65536)
    attr = struct.pack("IIQQIIQII16s", PROG_SK_MSG, len(code) // 8, ctypes.addressof(c),
                       ctypes.addressof(lic), 1, len(log), ctypes.addressof(log), 0, 0,
                       name.encode()[:15])
    try:
        return bpf(PROG_LOAD, attr)
    except OSError as e:
        raise OSError(e.errno, f"loading {name}: {e.strerror}\n{log.value.decode()}") from None


def data_segs_out(s: socket.socket) -> int:
    """tcpi_data_segs_out of struct tcp_info (offset 156, since 4.19)."""
    info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return struct.unpack_from("I", info, 156)[0]


VARIANTS = ["empty", "storage", "redirect_hash", "redirect_map", "storage+hash", "storage+map"]
REDIRECTS = {"redirect_hash", "redirect_map", "storage+hash", "storage+map", "meshlane"}


def cookie(s: socket.socket) -> int:
    return struct.unpack("Q", s.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]


def ping_pong(c: socket.socket, s: socket.socket, messages: int, evict: bytearray | None) -> None:
    msg = b"m" * 64
    sweep = None
    if evict:
        addr = ctypes.addressof((ctypes.c_char * len(evict)).from_buffer(evict))
        sweep = lambda i: ctypes.memset(addr, i & 0xFF, len(evict))  # noqa: E731
    for i in range(messages):
        if sweep:
            sweep(i)  # what other processes do to the caches between two messages of a socket
        c.sendall(msg)
        got = 0
        while got < len(msg):
            got += len(s.recv(len(msg) - got))
        s.sendall(msg)
        got = 0
        while got < len(msg):
            got += len(c.recv(len(msg) - got))


def floor_setup(variant: str, fds: dict[str, int], entries: int, owned: list[int]):
    """Loads `variant` on maps of its own; returns (program fd, how to put a pair in)."""
    verdict_map = map_create(MAP_SOCKHASH, 8, 8, entries)
    owned.append(verdict_map)
    targets_hash = map_create(MAP_SOCKHASH, 8, 8, entries)
    owned.append(targets_hash)
    targets_map = map_create(MAP_SOCKMAP, 4, 8, entries)
    owned.append(targets_map)
    fds = dict(fds, targets_hash=targets_hash, targets_map=targets_map)
    prog = prog_load(program(variant, fds), "floor_" + variant.replace("+", "_"))
    owned.append(prog)
    bpf(PROG_ATTACH, struct.pack("IIII", verdict_map, prog, SK_MSG_VERDICT, 0))

    def put(c: socket.socket, s: socket.socket) -> None:
        key = struct.pack("Q", TARGET_KEY)
        map_update(targets_hash, key, struct.pack("Q", s.fileno()))
        map_update(targets_map, struct.pack("I", TARGET_KEY), struct.pack("Q", s.fileno()))
        if variant.startswith("storage"):
            map_update(fds["storage"], struct.pack("i", c.fileno()), key)
        map_update(verdict_map, struct.pack("Q", 1), struct.pack("Q", c.fileno()))

    return prog, put


def meshlane_setup(pins: dict[str, int]):
    """meshlane's own sk_msg (a throwaway daemon's pins): the client is an app socket the
    programs paired under the reader rule, its peer the target; the state is written as sock_ops
    writes it at pairing (SockState, meshlane_common)."""

    def put(c: socket.socket, s: socket.socket) -> None:
        state = struct.pack("<Q32sQBBHIQQQ", cookie(c), b"", 0, ROLE_OUT_APP,
                            SOCK_IN_MAP | SOCK_READER_RULE | SOCK_PEER_KNOWN, 0, 0, cookie(s), 0, 0)
        map_update(pins["ML_SOCK_STATE"], struct.pack("i", c.fileno()), state)
        map_update(pins["ML_TARGETS"], struct.pack("Q", cookie(s)), struct.pack("I", s.fileno()))
        map_update(pins["ML_SOCKS"], struct.pack("Q", cookie(c)), struct.pack("I", c.fileno()))

    return pins["prog_sk_msg"], put


def run_variant(variant: str, fds: dict[str, int], messages: int, entries: int,
                evict: bytearray | None) -> float:
    """One fresh connection through `variant`; ns per run of its program."""
    owned: list[int] = []
    try:
        if variant == "meshlane":
            prog, put = meshlane_setup(fds)
        else:
            prog, put = floor_setup(variant, fds, entries, owned)
        with socket.create_server(("127.0.0.1", 0)) as ls, \
                socket.create_connection(ls.getsockname()) as c:
            s, _ = ls.accept()
            with s:
                for sock in (c, s):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                put(c, s)
                segs0, (runs0, ns0) = data_segs_out(c), prog_stats(prog)
                ping_pong(c, s, messages, evict)
                runs1, ns1 = prog_stats(prog)
                segs = data_segs_out(c) - segs0
        if runs1 - runs0 < messages:
            raise RuntimeError(f"{variant}: the program ran {runs1 - runs0} times for {messages} sends")
        # A redirected send leaves no TCP data segment, a passed one leaves one.
        want = 0 if variant in REDIRECTS else messages
        if segs != want:
            raise RuntimeError(f"{variant}: {segs} TCP data segments for {messages} sends "
                               f"(expected {want})")
        return (ns1 - ns0) / (runs1 - runs0)
    finally:
        for fd in owned:
            os.close(fd)


def measure(args, fds: dict[str, int], variants: list[str]) -> dict[str, list[float]]:
    res: dict[str, list[float]] = {v: [] for v in variants}
    evict = bytearray(args.evict << 20) if args.evict else None
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            res[v].append(run_variant(v, fds, args.messages, args.entries, evict))
            print(f"round {r + 1} {v:>14}: {res[v][-1]:6.1f} ns/run", flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--messages", type=int, default=20000, help="messages per variant and round")
    ap.add_argument("--entries", type=int, default=65536,
                    help="max entries of each socket map (meshlane's SOCKS_MAX: 65536)")
    ap.add_argument("--meshlane", metavar="BINARY",
                    help="also measure meshlane's own sk_msg, from a daemon this tool starts")
    ap.add_argument("--evict", type=int, default=0, metavar="MIB",
                    help="before each message, write MIB MiB of memory (cold caches, as when "
                    "other processes run between two messages of a socket); use fewer messages")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated, of: {', '.join(VARIANTS)}")
    args = ap.parse_args()
    variants = args.variants.split(",")
    if unknown := [v for v in variants if v not in VARIANTS]:
        ap.error(f"--variants: unknown {', '.join(unknown)}")
    if os.geteuid() != 0:
        print("sk_msg_floor: run as root", file=sys.stderr)
        return 2
    btf = storage_btf()
    fds = {"storage": map_create(MAP_SK_STORAGE, 4, 8, 0, F_NO_PREALLOC, (btf, 1, 2))}
    try:
        with bpf_stats():
            if args.meshlane:
                with daemon(args.meshlane, "meshlane-sk-msg-floor") as (pin_dir, _):
                    for pin in ("ML_SOCK_STATE", "ML_TARGETS", "ML_SOCKS", "prog_sk_msg"):
                        fds[pin] = obj_get(f"{pin_dir}/{pin}")
                    res = measure(args, fds, variants + ["meshlane"])
            else:
                res = measure(args, fds, variants)
    except RuntimeError as e:
        print(f"sk_msg_floor: {e}", file=sys.stderr)
        return 1
    finally:
        for fd in fds.values():
            os.close(fd)
        os.close(btf)
    print(f"\n{os.uname().release}, {os.cpu_count()} CPUs, {args.rounds} rounds x "
          f"{args.messages} messages of 64 B, maps of {args.entries} entries, "
          + (f"{args.evict} MiB written before each message, " if args.evict else "")
          + "median ns/run [min..max]")
    for v, ns in res.items():
        print(f"{v:>14}: {statistics.median(ns):6.1f} [{min(ns):.1f}..{max(ns):.1f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
