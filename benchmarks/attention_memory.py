"""Compiled memory of a GRPO step against sequence length, dense vs blockwise attention.

XLA's `compiled.memory_analysis().temp_size_in_bytes` of `steps.make_grpo_step` on a tiny fp32
model (one device, one row, nothing run: compile only). Dense attention's scores grow with T^2;
the blockwise kernel's tiles do not, so its temporaries grow ~linearly.

  python -m benchmarks.attention_memory [--lengths 1024 2048 4096] [--impls blockwise dense]
"""
from __future__ import annotations

import argparse

from flax import nnx

from copd_jax.memory_plan import compiled_grpo_step_temp_bytes
from copd_jax.models.qwen3 import Qwen3, Qwen3Config
from copd_jax.step_config import StepConfig

TINY = Qwen3Config(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=16, intermediate_size=128)


def grpo_step_temp_bytes(seq: int, attention: str, rows: int = 1, block: int = 512,
                         config: Qwen3Config = TINY) -> int:
  """Temporary bytes XLA allocates for one compiled GRPO step of `rows` x `seq` tokens."""
  model = nnx.eval_shape(
      lambda: Qwen3(config, rngs=nnx.Rngs(0), attention=attention, attention_block=block))
  return compiled_grpo_step_temp_bytes(model, rows, seq, StepConfig())


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--lengths', type=int, nargs='+', default=[1024, 2048, 4096])
  parser.add_argument('--impls', nargs='+', default=['blockwise', 'dense'])
  args = parser.parse_args()
  print('| attention | ' + ' | '.join(f'T={t}' for t in args.lengths) + ' |')
  print('|---|' + '---|' * len(args.lengths))
  for impl in args.impls:
    mib = [grpo_step_temp_bytes(t, impl) / 2**20 for t in args.lengths]
    print(f'| {impl} | ' + ' | '.join(f'{m:.1f} MiB' for m in mib) + ' |', flush=True)


if __name__ == '__main__':
  main()
