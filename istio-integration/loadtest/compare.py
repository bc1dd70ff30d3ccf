#!/usr/bin/env python3
"""Compares two sets of fortio runs made by run.sh: before and after meshlane.

  compare.py BEFORE_DIR AFTER_DIR [--json]

For every PLACEMENT-KIND.json present in both directories (same-node-max, other-node-fixed, ...)
it prints the latency percentiles fortio computed (p50, p90, p99, p99.9, in ms), the throughput,
and the change from before to after. Two runs are compared only if they asked for the same load
(requested QPS, connections, duration): otherwise the numbers mean nothing side by side and the
pair is refused. A run with any non-200 answer or with fewer than 100 calls is refused too, as
is a fixed-rate run that fell short of its rate by more than 2 % (the node was saturated, so its
latencies are of another load). Exit 0 when every pair was compared, 1 when any was refused or
nothing matched, 2 on a wrong invocation.

Only the standard library: it runs wherever the JSON was copied to.
"""
import json
import os
import sys

PERCENTILES = [50, 90, 99, 99.9]
MIN_CALLS = 100


def load(path):
    """fortio's JSON result; text before it (a log line that reached stdout) is skipped."""
    with open(path) as f:
        text = f.read()
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON object")
    doc, _ = json.JSONDecoder().raw_decode(text[start:])
    return doc


def summary(doc):
    """The numbers compared, and the reasons the run cannot be used (empty when it can)."""
    hist = doc.get("DurationHistogram") or {}
    pct = {p["Percentile"]: p["Value"] for p in hist.get("Percentiles") or []}
    codes = {str(k): v for k, v in (doc.get("RetCodes") or {}).items()}
    calls = hist.get("Count", 0)
    problems = []
    if calls < MIN_CALLS:
        problems.append(f"{calls} calls (fewer than {MIN_CALLS})")
    bad = {k: v for k, v in codes.items() if k != "200"}
    if bad:
        problems.append(f"non-200 answers {bad}")
    missing = [p for p in PERCENTILES if p not in pct]
    if missing:
        problems.append(f"percentiles {missing} not computed (run with -p 50,90,99,99.9)")
    requested = str(doc.get("RequestedQPS", ""))
    actual = doc.get("ActualQPS", 0.0)
    if requested not in ("", "max", "0"):
        try:
            if actual < 0.98 * float(requested):
                problems.append(f"reached {actual:.0f} of the requested {requested} qps (saturated)")
        except ValueError:
            problems.append(f"RequestedQPS {requested!r} is not a number")
    return {
        "labels": doc.get("Labels", ""),
        "load": (requested, doc.get("NumThreads"), doc.get("RequestedDuration")),
        "calls": calls,
        "qps": actual,
        "ms": {p: pct[p] * 1000 for p in PERCENTILES if p in pct},
        "problems": problems,
    }


def change(before, after):
    return (after - before) / before * 100 if before else float("nan")


def compare(before_dir, after_dir):
    names = sorted(
        n for n in os.listdir(before_dir)
        if n.endswith(".json") and not n.startswith("meshlane-status") and os.path.exists(os.path.join(after_dir, n))
    )
    rows, refused = [], []
    for name in names:
        run = name[:-len(".json")]
        try:
            b = summary(load(os.path.join(before_dir, name)))
            a = summary(load(os.path.join(after_dir, name)))
        except (OSError, ValueError) as e:
            refused.append(f"{run}: unreadable: {e}")
            continue
        why = [f"before: {p}" for p in b["problems"]] + [f"after: {p}" for p in a["problems"]]
        if b["load"] != a["load"]:
            why.append(f"different load (qps, connections, duration): before {b['load']}, after {a['load']}")
        if why:
            refused.append(f"{run}: " + "; ".join(why))
            continue
        rows.append({"run": run, "before": b, "after": a,
                     "change_pct": {**{f"p{p}": change(b["ms"][p], a["ms"][p]) for p in PERCENTILES},
                                    "qps": change(b["qps"], a["qps"])}})
    return names, rows, refused


def main(argv):
    as_json = "--json" in argv
    args = [a for a in argv if a != "--json"]
    if len(args) != 2 or not all(os.path.isdir(a) for a in args):
        print(__doc__, file=sys.stderr)
        return 2
    names, rows, refused = compare(*args)
    if as_json:
        print(json.dumps({"compared": rows, "refused": refused}, indent=2, default=str))
    else:
        head = f"{'run':<18} {'':6} " + " ".join(f"{'p' + str(p) + ' ms':>9}" for p in PERCENTILES) + f" {'qps':>9}"
        print(head)
        for r in rows:
            for side in ("before", "after"):
                s = r[side]
                print(f"{r['run'] if side == 'before' else '':<18} {side:<6} "
                      + " ".join(f"{s['ms'][p]:>9.3f}" for p in PERCENTILES) + f" {s['qps']:>9.1f}")
            c = r["change_pct"]
            print(f"{'':<18} {'change':<6} " + " ".join(f"{c['p' + str(p)]:>+8.1f}%" for p in PERCENTILES)
                  + f" {c['qps']:>+8.1f}%")
        for line in refused:
            print("REFUSED " + line)
    if not names:
        print("no run is in both directories", file=sys.stderr)
        return 1
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
