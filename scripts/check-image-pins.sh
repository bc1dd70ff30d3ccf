#!/usr/bin/env bash
# The release gate for meshlane's image: refuses to go on unless both base images of
# docker/Dockerfile are pinned by digest, so a release is rebuilt from exactly the bytes it was
# tested with (a tag such as rust:1.95-bookworm moves with every Debian point release).
# It reads the variables `docker buildx bake release` reads (docker-bake.hcl):
#
#   RUST_IMAGE_DIGEST=sha256:<64 hex>     the build stage's base (RUST_IMAGE, default rust:1.95-bookworm)
#   RUNTIME_IMAGE_DIGEST=sha256:<64 hex>  the runtime stage's base (RUNTIME_IMAGE, default debian:bookworm-slim)
#
#   scripts/check-image-pins.sh && docker buildx bake release --push
#
# It checks the form only: it cannot tell whether a digest belongs to the tag (that needs the
# registry; `docker buildx imagetools inspect NAME:TAG@DIGEST` does). Exit 0 pinned, 1 not.
set -euo pipefail

rust_image=${RUST_IMAGE:-rust:1.95-bookworm}
runtime_image=${RUNTIME_IMAGE:-debian:bookworm-slim}
bad=0
check() {
  local var=$1 image=$2 digest=$3 ok=1
  # The tag goes in RUST_IMAGE/RUNTIME_IMAGE, the digest here: the release target joins them.
  if [[ $image == *@* ]]; then
    echo "check-image-pins: ${var%_DIGEST}=$image already has a digest; give the tag there and the digest in $var" >&2
    ok=
  fi
  if [ -z "$digest" ]; then
    echo "check-image-pins: $var is not set: look it up with 'docker buildx imagetools inspect $image' (the first Digest: line, the multi-platform index)" >&2
    ok=
  elif ! [[ $digest =~ ^sha256:[0-9a-f]{64}$ ]]; then
    echo "check-image-pins: $var='$digest' is not sha256:<64 lowercase hex>" >&2
    ok=
  fi
  if [ -n "$ok" ]; then echo "check-image-pins: $image@$digest"; else bad=1; fi
}
check RUST_IMAGE_DIGEST "$rust_image" "${RUST_IMAGE_DIGEST:-}"
check RUNTIME_IMAGE_DIGEST "$runtime_image" "${RUNTIME_IMAGE_DIGEST:-}"
exit "$bad"
