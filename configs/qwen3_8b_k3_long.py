"""Long reasoning: configs/qwen3_8b_k3_plan.py (K=3 hub-and-spoke from Qwen3-8B) at 8,192 tokens
per sequence (prompts up to 1,024 tokens + 7,168 new), planned for a TPU v5p-64 slice (32 chips of
95 GiB HBM).

Plan (shapes only, no files needed):
  python -m copd_jax plan --config configs/qwen3_8b_k3_long.py --devices 32 --device-memory-gb 95
The default layout chooser gives training (branch, fsdp, tensor) = (1, 8, 4) and sampling
(1, 4, 8); the plan's peak is about 56 GiB per chip (training), 37 GiB while sampling. What makes
8k tokens fit: attention 'auto' runs blockwise / fused above model.attention_block tokens (memory
linear in length, copd_jax/models/attention.py), per-layer remat, logits scored 16 positions at a
time, and opd.prompts_per_step=16 so that an OPD micro-batch's rows (128 + 2 x 64) / 8 = 32 divide
over fsdp=8 (with 8 prompts, 24 rows would not divide and every device would hold all of them).

8 x H100 (80 GB) does not hold this run: three fp32 branches with Adam moments and gradients are
about 57 GiB per device before any activation (`--devices 8 --device-memory-gb 80` lists the
overshoot per phase). A K=3 8B run at this length needs >= 32 such devices, or bf16 parameters.
Not run in this repository (no accelerator here): no result is claimed for it.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qwen3_8b_k3_plan import get_config as short_config  # noqa: E402


def get_config():
  c = short_config()
  c.data.max_prompt_tokens = 1024
  c.data.long_prompts = 'drop'
  c.sampling.max_new_tokens = 7168
  c.opd.prompts_per_step = 16
  return c
