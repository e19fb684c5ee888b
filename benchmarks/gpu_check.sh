#!/usr/bin/env bash
# On a GPU machine (no network; torch, triton, transformers already installed): build the
# extension, run the GPU tests, run the quick kernel, end-to-end (with transformers' generate
# against the patched one) and serving benchmarks.
# Everything lands under $OUT (default benchmarks/results/gpu_check): one log and the
# benchmark tables/plots. Each step has its own time limit; a failing step does not stop
# the others, and the exit status says whether all passed. Under 8 minutes on an H200. The GPU
# tests include bf16/fp16 faithfulness against transformers on CUDA, graph replay against the
# eager step (bitwise), and an engine on cuda:1 where a second GPU exists.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export VPT_FAST_BUILD_DIR="${VPT_FAST_BUILD_DIR:-/tmp/vpt_fast_build}" VPT_FAST_RESULTS="$OUT"
failed=0
# torch guesses CUDA_HOME from the nvcc on PATH, which may be a wrapper outside the toolkit
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then export CUDA_HOME=/usr/local/cuda; fi

step() {  # step NAME SECONDS command...
  local name=$1 limit=$2
  shift 2
  echo "=== $name ($(date -u +%T), limit ${limit}s)" | tee -a "$LOG"
  local start=$SECONDS
  timeout "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - start))s" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || failed=1
}

{ nvidia-smi; python3 -c "import torch, triton, transformers; print(torch.__version__, torch.version.cuda, triton.__version__, transformers.__version__)"; } >>"$LOG" 2>&1
step build 150 python3 -c "import vpt_fast._ext as e; print('loaded:', e.load(verbose=True) is not None); print('cuda kernels:', e.available('cuda')); print('cpu kernels:', e.available('cpu'))"
step pytest_gpu 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests
step kernels 60 python3 benchmarks/kernels.py --quick
step e2e 200 python3 benchmarks/e2e.py --quick
step e2e_7b_decode 90 python3 benchmarks/e2e.py --shape 7b --decode-only
step e2e_hf_generate 120 python3 benchmarks/e2e.py --shape 2b --hf-generate --reps 2
step serving 150 python3 benchmarks/serving.py --quick
step host_overhead 90 python3 benchmarks/host_overhead.py --shape 2b --batches 1 8 32 --steps 15
step prefix_cache 90 python3 benchmarks/prefix_cache.py --shape 2b --images 4 --chats 3 --max-new-tokens 16
echo "gpu_check: $([ $failed -eq 0 ] && echo all steps passed || echo some steps FAILED)" | tee -a "$LOG"
exit $failed
