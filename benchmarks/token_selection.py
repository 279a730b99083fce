"""Per-step cost of picking the next token from [B, V] fp32 logits, on the default device.

    python benchmarks/token_selection.py                      # the GPU sampler shape
    python benchmarks/token_selection.py --batch 64 --vocab 256

Compares what the sampler does now (`sampling.select_tokens`: one uniform per row, two-level
inverse CDF, log-prob of the pick) with Gumbel-max, which the sampler used before (one Gumbel
draw per vocabulary entry; with per-row keys as the sampler would need them, and with one key
for the whole batch), and with a bare logsumexp as a reference for one pass over the logits.
Each is timed as 20 selections inside one jitted loop; prints the median ms per selection.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--vocab', type=int, default=151936)
  parser.add_argument('--reps', type=int, default=5)
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp
  from copd_jax import sampling

  B, V = args.batch, args.vocab
  logits = jax.random.normal(jax.random.key(0), (B, V), jnp.float32) * 3
  keys = jax.random.split(jax.random.key(1), B)
  uniforms = jax.random.uniform(jax.random.key(2), (B,))
  spec = sampling.SamplingParams(max_new_tokens=1)

  def gumbel_row_keys(x, keys):
    noise = jax.vmap(lambda k: jax.random.gumbel(k, (V,), jnp.float32))(keys)
    return sampling.first_argmax(x + noise)

  def gumbel_one_key(x, key):
    return sampling.first_argmax(x + jax.random.gumbel(key, x.shape, jnp.float32))

  candidates = [
      ('select_tokens (inverse CDF)', lambda x, u: sampling.select_tokens(x, u, spec)[1],
       (logits, uniforms)),
      ('Gumbel-max, per-row keys', gumbel_row_keys, (logits, keys)),
      ('Gumbel-max, one key', gumbel_one_key, (logits, jax.random.key(3))),
      ('logsumexp (one pass)', lambda x: jax.nn.logsumexp(x, axis=-1), (logits,)),
  ]
  print(f'{jax.devices()[0].device_kind}, logits [{B}, {V}]')
  for name, select, inputs in candidates:
    def twenty(*a, select=select):
      body = lambda i, acc: acc + select(*a).sum().astype(jnp.float32)
      return jax.lax.fori_loop(0, 20, body, 0.0)
    run = jax.jit(twenty)
    run(*inputs).block_until_ready()
    times = []
    for _ in range(args.reps):
      start = time.perf_counter()
      run(*inputs).block_until_ready()
      times.append(time.perf_counter() - start)
    print(f'{name:30s} {sorted(times)[len(times) // 2] / 20 * 1e3:8.3f} ms per selection')


if __name__ == '__main__':
  main()
