#!/usr/bin/env python3
"""Validates IstioOperator files against istiooperator.schema.json (beside this file).

  check_overlay.py FILE...       each file must be valid; exit 1 otherwise
  check_overlay.py --mutants FILE
      copies FILE with known mistakes and requires each copy to be rejected with a message
      naming the broken field; exit 1 if any copy passes or is rejected for another reason.
      Without this a PASS could come from a schema that accepts anything, as Istio's CRD does.

Messages name fields by their path in the document, e.g. `spec.bogus: unknown field`.
"""
import argparse
import copy
import json
import os
import sys

import jsonschema
import yaml

SCHEMA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "istiooperator.schema.json")


def dotted(path):
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(document)"


def problems(validator, doc):
    msgs = []
    for err in validator.iter_errors(doc):
        where = dotted(err.absolute_path)
        if err.validator == "additionalProperties":
            known = set(err.schema.get("properties", {}))
            for extra in sorted(set(err.instance) - known):
                msgs.append(f"{where}.{extra}: unknown field" if err.absolute_path else f"{extra}: unknown field")
        else:
            msgs.append(f"{where}: {err.message}")
    return sorted(msgs)


def load(path):
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    if len(docs) != 1:
        raise SystemExit(f"{path}: expected one YAML document, found {len(docs)}")
    return docs[0]


def set_path(doc, dotted_path, value):
    keys = dotted_path.split(".")
    node = doc
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value


def rename(doc, dotted_path, new_key):
    keys = dotted_path.split(".")
    node = doc
    for k in keys[:-1]:
        node = node[k]
    node[new_key] = node.pop(keys[-1])


# Each mistake: a description, how to make it, and the text the rejection must contain.
MUTANTS = [
    ("spec.addonComponents, which IstioOperatorSpec does not have, with a meshlane entry",
     lambda d: set_path(d, "spec.addonComponents.meshlane", {"enabled": True}),
     "spec.addonComponents: unknown field"),
    ("an unknown spec field",
     lambda d: set_path(d, "spec.bogus", True),
     "spec.bogus: unknown field"),
    ("an interception mode Istio does not have",
     lambda d: set_path(d, "spec.meshConfig.defaultConfig.interceptionMode", "BOGUS"),
     "spec.meshConfig.defaultConfig.interceptionMode: 'BOGUS' is not one of"),
    ("a typo in meshConfig.defaultConfig",
     lambda d: rename(d, "spec.meshConfig.defaultConfig", "defaultConfg"),
     "spec.meshConfig.defaultConfg: unknown field"),
    ("a string where values.global.proxy.privileged takes a boolean",
     lambda d: set_path(d, "spec.values.global.proxy.privileged", "yes"),
     "spec.values.global.proxy.privileged: 'yes' is not of type 'boolean'"),
    ("a string where values.global.nativeNftables takes a boolean",
     lambda d: set_path(d, "spec.values.global.nativeNftables", "true"),
     "spec.values.global.nativeNftables: 'true' is not of type 'boolean'"),
    ("a typo in values.global.proxy",
     lambda d: rename(d, "spec.values.global.proxy", "proxyy"),
     "spec.values.global.proxyy: unknown field"),
    ("a wrong kind",
     lambda d: d.update(kind="IstioOperatorr"),
     "kind: 'IstioOperator' was expected"),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mutants", action="store_true", help="check that broken copies are rejected")
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()

    with open(SCHEMA) as f:
        schema = json.load(f)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    validator = cls(schema)

    bad = 0
    for path in args.files:
        doc = load(path)
        if not args.mutants:
            msgs = problems(validator, doc)
            for m in msgs:
                print(f"INVALID {path}: {m}")
            if msgs:
                bad += 1
            else:
                print(f"valid   {path}")
            continue
        if problems(validator, doc):
            print(f"WRONG   {path} itself is invalid, so its mutants prove nothing")
            bad += 1
            continue
        for what, mutate, expect in MUTANTS:
            mutant = copy.deepcopy(doc)
            mutate(mutant)
            msgs = problems(validator, mutant)
            hit = [m for m in msgs if expect in m]
            if hit:
                print(f"ok      rejected {what}: {hit[0]}")
            elif msgs:
                print(f"WRONG   {what}: rejected, but not with {expect!r}: {msgs}")
                bad += 1
            else:
                print(f"WRONG   {what}: accepted")
                bad += 1
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
