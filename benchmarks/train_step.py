"""GRPO train-step throughput: copd_jax (sampling.generate + steps.grpo_step) vs Tunix's
`GrpoLearner`, side by side.

    .venv/bin/python benchmarks/train_step.py --peer-python /work/tunix_venv/bin/python

One command: this process starts two long-lived workers (ours in this interpreter's venv, Tunix's
in --peer-python's venv), lets each build and compile (two warm-up steps), then alternates timed
steps between them (one worker runs at a time) and prints medians, tokens/s and ratios. Workers
talk JSON lines over stdin/stdout. Our worker never imports tunix; the Tunix worker never imports
copd_jax.

Workload (both sides): a random-init Qwen3 (vocab 256, hidden 256, 4 layers, 8 q heads, 4 kv
heads, head_dim 32, intermediate 768, fp32 parameters and compute), 8 prompts of 16 tokens
(BOS + 15 random ids, new prompts every step), G = 8 samples each at temperature 1 (64 rows),
48 new tokens with an EOS id the model cannot emit (every row generates all 48), reward = share
of completion tokens equal to id 7, GRPO advantages, one clipped-surrogate update with
seq-mean-token-mean aggregation, no KL term, AdamW (lr 1e-6, weight decay 1e-4) after clipping
to global norm 1. Same algorithm, different implementations: our variants (--ours) choose whether
each GRPO group's shared prompt is scored once ('shared') or per row ('plain', like Tunix), and
lax.scan ('scan') or a Python loop ('unrolled', like Tunix's model) over the decoder layers.

Timed per step:
  full step  prompts -> rollout -> rewards -> advantages -> update -> parameters ready
             (Tunix: the time between two batch requests of GrpoLearner.train, a global step)
  update     the update alone (ours: grpo_step; Tunix: RLCluster.update_actor), each followed by
             block_until_ready on the parameters so asynchronous dispatch is not mistaken for speed
  rollout    sampling to host tokens (ours: sampling.generate_branches; Tunix:
             RLCluster.generate)
Tokens per step: 64 rows x 64 positions (prompt + completion) = 4096.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.workers import Worker, write_json  # noqa: E402

CONFIG = dict(vocab=256, hidden=256, layers=4, heads=8, kv_heads=4, head_dim=32,
              intermediate=768)
PROMPTS, GROUP, PROMPT_LEN, NEW_TOKENS = 8, 8, 16, 48
ROWS = PROMPTS * GROUP
TOKENS_PER_STEP = ROWS * (PROMPT_LEN + NEW_TOKENS)
LEARNING_RATE, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-6, 1e-4, 1.0
REWARD_ID, BOS, PAD = 7, 1, 0
WARMUP_STEPS = 2
# Our variants (--ours), '+'-joined: 'shared' scores each group's prompt once in the update
# (StepConfig.group_size / prompt_length) and the sampler prefills it once (generate_branches
# group_size), 'plain' does both per row (as Tunix does); 'unrolled' runs the decoder layers as a
# Python loop (as Tunix's model does), 'scan' with lax.scan (Qwen3 scan_layers=True); 'cores'
# splits the CPU into one jax device per core and runs the step data-parallel over them (rows
# over 'fsdp', parameters replicated: config.shard_params_over_fsdp = False), as
# `python -m copd_jax train` lays out a CPU host (copd_jax/host_devices.py); without it, one device.
OURS_VARIANTS = ('shared+unrolled+cores', 'plain+unrolled+cores', 'shared+unrolled',
                 'plain+unrolled', 'shared+scan', 'plain+scan')


def _prompt_ids(rep: int) -> list[list[int]]:
  """PROMPTS prompts of 15 ids in [3, vocab) (BOS is added by each side)."""
  rng = random.Random(1000 + rep)
  return [[rng.randrange(3, CONFIG['vocab']) for _ in range(PROMPT_LEN - 1)]
          for _ in range(PROMPTS)]


# ---------------------------------------------------------------------------------------------
# Our worker
# ---------------------------------------------------------------------------------------------

def _ours_worker(variant: str):
  """Returns step(rep) -> timings dict."""
  flags = set(variant.split('+'))
  share_prompts, scan_layers, per_core = 'shared' in flags, 'scan' in flags, 'cores' in flags
  from copd_jax import host_devices
  if per_core:
    host_devices.configure(host_devices.cpu_cores())
  import jax
  import numpy as np
  from flax import nnx
  from copd_jax import losses, mesh as mesh_lib, optim, sampling
  from copd_jax.models.qwen3 import Qwen3, Qwen3Config
  from copd_jax.scoring import split_model
  from copd_jax.steps import (RolloutBatch, StepConfig, branch_state_shardings,
                              init_branch_state, make_grpo_step)

  c = CONFIG
  config = Qwen3Config(vocab_size=c['vocab'], hidden_size=c['hidden'], num_layers=c['layers'],
                       num_heads=c['heads'], num_kv_heads=c['kv_heads'], head_dim=c['head_dim'],
                       intermediate_size=c['intermediate'])
  graphdef, params = split_model(Qwen3(config, rngs=nnx.Rngs(0), scan_layers=scan_layers))
  devices = jax.devices() if per_core else jax.devices()[:1]
  mesh = mesh_lib.make_mesh({'branch': 1, 'fsdp': -1, 'tensor': 1}, devices=devices)
  rules = mesh_lib.param_rules(shard_params_over_fsdp=not per_core)
  optimizer = optim.make_optimizer({'learning_rate': LEARNING_RATE, 'weight_decay': WEIGHT_DECAY,
                                    'max_grad_norm': MAX_GRAD_NORM})
  state = init_branch_state(graphdef, params, 1, optimizer, mesh, seed=0, rules=rules)
  step_config = StepConfig(group_size=GROUP, prompt_length=PROMPT_LEN) if share_prompts \
      else StepConfig()
  grpo_step = make_grpo_step(graphdef, optimizer, mesh, step_config,
                             branch_state_shardings(state, mesh, rules))
  sampling_params = sampling.SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0)
  eos = (c['vocab'],)   # never sampled: every row runs the full length
  holder = {'state': state}

  def step(rep: int) -> dict:
    start = time.perf_counter()
    prompts = np.asarray([[BOS] + ids for ids in _prompt_ids(rep) for _ in range(GROUP)],
                         np.int32)
    state = holder['state']
    # As the driver samples: generate_branches on the branch-stacked parameters.
    out = sampling.generate_branches(graphdef, state.params, prompts[None],
                                     np.ones_like(prompts, bool)[None],
                                     jax.random.key(10_000 + rep)[None], sampling_params,
                                     eos_ids=eos, pad_id=PAD, mesh=mesh,
                                     group_size=GROUP if share_prompts else 1)
    tokens, completion = np.asarray(out.tokens[0]), np.asarray(out.completion_mask[0])
    rollout_s = time.perf_counter() - start
    rewards = ((tokens == REWARD_ID) & completion).sum(-1) / NEW_TOKENS
    advantages = np.asarray(losses.group_advantages(rewards.astype(np.float32), GROUP))
    batch = RolloutBatch(out.tokens, out.token_valid, out.completion_mask, out.logprobs,
                         (advantages[..., None] * completion).astype(np.float32)[None])
    update_start, update_cpu = time.perf_counter(), time.process_time()
    state, metrics = grpo_step(state, batch)
    jax.block_until_ready((state, metrics))
    end = time.perf_counter()
    holder['state'] = state
    if share_prompts and float(metrics['prompt_mismatch'][0]) != 0.0:
      raise RuntimeError('rows of a group do not share their prompt')
    return {'seconds': end - start, 'update_s': end - update_start, 'rollout_s': rollout_s,
            'update_cpu_s': time.process_time() - update_cpu,
            'completion_tokens': int(completion.sum())}
  return step


def run_ours(variant: str):
  step = _ours_worker(variant)
  start = time.perf_counter()
  for i in range(WARMUP_STEPS):
    step(-1 - i)
  _emit({'ready': True, 'warmup_s': time.perf_counter() - start})
  for line in sys.stdin:
    cpu = time.process_time()
    result = step(int(line.split()[1]))
    result['cpu_seconds'] = time.process_time() - cpu
    _emit(result)


def _emit(obj: dict):
  print(json.dumps(obj), flush=True)


# ---------------------------------------------------------------------------------------------
# Tunix worker
# ---------------------------------------------------------------------------------------------

def run_tunix(per_core: bool = False):
  """GrpoLearner.train pulls batches from a generator; each pull after the first two (warm-up)
  reports the previous step's timings and waits for the orchestrator's next 'run' line.
  per_core ('tunix-cores'): the CPU split into one device per core, as for our 'cores'
  variants, with every role on an ('fsdp' = all devices) mesh."""
  import jax
  if per_core:
    jax.config.update('jax_num_cpu_devices', len(os.sched_getaffinity(0)))
  import numpy as np
  import optax
  from flax import nnx
  from tunix.rl import rl_cluster as rl_cluster_lib
  from tunix.rl.grpo import grpo_learner
  from tunix.rl.rollout import base_rollout

  from benchmarks.tunix_model import WordTokenizer, random_tunix_qwen3
  c = CONFIG
  model, mesh = random_tunix_qwen3(c, fsdp=jax.device_count())

  rollout = base_rollout.RolloutConfig(
      max_tokens_to_generate=NEW_TOKENS, max_prompt_length=PROMPT_LEN, temperature=1.0,
      top_p=1.0, top_k=None, kv_cache_size=PROMPT_LEN + NEW_TOKENS, eos_tokens=[c['vocab']])
  optimizer = optax.chain(optax.clip_by_global_norm(MAX_GRAD_NORM),
                          optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY))
  training = rl_cluster_lib.RLTrainingConfig(actor_optimizer=optimizer,
                                             eval_every_n_steps=10 ** 9, max_steps=10 ** 9,
                                             pbar_description=None)
  role = rl_cluster_lib.Role
  cluster = rl_cluster_lib.RLCluster(
      actor=model, reference=None, tokenizer=WordTokenizer(),
      cluster_config=rl_cluster_lib.ClusterConfig(
          role_to_mesh={role.ACTOR: mesh, role.REFERENCE: mesh, role.ROLLOUT: mesh},
          rollout_engine='vanilla', offload_to_cpu=False, training_config=training,
          rollout_config=rollout))

  def reward(prompts, completions, **_):
    return [sum(w == f'w{REWARD_ID}' for w in text.split()) / NEW_TOKENS for text in completions]

  learner = grpo_learner.GrpoLearner(
      rl_cluster=cluster, reward_fns=reward,
      algo_config=grpo_learner.GrpoConfig(num_generations=GROUP, num_iterations=1, beta=0.0,
                                          epsilon=0.2,
                                          loss_agg_mode='sequence-mean-token-mean'))

  current = {}   # timings of the step in flight
  lock = threading.Lock()

  def timed(name, fn, after=None):
    def wrapper(*args, **kwargs):
      start, cpu = time.perf_counter(), time.process_time()
      out = fn(*args, **kwargs)
      if after is not None:
        after(out)
      with lock:
        current[name] = current.get(name, 0.0) + time.perf_counter() - start
        if name == 'update_s':
          current['update_cpu_s'] = time.process_time() - cpu
      return out
    return wrapper

  def count_tokens(out):
    current['completion_tokens'] = sum(len(t) for t in out.tokens)

  cluster.generate = timed('rollout_s', cluster.generate, count_tokens)
  cluster.update_actor = timed(
      'update_s', cluster.update_actor,
      lambda _: jax.block_until_ready(nnx.state(cluster.actor_trainer.model)))

  def batches():
    start = time.perf_counter()
    for i in range(WARMUP_STEPS):
      yield _tunix_batch(-1 - i, np)
    _emit({'ready': True, 'warmup_s': time.perf_counter() - start})
    cpu = None
    for line in sys.stdin:
      rep = int(line.split()[1])
      current.clear()
      cpu, start = time.process_time(), time.perf_counter()
      yield _tunix_batch(rep, np)
      _emit({'seconds': time.perf_counter() - start, 'cpu_seconds': time.process_time() - cpu,
             **current})

  with mesh:  # Tunix's trainer shards its optimizer state under the legacy mesh context
    learner.train(batches())


def _tunix_batch(rep: int, np):
  return {'prompts': np.asarray([' '.join(f'w{i}' for i in ids) for ids in _prompt_ids(rep)])}


# ---------------------------------------------------------------------------------------------
# Orchestrator
# ---------------------------------------------------------------------------------------------

def orchestrate(args) -> dict:
  me = os.path.abspath(__file__)
  specs = [(f'copd_jax ({v})', [sys.executable, me, '--worker', v]) for v in args.ours.split(',')]
  if args.peer_python:
    specs.append(('tunix', [args.peer_python, me, '--worker', 'tunix']))
    if args.peer_cores:
      specs.append(('tunix-cores', [args.peer_python, me, '--worker', 'tunix-cores']))
  workers, setup = [], {}
  for name, argv in specs:   # built one after the other so compiles do not overlap
    worker = Worker(name, argv)
    setup[name] = worker.read()
    workers.append(worker)
  runs: dict[str, list[dict]] = {w.name: [] for w in workers}
  for rep in range(args.reps):
    for worker in (workers if rep % 2 == 0 else workers[::-1]):  # alternate who goes first
      result = worker.run(rep)
      if result.get('completion_tokens') != ROWS * NEW_TOKENS:
        raise RuntimeError(f'{worker.name} generated {result.get("completion_tokens")} tokens, '
                           f'not {ROWS * NEW_TOKENS}')
      runs[worker.name].append(result)
  for worker in workers:
    worker.close()
  summary = {}
  for name, rs in runs.items():
    med = lambda key: statistics.median(r[key] for r in rs)
    summary[name] = {
        'step_median_s': med('seconds'), 'update_median_s': med('update_s'),
        'rollout_median_s': med('rollout_s'), 'cpu_median_s': med('cpu_seconds'),
        'update_cpu_median_s': med('update_cpu_s'),
        'step_min_s': min(r['seconds'] for r in rs), 'step_max_s': max(r['seconds'] for r in rs),
        'step_tokens_per_s': TOKENS_PER_STEP / med('seconds'),
        'update_tokens_per_s': TOKENS_PER_STEP / med('update_s'),
        'warmup_s': setup[name]['warmup_s'], 'runs': rs}
  if 'tunix' in runs:  # per repetition, Tunix time / ours for the back-to-back runs
    for name, rs in runs.items():
      for key, label in (('seconds', 'paired_step'), ('update_s', 'paired_update')):
        summary[name][label] = statistics.median(
            t[key] / r[key] for t, r in zip(runs['tunix'], rs))
  return summary


def print_table(summary: dict):
  tunix = summary.get('tunix')
  ratio = lambda s, key: f'{s[key] / tunix[key]:.2f}x' if tunix else '-'
  paired = lambda s, key: f'{s[key]:.2f}x' if key in s else '-'
  cpu = lambda s, key: f'{tunix[key] / s[key]:.2f}x' if tunix else '-'
  print('| learner | full step s (median) | min / max s | tokens/s full step | vs tunix | paired '
        '| CPU s / step | CPU vs tunix | update s (median) | tokens/s update | vs tunix | paired '
        '| CPU s / update | CPU vs tunix | rollout s | warm-up s |')
  print('|---|' + '---:|' * 15)
  for name, s in summary.items():
    print(f'| {name} | {s["step_median_s"]:.3f} | {s["step_min_s"]:.3f} / {s["step_max_s"]:.3f} '
          f'| {s["step_tokens_per_s"]:.0f} | {ratio(s, "step_tokens_per_s")} | '
          f'{paired(s, "paired_step")} | {s["cpu_median_s"]:.2f} | {cpu(s, "cpu_median_s")} | '
          f'{s["update_median_s"]:.3f} | {s["update_tokens_per_s"]:.0f} | '
          f'{ratio(s, "update_tokens_per_s")} | {paired(s, "paired_update")} | '
          f'{s["update_cpu_median_s"]:.2f} | {cpu(s, "update_cpu_median_s")} | '
          f'{s["rollout_median_s"]:.3f} | {s["warmup_s"]:.1f} |')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--peer-python', default='', help="Tunix venv's python (omit: ours only)")
  parser.add_argument('--reps', type=int, default=9, help='timed steps per learner')
  parser.add_argument('--json', default='', help='also write the summary to this file')
  parser.add_argument('--ours', default=OURS_VARIANTS[0],
                      help=f'comma-separated copd_jax variants of {OURS_VARIANTS}')
  parser.add_argument('--peer-cores', action='store_true',
                      help="also run Tunix on one CPU device per core ('tunix-cores')")
  parser.add_argument('--worker', help=argparse.SUPPRESS)
  args = parser.parse_args()
  for variant in ([args.worker] if args.worker else args.ours.split(',')):
    if variant not in ('tunix', 'tunix-cores') and variant not in OURS_VARIANTS:
      parser.error(f'unknown variant {variant!r}; choose from {OURS_VARIANTS}')
  if args.worker in OURS_VARIANTS:
    run_ours(args.worker)
    return
  if args.worker in ('tunix', 'tunix-cores'):
    run_tunix(per_core=args.worker == 'tunix-cores')
    return
  summary = orchestrate(args)
  print_table(summary)
  write_json(args.json, summary)


if __name__ == '__main__':
  main()
