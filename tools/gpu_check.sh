#!/usr/bin/env bash
# Kernel check on a GPU machine (H100/H200, jax with CUDA, no network), run from the repository root:
#     OUT=/path/to/results bash tools/gpu_check.sh
# 1. a representative subset of the kernel tests, compiled with the Triton kernels (interpret=False), <= 100 s;
# 2. the kernel benchmark, <= 150 s: measured matmul peak and copy bandwidth, MLA decode, flash attention
#    forward/backward over a few block-size candidates (best printed per case), then the XLA baselines.
# Needs no installation: r1jax.kernels is loaded from ./kernels when r1jax is not pip-installed.
# Results (logs, JSON lines, junit xml) go to $OUT. Total under 5 minutes (the caps plus start-up).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"

{
  date
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  "$PY" -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
} 2>&1 | tee "$OUT/env.txt"

echo "== kernel tests, compiled Triton kernels ==" | tee "$OUT/tests.txt"
SUBSET="mla192_gqa_causal or bf16_mla_gqa_segments or fully_masked or default_blocks"
SUBSET="$SUBSET or (matches_reference_and_ignores_nan and bfloat16)"
R1JAX_KERNEL_KINDS=gpu R1JAX_KERNEL_INTERPRET=0 timeout 100 "$PY" -m pytest tests/test_kernels.py -k "$SUBSET" \
  -q -p no:cacheprovider --tb=short --junitxml="$OUT/tests.xml" 2>&1 | tail -n 150 | tee -a "$OUT/tests.txt"
echo "pytest exit: ${PIPESTATUS[0]}" | tee -a "$OUT/tests.txt"

echo "== benchmark ==" | tee "$OUT/bench.txt"
timeout 150 "$PY" tools/bench_kernels.py --iters 10 --json "$OUT/bench.jsonl" 2>&1 | tail -n 200 | tee -a "$OUT/bench.txt"
echo "bench exit: ${PIPESTATUS[0]}" | tee -a "$OUT/bench.txt"
