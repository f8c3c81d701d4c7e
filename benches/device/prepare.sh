#!/usr/bin/env bash
# Builds, on this GPU-less machine, what the device run needs into .device/ (git-ignored, carried to the
# GPU machine with `carry: [".device"]`): the serving benchmark built with CUDA (its `--check` mode holds
# the device correctness checks), stripped and xz-compressed. The server binary is built too, to show it
# compiles, but stays here: a device call carries 64 MiB at most. Run from the repository root.
set -euo pipefail
cd "$(dirname "$0")/../.."
eval "$(bash ../shared/cuda/setup-toolchain.sh)"
cargo fetch --locked
export NVCC_APPEND_FLAGS="--compress-mode=size"
started=$(date +%s)
cargo build --release --locked --features cuda --bin llava-server
bench=$(cargo bench --locked --features cuda --bench serving --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys;[print(m["executable"]) for m in map(json.loads,sys.stdin) if m.get("executable") and m["target"]["name"]=="serving"]' | tail -1)
echo "CUDA build took $(( $(date +%s) - started )) s"
mkdir -p .device
for f in "$bench"; do
  name=$(basename "$f" | sed 's/-[0-9a-f]\{16\}$//')
  strip -o ".device/$name" "$f"
  xz -6 -f ".device/$name"
done
ls -la .device
