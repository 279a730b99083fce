"""Accelerator step time, tokens/s and MFU of CoPD's GRPO and OPD steps on a random-init
Qwen3-0.6B-shaped model with K=2 branches, in one run.

    python benchmarks/gpu_step.py                # on a GPU / TPU host: Qwen3-0.6B shape
    python benchmarks/gpu_step.py --tiny         # a tiny model on CPU: checks the script works
    python benchmarks/gpu_step.py --json out.json --peak-tflops 989

Workload: K=2 branches on one mesh over every local device ('branch' = 2 when the device count
is even, the rest on 'fsdp'); fp32 parameters and AdamW moments, bf16 matmuls, per-layer remat.
Each step samples --prompts x --group rows per branch (prompt of --prompt-len random ids,
--new-tokens new tokens; the EOS id is outside the vocabulary so every row runs to full length),
then updates: a GRPO step on that batch, or an OPD step on it plus --distill rows per branch
that each branch sampled for its partner (pairwise topology: one round, branch 0 <-> 1), scored
by the partner. Warm-up steps compile; the timed steps report medians.

Timed (each ends with block_until_ready): 'rollout' (generate_branches to device-ready
tokens), 'update' (grpo_step / opd_step). Tokens are every position of every row the phase
processes (prompt + completion), over all branches.

FLOPs (model FLOPs, the MFU convention; remat's recompute is not counted): N_mm = matmul
parameters per branch (num_params, minus the embedding table when the head is untied),
per token: training 6 N_mm + 6 L H hd T (causal attention, forward + backward), scoring / prefill
2 N_mm + 2 L H hd T, decoding 2 N_mm + 4 L H hd c (c = the cache length it attends to, on
average P + N/2). MFU = FLOPs / seconds / (devices x peak): peak from --peak-tflops or the
table below (dense bf16), unknown on CPU (MFU is then not reported).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.workers import write_json  # noqa: E402
from copd_jax import losses, mesh as mesh_lib, optim, sampling  # noqa: E402
from copd_jax.models.presets import QWEN3_PRESETS  # noqa: E402
from copd_jax.models.qwen3 import Qwen3, Qwen3Config  # noqa: E402
from copd_jax.steps import (RolloutBatch, StepConfig, branch_state_shardings,  # noqa: E402
                            init_branch_state, make_grpo_step, make_opd_step)

TINY = Qwen3Config(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=16, intermediate_size=192, tie_word_embeddings=True)
# Dense bf16 peak TFLOP/s per device, matched against jax's device_kind (first match wins).
PEAK_TFLOPS = (('H100 PCIe', 756.0), ('H100', 989.0), ('H200', 989.0), ('GH200', 989.0),
               ('A100', 312.0), ('L40S', 362.0), ('L4', 121.0), ('TPU v6', 918.0),
               ('TPU v5 lite', 197.0), ('TPU v5e', 197.0), ('TPU v5', 459.0), ('TPU v4', 275.0))
K = 2


def matmul_params(c: Qwen3Config) -> int:
  return c.num_params() - (0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size)


def train_flops(c: Qwen3Config, rows: int, T: int) -> float:
  return rows * T * (6 * matmul_params(c) + 6 * c.num_layers * c.num_heads * c.head_dim * T)


def score_flops(c: Qwen3Config, rows: int, T: int) -> float:
  return rows * T * (2 * matmul_params(c) + 2 * c.num_layers * c.num_heads * c.head_dim * T)


def rollout_flops(c: Qwen3Config, rows: int, P: int, N: int) -> float:
  decode = rows * N * (2 * matmul_params(c) + 4 * c.num_layers * c.num_heads * c.head_dim
                       * (P + N / 2))
  return score_flops(c, rows, P) + decode


def peak_flops(device_kind: str, override: float | None) -> float | None:
  if override:
    return override * 1e12
  for name, tflops in PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return tflops * 1e12
  return None


def build(args, config: Qwen3Config):
  devices = jax.devices()
  branch = 2 if len(devices) % 2 == 0 else 1
  mesh = mesh_lib.make_mesh({'branch': branch, 'fsdp': -1, 'tensor': 1}, devices=devices,
                            num_branches=K)
  model = Qwen3(config, rngs=nnx.Rngs(0), param_dtype=jnp.float32, compute_dtype=jnp.bfloat16,
                remat=not args.no_remat)
  graphdef, params = nnx.split(model)
  optimizer = optim.make_optimizer({'learning_rate': 1e-6, 'max_grad_norm': 1.0})
  state = init_branch_state(graphdef, params, K, optimizer, mesh, seed=0)
  del model, params
  shardings = branch_state_shardings(state, mesh)
  cfg = StepConfig(num_micro_batches=args.micro_batches,
                   max_completion_tokens=args.new_tokens, logits_chunk=args.logits_chunk or None)
  grpo = make_grpo_step(graphdef, optimizer, mesh, cfg, shardings)
  opd = make_opd_step(graphdef, optimizer, mesh, cfg, shardings, ((1, 0),))
  return mesh, graphdef, state, grpo, opd


def rollout(graphdef, state, mesh, config, rows: int, args, seed: int):
  rng = np.random.default_rng(seed)
  prompts = rng.integers(1, config.vocab_size, (K, rows, args.prompt_len)).astype(np.int32)
  params = sampling.SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0)
  keys = jax.random.split(jax.random.key(seed), K)
  out = sampling.generate_branches(graphdef, state.params, prompts, np.ones_like(prompts, bool),
                                   keys, params, eos_ids=(config.vocab_size,), pad_id=0,
                                   mesh=mesh)
  return jax.block_until_ready(out)


def to_batch(out, advantages) -> RolloutBatch:
  completion = out.completion_mask
  return RolloutBatch(out.tokens, out.token_valid, completion, out.logprobs,
                      (advantages[..., None] * completion).astype(jnp.float32))


def run(args) -> dict:
  config = TINY if args.tiny else QWEN3_PRESETS['qwen3-0.6b']
  mesh, graphdef, state, grpo, opd = build(args, config)
  rows, M = args.prompts * args.group, args.distill
  T = args.prompt_len + args.new_tokens
  times = {'grpo': [], 'opd': []}
  for i in range(args.warmup + args.steps):
    for phase in ('grpo', 'opd'):
      t0 = time.perf_counter()
      native = rollout(graphdef, state, mesh, config, rows, args, seed=2 * i)
      distill = rollout(graphdef, state, mesh, config, M, args, seed=2 * i + 1) \
          if phase == 'opd' else None
      t1 = time.perf_counter()
      rewards = np.random.default_rng(i).random((K, rows)).astype(np.float32)
      batch = to_batch(native, losses.group_advantages(jnp.asarray(rewards), args.group))
      if phase == 'grpo':
        state, metrics = grpo(state, batch)
      else:
        d = to_batch(distill, jnp.zeros((K, M), jnp.float32))
        state, metrics = opd(state, batch, jax.tree.map(lambda x: x[None], d))
      jax.block_until_ready((state, metrics))
      t2 = time.perf_counter()
      if i >= args.warmup:
        times[phase].append({'rollout_s': t1 - t0, 'update_s': t2 - t1})
      assert all(np.all(np.isfinite(np.asarray(v))) for v in metrics.values()), metrics

  devices = jax.devices()
  peak = peak_flops(devices[0].device_kind, args.peak_tflops)
  work = {
      'grpo': dict(rollout_tokens=K * rows * T, update_tokens=K * rows * T,
                   rollout_flops=K * rollout_flops(config, rows, args.prompt_len, args.new_tokens),
                   update_flops=K * train_flops(config, rows, T)),
      'opd': dict(rollout_tokens=K * (rows + M) * T, update_tokens=K * (rows + M) * T,
                  rollout_flops=K * rollout_flops(config, rows + M, args.prompt_len,
                                                  args.new_tokens),
                  update_flops=K * (train_flops(config, rows + M, T) + score_flops(config, M, T))),
  }
  result = {'device_kind': devices[0].device_kind, 'num_devices': len(devices),
            'mesh': dict(mesh.shape), 'model': 'tiny' if args.tiny else 'qwen3-0.6b',
            'params_per_branch': config.num_params(), 'peak_flops_per_device': peak,
            'rows_per_branch': rows, 'distill_rows_per_branch': M, 'seq': T,
            'micro_batches': args.micro_batches, 'logits_chunk': args.logits_chunk,
            'remat': not args.no_remat, 'phases': {}}
  for phase, runs in times.items():
    entry = {}
    for part in ('rollout', 'update'):
      seconds = statistics.median(r[f'{part}_s'] for r in runs)
      flops = work[phase][f'{part}_flops']
      entry[part] = {'median_s': seconds, 'tokens_per_s': work[phase][f'{part}_tokens'] / seconds,
                     'model_tflops': flops / 1e12,
                     'mfu': flops / seconds / (len(devices) * peak) if peak else None}
    entry['step_s'] = statistics.median(r['rollout_s'] + r['update_s'] for r in runs)
    result['phases'][phase] = entry
  stats = devices[0].memory_stats() or {}
  result['peak_bytes_in_use_device0'] = stats.get('peak_bytes_in_use')
  return result


def print_table(result: dict) -> None:
  print(f"{result['model']} ({result['params_per_branch']:,} params/branch), K={K}, "
        f"{result['num_devices']} x {result['device_kind']}, mesh {result['mesh']}, "
        f"{result['rows_per_branch']} rows (+{result['distill_rows_per_branch']} OPD) x "
        f"{result['seq']} tokens per branch, {result['micro_batches']} micro-batches, "
        f"logits_chunk={result['logits_chunk']}, remat={result['remat']}")
  print('| step | part | median s | tokens/s | model TFLOPs | MFU |')
  print('|---|---|---:|---:|---:|---:|')
  for phase, entry in result['phases'].items():
    for part in ('rollout', 'update'):
      e = entry[part]
      mfu = f"{100 * e['mfu']:.1f}%" if e['mfu'] is not None else 'n/a'
      print(f"| {phase} | {part} | {e['median_s']:.3f} | {e['tokens_per_s']:.0f} | "
            f"{e['model_tflops']:.2f} | {mfu} |")
    print(f"| {phase} | full step | {entry['step_s']:.3f} | | | |")
  if result['peak_bytes_in_use_device0']:
    print(f"peak memory in use, device 0: {result['peak_bytes_in_use_device0'] / 2**30:.2f} GiB")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--tiny', action='store_true', help='tiny model (CPU smoke run)')
  parser.add_argument('--steps', type=int, default=3, help='timed steps per phase')
  parser.add_argument('--warmup', type=int, default=1, help='untimed steps per phase (compile)')
  parser.add_argument('--prompts', type=int, default=8, help='prompts per branch per step')
  parser.add_argument('--group', type=int, default=4, help='samples per prompt (GRPO group)')
  parser.add_argument('--distill', type=int, default=16, help='OPD rows per branch per step')
  parser.add_argument('--prompt-len', type=int, default=128)
  parser.add_argument('--new-tokens', type=int, default=384)
  parser.add_argument('--micro-batches', type=int, default=4)
  parser.add_argument('--no-remat', action='store_true')
  parser.add_argument('--logits-chunk', type=int, default=0,
                      help='score this many positions of full-vocabulary logits at a time '
                           '(grpo.logits_chunk; 0 = all at once)')
  parser.add_argument('--peak-tflops', type=float, default=None,
                      help='dense bf16 peak per device (default: from the device kind)')
  parser.add_argument('--json', default='', help='also write the result to this file')
  args = parser.parse_args()
  if args.tiny:  # a few seconds of work per step on a laptop CPU
    for name, value in (('prompts', 2), ('group', 4), ('distill', 4), ('prompt_len', 16),
                        ('new_tokens', 16), ('micro_batches', 2)):
      if getattr(args, name) == parser.get_default(name):
        setattr(args, name, value)
  result = run(args)
  print_table(result)
  write_json(args.json, result)


if __name__ == '__main__':
  main()
