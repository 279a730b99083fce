"""Peak host memory of the streaming merge vs a naive load-everything merge.

    python benchmarks/merge.py [--branches 3] [--layers 8] [--hidden 512] [--dir /tmp/merge_bench]

Writes one run checkpoint of K random branches of a Qwen3-shaped model, then runs each merge
in a fresh process and reports its peak RSS (ru_maxrss) and the part above the RSS right after
the imports. naive: restore the whole 'state' item (all K branches) with Orbax, average, save.
streaming: copd_jax.merge.merge_checkpoints (one tensor of one layer of the K branches at a time).
Both write the same params-only checkpoint; the script checks they agree.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_mib() -> float:
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmRSS:'):
        return int(line.split()[1]) / 1024
  return float('nan')


def peak_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def config_of(args):
  from copd_jax.models.qwen3 import Qwen3Config
  return Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                     num_heads=args.hidden // 64, num_kv_heads=max(1, args.hidden // 128),
                     head_dim=64, intermediate_size=4 * args.hidden)


def setup(args) -> dict:
  import numpy as np
  from flax import nnx
  import jax
  from copd_jax import checkpoint as ckpt
  from copd_jax.models.qwen3 import Qwen3
  config = config_of(args)
  _, shapes = nnx.split(nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.02 * rng.standard_normal((args.branches,) + s.shape))
                        .astype(np.float32), shapes)
  meta = ckpt.run_meta(cycle=0, phase='rl', step=1, model_config=config, tokenizer_dir=None,
                       base_params=None, config={})
  with ckpt.RunCheckpointer(os.path.join(args.dir, 'run'), async_save=False) as saver:
    saver.save(1, {'params': params}, meta, force=True)
  return {'params_per_branch': config.num_params()}


def naive(args, out: str) -> None:
  """Every branch read whole into host memory, then averaged: K models at once."""
  import numpy as np
  import jax
  from copd_jax import checkpoint as ckpt
  step_dir = ckpt.latest_step_dir(os.path.join(args.dir, 'run'))
  source = ckpt.open_source(step_dir)
  branches = [source.read_all(branch=k) for k in range(source.num_branches)]
  merged = jax.tree.map(lambda *xs: np.mean(np.stack(xs), axis=0), *branches)
  del branches
  meta = ckpt.read_meta(step_dir)
  ckpt.save_params_checkpoint(out, merged, {ckpt.META_MODEL_CONFIG: meta[ckpt.META_MODEL_CONFIG]})


def streaming(args, out: str) -> None:
  from copd_jax import merge
  merge.merge_checkpoints(os.path.join(args.dir, 'run'), 'mean', out=out)


def child(args) -> None:
  import jax  # noqa: F401  (the imports both modes pay)
  import orbax.checkpoint  # noqa: F401
  from copd_jax import checkpoint, merge  # noqa: F401
  base = rss_mib()
  start = time.perf_counter()
  out = os.path.join(args.dir, f'out_{args.role}')
  shutil.rmtree(out, ignore_errors=True)
  info = setup(args) if args.role == 'setup' else {}
  if args.role == 'naive':
    naive(args, out)
  elif args.role == 'streaming':
    streaming(args, out)
  print(json.dumps({'role': args.role, 'seconds': time.perf_counter() - start,
                    'rss_after_imports_mib': base, 'peak_rss_mib': peak_mib(), **info}))


def run_child(args, role: str) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), '--role', role, '--dir', args.dir,
         '--branches', str(args.branches), '--layers', str(args.layers),
         '--hidden', str(args.hidden), '--vocab', str(args.vocab)]
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
  return json.loads(proc.stdout.strip().splitlines()[-1])


def check_same(args) -> float:
  import numpy as np
  import jax
  from copd_jax import checkpoint as ckpt
  a, _ = ckpt.load_params_checkpoint(os.path.join(args.dir, 'out_naive'))
  b, _ = ckpt.load_params_checkpoint(os.path.join(args.dir, 'out_streaming'))
  return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--role', choices=('main', 'setup', 'naive', 'streaming'), default='main')
  parser.add_argument('--dir', default='/tmp/copd_merge_bench')
  parser.add_argument('--branches', type=int, default=3)
  parser.add_argument('--layers', type=int, default=8)
  parser.add_argument('--hidden', type=int, default=512)
  parser.add_argument('--vocab', type=int, default=32_000)
  args = parser.parse_args()
  if args.role != 'main':
    child(args)
    return
  shutil.rmtree(args.dir, ignore_errors=True)
  os.makedirs(args.dir)
  info = run_child(args, 'setup')
  results = [run_child(args, role) for role in ('naive', 'streaming')]
  sys.path.insert(0, ROOT)
  diff = check_same(args)
  branch_mib = info['params_per_branch'] * 4 / 2**20
  print(f'model: {info["params_per_branch"] / 1e6:.1f}M params per branch '
        f'({branch_mib:.0f} MiB fp32), K={args.branches}; machine: {platform.machine()} '
        f'{os.cpu_count()} cores; max |naive - streaming| = {diff:.1e}')
  print('| merge | peak RSS (MiB) | above post-import RSS (MiB) | in branches | seconds |')
  print('|---|---|---|---|---|')
  for r in results:
    extra = r['peak_rss_mib'] - r['rss_after_imports_mib']
    print(f'| {r["role"]} | {r["peak_rss_mib"]:.0f} | {extra:.0f} | {extra / branch_mib:.2f} | '
          f'{r["seconds"]:.1f} |')
  shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == '__main__':
  main()
