#!/usr/bin/env bash
# Verifies the Docker deployment for real, on the tiny fixture (HF's greedy text is the expected answer):
#   image    the CPU image builds (docker/build.sh cpu)
#   run      `docker run` of it answers a chat request with HF's text (whole and streamed), the
#            HEALTHCHECK turns healthy, the server runs as non-root, and `docker stop` drains an
#            in-flight stream (complete, exact) and exits 0
#   single   compose.yaml's single profile (CPU variant, fixture mounted) answers HF's text
#   rolling  compose.yaml's scale-out profile (3 replicas behind nginx, CPU variant) under a streaming
#            load: every replica in turn stopped and started again; zero failed or inexact answers
#   cuda     the CUDA image builds (Dockerfile.cuda); only a GPU host can run it
# Usage: docker/test.sh [image] [run] [single] [rolling] [cuda]   (default: image run single rolling)
# Skips (exit 0, with the reason) when no Docker daemon answers. Base images are pulled, or made
# locally by docker/stand-ins/make.sh where no registry is reachable. DOCKER_CPUSET limits the builds'
# CPUs (e.g. 1); EXTRA_CA_CERT is passed on to the builds (see build.sh).
set -euo pipefail
if ! docker info >/dev/null 2>&1; then
  echo "docker/test.sh: skipped: no Docker daemon is reachable (docker info failed)"
  exit 0
fi
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
steps=("$@"); [[ ${#steps[@]} -gt 0 ]] || steps=(image run single rolling)
port=${TEST_PORT:-18411}
lb_port=${TEST_LB_PORT:-18500}
build_opts=(--network host); [[ -n ${DOCKER_CPUSET:-} ]] && build_opts+=(--cpuset-cpus "$DOCKER_CPUSET")
client=(python3 docker/test_client.py)
log() { echo "[$(date -u +%H:%M:%S)] $*"; }
cleanups=()
# Last in, first out (as defers): `compose down` runs before its compose files are removed.
trap 'for ((i = ${#cleanups[@]} - 1; i >= 0; i--)); do eval "${cleanups[i]}" >/dev/null 2>&1 || true; done' EXIT

# The upstream image when it is here or can be pulled, else the local stand-in (made once).
pick() {  # pick UPSTREAM STAND_IN STAND_IN_KIND
  if docker image inspect "$1" >/dev/null 2>&1 || docker pull "$1" >/dev/null 2>&1; then echo "$1"
  else STAND_IN_CPUSET=${DOCKER_CPUSET:-} docker/stand-ins/make.sh "$3" >&2; echo "$2"; fi
}

wait_healthy() {  # wait_healthy CONTAINER SECONDS
  local t0=$SECONDS s
  while (( SECONDS - t0 < $2 )); do
    s=$(docker inspect -f '{{.State.Health.Status}}' "$1")
    [[ $s == healthy ]] && { log "$1 healthy after $((SECONDS - t0)) s"; return 0; }
    sleep 1
  done
  docker logs --tail 30 "$1"; echo "$1 not healthy after $2 s (status $s)" >&2; return 1
}

step_image() {
  docker/stand-ins/make.sh debian >/dev/null
  local rust; rust=$(pick rust:1.95-bookworm llava-stand-in/rust:1.95-bookworm rust)
  local t0=$SECONDS
  docker/build.sh cpu "${build_opts[@]}" --build-arg RUST_IMAGE="$rust" >/tmp/llava-docker-build.log 2>&1 \
    || { tail -40 /tmp/llava-docker-build.log; return 1; }
  log "image: llava-server:cpu built in $((SECONDS - t0)) s from $rust;" \
    "$(docker image inspect -f '{{.Size}}' llava-server:cpu | awk '{printf "%.0f MB", $1/1e6}')"
  # The extra CA bundle stays in the builder: the runtime image has Debian's stock bundle only.
  if [[ -n $(ls docker/certs/*.crt 2>/dev/null) ]]; then
    local extra; extra=$(cat docker/certs/*.crt | grep -c 'BEGIN CERT')
    local inimg; inimg=$(docker run --rm --entrypoint sh llava-server:cpu -c 'grep -c "BEGIN CERT" /etc/ssl/certs/ca-certificates.crt')
    log "image: runtime CA bundle has $inimg certificates (the extra bundle had $extra)"
  fi
}

step_run() {
  local name=llava-test-run
  docker rm -f "$name" >/dev/null 2>&1 || true
  docker run -d --name "$name" --network host -e LLAVA_SERVER_PORT="$port" \
    -v "$root/tests/fixtures/tiny:/models/tiny:ro" \
    llava-server:cpu --model /models/tiny --served-model-name tiny-llava --num-kv-blocks 400 >/dev/null
  cleanups+=("docker rm -f $name")
  wait_healthy "$name" 180
  local uid; uid=$(docker exec "$name" sh -c 'awk "/^Uid:/{print \$2}" /proc/1/status')
  log "run: PID 1 ($(docker exec "$name" cat /proc/1/comm)) runs as uid $uid, user '$(docker inspect -f '{{.Config.User}}' "$name")'"
  [[ $uid != 0 ]] || { echo "the server runs as root" >&2; return 1; }
  "${client[@]}" chat "http://127.0.0.1:$port"
  "${client[@]}" drain "http://127.0.0.1:$port" "$name"
  docker logs "$name" 2>&1 | grep -iE 'shutting down|timeout' | sed 's/^/  server log: /'
}

# compose.yaml's CPU variant (the same file without its GPU reservation) plus an override that mounts
# the fixture into SERVICES; sets the caller's `dc` to the docker-compose command for PROJECT.
cpu_compose() {  # cpu_compose PROJECT SERVICES...
  local project=$1; shift
  local variant=docker/.compose-$project.yaml override=docker/.compose-$project.override.yaml
  python3 - docker/compose.yaml "$variant" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
text, n = re.subn(r"\n  deploy:\n(?:    .*\n)+", "\n", text)
assert n == 1, "compose.yaml's GPU reservation block not found"
open(sys.argv[2], "w").write(text)
PY
  { echo "x-test: &test"; echo "  volumes: [\"$root/tests/fixtures/tiny:/models/tiny:ro\"]"; echo "services:"
    for svc in "$@"; do echo "  $svc: *test"; done; } >"$override"
  cleanups+=("rm -f $variant $override")
  dc=(docker-compose -p "$project" -f "$variant" -f "$override")
  if ! command -v docker-compose >/dev/null; then
    docker compose version >/dev/null 2>&1 || return 1
    dc=(docker compose -p "$project" -f "$variant" -f "$override")
  fi
  export LLAVA_IMAGE=llava-server:cpu MODEL=/models/tiny LLAVA_SERVER_SERVED_MODEL_NAME=tiny-llava \
    LLAVA_SERVER_NUM_KV_BLOCKS=400 LLAVA_SERVER_DEVICE=cpu LLAVA_SERVER_DTYPE=f32
}

step_single() {
  local dc
  cpu_compose llava-single llava-server || { log "single: skipped: neither docker-compose nor docker compose"; return 0; }
  export PORT=$lb_port
  cleanups+=("${dc[*]} --profile single down -v")
  "${dc[@]}" --profile single up -d 2>&1 | tail -3
  wait_healthy "$("${dc[@]}" ps -a -q llava-server)" 180
  "${client[@]}" chat "http://127.0.0.1:$lb_port"
  "${dc[@]}" --profile single down -v 2>&1 | tail -1
}

step_rolling() {
  local nginx; nginx=$(pick nginx:1.27-bookworm llava-stand-in/nginx:bookworm nginx)
  local dc
  cpu_compose llava-rolling replica-1 replica-2 replica-3 \
    || { log "rolling: skipped: neither docker-compose nor docker compose"; return 0; }
  export NGINX_IMAGE=$nginx PORT=$lb_port
  cleanups+=("${dc[*]} --profile scale-out down -v")
  "${dc[@]}" --profile scale-out up -d 2>&1 | tail -5
  replica() { "${dc[@]}" ps -a -q "replica-$1"; }  # container id (compose v1 and v2 name them differently)
  for r in 1 2 3; do wait_healthy "$(replica $r)" 180; done
  local base="http://127.0.0.1:$lb_port" stop; stop=$(mktemp -u)
  "${client[@]}" chat "$base"
  "${client[@]}" load "$base" "$stop" "${LOAD_CLIENTS:-6}" & local load=$!
  sleep 5
  for r in 1 2 3; do
    log "rolling: stopping replica-$r (drain)"; "${dc[@]}" stop -t 45 "replica-$r" 2>&1 | tail -1
    log "rolling: replica-$r exit code $(docker inspect -f '{{.State.ExitCode}}' "$(replica $r)"); starting it"
    "${dc[@]}" start "replica-$r" 2>&1 | tail -1
    wait_healthy "$(replica $r)" 180
    sleep 5
  done
  touch "$stop"
  local rc=0; wait "$load" || rc=$?
  rm -f "$stop"
  local lb_log; lb_log=$("${dc[@]}" logs --no-color lb 2>/dev/null)
  log "rolling: nginx answered $(grep -cE '" 200 ' <<<"$lb_log" || true) requests with 200 and" \
    "$(grep -cE '" 5[0-9][0-9] ' <<<"$lb_log" || true) with 5xx; its error log has" \
    "$(grep -cE 'upstream|connect\(\) failed' <<<"$lb_log" || true) upstream failures (a replica refusing" \
    "connections or answering 503 while it drained or loaded), each passed on to another replica"
  return $rc
}

step_cuda() {
  docker/stand-ins/make.sh debian >/dev/null
  local devel runtime
  devel=$(pick nvidia/cuda:13.0.2-devel-ubuntu24.04 llava-stand-in/cuda:13.0-devel-bookworm cuda-devel)
  runtime=$(pick nvidia/cuda:13.0.2-runtime-ubuntu24.04 llava-stand-in/cuda:13.0-runtime-bookworm cuda-runtime)
  local t0=$SECONDS
  docker/build.sh cuda "${build_opts[@]}" --build-arg CUDA_DEVEL_IMAGE="$devel" \
    --build-arg CUDA_RUNTIME_IMAGE="$runtime" >/tmp/llava-docker-build-cuda.log 2>&1 \
    || { tail -40 /tmp/llava-docker-build-cuda.log; return 1; }
  log "cuda: llava-server:cuda built in $((SECONDS - t0)) s from $devel / $runtime"
  # Without a GPU the binary can still show that it links and starts: every library but the driver resolves.
  docker run --rm --entrypoint sh llava-server:cuda -c 'ldd /usr/local/bin/llava-server | grep -E "not found|cublas|curand|cuda"' || true
}

for s in "${steps[@]}"; do
  log "== $s"
  "step_$s"
done
log "docker/test.sh: all steps passed: ${steps[*]}"
