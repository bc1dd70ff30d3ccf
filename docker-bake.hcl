# Build definitions for meshlane's image (docker/Dockerfile), for `docker buildx bake`.
# Run from the repository root:
#
#   docker buildx bake                  # "default": this machine's platform, loaded as meshlane:dev
#   docker buildx bake multiarch        # linux/amd64 + linux/arm64 with the base images by tag:
#                                       # a test of the cross build (needs a builder that can
#                                       # emit both, e.g. `docker buildx create --use`; not loadable
#                                       # into the local engine, add --push or an --set *.output=)
#   IMAGE=registry.example/meshlane VERSION=0.1.0 \
#   REVISION=$(git rev-parse HEAD) CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ) SOURCE=https://... \
#   RUST_IMAGE_DIGEST=sha256:... RUNTIME_IMAGE_DIGEST=sha256:... \
#     scripts/check-image-pins.sh && docker buildx bake release --push
#
# A release builds both platforms from base images pinned by digest. Look the digests up when
# releasing (the multi-platform index's digest, the first "Digest:" line):
#
#   docker buildx imagetools inspect rust:1.95-bookworm
#   docker buildx imagetools inspect debian:bookworm-slim
#
# scripts/check-image-pins.sh refuses the release unless both are given as sha256 digests. Run
# bare, the release target asks for `name:tag@` with an empty digest, which is not a valid image
# reference, so the build should stop there too (not tried: no buildx where this was written;
# the script is the gate). scripts/lint-deploy.sh checks this file against docker/Dockerfile
# (platforms, args, the release pins); no digest is written here: none could be looked up.

variable "IMAGE" {
  default = "meshlane"
}
variable "VERSION" {
  default = "0.1.0"
}
variable "REVISION" {
  default = "unknown"
}
variable "CREATED" {
  default = "unknown"
}
variable "SOURCE" {
  default = "unknown"
}
# The base images by tag; kept in step with the ARG defaults in docker/Dockerfile (lint-deploy
# checks that).
variable "RUST_IMAGE" {
  default = "rust:1.95-bookworm"
}
variable "RUNTIME_IMAGE" {
  default = "debian:bookworm-slim"
}
# sha256:<64 hex> of each base image's multi-platform index; required by the release target.
variable "RUST_IMAGE_DIGEST" {
  default = ""
}
variable "RUNTIME_IMAGE_DIGEST" {
  default = ""
}

group "default" {
  targets = ["dev"]
}

target "_common" {
  context    = "."
  dockerfile = "docker/Dockerfile"
  args = {
    VERSION  = VERSION
    REVISION = REVISION
    CREATED  = CREATED
    SOURCE   = SOURCE
  }
}

target "dev" {
  inherits = ["_common"]
  args = {
    RUST_IMAGE    = RUST_IMAGE
    RUNTIME_IMAGE = RUNTIME_IMAGE
  }
  tags   = ["${IMAGE}:dev"]
  output = ["type=docker"]
}

target "multiarch" {
  inherits  = ["_common"]
  platforms = ["linux/amd64", "linux/arm64"]
  args = {
    RUST_IMAGE    = RUST_IMAGE
    RUNTIME_IMAGE = RUNTIME_IMAGE
  }
  tags = ["${IMAGE}:${VERSION}-test"]
}

target "release" {
  inherits  = ["_common"]
  platforms = ["linux/amd64", "linux/arm64"]
  args = {
    RUST_IMAGE    = "${RUST_IMAGE}@${RUST_IMAGE_DIGEST}"
    RUNTIME_IMAGE = "${RUNTIME_IMAGE}@${RUNTIME_IMAGE_DIGEST}"
  }
  tags = ["${IMAGE}:${VERSION}"]
}
