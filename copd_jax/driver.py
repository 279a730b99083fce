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
loop on the same config, draws the same prompts and computes the same rewards and advantages on
the host; device batches are global arrays of which each process feeds its own devices' rows,
and sampled tokens and step metrics are all-gathered to every host. Process 0 alone logs, writes
metrics, the merged model and the evaluation; Orbax checkpoints are written by all processes.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from copd_jax import checkpoint as ckpt
from copd_jax import distributed
from copd_jax import mesh as mesh_lib
from copd_jax import memory_check
from copd_jax import metrics as metrics_lib
from copd_jax import storage
from copd_jax.config import resume_differences
from copd_jax.config_checks import branch_domains
from copd_jax.errors import ConfigError, TrainingHalted
from copd_jax.data import BranchPromptLoader, Example, load_examples, synthetic_domain
from copd_jax.data.domain import prompt_format
from copd_jax.models.hub import local_model_path
from copd_jax.rewards import reward_spec
from copd_jax.evaluation import evaluate_models, markdown_table, save_results
from copd_jax.losses import group_advantages
from copd_jax.merge import merge_checkpoints
from copd_jax.models import hf_io
from copd_jax.models.presets import DTYPES
from copd_jax.models.tokenizer import load_tokenizer
from copd_jax.optim import make_optimizer
from copd_jax.rollouts import (PromptEncoder, Rollouts, device_batch, sample_and_score,
                               stack_rounds, to_batch)
from copd_jax.sampling import SamplingParams
from copd_jax.step_config import StepConfig
from copd_jax.steps import (RolloutBatch, branch_state_shardings, init_branch_state,
                            make_edge_topk, make_grpo_step, make_opd_step, reference_shardings)
from copd_jax.topology import topology_from_config
from copd_jax.warmstart import ensure_base_model


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Global step g -> (cycle, phase, step within phase)."""
  num_cycles: int
  s_rl: int
  s_opd: int

  @property
  def steps_per_cycle(self) -> int:
    return self.s_rl + self.s_opd

  @property
  def total_steps(self) -> int:
    return self.num_cycles * self.steps_per_cycle

  def at(self, step: int) -> tuple[int, str, int]:
    cycle, within = divmod(step, self.steps_per_cycle)
    return (cycle, 'rl', within) if within < self.s_rl else (cycle, 'opd', within - self.s_rl)

  def is_phase_end(self, step: int) -> bool:
    within = step % self.steps_per_cycle
    return within == self.s_rl - 1 or within == self.steps_per_cycle - 1


class PhaseController:
  """Which phase each global step runs.

  'fixed': N cycles of S_RL GRPO then S_OPD OPD steps (Algorithm 1). 'overlap': start with RL;
  switch to OPD once the smallest measured top-k overlap over the teaching edges falls below
  overlap_low, and back to RL once it reaches overlap_high (O_k is measured on every OPD step,
  and every probe_every RL steps by a probe that samples distillation rollouts without training
  on them). Both spend the same budget of N x (S_RL + S_OPD) steps.
  """

  def __init__(self, copd_cfg):
    self.cfg = copd_cfg
    self.schedule = Schedule(copd_cfg.num_cycles, copd_cfg.s_rl, copd_cfg.s_opd)
    self.adaptive = copd_cfg.schedule == 'overlap'
    self.current, self.cycle = 'rl', 0

  @property
  def total_steps(self) -> int:
    return self.schedule.total_steps

  def at(self, step: int) -> tuple[int, str]:
    if not self.adaptive:
      cycle, phase, _ = self.schedule.at(step)
      return cycle, phase
    return self.cycle, self.current

  def wants_probe(self, step: int, phase: str) -> bool:
    return self.adaptive and phase == 'rl' and step % self.cfg.probe_every == 0

  def observe(self, min_overlap: float | None) -> None:
    """Feeds the step's smallest measured O_k (None: not measured) to the adaptive schedule."""
    if not self.adaptive or min_overlap is None or not np.isfinite(min_overlap):
      return
    if self.current == 'rl' and min_overlap < self.cfg.overlap_low:
      self.current = 'opd'
    elif self.current == 'opd' and min_overlap >= self.cfg.overlap_high:
      self.current, self.cycle = 'rl', self.cycle + 1

  def is_phase_end(self, step: int) -> bool:
    return False if self.adaptive else self.schedule.is_phase_end(step)

  def get_state(self) -> dict[str, Any]:
    return {'current': self.current, 'cycle': self.cycle}

  def set_state(self, state: dict[str, Any]) -> None:
    self.current, self.cycle = state['current'], state['cycle']


# ---------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------

def load_domains(config) -> dict[str, tuple[list[Example], list[Example]]]:
  """(train, eval) examples of every domain some branch uses; file errors name file and line."""
  used = sorted({d for names in branch_domains(config) for d in names})
  out = {}
  for i, name in enumerate(used):
    spec = config.domains[name]
    if spec.source == 'synthetic':
      out[name] = synthetic_domain(name, config.seed + 1000 * i, spec.num_train, spec.num_eval)
    else:
      fields = dict(prompt_field=spec.prompt_field or None, answer_field=spec.answer_field or None)
      out[name] = (load_examples(spec.train_path, name, reward=spec.reward, **fields),
                   load_examples(spec.eval_path, name, reward=spec.reward, **fields))
  return out


def base_model_path(config, workdir: str, domains, log: Callable) -> str:
  if config.model.source == 'hf':
    return local_model_path(config.model.hf_path)  # a Hub id: its cached snapshot
  pairs = []
  for train, _ in domains.values():
    pairs += [(e.prompt + '\n=', e.answer) for e in train]
  # Several processes: process 0 trains and writes it, the others then find it (or, on their own
  # disks, train the same model from the same seed).
  return distributed.primary_first(lambda: ensure_base_model(
      workdir, config.model, config.warmstart, pairs, config.seed, log), 'warmstart')


class PromptSources:
  """Data loaders of a run: the native loader (branch k on its own domains) and one loader per
  OPD round (student k on its teacher's domains). Their iterator states are checkpointed."""

  def __init__(self, config, domains, rounds):
    train = {name: split[0] for name, split in domains.items()}
    per_branch = branch_domains(config)
    own = [sum((train[d] for d in names), []) for names in per_branch]
    # mix_domains: a branch on 'a+b' draws each domain with equal weight, whatever their sizes.
    self.native = BranchPromptLoader(own, config.grpo.prompts_per_step, config.seed,
                                     mix_domains=True)
    self.rounds = []
    for r, teacher_of in enumerate(rounds):
      # A branch that learns nothing in this round still samples (shapes stay fixed); its rows
      # are masked out of the update.
      sources = [own[t] if t >= 0 else own[k] for k, t in enumerate(teacher_of)]
      self.rounds.append(BranchPromptLoader(sources, config.opd.prompts_per_step,
                                            config.seed + 7919 * (r + 1), mix_domains=True))

  def get_state(self) -> dict[str, Any]:
    return {'native': self.native.get_state(),
            'rounds': [loader.get_state() for loader in self.rounds]}

  def set_state(self, state: dict[str, Any]) -> None:
    self.native.set_state(state['native'])
    for loader, s in zip(self.rounds, state['rounds']):
      loader.set_state(s)


def repeat_rows(examples: list[list[Example]], times: int) -> list[list[Example]]:
  return [[e for e in row for _ in range(times)] for row in examples]


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class RunResult:
  workdir: str
  results: dict | None
  table: str | None
  steps_done: int


def train(config, workdir: str, log: Callable[[str], None] = print, progress: bool = True,
          stop_after: int | None = None) -> RunResult:
  """Runs (or resumes) the configured experiment in `workdir` to the end. On several processes
  every process calls it; only process 0 logs (`log`), shows progress and returns results."""
  K = len(config.branches)
  log = distributed.primary_logger(log)
  progress = progress and distributed.is_primary()
  domains = load_domains(config)  # validates data files before any compute or any write
  storage.makedirs(workdir)
  checkpointer = ckpt.RunCheckpointer(workdir, keep_last=config.checkpoint.keep_last,
                                      keep_marked=config.checkpoint.keep_phase_ends)
  if checkpointer.latest_step() is not None:  # refuse an incompatible resume before any work
    try:
      saved = checkpointer.restore_meta()['config']
    except Exception:  # a damaged newest checkpoint: restore() falls back and we check then
      saved = None
    if saved is not None:
      _check_resume_compatible(saved, config, log)
  base_path = base_model_path(config, workdir, domains, log)
  model = hf_io.load_model(base_path, compute_dtype=DTYPES[config.model.compute_dtype],
                           param_dtype=DTYPES[config.model.param_dtype],
                           remat=config.model.remat, scan_layers=config.model.scan_layers)
  tokenizer = load_tokenizer(storage.local_copy(base_path))
  graphdef, base_params = nnx.split(model)

  mesh = mesh_lib.make_mesh(config.mesh, num_branches=K)
  sample_mesh = mesh_lib.sampling_mesh(config, list(mesh.devices.flat), K)
  rounds = topology_from_config(config).rounds() if config.copd.s_opd else ()
  optimizer = make_optimizer(config.optimizer)
  phases = PhaseController(config.copd)
  sampling = SamplingParams.from_config(config)
  reward_kinds = {name: reward_spec(config.domains[name]) for name in domains}
  encoder = PromptEncoder(tokenizer, {n: prompt_format(config.domains[n]) for n in domains})
  # One prompt bucket for the whole run (the longest prompt of any domain): one compiled
  # sampler / step per phase, and GRPO groups can share their prompt's computation.
  encoder.fix_length(max(len(encoder.ids(e)) for split in domains.values() for part in split
                         for e in part))
  sources = PromptSources(config, domains, rounds)
  # Stop with one line if the run's memory estimate exceeds what this process can use.
  memory_check.check_fits(config, list(mesh.devices.flat), encoder.length, model.config, log)

  param_rules = mesh_lib.param_rules(config.shard_params_over_fsdp)
  state = init_branch_state(graphdef, base_params, K, optimizer, mesh, config.seed, param_rules)
  if config.model.branch_init:
    state = state._replace(params=branch_init_params(config.model.branch_init, base_params,
                                                     state.params, model.config))
  start = 0
  if checkpointer.latest_step() is not None:
    state, meta = checkpointer.restore(state)
    _check_resume_compatible(meta['config'], config, log=lambda _: None)  # noted above
    start = meta['step'] + 1
    sources.set_state(meta['data_state'])
    phases.set_state(meta['phases'])
    log(f'resumed from step {meta["step"]} (cycle {meta["cycle"] + 1}, phase {meta["phase"]})')
  metrics_log = metrics_lib.MetricsLog(workdir, resume_step=start if start else None,
                                       enabled=jax.process_index() == 0)

  step_config = StepConfig.from_config(config, encoder.length, model.config.vocab_size)
  sharding = branch_state_shardings(state, mesh, param_rules)
  grpo_step = make_grpo_step(graphdef, optimizer, mesh, step_config, sharding)
  opd_step = make_opd_step(graphdef, optimizer, mesh, step_config, sharding, rounds) \
      if rounds else None
  probe = make_edge_topk(graphdef, mesh, sharding, rounds, config.metrics.overlap_top_k,
                         config.sampling.temperature,
                         num_micro_batches=config.grpo.micro_batches,
                         logits_chunk=step_config.logits_chunk) if rounds else None
  # The frozen reference of the optional k3 KL term is the base model.
  ref = (jax.device_put(base_params, reference_shardings(sharding)),) \
      if step_config.kl_coef > 0 else ()
  root_key = jax.random.key(config.seed)
  total = phases.total_steps
  bar = _progress_bar(total, start, progress)
  last = min(stop_after if stop_after is not None else total, total)
  names = _names(config.branches)
  injections = nan_injections(config)
  bad_steps = 0
  try:
    for step in range(start, last):
      cycle, phase = phases.at(step)
      key = jax.random.fold_in(root_key, step)
      t0 = time.perf_counter()
      native = _native_batch(state, graphdef, sources, encoder, sampling, reward_kinds, config,
                             jax.random.fold_in(key, 0), sample_mesh)
      scalars = _rollout_scalars(native, config.branches, 'native')
      distill = None
      if phase == 'opd' or phases.wants_probe(step, phase):
        distill = [_distill_batch(state, graphdef, loader, teacher_of, encoder, sampling,
                                  reward_kinds, jax.random.fold_in(key, r + 1), sample_mesh,
                                  config.opd.samples_per_prompt)
                   for r, (loader, teacher_of) in enumerate(zip(sources.rounds, rounds))]
        stacked = stack_rounds([d.batch for d in distill],
                               [device_batch(d.batch, mesh) for d in distill], mesh)
        for r, d in enumerate(distill):
          scalars.update(_rollout_scalars(d, config.branches, f'distill_round{r}'))
        masks = np.stack([d.batch.completion_mask for d in distill])
        behaviour = _behaviour_scalars(probe, state, stacked, masks, rounds, config.branches)
        scalars.update(behaviour)
        overlaps = [v for k, v in behaviour.items() if k.startswith('behaviour/overlap_top')]
        scalars['behaviour/min_overlap'] = min(overlaps) if overlaps else float('nan')
      native_batch = native.batch
      if step in injections:
        native_batch = poison(native_batch, injections[step])
      native_batch = device_batch(native_batch, mesh)
      if phase == 'rl':
        state, step_metrics = grpo_step(state, native_batch, *ref)
      else:
        state, step_metrics = opd_step(state, native_batch, stacked, *ref)
      step_metrics = distributed.to_host(step_metrics)
      skipped = np.asarray(step_metrics['skipped_nonfinite'])
      bad_steps = bad_steps + 1 if skipped.any() else 0
      if skipped.any():
        log(f'step {step}: non-finite loss or gradient in branch(es) '
            f'{[names[k] for k in np.flatnonzero(skipped)]}; update skipped '
            f'({bad_steps}/{config.guard.max_bad_steps} consecutive)')
      if bad_steps >= config.guard.max_bad_steps:
        raise TrainingHalted(
            f'{bad_steps} consecutive steps with non-finite losses (last: step {step}); stopped '
            f'before saving step {step}. Skipped updates leave parameters unchanged, so the newest '
            f'checkpoint (step {checkpointer.latest_step()} in {workdir}/checkpoints) is finite')
      phases.observe(scalars.get('behaviour/min_overlap'))
      scalars.update(_branch_scalars(step_metrics, config.branches))
      scalars.update({'cycle': cycle, 'phase_is_opd': float(phase == 'opd'),
                      'step_seconds': time.perf_counter() - t0})
      if step % config.metrics.log_every == 0 or step == total - 1:
        metrics_log.write(step, scalars)
      bar.set_postfix_str(f'cycle {cycle + 1} {phase} reward ' + ' '.join(
          f'{scalars[f"native/reward/{b}"]:.2f}' for b in names))
      bar.update(1)
      if (step + 1) % config.checkpoint.every_steps == 0 or phases.is_phase_end(step) \
          or step == total - 1:
        metrics_log.flush()  # a resume from this checkpoint then finds every logged step
        checkpointer.save(step, state, ckpt.run_meta(
            cycle=cycle, phase=phase, step=step, model_config=model.config,
            tokenizer_dir=base_path, base_params=base_path, config=config,
            data_state=sources.get_state(), phases=phases.get_state()),
            keep=phases.is_phase_end(step))
  finally:
    bar.close()
    checkpointer.wait()
    metrics_log.close()
  checkpointer.close()  # before _finish: its merge reads the final checkpoint from disk
  if last < total:
    return RunResult(workdir, None, None, last)

  results, table = _finish(config, workdir, graphdef, base_params, state, domains, encoder,
                           reward_kinds, model.config, base_path, log)
  return RunResult(workdir, results, table, last)


def nan_injections(config) -> dict[int, list[int]]:
  """guard.inject_nan 'BRANCH:STEP,...' -> {step: [branch, ...]} (fault-injection hook)."""
  out: dict[int, list[int]] = {}
  for item in (t.strip() for t in config.guard.inject_nan.split(',') if t.strip()):
    branch, step = (int(x) for x in item.split(':'))
    out.setdefault(step, []).append(branch)
  return out


def poison(batch: RolloutBatch, branches: list[int]) -> RolloutBatch:
  """NaN advantages in the given branches of a host batch: what a numerical blow-up looks like
  to the step."""
  adv = np.array(batch.advantages)
  adv[branches] = np.nan
  return batch._replace(advantages=adv)


def branch_init_params(paths, base_params, stacked_params, model_config):
  """Branch-stacked params where branch k starts from paths[k] ('' = the base): a HF folder,
  a merged checkpoint, or a run workdir / step folder with ':k' selecting its branch."""
  per_branch = []
  base = nnx.to_pure_dict(jax.device_get(base_params))
  for k, path in enumerate(paths):
    if not path:
      per_branch.append(base)
      continue
    folder, branch = path, None
    if ':' in path and path.rsplit(':', 1)[1].isdigit():
      folder, branch = path.rsplit(':', 1)[0], int(path.rsplit(':', 1)[1])
    config, params, _ = ckpt.load_params_for_inference(folder, branch)
    if config != model_config:
      raise ConfigError(f'config.model.branch_init[{k}]: {path} has architecture {config}, '
                        f'the base model has {model_config}')
    per_branch.append(params)
  stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *per_branch)
  shardings = jax.tree.map(lambda x: x.sharding, stacked_params)
  return jax.device_put(state_from_pure_dict(stacked_params, stacked), shardings)


def _check_resume_compatible(saved: dict, config, log: Callable[[str], None]) -> None:
  """Refuses a resume whose training fields (config.TRAINING_SECTIONS) differ from the
  checkpoint's; fields the checkpoint's code did not have yet are accepted with a note."""
  changed, added = resume_differences(saved, config.to_dict())
  if changed:
    field = changed[0]
    value = saved
    for key in field.split('.')[1:]:
      value = value.get(key) if isinstance(value, dict) else None
    more = f' (and {len(changed) - 1} more field(s))' if len(changed) > 1 else ''
    raise ConfigError(f'{field}: differs from the checkpoint in this workdir (saved {value!r})'
                      f'{more}; resume with the original config or use a new --workdir')
  if added:
    log(f'resume: the checkpoint predates {", ".join(added)}; continuing with their configured '
        'values')


def _names(branches) -> list[str]:
  return [f'b{k}_{name}' for k, name in enumerate(branches)]


@dataclasses.dataclass
class _Sampled:
  rollouts: Rollouts
  batch: RolloutBatch


def _native_batch(state, graphdef, sources, encoder, sampling, reward_kinds, config, key, mesh):
  prompts = sources.native.next()
  rows = repeat_rows(prompts, config.grpo.group_size)
  rollouts = sample_and_score(graphdef, state.params, rows, encoder, sampling, key, reward_kinds,
                              mesh=mesh, group_size=config.grpo.group_size)
  advantages = np.asarray(group_advantages(jnp.asarray(rollouts.rewards), config.grpo.group_size,
                                           normalize_std=config.grpo.std_normalize))
  return _Sampled(rollouts, to_batch(rollouts, advantages))


def _distill_batch(state, graphdef, loader, teacher_of, encoder, sampling, reward_kinds, key,
                   mesh, samples_per_prompt: int):
  prompts = loader.next()
  rows = repeat_rows(prompts, samples_per_prompt)
  rollouts = sample_and_score(graphdef, state.params, rows, encoder, sampling, key, reward_kinds,
                              mesh=mesh, group_size=samples_per_prompt)
  learns = np.asarray([t >= 0 for t in teacher_of])
  row_mask = np.broadcast_to(learns[:, None], rollouts.rewards.shape)
  return _Sampled(rollouts, to_batch(rollouts, None, row_mask))


def _rollout_scalars(sampled: _Sampled, branches, prefix: str) -> dict[str, float]:
  r = sampled.rollouts
  lengths = metrics_lib.completion_lengths(r.output.completion_mask)
  out = {}
  for k, name in enumerate(_names(branches)):
    out[f'{prefix}/reward/{name}'] = float(r.rewards[k].mean())
    out[f'{prefix}/length/{name}'] = float(lengths[k].mean())
  return out


def _branch_scalars(host_metrics, branches) -> dict[str, float]:
  out = {}
  for key, values in host_metrics.items():
    values = np.asarray(values)
    if values.ndim == 0:
      out[f'train/{key}'] = float(values)
      continue
    for k, name in enumerate(_names(branches)):
      out[f'train/{key}/{name}'] = float(values[k])
  return out


def _behaviour_scalars(probe, state, stacked, masks, rounds, branches) -> dict[str, float]:
  """Top-k overlap and KL estimates of each (student <- teacher) edge on the student's
  distillation rollouts (estimators documented in copd_jax.metrics); masks: the host completion
  masks [R, K, M, T] of `stacked`."""
  edge = distributed.to_host(probe(state.params, stacked))
  names = _names(branches)
  k = edge.student_ids.shape[-1]
  out = {}
  for r, teacher_of in enumerate(rounds):
    mask = masks[r]
    for s, t in enumerate(teacher_of):
      if t < 0:
        continue
      name = f'{names[s]}<-{names[t]}'
      student_lp, teacher_lp = edge.student_token_logprob[r, s], edge.teacher_token_logprob[r, s]
      out[f'behaviour/overlap_top{k}/{name}'] = metrics_lib.topk_overlap(
          edge.student_ids[r, s], edge.teacher_ids[r, s], mask[s])
      out[f'behaviour/symmetric_kl/{name}'] = metrics_lib.symmetric_kl_estimate(
          student_lp, teacher_lp, mask[s])
      out[f'behaviour/reverse_kl/{name}'] = metrics_lib.reverse_kl_estimate(
          student_lp, teacher_lp, mask[s])
  return out


def _progress_bar(total: int, start: int, enabled: bool):
  from tqdm import tqdm
  return tqdm(total=total, initial=start, desc='train', disable=not enabled, dynamic_ncols=True)


def state_from_pure_dict(template: nnx.State, pure: dict) -> nnx.State:
  """An nnx.State shaped like `template` holding the arrays of the pure dict `pure`."""
  state = jax.tree.map(lambda x: x, template)
  nnx.replace_by_pure_dict(state, pure)
  return state


def _finish(config, workdir, graphdef, base_params, state, domains, encoder, reward_kinds,
            model_config, base_path, log):
  """Merge the branches, evaluate base / branches / merge, write the table and the merged model.

  Several processes: every process gathers the final params (a collective); process 0 alone
  merges, evaluates on its own devices and writes, while the others wait for it and return no
  results."""
  branch_params = distributed.to_host(state.params)
  try:
    if not distributed.is_primary():
      return None, None
    return _merge_and_evaluate(config, workdir, graphdef, base_params, branch_params, domains,
                               encoder, reward_kinds, model_config, base_path, log)
  finally:
    distributed.barrier('finish')


def _merge_and_evaluate(config, workdir, graphdef, base_params, branch_params, domains, encoder,
                        reward_kinds, model_config, base_path, log):
  K = len(config.branches)
  names = ['base'] + [f'branch{k}:{b}' for k, b in enumerate(config.branches)]
  models = [jax.tree.map(lambda x: np.asarray(x)[None], base_params),
            jax.tree.map(np.asarray, branch_params)]
  if config.merge.method != 'none' and K > 1:
    # The same streaming merge as `python -m copd_jax merge --workdir`, from the final checkpoint
    # (on several processes, process 0 alone: checkpoint.this_process_only).
    merged = merge_checkpoints(workdir, config.merge.method, lam=config.merge.lam,
                               density=config.merge.density,
                               out=storage.join(workdir, 'merged'), overwrite=True)
    out_dir = storage.join(workdir, 'merged_hf')
    hf_io.save_hf_folder(merged.params, model_config, out_dir, tokenizer_from=base_path)
    log(f'merged model ({config.merge.method}) written to {out_dir}')
    models.append(jax.tree.map(lambda x: np.asarray(x)[None],
                               state_from_pure_dict(base_params, merged.params)))
    names.append(f'merged:{config.merge.method}')
  all_params = jax.tree.map(lambda *xs: np.concatenate(xs), *models)
  eval_sets = {name: split[1][:config.eval.num_examples] for name, split in domains.items()}
  results = evaluate_models(graphdef, all_params, names, eval_sets, encoder, reward_kinds,
                            config.sampling.max_new_tokens, config.sampling.temperature,
                            config.eval.samples_k, config.seed)
  table = markdown_table(results, config.eval.samples_k)
  save_results(storage.join(workdir, 'eval.json'), results, config.eval.samples_k)
  storage.write_text(storage.join(workdir, 'eval.md'), table + '\n')
  log('\n' + table)
  return results, table
