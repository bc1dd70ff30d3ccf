"""bpf(2) from Python, and a throwaway meshlane daemon, for the standalone tools in this directory
(root only; x86_64 syscall number). Nothing here is used by the daemon or the benchmark."""
import contextlib
import ctypes
import ctypes.util
import os
import shutil
import socket
import struct
import subprocess
import time
import urllib.request

LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
SYS_BPF = 321  # x86_64
MAP_CREATE, MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM = 0, 1, 2, 3
PROG_LOAD, OBJ_GET, PROG_ATTACH = 5, 7, 8
PROG_GET_NEXT_ID, PROG_GET_FD_BY_ID, OBJ_GET_INFO_BY_FD, BTF_LOAD = 11, 13, 15, 18
STATS_PATH = "/proc/sys/kernel/bpf_stats_enabled"


def bpf(cmd: int, attr: bytes) -> int:
    buf = ctypes.create_string_buffer(attr, 144)
    r = LIBC.syscall(SYS_BPF, cmd, buf, 144)
    if r < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf({cmd}): {os.strerror(err)}")
    return r


def obj_get(path: str) -> int:
    p = ctypes.create_string_buffer(path.encode())
    return bpf(OBJ_GET, struct.pack("QII", ctypes.addressof(p), 0, 0))


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes:
    k, v = ctypes.create_string_buffer(key), ctypes.create_string_buffer(value_size)
    bpf(MAP_LOOKUP_ELEM, struct.pack("IIQQQ", fd, 0, ctypes.addressof(k), ctypes.addressof(v), 0))
    return v.raw[:value_size]


def map_update(fd: int, key: bytes, value: bytes) -> None:
    k, v = ctypes.create_string_buffer(key), ctypes.create_string_buffer(value)
    bpf(MAP_UPDATE_ELEM, struct.pack("IIQQQ", fd, 0, ctypes.addressof(k), ctypes.addressof(v), 0))


def map_delete(fd: int, key: bytes) -> None:
    k = ctypes.create_string_buffer(key)
    bpf(MAP_DELETE_ELEM, struct.pack("IIQ", fd, 0, ctypes.addressof(k)))


def prog_stats(fd: int) -> tuple[int, int]:
    """(run_cnt, run_time_ns) of a program, as bpf_stats counts them."""
    info = ctypes.create_string_buffer(256)
    bpf(OBJ_GET_INFO_BY_FD, struct.pack("IIQ", fd, 256, ctypes.addressof(info)))
    run_ns, run_cnt = struct.unpack_from("QQ", info.raw, 192)
    return run_cnt, run_ns


def prog_stats_by_name(name: str) -> tuple[int, int]:
    """[`prog_stats`] of the loaded program called `name`."""
    prog_id = 0
    while True:
        buf = ctypes.create_string_buffer(struct.pack("II", prog_id, 0), 128)
        if LIBC.syscall(SYS_BPF, PROG_GET_NEXT_ID, buf, 128) < 0:
            raise LookupError(f"no loaded BPF program {name}")
        prog_id = struct.unpack_from("II", buf.raw)[1]
        try:
            fd = bpf(PROG_GET_FD_BY_ID, struct.pack("I", prog_id))
        except OSError:
            continue  # unloaded meanwhile
        try:
            info = ctypes.create_string_buffer(256)
            bpf(OBJ_GET_INFO_BY_FD, struct.pack("IIQ", fd, 256, ctypes.addressof(info)))
            if info.raw[64:80].split(b"\0")[0].decode() == name:
                return prog_stats(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def bpf_stats():
    """kernel.bpf_stats_enabled on, restored to what it was on exit."""
    before = open(STATS_PATH).read().strip()
    try:
        open(STATS_PATH, "w").write("1")
        yield
    finally:
        open(STATS_PATH, "w").write(before)


@contextlib.contextmanager
def daemon(meshlane: str, tag: str):
    """`meshlane run --discovery none` on a cgroup, pin directory, API socket and metrics port of
    its own, all removed on exit. Yields (pin_dir, metrics text once it serves them)."""
    tag = f"{tag}-{os.getpid()}"
    cgroup = next(
        f"{root}/{tag}"
        for root in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup")
        if os.path.exists(f"{root}/cgroup.controllers")
    )
    pin_dir, api = f"/sys/fs/bpf/{tag}", f"/tmp/{tag}.sock"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.mkdir(cgroup)
    log = open(f"/tmp/{tag}.log", "w")
    proc = subprocess.Popen(
        [meshlane, "run", "--discovery", "none", "--pin-dir", pin_dir, "--cgroup", cgroup,
         "--api-socket", api, "--metrics-addr", f"127.0.0.1:{port}", "--detach-on-exit"],
        stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    metrics = r.read().decode()
                if "meshlane_read_tracer{" in metrics:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not come up (log: {log.name})")
            time.sleep(0.5)
        yield pin_dir, metrics
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        os.rmdir(cgroup)
        shutil.rmtree(pin_dir, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(api)
