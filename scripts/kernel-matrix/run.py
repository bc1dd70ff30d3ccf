#!/usr/bin/env python3
"""The kernel matrix: meshlane's privileged datapath tests and `meshlane probe` on other kernels.

For each kernel line in kernels.toml this fetches the kernel from Debian's repositories
(resolving the metapackage now, so a security update never breaks a pinned name), boots it under
QEMU software emulation with an initramfs that carries the tests as static binaries, the static
`meshlane` binary and the node tools they drive (ip, nsenter, iptables-nft), and reads each test's
result from markers on the serial console. The host's own kernel runs the same binaries natively.

Nothing is installed system-wide: QEMU and busybox are unpacked from their .deb files into the
cache, apt runs with a private configuration, and downloads are kept for the next run. A guest
that panics or hangs fails with its console log kept under --out.

Exit status: 0 when every test passed on every kernel and no kernel logged a warning or oops;
1 otherwise; 2 when the matrix could not be set up (no network, a package that vanished).
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

# The test binaries the guests run: every privileged test that needs no Envoy (pairing, the
# first-byte rule, pod isolation with identical addresses, EOF, half-close, RST, large and tiny
# writes, the unread budget, daemon restart and detach, the probe and a refusing daemon, the
# redirect mode each kernel gets, and the socket-API conformance suite).
TEST_SUITES = ["datapath", "semantics", "lifecycle", "probe", "appview", "cost", "forgery", "reorder"]

# Host tools the tests run, copied into the guest with the shared libraries they load.
GUEST_TOOLS = ["ip", "nsenter", "iptables-restore", "iptables-save", "iptables",
               "ip6tables-restore", "ip6tables-save", "ip6tables"]

# Kernel modules the pods need: veth links and istio-init's nat rules through iptables-nft
# (REDIRECT, owner and port matches through nft_compat). Built-in or absent ones are skipped.
WANTED_MODULES = [
    "veth",
    "nf_tables",
    "nft_compat",
    "nft_chain_nat",
    "nft_redir",
    "nf_nat",
    "nf_conntrack",
    "xt_owner",
    "xt_tcpudp",
    "xt_REDIRECT",
    "xt_nat",
    "xt_comment",
    "xt_multiport",
    "xt_conntrack",
    "xt_mark",
]

DEBIAN = "http://deb.debian.org/debian"
DEBIAN_SECURITY = "http://deb.debian.org/debian-security"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
TOOLS_SUITES = ["bookworm", "bookworm-updates", "bookworm-security"]

README_BEGIN = "<!-- kernel-matrix:begin (written by scripts/kernel-matrix/run.py --update-readme) -->"
README_END = "<!-- kernel-matrix:end -->"

# Lines of a kernel log that mean the kernel itself complained (a hazard may show this way
# even when every byte arrived).
KERNEL_TROUBLE = re.compile(
    r"(WARNING: CPU:|BUG: |Oops|Kernel panic|general protection fault|"
    r"INFO: task .* blocked for more than|refcount_t: |UBSAN: |list_(add|del) corruption)"
)


class SetupError(Exception):
    """The matrix could not be set up (as opposed to a test that failed)."""


def log(msg: str) -> None:
    print(f"[kernel-matrix] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """Runs cmd; a failure raises SetupError naming the command and its stderr."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    p = subprocess.run(cmd, **kw)
    if p.returncode != 0:
        err = (p.stderr or "").strip()[-2000:]
        raise SetupError(f"`{' '.join(map(str, cmd))}` exited {p.returncode}: {err}")
    return p


# ---------------------------------------------------------------------------------------------
# Debian packages through a private apt configuration


class Apt:
    """apt-get/apt-cache with their own sources, lists and archive cache under `root`.

    `host_status` makes apt see the packages the host has, so `install --download-only` fetches
    only what is missing here (the QEMU libraries); kernels are resolved against an empty status.
    """

    def __init__(self, root: Path, suites: list[str], host_status: bool):
        self.root = root
        for d in ["lists/partial", "archives/partial", "parts", "prefs"]:
            (root / d).mkdir(parents=True, exist_ok=True)
        lines = []
        for s in suites:
            uri = DEBIAN_SECURITY if s.endswith("-security") else DEBIAN
            lines.append(f"deb [signed-by={KEYRING}] {uri} {s} main")
        (root / "sources.list").write_text("\n".join(lines) + "\n")
        status = root / "status"
        if not status.exists():
            status.write_text("")
        conf = [
            f'Dir::Etc::SourceList "{root}/sources.list";',
            f'Dir::Etc::SourceParts "{root}/parts";',
            f'Dir::Etc::Parts "{root}/parts";',
            f'Dir::Etc::PreferencesParts "{root}/prefs";',
            f'Dir::State::Lists "{root}/lists";',
            f'Dir::Cache "{root}";',
            f'Dir::Cache::Archives "{root}/archives";',
            'Acquire::Languages "none";',
            'Acquire::Retries "3";',
            'APT::Sandbox::User "root";',
            'APT::Architecture "amd64";',
        ]
        if not host_status:
            conf.append(f'Dir::State::status "{status}";')
        (root / "apt.conf").write_text("\n".join(conf) + "\n")
        self.env = dict(os.environ, APT_CONFIG=str(root / "apt.conf"), DEBIAN_FRONTEND="noninteractive")

    def update(self) -> None:
        """Refreshes the package lists; keeps what it has (with a warning) when some fail."""
        p = subprocess.run(["apt-get", "update", "-qq"], env=self.env, capture_output=True, text=True)
        have_lists = any((self.root / "lists").glob("*_Packages*"))
        if p.returncode != 0 or "Failed to fetch" in p.stderr:
            if not have_lists:
                raise SetupError(f"apt-get update ({self.root}/sources.list) failed: {p.stderr.strip()[-1500:]}")
            # One suite failing (offline, or a mirror whose Release file has expired) leaves the
            # others usable; a kernel that needed it fails to resolve with its own error.
            log(f"apt-get update reported errors; going on with the package lists it has: {p.stderr.strip()[-300:]}")

    def cmd(self, *args: str, cwd: Path | None = None) -> str:
        return run(list(args), env=self.env, cwd=cwd).stdout


def deb_version_gt(a: str, b: str) -> bool:
    return subprocess.run(["dpkg", "--compare-versions", a, "gt", b]).returncode == 0


def resolve_kernel(apt: Apt, package: str, suites: list[str], prefix: str) -> tuple[str, list[str]]:
    """The newest `package` version from `suites` starting with `prefix`, and the exact
    `name=version` of every linux-image/binary/modules package it pulls in."""
    best = None
    for line in apt.cmd("apt-cache", "madison", package).splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) < 3 or not parts[1].startswith(prefix):
            continue
        suite = parts[2].split()[1].split("/")[0] if len(parts[2].split()) > 1 else ""
        if suite in suites and (best is None or deb_version_gt(parts[1], best)):
            best = parts[1]
    if best is None:
        raise SetupError(f"no {package} version {prefix}* in {', '.join(suites)}")
    wanted, todo = [], [(package, best)]
    while todo:
        name, ver = todo.pop()
        wanted.append(f"{name}={ver}")
        show = apt.cmd("apt-cache", "show", f"{name}={ver}")
        deps = re.search(r"^Depends: (.*)$", show.split("\n\n")[0], re.M)
        for alt in (deps.group(1).split(",") if deps else []):
            for dep in alt.split("|"):
                m = re.match(r"\s*(linux-(?:image|binary|modules)-\S+) \(= (\S+)\)", dep)
                if m and f"{m.group(1)}={m.group(2)}" not in wanted:
                    todo.append((m.group(1), m.group(2)))
    return best, wanted


@dataclass
class Kernel:
    name: str
    version: str  # the Debian package version
    release: str  # uname -r
    vmlinuz: Path
    modules: Path  # .../lib/modules/<release>
    known: dict[str, str] = field(default_factory=dict)  # suite::test -> why it fails here


def fetch_kernel(cache: Path, apt: Apt, spec: dict) -> Kernel:
    version, pkgs = resolve_kernel(apt, spec["package"], spec["suites"], spec["version"])
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    root = cache / "kernels" / f"{spec['package']}_{version}"
    stamp = root / ".unpacked"
    if not stamp.exists():
        log(f"{spec['name']}: fetching {', '.join(pkgs)}")
        apt.cmd("apt-get", "download", "-qq", *pkgs, cwd=debs)
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        for p in pkgs:
            name, ver = p.split("=")
            ver_file = ver.replace(":", "%3a")
            matches = list(debs.glob(f"{name}_{ver_file}_*.deb"))
            if not matches:
                raise SetupError(f"apt-get download left no .deb for {p} in {debs}")
            run(["dpkg-deb", "-x", str(matches[0]), str(root)])
        stamp.write_text("\n".join(pkgs) + "\n")
    images = list(root.glob("boot/vmlinuz-*")) + list(root.glob("usr/lib/modules/*/vmlinuz"))
    mods = [d for d in list(root.glob("lib/modules/*")) + list(root.glob("usr/lib/modules/*")) if (d / "kernel").is_dir()]
    if len(images) != 1 or len(mods) != 1:
        raise SetupError(f"{root}: expected one vmlinuz and one modules dir, found {images} and {mods}")
    return Kernel(spec["name"], version, mods[0].name, images[0], mods[0], dict(spec.get("known", {})))


def fetch_tools(cache: Path) -> Path:
    """QEMU and busybox-static from bookworm, unpacked (never installed: bookworm's QEMU would
    replace the image's qemu-utils). Returns the unpacked root."""
    apt = Apt(cache / "apt-tools", TOOLS_SUITES, host_status=True)
    root = cache / "tools"
    qemu = root / "usr/bin/qemu-system-x86_64"
    if not qemu.exists() or not (root / "bin/busybox").exists():
        log("fetching QEMU and busybox-static (unpacked into the cache, not installed)")
        apt.update()
        apt.cmd("apt-get", "install", "-y", "-qq", "--download-only", "--no-install-recommends",
                "qemu-system-x86", "busybox-static")
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        for deb in sorted((apt.root / "archives").glob("*.deb")):
            run(["dpkg-deb", "-x", str(deb), str(root)])
    p = subprocess.run([str(qemu), "--version"], env=qemu_env(root), capture_output=True, text=True)
    if p.returncode != 0:
        raise SetupError(f"the unpacked QEMU does not start: {p.stderr.strip()} (remove {root} to refetch)")
    return root


def qemu_env(tools: Path) -> dict:
    libs = [tools / "usr/lib/x86_64-linux-gnu", tools / "lib/x86_64-linux-gnu"]
    return dict(os.environ, LD_LIBRARY_PATH=":".join(map(str, libs)))


# ---------------------------------------------------------------------------------------------
# The payload: static test binaries and meshlane


@dataclass
class Build:
    tests: dict[str, Path]  # suite -> stripped test binary
    meshlane: Path  # stripped meshlane
    meshlane_path: str  # where the tests look for meshlane (CARGO_BIN_EXE_meshlane)


def is_static(path: Path) -> bool:
    """True when the ELF file has no program interpreter (PT_INTERP)."""
    with open(path, "rb") as f:
        data = f.read(1 << 16)
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    phoff = int.from_bytes(data[0x20:0x28], "little")
    phentsize = int.from_bytes(data[0x36:0x38], "little")
    phnum = int.from_bytes(data[0x38:0x3A], "little")
    for i in range(phnum):
        if int.from_bytes(data[phoff + i * phentsize : phoff + i * phentsize + 4], "little") == 3:
            return False
    return True


def build(suites: list[str], out: Path) -> Build:
    """Builds the test binaries and meshlane statically linked (crt-static glibc), so they run
    on any guest userland. --target keeps them apart from the host build's artifacts."""
    log("building static test binaries and meshlane (cargo test --no-run, +crt-static)")
    cmd = ["cargo", "test", "--locked", "--no-run", "-p", "meshlane", "--target", "x86_64-unknown-linux-gnu",
           "--message-format=json-render-diagnostics"]
    for s in suites:
        cmd += ["--test", s]
    env = dict(os.environ, RUSTFLAGS="-C target-feature=+crt-static")
    p = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise SetupError("the static build failed (cargo's errors are above)")
    tests, meshlane = {}, None
    for line in p.stdout.splitlines():
        msg = json.loads(line)
        if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
            continue
        kinds = msg["target"]["kind"]
        if "test" in kinds and msg["target"]["name"] in suites:
            tests[msg["target"]["name"]] = Path(msg["executable"])
        elif "bin" in kinds and msg["target"]["name"] == "meshlane":
            meshlane = Path(msg["executable"])
    if meshlane is None:
        meshlane = REPO / "target/x86_64-unknown-linux-gnu/debug/meshlane"
    missing = [s for s in suites if s not in tests]
    if missing or not meshlane.exists():
        raise SetupError(f"the build produced no binary for {missing or 'meshlane'}")
    for b in [meshlane, *tests.values()]:
        if not is_static(b):
            raise SetupError(f"{b} is dynamically linked; the guests need static binaries")
    # Debug builds carry ~200 MB of DWARF each; the guest keeps its initramfs in RAM.
    bins = out / "bin"
    bins.mkdir(parents=True, exist_ok=True)

    def stripped(b: Path, name: str) -> Path:
        dst = bins / name
        run(["strip", "--strip-debug", "-o", str(dst), str(b)])
        return dst

    return Build({s: stripped(b, s) for s, b in tests.items()}, stripped(meshlane, "meshlane"), str(meshlane))


# ---------------------------------------------------------------------------------------------
# The initramfs


class Tree:
    """A directory tree to pack: path in the guest -> ('file', host path, mode) | ('dir',) |
    ('link', target)."""

    def __init__(self):
        self.entries: dict[str, tuple] = {}

    def dir(self, path: str) -> None:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            self.entries.setdefault("/".join(parts[:i]), ("dir",))

    def file(self, path: str, src: Path | bytes, mode: int = 0o755) -> None:
        path = path.strip("/")
        if "/" in path:
            self.dir(path.rsplit("/", 1)[0])
        self.entries[path] = ("file", src, mode)

    def link(self, path: str, target: str) -> None:
        path = path.strip("/")
        if "/" in path:
            self.dir(path.rsplit("/", 1)[0])
        self.entries[path] = ("link", target)

    def host_file(self, path: str) -> None:
        """Copies a host file (following symlinks for the content) to the same path."""
        self.file(path, Path(os.path.realpath(path)), os.stat(path).st_mode & 0o7777)

    def write_cpio(self, out: Path) -> None:
        """An uncompressed newc archive: the kernel unpacks it without a decompressor, which
        also saves time under emulation."""
        ino = 1
        with open(out, "wb") as f:

            def entry(name: str, mode: int, data: bytes) -> None:
                nonlocal ino
                hdr = "070701" + "".join(
                    f"{v:08x}" for v in [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
                )
                ino += 1
                blob = hdr.encode() + name.encode() + b"\0"
                blob += b"\0" * (-len(blob) % 4)
                f.write(blob + data + b"\0" * (-len(data) % 4))

            for name in sorted(self.entries):
                e = self.entries[name]
                if e[0] == "dir":
                    entry(name, 0o040755, b"")
                elif e[0] == "link":
                    entry(name, 0o120777, e[1].encode())
                else:
                    src, mode = e[1], e[2]
                    data = src if isinstance(src, bytes) else src.read_bytes()
                    entry(name, 0o100000 | mode, data)
            entry("TRAILER!!!", 0, b"")


def which(tool: str) -> str:
    for d in os.environ.get("PATH", "").split(":") + ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]:
        if d and os.access(os.path.join(d, tool), os.X_OK):
            return os.path.join(d, tool)
    raise SetupError(f"{tool} is not on this machine (scripts/setup.sh installs it)")


def add_with_libs(tree: Tree, path: str) -> None:
    """Adds a dynamically linked host program or library and everything `ldd` says it loads."""
    tree.host_file(path)
    p = subprocess.run(["ldd", path], capture_output=True, text=True)
    for line in p.stdout.splitlines():
        m = re.search(r"(?:=> )?(/\S+) \(0x", line)
        if m:
            tree.host_file(m.group(1))


def common_tree(build: Build, tools: Path, per_test_timeout: int, filt: str) -> Tree:
    t = Tree()
    for d in ["proc", "sys", "dev", "run", "tmp", "root", "etc", "var"]:
        t.dir(d)
    t.link("var/run", "../run")
    t.file("init", (HERE / "guest-init.sh").read_bytes())
    t.file("bin/busybox", tools / "bin/busybox")
    t.file("matrix/per-test-timeout", f"{per_test_timeout}\n".encode(), 0o644)
    t.file("matrix/filter", f"{filt}\n".encode(), 0o644)
    # meshlane where the tests look for it (the path cargo compiled in), and a short name.
    t.file(build.meshlane_path, build.meshlane)
    t.link("matrix/bin/meshlane", build.meshlane_path)
    if build.meshlane_path.startswith(("/proc/", "/sys/", "/dev/", "/run/")):
        raise SetupError(f"the tests look for meshlane at {build.meshlane_path}, under a directory the guest "
                         "mounts over; build from a checkout elsewhere")
    t.file("matrix/meshlane-path", f"{build.meshlane_path}\n".encode(), 0o644)
    for suite, b in build.tests.items():
        t.file(f"matrix/tests/{suite}", b)
    for tool in GUEST_TOOLS:
        path = which(tool)
        real = os.path.realpath(path)
        add_with_libs(t, real)
        if real != path:
            # /usr/sbin/ip -> /usr/bin/ip (merged /usr), iptables-restore -> xtables-nft-multi
            # (a multi-call binary that dispatches on argv[0], so the name must stay a link).
            t.link(path, real)
    xt = Path("/usr/lib/x86_64-linux-gnu/xtables")
    for so in sorted(xt.glob("*.so")):
        add_with_libs(t, str(so))
    for f in ["/etc/protocols", "/etc/services", "/etc/ethertypes"]:
        if os.path.exists(f):
            t.file(f, Path(f), 0o644)
    t.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nistio-proxy:x:1337:1337::/:/bin/false\n", 0o644)
    t.file("etc/group", b"root:x:0:\nistio-proxy:x:1337:\n", 0o644)
    return t


def modinfo_depends(data: bytes) -> list[str]:
    m = re.search(rb"(?:^|\x00)depends=([^\x00]*)\x00", data)
    return [d for d in m.group(1).decode().split(",") if d] if m else []


def module_tree(kernel: Kernel) -> tuple[Tree, list[str]]:
    """The wanted modules and their dependencies, decompressed, with a load order."""
    files: dict[str, Path] = {}
    for p in (kernel.modules / "kernel").rglob("*.ko*"):
        name = p.name.split(".ko")[0].replace("-", "_")
        files[name] = p
    order, seen, t = [], set(), Tree()

    def visit(name: str) -> None:
        if name in seen or name not in files:
            return
        seen.add(name)
        p = files[name]
        data = p.read_bytes()
        if p.name.endswith(".xz"):
            data = lzma.decompress(data)
        elif p.name.endswith(".zst"):
            data = run(["zstd", "-dc", str(p)], text=False).stdout
        for dep in modinfo_depends(data):
            visit(dep.replace("-", "_"))
        t.file(f"matrix/modules/{name}.ko", data, 0o644)
        order.append(name)

    for m in WANTED_MODULES:
        visit(m)
    t.file("matrix/modules.order", ("\n".join(order) + "\n").encode(), 0o644)
    return t, order


# ---------------------------------------------------------------------------------------------
# Reading the console


@dataclass
class Outcome:
    """What one kernel (or the host) said."""

    release: str = ""
    finished: bool = False
    probe: dict | None = None
    probe_rc: int | None = None
    tests: dict[str, str] = field(default_factory=dict)  # suite::test -> pass | FAIL (rc N)
    known: dict[str, str] = field(default_factory=dict)  # suite::test -> why it fails on this kernel
    output: dict[str, list[str]] = field(default_factory=dict)  # suite::test -> its lines
    trouble: list[str] = field(default_factory=list)  # kernel warnings, oopses, module failures
    seconds: float = 0.0
    note: str = ""


def parse_console(text: str) -> Outcome:
    o = Outcome()
    current, probe_lines = None, None
    for raw in text.splitlines():
        line = raw.rstrip("\r")
        if KERNEL_TROUBLE.search(line):
            o.trouble.append(line.strip())
        if m := re.search(r"MATRIX-KERNEL (\S+)", line):
            o.release = m.group(1)
        elif m := re.search(r"MATRIX-SETUP-FAILED (.*)", line):
            o.trouble.append(f"guest set-up: {m.group(1)}")
        elif m := re.search(r"MATRIX-MODULE-FAILED (\S+)(.*)", line):
            o.trouble.append(f"insmod {m.group(1)} failed:{m.group(2)}")
        elif "MATRIX-PROBE-BEGIN" in line:
            probe_lines = []
        elif m := re.search(r"MATRIX-PROBE-END rc=(\d+)", line):
            o.probe_rc = int(m.group(1))
            try:
                o.probe = json.loads("\n".join(probe_lines or []))
            except json.JSONDecodeError:
                o.probe = None
            probe_lines = None
        elif probe_lines is not None:
            probe_lines.append(line)
        elif m := re.search(r"MATRIX-TEST-BEGIN (\S+)", line):
            current = m.group(1)
            o.tests[current] = "not finished"
            o.output[current] = []
        elif m := re.search(r"MATRIX-TEST-END (\S+) rc=(\d+)", line):
            rc = int(m.group(2))
            o.tests[m.group(1)] = "pass" if rc == 0 else ("FAIL (timeout)" if rc in (124, 143) else f"FAIL (rc {rc})")
            current = None
        elif re.search(r"GUEST-EXIT rc=0", line):
            o.finished = True
        elif current is not None:
            o.output[current].append(line)
    return o


def probe_cell(o: Outcome) -> str:
    """The probe's verdict and, when it refuses, the failed checks."""
    if o.probe is None:
        return "FAIL (no report)" if o.probe_rc is not None or o.finished else "not run"
    fails = [c["name"] for c in o.probe.get("checks", []) if c.get("status") == "fail"]
    return "safe" if o.probe.get("ok") else "refuses: " + ", ".join(fails)


def _mode(o: Outcome, name: str) -> dict | None:
    return next((m for m in (o.probe or {}).get("modes", []) if m.get("mode") == name), None)


def mode_cell(o: Outcome) -> str:
    """The mode `meshlane run` takes with its default `--mode auto` on this kernel (the same rule
    as accelerator/src/mode.rs): the reader rule only where apps see exactly plain TCP under it,
    else app sockets left alone and only the sidecar hop, where the probe's check of it passed."""
    if o.probe is None:
        return "not run"
    if not o.probe.get("ok"):
        return "off (the probe refuses)"
    reader = _mode(o, "reader")
    if reader is None:
        why = "reader rule not measured"
    elif not reader.get("safe"):
        why = "reader rule unsafe"
    elif reader.get("differences"):
        why = "apps could tell"
    else:
        return "reader"
    sidecar = any(c.get("name") == "sidecar hop" and c.get("status") == "pass"
                  for c in o.probe.get("checks", []))
    return f"sidecar ({why})" if sidecar else f"off ({why})"


def two_way_cell(o: Outcome) -> str:
    """Whether the two-way opt-in is allowed, and which of its checks refuse it."""
    m = _mode(o, "two-way")
    if o.probe is None or m is None:
        return "not run"
    if m.get("safe"):
        return "allowed"
    refusing = [c["name"].removeprefix("two-way ") for c in o.probe.get("checks", [])
                if c["name"].startswith("two-way ") and c.get("status") != "pass"]
    return "refused: " + (", ".join(refusing) or "its redirects were not seen")


def app_view_cell(o: Outcome, mode: str) -> str:
    """The behaviours an app could tell apart from plain TCP in `mode` (this run; kept out of
    --check-readme like the warnings: appview.rs asserts them against the suite)."""
    m = _mode(o, mode)
    if m is None:
        return "not run"
    names = sorted({d["behaviour"] for d in m.get("differences", [])})
    return ", ".join(names) or "none"


def warnings_cell(o: Outcome) -> str:
    """The probe's warnings. Kept out of --check-readme: some caveats depend on timing (the
    half-close EAGAIN shows when a read outwaits the peer's delayed ACK), so one run may see one
    and the next not. probe.rs asserts the warnings that must show on each kernel line."""
    if o.probe is None:
        return ""
    return ", ".join(c["name"] for c in o.probe.get("checks", []) if c.get("status") == "warn") or "none"


def failures(o: Outcome, expected: list[str]) -> list[tuple[str | None, str]]:
    """(test or None, what went wrong) for everything that makes this column fail. A test that
    kernels.toml lists as a known failure of this kernel fails it only by not running."""
    bad: list[tuple[str | None, str]] = [
        (t, f"{t}: {r}") for t, r in o.tests.items() if r != "pass" and not (t in o.known and r.startswith("FAIL"))
    ]
    bad += [(None, f"{t}: not run") for t in expected if t not in o.tests]
    if not o.finished:
        bad.append((None, o.note or "the guest did not finish (panic or hang)"))
    if o.probe is None:
        bad.append((None, "meshlane probe gave no report"))
    elif o.probe_rc != (0 if o.probe.get("ok") else 3):  # 3: unsafe kernel, 1: could not probe
        bad.append((None, f"meshlane probe exited {o.probe_rc} with ok={o.probe.get('ok')}"))
    bad += [(None, f"kernel: {t}") for t in o.trouble]
    return bad


# ---------------------------------------------------------------------------------------------
# Running


def boot(kernel: Kernel, initrd: Path, tools: Path, console: Path, timeout: int, prefix: str) -> Outcome:
    cmd = [
        str(tools / "usr/bin/qemu-system-x86_64"),
        "-L", str(tools / "usr/share/qemu"), "-L", str(tools / "usr/share/seabios"),
        "-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "2G",
        "-nodefaults", "-no-user-config", "-nic", "none", "-display", "none", "-no-reboot",
        "-serial", "stdio", "-monitor", "none",
        "-kernel", str(kernel.vmlinuz), "-initrd", str(initrd),
        "-append", "console=ttyS0 rdinit=/init panic=-1 loglevel=4",
    ]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=qemu_env(tools), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    note = ""
    with open(console, "wb") as logf:
        os.set_blocking(proc.stdout.fileno(), False)
        buf = b""
        while True:
            if time.monotonic() - start > timeout:
                proc.kill()
                note = f"the guest ran past {timeout} s and was killed (a hang)"
                break
            chunk = proc.stdout.read(65536)
            if chunk:
                logf.write(chunk)
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    echo(prefix, line.decode(errors="replace").rstrip("\r"))
            elif proc.poll() is not None:
                break
            else:
                time.sleep(0.05)
        proc.wait()
    o = parse_console(console.read_text(errors="replace"))
    o.seconds = time.monotonic() - start
    if not o.finished:
        o.note = note or f"the guest stopped without its exit marker (panic?); QEMU exited {proc.returncode}"
    return o


def echo(prefix: str, line: str) -> None:
    """Shows progress in the CI log: markers, test verdicts and kernel trouble, not every line."""
    if "MATRIX-" in line or "GUEST-EXIT" in line or KERNEL_TROUBLE.search(line) or line.startswith("test ") \
            or "panicked at" in line:
        print(f"{prefix} {line}", flush=True)


def run_host(build: Build, out: Path, per_test_timeout: int, tests: list[str]) -> Outcome:
    """The same binaries, the same markers, on this machine's own kernel. `tests`: suite::name."""
    lines = [f"MATRIX-KERNEL {os.uname().release}", "MATRIX-PROBE-BEGIN"]
    env = dict(os.environ, CI="true")
    start = time.monotonic()
    p = subprocess.run([str(build.meshlane), "probe", "--json"], capture_output=True, text=True, env=env,
                       timeout=per_test_timeout)
    lines += [p.stdout, f"MATRIX-PROBE-END rc={p.returncode}"]
    for test in tests:
        suite, t = test.split("::", 1)
        lines.append(f"MATRIX-TEST-BEGIN {test}")
        try:
            r = subprocess.run([str(build.tests[suite]), "--exact", t, "--test-threads=1", "--nocapture"], env=env,
                               stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=per_test_timeout)
            lines += (r.stdout + r.stderr).splitlines()
            rc = r.returncode
        except subprocess.TimeoutExpired:
            rc = 124
        lines.append(f"MATRIX-TEST-END {test} rc={rc}")
        echo("[host]", f"test {test} ... {'ok' if rc == 0 else f'FAILED (rc {rc})'}")
    lines.append("GUEST-EXIT rc=0")
    text = "\n".join(lines) + "\n"
    (out / "host.log").write_text(text)
    o = parse_console(text)
    o.trouble = []  # the host's test output is not a kernel log
    o.seconds = time.monotonic() - start
    return o


# ---------------------------------------------------------------------------------------------
# The table


def cell(o: Outcome, test: str, notes: list[str]) -> str:
    r = o.tests.get(test, "not run")
    if test in o.known:
        if test not in notes:
            notes.append(test)
        mark = f"[^{notes.index(test) + 1}]"
        return f"known {r}{mark}" if r.startswith("FAIL") else f"{r}{mark}"
    return r


def table(columns: list[tuple[str, str, Outcome]], tests: list[str]) -> str:
    """columns: (heading, kernel detail, outcome). Known failures get a footnote with the reason
    kernels.toml gives."""
    notes: list[str] = []
    head = "| | " + " | ".join(c[0] for c in columns) + " |"
    rows = [head, "|" + "---|" * (len(columns) + 1)]
    rows.append("| kernel | " + " | ".join(c[1] for c in columns) + " |")
    rows.append("| `meshlane probe` | " + " | ".join(probe_cell(c[2]) for c in columns) + " |")
    rows.append("| probe warnings (this run) | " + " | ".join(warnings_cell(c[2]) for c in columns) + " |")
    rows.append("| mode with `--mode auto` | " + " | ".join(mode_cell(c[2]) for c in columns) + " |")
    rows.append("| two-way opt-in | " + " | ".join(two_way_cell(c[2]) for c in columns) + " |")
    rows.append("| apps could tell, reader rule (this run) | "
                + " | ".join(app_view_cell(c[2], "reader") for c in columns) + " |")
    rows.append("| apps could tell, two-way (this run) | "
                + " | ".join(app_view_cell(c[2], "two-way") for c in columns) + " |")
    for t in tests:
        rows.append(f"| {t} | " + " | ".join(cell(c[2], t, notes) for c in columns) + " |")
    rows.append("| kernel log | " + " | ".join("clean" if not c[2].trouble else "TROUBLE" for c in columns) + " |")
    if notes:
        rows.append("")
    for i, t in enumerate(notes):
        why = "; ".join(f"{c[0]}: {c[2].known[t]}" for c in columns if t in c[2].known)
        rows.append(f"[^{i + 1}]: known failure, listed in scripts/kernel-matrix/kernels.toml. {why}")
    return "\n".join(rows) + "\n"


def result_rows(md: str) -> list[str]:
    """The table's rows and notes without the kernel and warnings rows: what --check-readme
    compares (a point release of a kernel line changes the version, not the result)."""
    skip = ("| kernel |", "| probe warnings", "| apps could tell")
    return [r for r in md.strip().splitlines() if r.startswith(("|", "[^")) and not r.startswith(skip)]


def readme_table(readme: Path) -> str | None:
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        return None
    return text.split(README_BEGIN, 1)[1].split(README_END, 1)[0]


def write_readme(readme: Path, md: str, when: str) -> None:
    text = readme.read_text()
    block = f"{README_BEGIN}\n{md}\n_{when}_\n{README_END}"
    if README_BEGIN in text:
        pre = text.split(README_BEGIN, 1)[0]
        post = text.split(README_END, 1)[1]
        text = pre + block + post
    else:
        raise SetupError(f"{readme} has no {README_BEGIN} marker to write the table under")
    readme.write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", help="comma-separated kernel names from kernels.toml (default: all)")
    ap.add_argument("--no-host", action="store_true", help="skip the native run on this machine's kernel")
    ap.add_argument("--cache", type=Path,
                    default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "meshlane-kernel-matrix",
                    help="downloads and unpacked kernels/QEMU, kept between runs (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=REPO / "target/kernel-matrix",
                    help="console logs, initramfs images, matrix.md and matrix.json (default: %(default)s)")
    ap.add_argument("--filter", default="",
                    help="run only tests whose suite::name contains this (the probe always runs)")
    ap.add_argument("--per-test-timeout", type=int, default=300,
                    help="seconds per test inside a guest (default: %(default)s; the slowest takes ~20)")
    ap.add_argument("--guest-timeout", type=int, default=900,
                    help="seconds per guest, boot to power-off (default: %(default)s; a full guest takes ~2 min)")
    ap.add_argument("--update-readme", action="store_true", help="write the table into README.md")
    ap.add_argument("--check-readme", action="store_true",
                    help="fail when README.md's table shows other results than this run")
    args = ap.parse_args()

    if (args.update_readme or args.check_readme) and (args.kernels or args.filter or args.no_host):
        print("kernel-matrix: --update-readme and --check-readme need the whole matrix "
              "(no --kernels, --filter or --no-host)", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("kernel-matrix: run as root (the tests create namespaces, cgroups and BPF programs)", file=sys.stderr)
        return 2
    specs = tomllib.loads((HERE / "kernels.toml").read_text())["kernel"]
    if args.kernels:
        names = args.kernels.split(",")
        unknown = [n for n in names if n not in {s["name"] for s in specs}]
        if unknown:
            print(f"kernel-matrix: --kernels: unknown {unknown}; kernels.toml has {[s['name'] for s in specs]}",
                  file=sys.stderr)
            return 2
        specs = [s for s in specs if s["name"] in names]
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    try:
        tools = fetch_tools(args.cache)
        apt = Apt(args.cache / "apt-kernels", sorted({s for k in specs for s in k["suites"]}), host_status=False)
        apt.update()
        kernels = [fetch_kernel(args.cache, apt, s) for s in specs]
        b = build(TEST_SUITES, out)
    except SetupError as e:
        print(f"kernel-matrix: setup failed: {e}", file=sys.stderr)
        return 2

    all_tests = []
    for suite, binary in b.tests.items():
        listed = subprocess.run([str(binary), "--list"], capture_output=True, text=True).stdout
        all_tests += [f"{suite}::{l[: -len(': test')]}" for l in listed.splitlines() if l.endswith(": test")]
    # Sorted, so the table's rows do not follow the order cargo happened to finish the builds in.
    expected = sorted(t for t in all_tests if args.filter in t)
    for k in kernels:
        stale = [t for t in k.known if t not in all_tests]
        if stale:
            print(f"kernel-matrix: kernels.toml: {k.name}: known failures name no test: {stale}", file=sys.stderr)
            return 2

    columns: list[tuple[str, str, Outcome]] = []
    if not args.no_host:
        log(f"host: {os.uname().release}, natively")
        o = run_host(b, out, args.per_test_timeout, expected)
        columns.append(("host", f"{o.release} (this machine)", o))

    common = out / "common.cpio"
    try:
        common_tree(b, tools, args.per_test_timeout, args.filter).write_cpio(common)
    except SetupError as e:
        print(f"kernel-matrix: setup failed: {e}", file=sys.stderr)
        return 2
    for k in kernels:
        kt, order = module_tree(k)
        kcpio = out / f"{k.name}-modules.cpio"
        kt.write_cpio(kcpio)
        initrd = out / f"{k.name}.initrd"
        with open(initrd, "wb") as f:
            for part in (common, kcpio):
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, f)
        console = out / f"{k.name}.console.log"
        log(f"{k.name}: booting {k.release} ({k.version}) under QEMU TCG; {len(order)} modules; console: {console}")
        o = boot(k, initrd, tools, console, args.guest_timeout, f"[{k.name}]")
        o.known = k.known
        log(f"{k.name}: {'finished' if o.finished else 'DID NOT FINISH'} in {o.seconds:.0f} s")
        columns.append((k.name, f"{o.release or k.release} ({k.version})", o))

    md = table(columns, expected)
    (out / "matrix.md").write_text(md)
    (out / "matrix.json").write_text(json.dumps(
        {name: {"kernel": detail, "finished": o.finished, "probe": o.probe, "tests": o.tests,
                "trouble": o.trouble, "seconds": round(o.seconds, 1)} for name, detail, o in columns}, indent=2))
    print("\n" + md, flush=True)

    bad = 0
    for name, _, o in columns:
        fs = failures(o, expected)
        for test, what in fs:
            print(f"[{name}] FAILED {what}", flush=True)
            for line in o.output.get(test, [])[-40:] if test else []:
                print(f"[{name}]   | {line}", flush=True)
        bad += len(fs)
        print(f"[{name}] {'ok' if not fs else f'{len(fs)} failure(s)'} in {o.seconds:.0f} s", flush=True)

    readme = REPO / "README.md"
    when = f"Last run {time.strftime('%Y-%m-%d')} by scripts/kernel-matrix/run.py on QEMU TCG (host natively)."
    if args.update_readme:
        write_readme(readme, md, when)
        log("README.md: table updated")
    if args.check_readme:
        have = readme_table(readme)
        if have is None:
            print(f"kernel-matrix: README.md has no table between {README_BEGIN!r} markers", file=sys.stderr)
            bad += 1
        elif result_rows(have) != result_rows(md):
            print("kernel-matrix: README.md's table differs from this run (rerun with --update-readme):",
                  file=sys.stderr)
            for r in sorted(set(result_rows(have)) ^ set(result_rows(md))):
                print(f"  {'README' if r in result_rows(have) else 'run   '}: {r}", file=sys.stderr)
            bad += 1
        else:
            log("README.md's table matches this run")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
