#!/usr/bin/env bash
# Builds, on this GPU-less machine, everything the device run needs, into .device/ (git-ignored, carried
# to the GPU machine with `carry: [".device"]`): the CUDA server binary, the serving benchmark and the
# GPU test binary, stripped and xz-compressed. Run from the repository root.
set -euo pipefail
cd "$(dirname "$0")/../.."
eval "$(bash ../shared/cuda/setup-toolchain.sh)"
cargo fetch --locked
export NVCC_APPEND_FLAGS="--compress-mode=size"
started=$(date +%s)
cargo build --release --locked --features cuda --bin llava-server
bench=$(cargo bench --locked --features cuda --bench serving --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys;[print(m["executable"]) for m in map(json.loads,sys.stdin) if m.get("executable") and m["target"]["name"]=="serving"]' | tail -1)
tests=$(cargo test --release --locked --features cuda --test kernels_device --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys;[print(m["executable"]) for m in map(json.loads,sys.stdin) if m.get("executable") and m["target"]["name"]=="kernels_device"]' | tail -1)
echo "CUDA build took $(( $(date +%s) - started )) s"
mkdir -p .device
for f in target/release/llava-server "$bench" "$tests"; do
  name=$(basename "$f" | sed 's/-[0-9a-f]\{16\}$//')
  strip -o ".device/$name" "$f"
  xz -6 -f ".device/$name"
done
ls -la .device
