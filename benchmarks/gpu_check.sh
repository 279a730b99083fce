#!/usr/bin/env bash
# The accelerator measurements of BENCHMARKS.md in one command, for a short GPU lease:
#   1. the device, versions, and the HBM copy bandwidth this machine reaches (the roofline's
#      practical ceiling, beside the datasheet one);
#   2. benchmarks/sampler.py on a random Qwen3-0.6B-shaped model, batch 256, bf16, ours and
#      Tunix's sampler side by side (issue #3), with the memory-bandwidth roofline fraction;
#   3. benchmarks/gpu_step.py: K=2 GRPO and OPD steps on the same shape (issue #8), step time,
#      tokens/s and MFU.
#
#   bash benchmarks/gpu_check.sh OUT_DIR          # PYTHON (default python3) needs jax with
#                                                 # CUDA, our requirements, and google-tunix
#   SMOKE=1 bash benchmarks/gpu_check.sh OUT_DIR  # tiny shapes: checks the script on a CPU
set -uo pipefail
OUT=${1:?usage: gpu_check.sh OUT_DIR}
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# Two sampler processes share the GPU: allocate on demand instead of 75% each up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

if [[ -n "${SMOKE:-}" ]]; then
  SAMPLER=(--model tiny --batch 8 --dtype bfloat16 --reps 1)
  STEP=(--tiny --steps 1)
else
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
  SAMPLER=(--model qwen3-0.6b --batch 256 --dtype bfloat16 --reps 5)
  STEP=(--steps 2)
fi

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
"$PY" - <<'EOF' 2>&1 | tee "$OUT/device.txt"
import time
import flax, jax, jax.numpy as jnp, optax
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__)
print('devices', jax.devices())
x = jnp.ones((1 << 29,), jnp.float32)          # 2 GiB read + 2 GiB written per call
f = jax.jit(lambda a: a * 1.0001)
f(x).block_until_ready()
best = float('inf')
for _ in range(10):
  t0 = time.perf_counter()
  f(x).block_until_ready()
  best = min(best, time.perf_counter() - t0)
print(f'copy bandwidth (read + write): {2 * x.nbytes / best / 1e9:.0f} GB/s')
EOF

echo '== sampler: copd_jax vs Tunix'
"$PY" benchmarks/sampler.py "${SAMPLER[@]}" --peer-python "$PY" --json "$OUT/sampler.json" \
  2>&1 | tee "$OUT/sampler.txt"

echo '== GRPO / OPD steps, K=2'
"$PY" benchmarks/gpu_step.py "${STEP[@]}" --json "$OUT/gpu_step.json" 2>&1 \
  | tee "$OUT/gpu_step.txt"
