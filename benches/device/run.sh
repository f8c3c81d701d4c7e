#!/usr/bin/env bash
# Runs on the lent GPU machine, from the repository root, after benches/device/prepare.sh here:
# correctness first (kernels vs CPU references, tiny fixtures in bf16), then the timing scenarios with
# dummy LLaVA-1.5-7B weights in bf16. Everything lands in $OUT (results.md is the table to commit).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/bin
LIBS=$(python3 -c "import nvidia,os;print(os.path.join(list(nvidia.__path__)[0],'cu13','lib'))")
export LD_LIBRARY_PATH=$LIBS:${LD_LIBRARY_PATH:-}
for f in .device/*.xz; do xz -dc "$f" > "/tmp/bin/$(basename "$f" .xz)"; chmod +x "/tmp/bin/$(basename "$f" .xz)"; done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
timeout 120 /tmp/bin/serving --check --scenarios none --device cuda:0 --dtype bf16 --out "$OUT/check.md" \
  2>&1 | tee "$OUT/correctness.txt"
timeout 300 /tmp/bin/serving --model llava-1.5-7b --load-format dummy --device cuda:0 --dtype bf16 \
  --out "$OUT/results.md" 2>&1 | tee "$OUT/serving.log"
# S1 again without CUDA graphs: what the graphs save at batch 1.
timeout 60 /tmp/bin/serving --model llava-1.5-7b --load-format dummy --device cuda:0 --dtype bf16 \
  --scenarios s1 --enforce-eager --out "$OUT/results-eager.md" 2>&1 | tee "$OUT/serving-eager.log"
# The original-format path (liuhaotian/llava-v1.5-7b's shapes, conversation template, SentencePiece
# tokenizer): S1 only.
timeout 60 /tmp/bin/serving --model liuhaotian/llava-v1.5-7b --load-format dummy --device cuda:0 --dtype bf16 \
  --scenarios s1 --out "$OUT/results-original.md" 2>&1 | tee "$OUT/serving-original.log"
# LLaVA-NeXT (anyres tiles, packed features, Mistral decoder): S1 only.
timeout 60 /tmp/bin/serving --model llava-v1.6-mistral-7b --load-format dummy --device cuda:0 --dtype bf16 \
  --scenarios s1 --out "$OUT/results-next.md" 2>&1 | tee "$OUT/serving-next.log"
