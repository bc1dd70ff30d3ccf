#!/usr/bin/env python3
"""What the before/after load test (istio-integration/loadtest) must be, beyond valid objects:

  - its namespace has Istio's sidecar injection on, and every object is in that namespace;
  - the fortio image is pinned to a version tag, the same in every pod;
  - the Service selects the server's pods and targets a port its container names;
  - client-same-node.yaml requires the server's node (podAffinity on kubernetes.io/hostname),
    client-other-node.yaml requires another node (podAntiAffinity), both on the server's labels;
  - no container runs as uid 1337, the sidecar's, whose traffic Istio's capture lets through;
  - run.sh's defaults name existing client manifests, the Service's DNS name and port, and ask
    fortio for the percentiles compare.py reads.

  check_loadtest.py DIR            exit 1 and name each problem
  check_loadtest.py --mutants DIR  broken copies must each be refused (the negative control)
"""
import copy
import importlib.util
import os
import re
import sys

import yaml

NS = "meshlane-loadtest"
PLACEMENT = {"same-node": "podAffinity", "other-node": "podAntiAffinity"}


def load_dir(d):
    docs = {}
    for name in ("namespace.yaml", "server.yaml", "client-same-node.yaml", "client-other-node.yaml"):
        with open(os.path.join(d, name)) as f:
            docs[name] = [x for x in yaml.safe_load_all(f) if x]
    with open(os.path.join(d, "run.sh")) as f:
        run_sh = f.read()
    return docs, run_sh


def compare_percentiles(d):
    spec = importlib.util.spec_from_file_location("compare", os.path.join(d, "compare.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.PERCENTILES


def check(docs, run_sh, percentiles):
    errors = []
    objs = [o for v in docs.values() for o in v]
    ns = [o for o in objs if o["kind"] == "Namespace"]
    if len(ns) != 1 or ns[0]["metadata"]["name"] != NS:
        errors.append(f"namespace.yaml: not the one Namespace {NS}")
    elif (ns[0]["metadata"].get("labels") or {}).get("istio-injection") != "enabled":
        errors.append(f"Namespace {NS}: no label istio-injection: enabled, so no sidecars and nothing to measure")
    for o in objs:
        if o["kind"] != "Namespace" and o["metadata"].get("namespace") != NS:
            errors.append(f"{o['kind']} {o['metadata']['name']}: namespace {o['metadata'].get('namespace')}, not {NS}")

    deps = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Deployment"}
    images = set()
    for name, d in deps.items():
        pod = d["spec"]["template"]
        if d["spec"]["selector"].get("matchLabels") != {
            k: v for k, v in pod["metadata"]["labels"].items() if k in d["spec"]["selector"].get("matchLabels", {})
        }:
            errors.append(f"Deployment {name}: selector does not match its pod labels")
        for c in pod["spec"]["containers"]:
            img = c["image"]
            images.add(img)
            if not re.fullmatch(r"fortio/fortio:\d+\.\d+\.\d+(@sha256:[0-9a-f]{64})?", img):
                errors.append(f"{name}/{c['name']}: image {img} is not fortio/fortio pinned to a version tag")
            for sc in (pod["spec"].get("securityContext") or {}, c.get("securityContext") or {}):
                if sc.get("runAsUser") == 1337:
                    errors.append(f"{name}/{c['name']}: runs as uid 1337, Istio's proxy uid, so its traffic bypasses the sidecar")
    if len(images) > 1:
        errors.append(f"pods use different fortio images {sorted(images)}")

    server = deps.get("fortio-server")
    svc = next((o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == "fortio-server"), None)
    if server is None or svc is None:
        errors.append("no Deployment and Service fortio-server")
        return errors
    server_labels = server["spec"]["template"]["metadata"]["labels"]
    if not svc["spec"]["selector"].items() <= server_labels.items():
        errors.append(f"Service fortio-server selects {svc['spec']['selector']}, not the server's pods {server_labels}")
    port_names = {p.get("name") for c in server["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
    svc_port = svc["spec"]["ports"][0]
    if svc_port.get("targetPort") not in port_names:
        errors.append(f"Service fortio-server targets port {svc_port.get('targetPort')}, which the server does not name")

    for placement, kind in PLACEMENT.items():
        d = deps.get(f"fortio-client-{placement}")
        if d is None:
            errors.append(f"no Deployment fortio-client-{placement} (client-{placement}.yaml)")
            continue
        aff = (d["spec"]["template"]["spec"].get("affinity") or {})
        terms = (aff.get(kind) or {}).get("requiredDuringSchedulingIgnoredDuringExecution") or []
        ok = any(
            t.get("topologyKey") == "kubernetes.io/hostname"
            and t.get("labelSelector", {}).get("matchLabels")
            and t["labelSelector"]["matchLabels"].items() <= server_labels.items()
            for t in terms
        )
        if not ok:
            errors.append(f"fortio-client-{placement}: no required {kind} on kubernetes.io/hostname for the server's labels")
        other = "podAntiAffinity" if kind == "podAffinity" else "podAffinity"
        if other in aff:
            errors.append(f"fortio-client-{placement}: also has {other}")

    m = re.search(r"^placements=\$\{PLACEMENTS:-([^}]*)\}", run_sh, re.M)
    for p in (m.group(1).split() if m else []):
        if f"fortio-client-{p}" not in deps:
            errors.append(f"run.sh: default placement {p} has no client-{p}.yaml Deployment")
    if not m:
        errors.append("run.sh: no default PLACEMENTS")
    u = re.search(r"^url=http://([^:/]+):(\d+)/", run_sh, re.M)
    want_host = f"fortio-server.{NS}.svc.cluster.local"
    if not u or u.group(1).replace("$ns", NS) != want_host or int(u.group(2)) != svc_port["port"]:
        errors.append(f"run.sh: url is not http://{want_host}:{svc_port['port']}/")
    pm = re.search(r"^percentiles=(\S+)", run_sh, re.M)
    asked = [float(x) for x in pm.group(1).split(",")] if pm else []
    if not pm or not set(percentiles) <= set(asked):
        errors.append(f"run.sh: percentiles {pm.group(1) if pm else None} do not include compare.py's {percentiles}")
    return errors


def mutants(docs, run_sh):
    """(what, docs, run_sh, a phrase the refusal must contain)."""
    out = []

    def mut(what, phrase, fn=None, sh=None):
        d = copy.deepcopy(docs)
        if fn:
            fn(d)
        out.append((what, d, sh if sh is not None else run_sh, phrase))

    def dep(d, name):
        return next(o for v in d.values() for o in v if o["kind"] == "Deployment" and o["metadata"]["name"] == name)

    mut("no sidecar injection", "istio-injection", lambda d: d["namespace.yaml"][0]["metadata"]["labels"].clear())
    mut("image :latest", "not fortio/fortio pinned",
        lambda d: dep(d, "fortio-server")["spec"]["template"]["spec"]["containers"][0].update(image="fortio/fortio:latest"))
    mut("preferred, not required, affinity", "fortio-client-same-node: no required podAffinity",
        lambda d: dep(d, "fortio-client-same-node")["spec"]["template"]["spec"]["affinity"]["podAffinity"].update(
            preferredDuringSchedulingIgnoredDuringExecution=[],
            requiredDuringSchedulingIgnoredDuringExecution=[]))
    mut("zone, not node", "fortio-client-other-node: no required podAntiAffinity",
        lambda d: dep(d, "fortio-client-other-node")["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"][0].update(topologyKey="topology.kubernetes.io/zone"))
    mut("Service selects nothing", "Service fortio-server selects",
        lambda d: d["server.yaml"][1]["spec"].update(selector={"app": "fortio"}))
    mut("client as uid 1337", "uid 1337",
        lambda d: dep(d, "fortio-client-same-node")["spec"]["template"]["spec"]["containers"][0]["securityContext"].update(runAsUser=1337))
    mut("other namespace", "not meshlane-loadtest",
        lambda d: d["server.yaml"][1]["metadata"].update(namespace="default"))
    mut("run.sh url in another namespace", "run.sh: url", sh=run_sh.replace(".$ns.svc", ".default.svc", 1))
    mut("run.sh without p90", "run.sh: percentiles", sh=run_sh.replace("percentiles=50,90,99,99.9", "percentiles=50,99", 1))
    return out


def main(argv):
    mut = argv[:1] == ["--mutants"]
    args = argv[1:] if mut else argv
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    docs, run_sh = load_dir(args[0])
    pcts = compare_percentiles(args[0])
    if not mut:
        errors = check(docs, run_sh, pcts)
        for e in errors:
            print("WRONG " + e)
        if not errors:
            print(f"{args[0]}: injection on, fortio pinned, same-node and other-node placement required, run.sh consistent")
        return 1 if errors else 0
    bad = 0
    for what, d, sh, phrase in mutants(docs, run_sh):
        errors = check(d, sh, pcts)
        hit = next((e for e in errors if phrase in e), None)
        if hit:
            print(f"refused  {what}: {hit}")
        else:
            print(f"ACCEPTED {what}: expected a refusal containing {phrase!r}, got {errors}")
            bad += 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
