#!/usr/bin/env python3
"""Static checks of meshlane's image definition: docker/Dockerfile and docker-bake.hcl.

No Docker engine or buildx runs here, so what a build would show is checked on the files:
  - every FROM names its base image through a global ARG (RUST_IMAGE, RUNTIME_IMAGE) or an
    earlier stage, so a release can pin both by digest, and no sha256 digest is written into
    either file (digests come from the release's environment, see scripts/check-image-pins.sh);
  - the build stage runs on $BUILDPLATFORM and cross-compiles for TARGETARCH amd64 and arm64;
    the runtime stage is the target platform's;
  - the binary copied into the image is stripped in the step that builds it;
  - the runtime stage carries the OCI labels, version/revision/created/source from build args;
  - docker-bake.hcl: "multiarch" and "release" build linux/amd64 and linux/arm64, "release"
    appends RUST_IMAGE_DIGEST and RUNTIME_IMAGE_DIGEST to the base images, every arg a target
    passes is an ARG of the Dockerfile, and the base-image defaults agree with the Dockerfile's.

  check_image_def.py DOCKERFILE BAKEFILE            exit 1 and name each problem
  check_image_def.py --mutants DOCKERFILE BAKEFILE  broken copies must each be refused with
                                                    the expected message (the negative control)
"""
import re
import sys

import hcl2

PLATFORMS = ["linux/amd64", "linux/arm64"]
OCI_LABELS = ["title", "description", "version", "revision", "created", "source", "licenses"]
FROM_ARGS = {
    "org.opencontainers.image.version": "VERSION",
    "org.opencontainers.image.revision": "REVISION",
    "org.opencontainers.image.created": "CREATED",
    "org.opencontainers.image.source": "SOURCE",
}
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


def instructions(text):
    """(KEYWORD, rest) per instruction: comments dropped, continuation lines joined."""
    out, cur = [], ""
    for line in text.splitlines():
        s = line.strip()
        if not cur and (not s or s.startswith("#")):
            continue
        if cur and s.startswith("#"):
            continue
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        cur += s
        kw, _, rest = cur.partition(" ")
        out.append((kw.upper(), rest.strip()))
        cur = ""
    return out


def check_dockerfile(text, errors):
    """Returns the ARG names (all stages) and the global ARG defaults."""
    ins = instructions(text)
    global_args, all_args, stages = {}, set(), []
    for kw, rest in ins:
        if kw == "FROM":
            m = re.match(r"(?:--platform=(\S+)\s+)?(\S+)(?:\s+AS\s+(\S+))?$", rest, re.I)
            if not m:
                errors.append(f"FROM {rest}: not understood")
                continue
            stages.append({"platform": m.group(1), "image": m.group(2), "name": m.group(3), "ins": []})
        elif kw == "ARG":
            name, _, default = rest.partition("=")
            all_args.add(name)
            if not stages:
                global_args[name] = default
        if stages and kw != "FROM":
            stages[-1]["ins"].append((kw, rest))

    for var in ("RUST_IMAGE", "RUNTIME_IMAGE"):
        d = global_args.get(var)
        if d is None:
            errors.append(f"no global ARG {var}: the base images must be build args so a release can pin them")
        elif not re.fullmatch(r"[a-z0-9][a-z0-9._/-]*:[A-Za-z0-9._-]+", d):
            errors.append(f"ARG {var}={d}: the default must be name:tag (the digest comes from the release)")
    if DIGEST_RE.search(text):
        errors.append("a sha256 digest is written in the Dockerfile: pins come from the release's environment")

    names = set()
    for st in stages:
        img = st["image"]
        m = re.fullmatch(r"\$\{?([A-Z_]+)\}?", img)
        if m and m.group(1) in global_args:
            pass
        elif img in names:
            pass
        else:
            errors.append(f"FROM {img}: base images must come from a global ARG (RUST_IMAGE/RUNTIME_IMAGE), not be written in")
        if st["name"]:
            names.add(st["name"])
    if not stages:
        errors.append("no FROM")
        return all_args, global_args
    build = next((s for s in stages if s["name"] == "build"), None)
    final = stages[-1]
    if build is None:
        errors.append("no stage named build")
        return all_args, global_args
    if build["platform"] not in ("$BUILDPLATFORM", "${BUILDPLATFORM}"):
        errors.append(f"build stage --platform={build['platform']}: it must run on $BUILDPLATFORM and cross-compile")
    if final["platform"]:
        errors.append(f"runtime stage --platform={final['platform']}: it must be the target platform's")
    build_args = {r.partition("=")[0] for k, r in build["ins"] if k == "ARG"}
    if "TARGETARCH" not in build_args:
        errors.append("build stage: no ARG TARGETARCH, so every platform would get the builder's binary")
    runs = " ".join(r for k, r in build["ins"] if k == "RUN")
    for arch, triple in (("amd64", "x86_64-unknown-linux-gnu"), ("arm64", "aarch64-unknown-linux-gnu")):
        if not re.search(rf"\b{arch}\)\s*triple={triple}\b", runs):
            errors.append(f"build stage: TARGETARCH {arch} is not mapped to the Rust target {triple}")
    if "--target" not in runs or "cargo build" not in runs:
        errors.append("build stage: cargo build without --target")
    built = next((r for k, r in build["ins"] if k == "RUN" and "/out/meshlane" in r), "")
    if not re.search(r"install\b.*?/out/meshlane.*?-strip\"? --strip-all /out/meshlane", built):
        errors.append("build stage: /out/meshlane is not stripped (--strip-all) after it is installed")
    if not any(k == "COPY" and "--from=build" in r and "/out/meshlane" in r for k, r in final["ins"]):
        errors.append("runtime stage: does not copy /out/meshlane from the build stage")

    labels = {}
    for k, r in final["ins"]:
        if k == "LABEL":
            for key, val in re.findall(r'(\S+?)="((?:[^"\\]|\\.)*)"', r):
                labels[key] = val
    final_args = {r.partition("=")[0] for k, r in final["ins"] if k == "ARG"}
    for name in OCI_LABELS:
        key = f"org.opencontainers.image.{name}"
        if not labels.get(key):
            errors.append(f"runtime stage: no LABEL {key}")
    for key, arg in FROM_ARGS.items():
        if key in labels and labels[key] != f"${{{arg}}}":
            errors.append(f"LABEL {key}={labels[key]}: must be ${{{arg}}}")
        if arg not in final_args:
            errors.append(f"runtime stage: no ARG {arg} for LABEL {key}")
    return all_args, global_args


def unquote(v, variables):
    """A bake value: a quoted string with ${VAR} interpolated, or a bare variable name."""
    if isinstance(v, list):
        return [unquote(x, variables) for x in v]
    if isinstance(v, dict):
        return {k: unquote(x, variables) for k, x in v.items() if k != "__is_block__"}
    if isinstance(v, str) and len(v) >= 2 and v[0] == v[-1] == '"':
        return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: variables.get(m.group(1), m.group(0)), v[1:-1])
    if isinstance(v, str) and v in variables:
        return variables[v]
    return v


def load_bake(text, overrides=None):
    doc = hcl2.loads(text)
    variables = {}
    for block in doc.get("variable", []):
        for name, body in block.items():
            variables[name.strip('"')] = unquote(body.get("default", '""'), {})
    variables.update(overrides or {})
    raw = {}
    for block in doc.get("target", []):
        for name, body in block.items():
            raw[name.strip('"')] = body
    groups = {}
    for block in doc.get("group", []):
        for name, body in block.items():
            groups[name.strip('"')] = unquote(body.get("targets", []), variables)

    def resolve(name, seen=()):
        if name in seen or name not in raw:
            raise KeyError(name)
        out = {"args": {}}
        for parent in unquote(raw[name].get("inherits", []), variables):
            p = resolve(parent, seen + (name,))
            out.update({k: v for k, v in p.items() if k != "args"})
            out["args"].update(p["args"])
        body = unquote(raw[name], variables)
        for k, v in body.items():
            if k == "args":
                out["args"].update(v)
            elif k != "inherits":
                out[k] = v
        return out

    return variables, groups, {n: resolve(n) for n in raw}


def check_bake(text, docker_args, docker_globals, errors):
    try:
        variables, groups, targets = load_bake(text)
    except Exception as e:  # a parse error or an inherits loop is a finding, not a crash
        errors.append(f"docker-bake.hcl: {type(e).__name__}: {e}")
        return
    if DIGEST_RE.search(text):
        errors.append("a sha256 digest is written in docker-bake.hcl: pins come from the release's environment")
    for t in groups.get("default", []):
        if t not in targets:
            errors.append(f"group default names target {t}, which does not exist")
    if not groups.get("default"):
        errors.append("no group default: `docker buildx bake` alone would build nothing")
    for name, t in targets.items():
        if name.startswith("_"):
            continue
        if t.get("dockerfile") != "docker/Dockerfile" or t.get("context") != ".":
            errors.append(f"target {name}: dockerfile {t.get('dockerfile')} context {t.get('context')}, not docker/Dockerfile from the root")
        for arg in t["args"]:
            if arg not in docker_args:
                errors.append(f"target {name}: arg {arg} is not an ARG of docker/Dockerfile (it would be ignored)")
    for name in ("multiarch", "release"):
        t = targets.get(name)
        if t is None:
            errors.append(f"no target {name}")
        elif sorted(t.get("platforms", [])) != PLATFORMS:
            errors.append(f"target {name}: platforms {t.get('platforms')}, not {PLATFORMS}")
    for var in ("RUST_IMAGE", "RUNTIME_IMAGE"):
        if var in docker_globals and variables.get(var) != docker_globals[var]:
            errors.append(f"variable {var} default {variables.get(var)!r} differs from the Dockerfile's ARG {docker_globals[var]!r}")
    if "release" in targets:
        # Resolved with stand-in digests, the release must name exactly tag@digest for both.
        pins = {"RUST_IMAGE_DIGEST": "sha256:" + "1" * 64, "RUNTIME_IMAGE_DIGEST": "sha256:" + "2" * 64}
        v, _, ts = load_bake(text, pins)
        for var in ("RUST_IMAGE", "RUNTIME_IMAGE"):
            want = f"{v[var]}@{pins[var + '_DIGEST']}"
            got = ts["release"]["args"].get(var)
            if got != want:
                errors.append(f"target release: arg {var}={got!r}, not the tag pinned by ${{{var}_DIGEST}} ({want!r})")


def check(dockerfile, bake):
    errors = []
    args, globals_ = check_dockerfile(dockerfile, errors)
    check_bake(bake, args, globals_, errors)
    return errors


# Broken copies: (what, file, old, new, a phrase the refusal must contain).
MUTANTS = [
    ("base image written in", "docker", "FROM ${RUNTIME_IMAGE}", "FROM debian:bookworm-slim", "must come from a global ARG"),
    ("digest written in", "docker", "ARG RUNTIME_IMAGE=debian:bookworm-slim",
     "ARG RUNTIME_IMAGE=debian:bookworm-slim@sha256:" + "0" * 64, "sha256 digest is written"),
    ("build stage on the target platform", "docker", "FROM --platform=$BUILDPLATFORM ${RUST_IMAGE} AS build",
     "FROM ${RUST_IMAGE} AS build", "must run on $BUILDPLATFORM"),
    ("no TARGETARCH", "docker", "ARG TARGETARCH\n", "", "no ARG TARGETARCH"),
    ("arm64 not mapped", "docker", "arm64) triple=aarch64-unknown-linux-gnu", "arm) triple=aarch64-unknown-linux-gnu",
     "arm64 is not mapped"),
    ("not stripped", "docker", '"${gnu}-strip" --strip-all /out/meshlane', "true", "is not stripped"),
    ("label missing", "docker", 'org.opencontainers.image.licenses="Apache-2.0"', 'org.example.licenses="Apache-2.0"',
     "no LABEL org.opencontainers.image.licenses"),
    ("label not from its arg", "docker", 'org.opencontainers.image.revision="${REVISION}"',
     'org.opencontainers.image.revision="unknown"', "must be ${REVISION}"),
    ("release without arm64", "bake", 'platforms = ["linux/amd64", "linux/arm64"]\n  args = {\n    RUST_IMAGE    = "${RUST_IMAGE}@',
     'platforms = ["linux/amd64"]\n  args = {\n    RUST_IMAGE    = "${RUST_IMAGE}@', "target release: platforms"),
    ("release unpinned", "bake", '"${RUNTIME_IMAGE}@${RUNTIME_IMAGE_DIGEST}"', "RUNTIME_IMAGE",
     "not the tag pinned by ${RUNTIME_IMAGE_DIGEST}"),
    ("arg the Dockerfile lacks", "bake", "REVISION = REVISION", "REVISON  = REVISION", "arg REVISON is not an ARG"),
    ("bake default differs", "bake", 'default = "debian:bookworm-slim"', 'default = "debian:trixie-slim"',
     "differs from the Dockerfile's ARG"),
]


def main(argv):
    mutants = argv[:1] == ["--mutants"]
    paths = argv[1:] if mutants else argv
    if len(paths) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(paths[0]) as f:
        dockerfile = f.read()
    with open(paths[1]) as f:
        bake = f.read()
    if not mutants:
        errors = check(dockerfile, bake)
        for e in errors:
            print("WRONG " + e)
        if not errors:
            print(f"{paths[0]} and {paths[1]}: base images by ARG, cross build for amd64+arm64, stripped, OCI labels, release pinned")
        return 1 if errors else 0
    bad = 0
    for what, which, old, new, phrase in MUTANTS:
        if (dockerfile if which == "docker" else bake).count(old) != 1:
            print(f"STALE mutant {what!r}: its text is not in the {which} file once; update MUTANTS")
            bad += 1
            continue
        d = dockerfile.replace(old, new) if which == "docker" else dockerfile
        b = bake.replace(old, new) if which == "bake" else bake
        errors = check(d, b)
        if any(phrase in e for e in errors):
            print(f"refused  {what}: {next(e for e in errors if phrase in e)}")
        else:
            print(f"ACCEPTED {what}: expected a refusal containing {phrase!r}, got {errors}")
            bad += 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
