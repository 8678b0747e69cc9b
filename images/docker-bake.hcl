# Build every stage image with BuildKit in one go (parallel, shared cache):
#   REGISTRY=registry.example.com/cmv TAG=$(git describe --always --dirty) docker buildx bake -f images/docker-bake.hcl [--push]
# `make images` / `make push` do the same one image at a time with plain `docker build` (works with podman too).

variable "REGISTRY" {
  default = "localhost:5000"
}

variable "TAG" {
  default = "dev"
}

variable "PLATFORM" {
  default = "linux/amd64"
}

group "default" {
  targets = ["clean", "format", "train", "generate", "judge"]
}

target "_common" {
  context   = "."
  platforms = [PLATFORM]
  labels = {
    "org.opencontainers.image.source"   = "cmv-persuasion"
    "org.opencontainers.image.revision" = TAG
  }
}

target "clean" {
  inherits   = ["_common"]
  dockerfile = "images/clean.Dockerfile"
  tags       = ["${REGISTRY}/cmv-clean:${TAG}"]
}

target "format" {
  inherits   = ["_common"]
  dockerfile = "images/format.Dockerfile"
  tags       = ["${REGISTRY}/cmv-format:${TAG}"]
}

target "train" {
  inherits   = ["_common"]
  dockerfile = "images/train.Dockerfile"
  tags       = ["${REGISTRY}/cmv-train:${TAG}"]
}

target "generate" {
  inherits   = ["_common"]
  dockerfile = "images/generate.Dockerfile"
  tags       = ["${REGISTRY}/cmv-generate:${TAG}"]
}

target "judge" {
  inherits   = ["_common"]
  dockerfile = "images/judge.Dockerfile"
  tags       = ["${REGISTRY}/cmv-judge:${TAG}"]
}
