#!/usr/bin/env bash
# Kernel check on a GPU machine (H100/H200, jax with CUDA, no network), run from the repository root:
#     OUT=/path/to/results bash tools/gpu_check.sh
# 1. the interpret-mode kernel test grid, compiled with the Triton kernels (interpret=False);
# 2. the kernel benchmark (TFLOP/s, GB/s vs XLA, measured matmul peak and copy bandwidth).
# Needs no installation: r1jax.kernels is loaded from ./kernels when r1jax is not pip-installed.
# Results (logs, JSON lines, junit xml) go to $OUT. Total well under 7 minutes.
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
R1JAX_KERNEL_KINDS=gpu R1JAX_KERNEL_INTERPRET=0 timeout 240 "$PY" -m pytest tests/test_kernels.py \
  -q -p no:cacheprovider --tb=short --junitxml="$OUT/tests.xml" 2>&1 | tail -n 150 | tee -a "$OUT/tests.txt"
echo "pytest exit: ${PIPESTATUS[0]}" | tee -a "$OUT/tests.txt"

echo "== benchmark ==" | tee "$OUT/bench.txt"
timeout 240 "$PY" tools/bench_kernels.py --iters 20 --json "$OUT/bench.jsonl" 2>&1 | tail -n 200 | tee -a "$OUT/bench.txt"
echo "bench exit: ${PIPESTATUS[0]}" | tee -a "$OUT/bench.txt"
