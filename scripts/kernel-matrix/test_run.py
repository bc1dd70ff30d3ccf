"""Unit tests of the kernel matrix runner's own logic: reading a guest's console, deciding what
fails, the table and the initramfs format. `python3 -m unittest discover -s scripts/kernel-matrix`
(scripts/test.sh runs them before the matrix itself)."""

import json
import sys
import tempfile
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402

PROBE_OK = {"kernel": "6.12.1", "ok": True, "checks": [{"name": "load and attach", "status": "pass"},
                                                       {"name": "reads counted", "status": "warn"}]}


def console(*tests: tuple[str, int], probe=PROBE_OK, probe_rc=0, finished=True, extra=()) -> str:
    lines = ["[    0.000000] Linux version 6.12.1", "MATRIX-KERNEL 6.12.1-cloud-amd64", "MATRIX-PROBE-BEGIN"]
    lines += json.dumps(probe, indent=2).splitlines() + [f"MATRIX-PROBE-END rc={probe_rc}"]
    for name, rc in tests:
        lines += [f"MATRIX-TEST-BEGIN {name}", "running 1 test", f"output of {name}",
                  f"MATRIX-TEST-END {name} rc={rc} s=3"]
    lines += list(extra)
    if finished:
        lines.append("GUEST-EXIT rc=0")
    return "\r\n".join(lines) + "\r\n"


class ParseConsole(unittest.TestCase):
    def test_every_test_passing_is_no_failure(self):
        o = run.parse_console(console(("a::x", 0), ("b::y", 0)))
        self.assertEqual(o.release, "6.12.1-cloud-amd64")
        self.assertEqual(o.tests, {"a::x": "pass", "b::y": "pass"})
        self.assertTrue(o.finished)
        self.assertEqual(run.failures(o, ["a::x", "b::y"]), [])
        self.assertEqual(run.probe_cell(o), "safe")
        self.assertEqual(run.warnings_cell(o), "reads counted")

    def test_a_failing_test_fails_the_kernel_and_keeps_its_output(self):
        o = run.parse_console(console(("a::x", 101), ("b::y", 0)))
        self.assertEqual(o.tests["a::x"], "FAIL (rc 101)")
        self.assertIn("output of a::x", o.output["a::x"])
        self.assertEqual([t for t, _ in run.failures(o, ["a::x", "b::y"])], ["a::x"])

    def test_a_timeout_is_named(self):
        o = run.parse_console(console(("a::x", 143)))
        self.assertEqual(o.tests["a::x"], "FAIL (timeout)")

    def test_a_guest_that_dies_mid_test_fails_every_test_it_did_not_finish(self):
        text = console(("a::x", 0), finished=False) + "MATRIX-TEST-BEGIN b::y\r\nKernel panic - not syncing\r\n"
        o = run.parse_console(text)
        self.assertFalse(o.finished)
        whats = [w for _, w in run.failures(o, ["a::x", "b::y", "c::z"])]
        self.assertIn("b::y: not finished", whats)
        self.assertIn("c::z: not run", whats)
        self.assertTrue(any("did not finish" in w for w in whats))
        self.assertTrue(any(w.startswith("kernel: Kernel panic") for w in whats))

    def test_a_kernel_warning_fails_the_kernel_even_when_every_test_passed(self):
        o = run.parse_console(console(("a::x", 0), extra=["[   12.3] WARNING: CPU: 1 PID: 99 at net/core/skmsg.c:700"]))
        self.assertEqual(len(run.failures(o, ["a::x"])), 1)

    def test_a_guest_set_up_failure_fails_the_kernel(self):
        o = run.parse_console(console(("a::x", 0), extra=["MATRIX-SETUP-FAILED meshlane is not at /x/meshlane"]))
        self.assertIn("kernel: guest set-up: meshlane is not at /x/meshlane", [w for _, w in run.failures(o, ["a::x"])])

    def test_a_probe_without_a_report_fails(self):
        text = console(("a::x", 0)).replace('"ok": true', '"ok": tru')
        o = run.parse_console(text)
        self.assertIsNone(o.probe)
        self.assertIn("meshlane probe gave no report", [w for _, w in run.failures(o, ["a::x"])])

    def test_a_refusing_probe_must_exit_3(self):
        refusing = dict(PROBE_OK, ok=False, checks=[{"name": "FIONREAD", "status": "fail"}])
        self.assertEqual(run.failures(run.parse_console(console(probe=refusing, probe_rc=3)), []), [])
        self.assertEqual(len(run.failures(run.parse_console(console(probe=refusing, probe_rc=0)), [])), 1)
        # 1 is an error of the probe itself (it could not start), not a verdict on the kernel.
        self.assertEqual(len(run.failures(run.parse_console(console(probe=refusing, probe_rc=1)), [])), 1)
        self.assertEqual(run.probe_cell(run.parse_console(console(probe=refusing, probe_rc=3))), "refuses: FIONREAD")


class Modes(unittest.TestCase):
    def modes(self, reader_diffs, two_way_safe=True, sidecar_hop="pass"):
        checks = PROBE_OK["checks"] + [{"name": "two-way FIONREAD", "status": "pass" if two_way_safe else "warn"},
                                       {"name": "sidecar hop", "status": sidecar_hop}]
        return dict(PROBE_OK, checks=checks, modes=[
            {"mode": "reader", "safe": True, "problem": "", "differences": [{"behaviour": b} for b in reader_diffs]},
            {"mode": "two-way", "safe": two_way_safe, "problem": "" if two_way_safe else "a check failed",
             "differences": [{"behaviour": "splice_to_pipe"}, {"behaviour": "splice_to_pipe"}]},
        ])

    def test_auto_takes_the_reader_rule_only_where_apps_cannot_tell(self):
        o = run.parse_console(console(probe=self.modes([])))
        self.assertEqual(run.mode_cell(o), "reader")
        self.assertEqual(run.app_view_cell(o, "reader"), "none")
        o = run.parse_console(console(probe=self.modes(["fionread_tcp", "signal_restart", "fionread_tcp"])))
        self.assertEqual(run.mode_cell(o), "sidecar (apps could tell)")
        self.assertEqual(run.app_view_cell(o, "reader"), "fionread_tcp, signal_restart")
        o = run.parse_console(console(probe=self.modes(["oob_send"], sidecar_hop="fail")))
        self.assertEqual(run.mode_cell(o), "off (apps could tell)")
        self.assertEqual(run.app_view_cell(o, "two-way"), "splice_to_pipe")

    def test_a_refused_two_way_names_the_check(self):
        o = run.parse_console(console(probe=self.modes([], two_way_safe=False)))
        self.assertEqual(run.two_way_cell(o), "refused: FIONREAD")
        self.assertEqual(run.two_way_cell(run.parse_console(console(probe=self.modes([])))), "allowed")

    def test_the_timing_dependent_rows_are_not_checked_but_the_mode_is(self):
        o = run.parse_console(console(("a::x", 0), probe=self.modes(["oob_send"])))
        rows = run.result_rows(run.table([("6.12", "6.12.1", o)], ["a::x"]))
        self.assertIn("| mode with `--mode auto` | sidecar (apps could tell) |", rows)
        self.assertFalse(any(r.startswith("| apps could tell") for r in rows))


class KnownFailures(unittest.TestCase):
    def test_a_known_failure_does_not_fail_the_kernel_but_is_shown_with_its_reason(self):
        o = run.parse_console(console(("a::x", 101), ("b::y", 0)))
        o.known = {"a::x": "no tracepoint before 6.4"}
        self.assertEqual(run.failures(o, ["a::x", "b::y"]), [])
        md = run.table([("6.1", "6.1.0", o)], ["a::x", "b::y"])
        self.assertIn("| a::x | known FAIL (rc 101)[^1] |", md)
        self.assertIn("[^1]: known failure, listed in scripts/kernel-matrix/kernels.toml. 6.1: no tracepoint before 6.4", md)

    def test_a_known_failure_that_does_not_run_still_fails(self):
        o = run.parse_console(console(("b::y", 0), finished=False))
        o.known = {"a::x": "flaky"}
        self.assertIn("a::x: not run", [w for _, w in run.failures(o, ["a::x", "b::y"])])


class Table(unittest.TestCase):
    def test_the_readme_check_ignores_versions_but_not_results(self):
        o = run.parse_console(console(("a::x", 0)))
        md = run.table([("6.12", "6.12.117 (6.12.117-1)", o)], ["a::x"])
        newer = run.table([("6.12", "6.12.118 (6.12.118-1)", o)], ["a::x"])
        self.assertEqual(run.result_rows(md), run.result_rows(newer))
        o.tests["a::x"] = "FAIL (rc 101)"
        self.assertNotEqual(run.result_rows(md), run.result_rows(run.table([("6.12", "x", o)], ["a::x"])))

    def test_the_readme_check_ignores_probe_warnings_but_not_the_verdict(self):
        o = run.parse_console(console(("a::x", 0)))
        md = run.table([("6.12", "v", o)], ["a::x"])
        o.probe = dict(PROBE_OK, checks=[])
        self.assertEqual(run.result_rows(md), run.result_rows(run.table([("6.12", "v", o)], ["a::x"])))
        o.probe = dict(PROBE_OK, ok=False, checks=[{"name": "FIONREAD", "status": "fail"}])
        self.assertNotEqual(run.result_rows(md), run.result_rows(run.table([("6.12", "v", o)], ["a::x"])))

    def test_the_readme_block_is_replaced_in_place(self):
        with tempfile.TemporaryDirectory() as d:
            readme = Path(d) / "README.md"
            readme.write_text(f"intro\n{run.README_BEGIN}\nold\n{run.README_END}\noutro\n")
            run.write_readme(readme, "| new |\n", "when")
            text = readme.read_text()
            self.assertTrue(text.startswith("intro\n") and text.endswith("outro\n"))
            self.assertEqual(run.readme_table(readme).strip().splitlines()[0], "| new |")
            self.assertNotIn("old", text)


class Initramfs(unittest.TestCase):
    def test_newc_entries_are_aligned_and_end_with_a_trailer(self):
        t = run.Tree()
        t.file("matrix/a", b"hello", 0o644)
        t.link("bin/sh", "busybox")
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "x.cpio"
            t.write_cpio(out)
            data = out.read_bytes()
        names, pos = [], 0
        while True:
            hdr = data[pos : pos + 110]
            self.assertEqual(hdr[:6], b"070701")
            size, namesize = int(hdr[54:62], 16), int(hdr[94:102], 16)
            name = data[pos + 110 : pos + 110 + namesize - 1].decode()
            names.append(name)
            pos += 110 + namesize
            pos += -pos % 4
            body = data[pos : pos + size]
            if name == "matrix/a":
                self.assertEqual(body, b"hello")
            pos += size + (-size % 4)
            if name == "TRAILER!!!":
                break
        self.assertEqual(names, ["bin", "bin/sh", "matrix", "matrix/a", "TRAILER!!!"])
        self.assertEqual(pos, len(data))

    def test_module_dependencies_come_from_modinfo(self):
        blob = b"\x7fELF....\x00license=GPL\x00depends=nf_conntrack,nf_defrag_ipv6\x00vermagic=6.1\x00"
        self.assertEqual(run.modinfo_depends(blob), ["nf_conntrack", "nf_defrag_ipv6"])
        self.assertEqual(run.modinfo_depends(b"\x00depends=\x00"), [])

    def test_static_binaries_are_told_from_dynamic_ones(self):
        self.assertFalse(run.is_static(Path("/bin/ls")))


if __name__ == "__main__":
    unittest.main()
