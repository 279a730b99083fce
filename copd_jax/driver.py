"""Algorithm 1 of the paper as a plain Python loop.

    for cycle in 1..N:
      S_RL  x  GRPO step   (branch k on its own domain D_k)
      S_OPD x  OPD step    (branch k: its native GRPO batch on D_k, plus rollouts on each
                            teacher j's domain D_j scored token by token by branch j)
    merge the branches; evaluate base, every branch and the merge

All K branches advance together: sampling and updates are single programs vmapped over the
stacked branch state. A single-branch run (K = 1, s_opd = 0) is a domain expert; a branch whose
domain is 'a+b' trains on mixed data, so the paper's baselines run on this same loop.

Determinism: every random draw derives from (config.seed, global step), and data iterators are
checkpointed, so a resumed run reproduces an uninterrupted one exactly.

Sampling runs on `config.mesh_sampling` when it is set (the same devices in another layout, e.g.
no 'fsdp' split so each branch's weights are whole on fewer devices): every sampling call places
a copy of the params in that layout; the training state stays in the training layout.

Multi-host (a JAX multi-controller program; see copd_jax.distributed): every process runs this
loop on the same config, draws the same prompts and computes the same advantages on the host
from rewards that each process scored for its own rows (copd_jax.rollouts); sampled tokens stay
on the devices, and step metrics are all-gathered to every host. Process 0 alone logs, writes
metrics, the merged model and the evaluation; Orbax checkpoints are written by all processes.

Files: set-up in copd_jax.run_setup, the phase schedule in copd_jax.schedule, what happens around
a step (guard, metrics, progress, checkpoints, fault injection) in copd_jax.hooks, the final
merge and evaluation in copd_jax.finish. This file holds the loop and one function per step kind.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from copd_jax import distributed
from copd_jax import metrics as metrics_lib
from copd_jax.data import Example
from copd_jax.finish import finish
from copd_jax.hooks import Hook, StepInfo, closed_at_exit, standard_hooks
from copd_jax.losses import group_advantages
from copd_jax.probe_metrics import probe_metrics
from copd_jax.prompt_buckets import pad_batch
from copd_jax.rollouts import (Rollouts, device_batch, sample_and_score, stack_rounds,
                               to_batch)
from copd_jax.run_setup import Run, setup_run
from copd_jax.sampling.engine import EngineSettings
from copd_jax.steps import BranchState, RolloutBatch


@dataclasses.dataclass
class RunResult:
  workdir: str
  results: dict | None
  table: str | None
  steps_done: int


def train(config, workdir: str, log: Callable[[str], None] = print, progress: bool = True,
          stop_after: int | None = None, hooks: Sequence[Hook] = ()) -> RunResult:
  """Runs (or resumes) the configured experiment in `workdir` to the end, or until `stop_after`
  global steps are done. On several processes every process calls it; only process 0 logs (`log`), shows
  progress and returns results. `hooks` run before the standard ones (copd_jax.hooks)."""
  log = distributed.primary_logger(log)
  run = setup_run(config, workdir, log)
  total = run.phases.total_steps
  last = min(stop_after if stop_after is not None else total, total)
  hooks = [*hooks, *standard_hooks(run, progress and distributed.is_primary())]
  state = run.state
  with closed_at_exit(hooks):
    for step in range(run.start_step, last):
      cycle, phase = run.phases.at(step)
      key = jax.random.fold_in(run.root_key, step)
      t0 = time.perf_counter()
      # Every branch k samples a GRPO batch on its own domain D_k.
      native = sample_native(run, state, jax.random.fold_in(key, 0))
      scalars = rollout_scalars(native, run, 'native')
      distill = None
      if phase == 'opd' or run.phases.wants_probe(step, phase):
        # Student k samples on its teacher's domain, round by round; O_k is measured on them.
        distill = sample_distill(run, state, key, native.batch.tokens.shape[-1])
        scalars.update(distill.scalars)
        scalars.update(probe(run, state, distill))
      batch = native.batch
      for hook in hooks:
        batch = hook.before_update(step, batch)
      if phase == 'rl':
        state, metrics = rl_step(run, state, batch)
      else:
        state, metrics = opd_step(run, state, batch, distill)
      run.phases.observe(scalars.get('behaviour/min_overlap'))
      scalars.update(branch_scalars(metrics, run.names))
      scalars.update({'cycle': cycle, 'phase_is_opd': float(phase == 'opd'),
                      'step_seconds': time.perf_counter() - t0})
      info = StepInfo(step, cycle, phase, state, metrics, scalars, native.rollouts)
      for hook in hooks:
        hook.after_step(info)
  run.checkpointer.close()  # before finish: its merge reads the final checkpoint from disk
  if last < total:
    return RunResult(workdir, None, None, last)
  results, table = finish(run, state, progress and distributed.is_primary())
  return RunResult(workdir, results, table, last)


# ---------------------------------------------------------------------------------------------
# The step kinds
# ---------------------------------------------------------------------------------------------

def rl_step(run: Run, state: BranchState, native: RolloutBatch) -> tuple[BranchState, dict]:
  """GRPO on every branch's native batch (Algorithm 1, lines 3-7). -> (state, host metrics)."""
  state, metrics = run.grpo_step(state, device_batch(native, run.mesh), *run.ref)
  return state, distributed.to_host(metrics)


def opd_step(run: Run, state: BranchState, native: RolloutBatch, distill: 'Distillation'
             ) -> tuple[BranchState, dict]:
  """OPD (lines 8-17): the native GRPO batch plus the distillation rollouts, whose tokens each
  teacher scores on its own shard. Native rows are left-padded to the distillation rollouts'
  prompt bucket (sample_distill's, at least the native one) so they form one batch.
  -> (state, host metrics)."""
  native = pad_batch(native, distill.stacked.tokens.shape[-1], pad_id(run))
  state, metrics = run.opd_step(state, device_batch(native, run.mesh), distill.stacked, *run.ref)
  return state, distributed.to_host(metrics)


def probe(run: Run, state: BranchState, distill: 'Distillation') -> dict[str, float]:
  """Top-k overlap, KL estimates and OPD signal metrics ('opd/...') of each (student <- teacher)
  edge on the student's distillation rollouts (documented in copd_jax.metrics), and their
  smallest overlap 'behaviour/min_overlap', which drives the overlap schedule. Each process
  sums the metrics' terms on its own rows; only those numbers are gathered
  (copd_jax/probe_metrics.py)."""
  opd = run.config.opd
  return probe_metrics(run.probe(state.params, distill.stacked), distill.stacked, run.rounds,
                       run.names, run.mesh, opd.beta, opd.delta_clamp)


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------

class Sampled(NamedTuple):
  rollouts: Rollouts
  batch: RolloutBatch   # device arrays [K, N, T] (rollouts.to_batch)


class Distillation(NamedTuple):
  """The distillation rollouts of one step: per round r, student k sampled on the domain of its
  teacher rounds[r][k]; `stacked` is their [R, K, M, T] device batch."""
  rounds: list[Sampled]
  stacked: RolloutBatch
  scalars: dict[str, float]


def repeat_rows(examples: list[list[Example]], times: int) -> list[list[Example]]:
  return [[e for e in row for _ in range(times)] for row in examples]


def sample_native(run: Run, state: BranchState, key: jax.Array) -> Sampled:
  """G completions of each branch's next prompts, rewarded, with their group advantages."""
  grpo = run.config.grpo
  rows = repeat_rows(run.sources.native.next(), grpo.group_size)
  rollouts = sample_and_score(run.graphdef, state.params, rows, run.encoder, run.sampling, key,
                              run.reward_kinds, mesh=run.sample_mesh, group_size=grpo.group_size,
                              engine=EngineSettings.from_config(run.config))
  advantages = np.asarray(group_advantages(jnp.asarray(rollouts.rewards), grpo.group_size,
                                           normalize_std=grpo.std_normalize))
  return Sampled(rollouts, to_batch(rollouts, advantages))


def pad_id(run: Run) -> int:
  return run.encoder.tokenizer.pad_token_id or 0


def sample_distill(run: Run, state: BranchState, key: jax.Array,
                   min_tokens: int = 0) -> Distillation:
  """Each round's rollouts (round r from key fold_in(key, r + 1)); rows of a branch that learns
  nothing in a round are masked out. Each round samples with its own prompt bucket; their
  batches are then left-padded to the longest of them and `min_tokens` (the native batch's
  tokens), so rounds stack and join the native rows (copd_jax/prompt_buckets.py)."""
  per_prompt = run.config.opd.samples_per_prompt
  rounds = []
  for r, (loader, teacher_of) in enumerate(zip(run.sources.rounds, run.rounds)):
    rows = repeat_rows(loader.next(), per_prompt)
    rollouts = sample_and_score(run.graphdef, state.params, rows, run.encoder, run.sampling,
                                jax.random.fold_in(key, r + 1), run.reward_kinds,
                                mesh=run.sample_mesh, group_size=per_prompt,
                                engine=EngineSettings.from_config(run.config))
    learns = np.asarray([t >= 0 for t in teacher_of])
    row_mask = np.broadcast_to(learns[:, None], rollouts.rewards.shape)
    rounds.append(Sampled(rollouts, to_batch(rollouts, None, row_mask)))
  length = max([min_tokens] + [d.batch.tokens.shape[-1] for d in rounds])
  rounds = [d._replace(batch=pad_batch(d.batch, length, pad_id(run))) for d in rounds]
  stacked = stack_rounds([device_batch(d.batch, run.mesh) for d in rounds], run.mesh)
  scalars = {}
  for r, d in enumerate(rounds):
    scalars.update(rollout_scalars(d, run, f'distill_round{r}'))
  return Distillation(rounds, stacked, scalars)


# ---------------------------------------------------------------------------------------------
# Logged scalars
# ---------------------------------------------------------------------------------------------

def rollout_scalars(sampled: Sampled, run: Run, prefix: str) -> dict[str, float]:
  """Per branch: mean reward, mean / max completion length and the share of completions cut
  at max_new_tokens ('{prefix}/{reward|length|max_length|truncated}/{branch}')."""
  r = sampled.rollouts
  stats = metrics_lib.summarize_lengths(r.lengths, r.truncated)
  out = {}
  for k, name in enumerate(run.names):
    out[f'{prefix}/reward/{name}'] = float(r.rewards[k].mean())
    for stat, values in stats.items():
      out[f'{prefix}/{stat}/{name}'] = float(values[k])
  return out


def branch_scalars(host_metrics, names: Sequence[str]) -> dict[str, float]:
  out = {}
  for key, values in host_metrics.items():
    values = np.asarray(values)
    if values.ndim == 0:
      out[f'train/{key}'] = float(values)
      continue
    for k, name in enumerate(names):
      out[f'train/{key}/{name}'] = float(values[k])
  return out
