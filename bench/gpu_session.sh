#!/usr/bin/env bash
# The GPU checks and benches of issue 5 in three stages, each sized for one 10-minute call of the
# workplace's device tool (whose machine has its own python3 with torch/triton/transformers; nothing
# can be installed there). Results land in bench/results/ and, when $OUT is set, are copied there.
#
#   bash bench/gpu_session.sh tests     # bf16/fp16 kernel correctness, CUDA graphs, host syncs, KV sizing
#   bash bench/gpu_session.sh kernels   # bench/kernels.py + bench/fused_ops.py
#   bash bench/gpu_session.sh e2e       # bench/e2e_paper.py (1B model, paper workload), ROWS=3200 HF_ROWS=256
#   bash bench/gpu_session.sh all       # the three in one call of at most ~9 minutes: each stage has a
#                                       # time cap (TESTS_S, KERNEL_TESTS_S, KERNELS_S, FUSED_S, E2E_S);
#                                       # smaller benches. 2026-11-28 on an H200: the full kernel tests
#                                       # took ~330 s, kernels+fused benches ~90 s, e2e (640 rows) ~70 s
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-}
stage=${1:?usage: bash bench/gpu_session.sh tests|kernels|e2e|all}
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1

log() { if [ -n "$OUT" ]; then tee -a "$OUT/$stage.log"; else cat; fi; }
keep() { if [ -n "$OUT" ]; then cp -f "$@" "$OUT/" 2>/dev/null || true; fi; }

{
  date -u +%FT%TZ; git rev-parse HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 | head -3
  $PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
} 2>&1 | log

case "$stage" in
  tests)
    $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_gpu.py tests/test_engine_gpu.py 2>&1 | tail -40 | log
    ;;
  kernels)
    $PY bench/kernels.py 2>&1 | tail -40 | log
    $PY bench/fused_ops.py 2>&1 | tail -30 | log
    keep bench/results/kernels_*.json bench/results/fused_ops_*.json
    ;;
  e2e)
    $PY bench/e2e_paper.py --rows "${ROWS:-3200}" --hf-rows "${HF_ROWS:-256}" 2>&1 | tail -40 | log
    keep bench/results/e2e_paper_*.json
    ;;
  all)
    # One device call: whatever stage runs out of its time is cut there, the next one still runs.
    # Engine tests first (graphs, every CUDA path against the CPU engine), then the kernels in bfloat16
    # (float16 runs in the `tests` stage); a failure's traceback is printed when it happens.
    export BATCHLLM_INSTAFAIL=1
    timeout -k 5 "${TESTS_S:-240}" $PY -m pytest -v -m gpu -p no:cacheprovider --durations=8 --timeout 120 \
      tests/test_engine_gpu.py 2>&1 | log
    timeout -k 5 "${KERNEL_TESTS_S:-60}" $PY -m pytest -q -m gpu -p no:cacheprovider --timeout 60 -k "not dtype1" \
      tests/test_kernels_gpu.py 2>&1 | log
    { timeout -k 5 "${KERNELS_S:-70}" $PY bench/kernels.py --rep-ms 100 2>&1 | tail -30
      timeout -k 5 "${FUSED_S:-35}" $PY bench/fused_ops.py --rep-ms 50 2>&1 | tail -25; } | log
    keep bench/results/kernels_*.json bench/results/fused_ops_*.json
    timeout -k 5 "${E2E_S:-120}" $PY bench/e2e_paper.py --rows "${ROWS:-640}" --hf-rows "${HF_ROWS:-64}" \
      --modes plan none --max-num-seqs 256 --copy-gib 2 --breakdown-rows 160 2>&1 | tail -30 | log
    keep bench/results/e2e_paper_*.json
    ;;
  *)
    echo "unknown stage $stage: tests, kernels or e2e" >&2; exit 2 ;;
esac
