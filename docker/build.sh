#!/usr/bin/env bash
# Builds llava-server:cpu or llava-server:cuda from the repository root with plain `docker build`
# (the legacy builder works too: no BuildKit features are used).
#   docker/build.sh cpu|cuda [extra docker build arguments...]
# EXTRA_CA_CERT=/path/to/bundle.crt: a CA bundle the builder stage trusts (TLS-intercepting proxies);
# it is copied into docker/certs/ for the build and removed afterwards, and never reaches the runtime image.
# IMAGE overrides the tag. Example here: docker/build.sh cpu --network host --cpuset-cpus 1
set -euo pipefail
flavor=${1:-}
case "$flavor" in
  cpu | cuda) shift ;;
  *) echo "usage: $0 cpu|cuda [docker build args...]" >&2; exit 2 ;;
esac
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
image=${IMAGE:-llava-server:$flavor}
staged=""
if [[ -n ${EXTRA_CA_CERT:-} ]]; then
  [[ -r $EXTRA_CA_CERT ]] || { echo "EXTRA_CA_CERT=$EXTRA_CA_CERT is not readable" >&2; exit 2; }
  staged="$root/docker/certs/extra-ca-$$.crt"
  cp "$EXTRA_CA_CERT" "$staged"
  trap 'rm -f "$staged"' EXIT
fi
cd "$root"
DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-0} docker build -f "docker/Dockerfile.$flavor" -t "$image" "$@" .
echo "built $image"
