#!/usr/bin/env bash
# Lints the meshlane.v1 API (proto/) with buf (proto/buf.yaml): style (`buf lint`, STANDARD
# rules), layout (`buf format`), and compatibility with a baseline (`buf breaking`, FILE rules:
# wire, JSON and generated-code compatibility). buf comes from npm's @bufbuild/buf, installed
# by scripts/setup.sh.
#
#   scripts/lint-proto.sh    exit 1 if any check fails
#
# The baseline: meshlane has no release yet, so it is the commit that gave meshlane.v1 its
# buf-lint-clean shape (service MeshlaneService, Get*Response wrappers, Timestamps, PodReason and
# CounterName enums: "meshlane.v1 made buf-lint clean ...", 5360563), the last deliberate break.
# Every later change is checked against it; at the first release, make the release tag the
# default instead. A commit of this repository's own history works in any full clone, with no
# tag to push or fetch (a shallow CI clone needs that commit fetched: fetch-depth 0).
set -euo pipefail
cd "$(dirname "$0")/.."

BUF=${MESHLANE_TOOLS_DIR:-/opt/meshlane-tools}/buf/node_modules/.bin/buf
BASELINE=${MESHLANE_PROTO_BASELINE:-5360563307e025d735389a32227db19f5657ce3e}

if [ ! -x "$BUF" ]; then
  echo "lint-proto.sh: $BUF is missing; run scripts/setup.sh" >&2
  exit 1
fi
say() { printf '[lint-proto] %s\n' "$*" >&2; }

say "buf lint"
"$BUF" lint proto
say "buf format"
"$BUF" format --diff --exit-code proto
# In a git worktree .git is a file; the common directory holds the objects buf clones from.
git_dir=$(git rev-parse --path-format=absolute --git-common-dir)
say "buf breaking against $BASELINE"
"$BUF" breaking proto --against "$git_dir#ref=$BASELINE,subdir=proto"
say "ok"
