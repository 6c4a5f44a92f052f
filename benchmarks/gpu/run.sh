#!/usr/bin/env bash
# The GPU figures of FLoRA against LoRA, on a machine with torch + triton and no vLLM, no network:
#
#   1. benchmarks/gpu/check.py: the fused FLoRA kernel against the torch reference, and vLLM's
#      Triton LoRA kernels (lora_shrink / lora_expand, vendored in benchmarks/gpu/vendor/) against
#      a torch LoRA, at the shapes timed next
#   2. benchmarks/layer_bench.py, once per dtype (bf16, fp16): one adapted linear layer at the
#      Llama-2-7B and StarCoder-15B shapes, ranks 1-16, 1-256 tokens, every token its own adapter:
#      base, FLoRA (torch, fused Triton), LoRA (bmm, gathered, vLLM's Triton kernels), CUDA
#      events with the L2 flushed before each call
#
# usage: bash benchmarks/gpu/run.sh [--out DIR] [--quick | --tiny] [--dtype bfloat16|float16]
#   --out DIR  where the files go (default benchmarks/results/gpu)
#   --quick    2 shapes, T 1 16 256, ranks 1 4 16, bf16 only (if device time is short)
#   --tiny     the CPU under TRITON_INTERPRET=1, tiny shapes, fp16 (the test suite runs this)
#   --dtype    time this dtype only (default: both, bf16 first)
# Writes DIR/check_<gpu>.json, DIR/layer_<gpu>_<dtype>.json (+ .png with matplotlib) and
# DIR/run_<gpu>.log. Exit 1 when a check failed (the timings still run), else layer_bench's.
# PYTHON names the interpreter (default python3). Run from anywhere: it cds to the repo root.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
OUT=benchmarks/results/gpu
MODE=full
ONLY_DTYPE=
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --quick) MODE=quick; shift ;;
    --tiny) MODE=tiny; shift ;;
    --dtype) ONLY_DTYPE=$2; shift 2 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this tree's flora_vllm, not an installed one

case $MODE in
  full)  LAYER=(--tokens 1 4 16 64 256 --ranks 1 2 4 8 16); DTYPES=(bfloat16 float16) ;;
  quick) LAYER=(--shapes llama7b-qkvo starcoder15b-attn --tokens 1 16 256 --ranks 1 4 16)
         DTYPES=(bfloat16) ;;
  tiny)  export TRITON_INTERPRET=1  # before triton is first imported
         # every interpreted program costs milliseconds: one warm-up-free call per path
         LAYER=(--device cpu --shapes 48x80 --tokens 1 3 --ranks 1 2 --warmup 0 --reps 1)
         DTYPES=(float16) ;;  # bf16 reads garbage under triton 3.9's interpreter
esac
[ -z "$ONLY_DTYPE" ] || DTYPES=("$ONLY_DTYPE")

if [ $MODE = tiny ]; then
  TAG=cpu-tiny
else
  TAG=$("$PY" -c 'import sys, torch
if not torch.cuda.is_available():
    sys.exit("run.sh: no CUDA device here (--tiny runs the CPU variant)")
from benchmarks.common import slug
print(slug(torch.cuda.get_device_name()))')
fi
mkdir -p "$OUT"
LOG="$OUT/run_$TAG.log"

body() {
  echo "== run.sh $MODE on $TAG, $(date -u +%FT%TZ), $(git rev-parse --short HEAD 2>/dev/null || echo no-git)"
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda,
  "triton", triton.__version__)'
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true

  status=0
  echo "== 1. correctness: benchmarks/gpu/check.py"
  CHECK=(benchmarks/gpu/check.py --out "$OUT/check_$TAG.json")
  [ $MODE = tiny ] && CHECK+=(--tiny)
  "$PY" "${CHECK[@]}" || status=1

  for dt in "${DTYPES[@]}"; do
    short=${dt/bfloat16/bf16}; short=${short/float16/fp16}
    echo "== 2. timing ($dt): benchmarks/layer_bench.py"
    "$PY" benchmarks/layer_bench.py "${LAYER[@]}" --dtype "$dt" \
      --out "$OUT/layer_${TAG}_$short.json" || { rc=$?; [ $status -ne 0 ] || status=$rc; }
  done

  echo "== wrote $OUT:"
  ls -l "$OUT" | sed -n '2,$p'
  if ! "$PY" -c 'import matplotlib' 2>/dev/null; then
    echo "no matplotlib here: plot later with python benchmarks/plot.py $OUT/layer_${TAG}_<dtype>.json"
  fi
  if [ $status -eq 0 ]; then echo "== done"; else echo "== done, with failures (exit $status)"; fi
  return $status
}

body 2>&1 | tee "$LOG"  # pipefail: the exit status is body's
