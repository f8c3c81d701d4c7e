#!/usr/bin/env bash
# Makes local stand-ins for the upstream base images where no image registry is reachable (as on our
# development machines): each is tried from the registry first and built only when the pull fails.
#   docker/stand-ins/make.sh debian|rust|nginx|cuda-devel|cuda-runtime...
# Tags: debian:bookworm-slim (debootstrap of Debian's archive, the real tag) and llava-stand-in/* for the
# rest, which the Dockerfiles and compose.yaml take as build arguments / variables (see docker/test.sh).
# EXTRA_CA_CERT (default: docker/certs/*.crt) is trusted for the downloads inside these builds.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
build_args=(--network host)
std_path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
[[ -n ${STAND_IN_CPUSET:-} ]] && build_args+=(--cpuset-cpus "$STAND_IN_CPUSET")

context() {  # a throwaway build context: the CA files and, for CUDA, the driver entry points cudarc binds
  ctx=$(mktemp -d); mkdir "$ctx/certs"
  if [[ -n ${EXTRA_CA_CERT:-} ]]; then cp "$EXTRA_CA_CERT" "$ctx/certs/extra.crt"
  else cp "$root"/docker/certs/*.crt "$ctx/certs/" 2>/dev/null || true; fi
  touch "$ctx/cudarc-driver-symbols.txt"
  echo "$ctx"
}

build() {  # build TAG DOCKERFILE [args...]
  local tag=$1 file=$2; shift 2
  docker image inspect "$tag" >/dev/null 2>&1 && return 0
  local ctx; ctx=$(context)
  if [[ $file == cuda-devel.Dockerfile ]]; then
    # The stub libcuda must define every symbol cudarc's bindings reference; take them from its sources.
    (cd "$root" && cargo fetch --locked >/dev/null)
    grep -ohE 'pub (unsafe )?fn cu[A-Za-z0-9_]+' "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/src/driver/sys/*.rs \
      | awk '{print $NF}' | sort -u > "$ctx/cudarc-driver-symbols.txt"
  fi
  DOCKER_BUILDKIT=0 docker build "${build_args[@]}" -f "$here/$file" -t "$tag" "$@" "$ctx"
  rm -rf "$ctx"
}

for what in "$@"; do
  case "$what" in
    debian)
      docker image inspect debian:bookworm-slim >/dev/null 2>&1 || docker pull debian:bookworm-slim 2>/dev/null || {
        command -v debootstrap >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
        dir=$(mktemp -d)
        debootstrap --variant=minbase bookworm "$dir" >/dev/null
        chmod 755 "$dir"  # mktemp's 0700 would become the image's /, closed to non-root users
        tar -C "$dir" -c . | docker import --change "ENV PATH=$std_path" - debian:bookworm-slim >/dev/null
        rm -rf "$dir"
      }
      # An imported root file system has no PATH (the real image sets one): without it an exec-form
      # ENTRYPOINT naming a bare command is not found.
      # A root file system imported from a 0700 folder closes / to every user but root.
      if ! docker image inspect -f '{{.Config.Env}}' debian:bookworm-slim | grep -q PATH= ||
        [[ $(docker run --rm --network none debian:bookworm-slim stat -c %a /) != 755 ]]; then
        # (A RUN chmod in a layer above does not change the mode of /: import the files anew.)
        dir=$(mktemp -d); chmod 755 "$dir"
        id=$(docker create debian:bookworm-slim /bin/true)
        docker export "$id" | tar -C "$dir" -x; docker rm "$id" >/dev/null
        tar -C "$dir" -c . | docker import --change "ENV PATH=$std_path" - debian:bookworm-slim >/dev/null
        rm -rf "$dir"
      fi ;;
    rust) build llava-stand-in/rust:1.95-bookworm rust.Dockerfile ;;
    nginx) build llava-stand-in/nginx:bookworm nginx.Dockerfile ;;
    cuda-devel) build llava-stand-in/cuda:13.0-devel-bookworm cuda-devel.Dockerfile ;;
    cuda-runtime)
      build llava-stand-in/cuda:13.0-runtime-bookworm cuda-runtime.Dockerfile \
        --build-arg DEVEL_IMAGE=llava-stand-in/cuda:13.0-devel-bookworm ;;
    *) echo "unknown stand-in: $what" >&2; exit 2 ;;
  esac
  echo "stand-in ready: $what"
done
