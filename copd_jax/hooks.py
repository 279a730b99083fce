"""What happens around a training step, outside Algorithm 1 itself: hooks.

The loop (copd_jax.driver.train) calls, for each global step and for every hook in order,
`before_update(step, batch)` on the native batch just before it goes to the update, and
`after_step(info)` with a `StepInfo` once the update is done; `close()` at the end of the loop,
also when it ends with an error (in reverse order; `closed_at_exit`: the loop's first error is
the one raised, a close that fails after it is reported on its own line). `standard_hooks` are
those of every run: the numerical guard, the metric log (JSONL + TensorBoard), the progress bar
and the checkpoint cadence, and those the config turns on: periodic evaluation (eval.every_steps,
copd_jax.periodic_eval), sample completions (metrics.samples_every, copd_jax.samples) and
Weights & Biases (metrics.wandb, copd_jax.wandb_log). Tests and the fault harness add their
own through `train(..., hooks=[...])`, e.g. `NanInjection`, which poisons chosen branches'
batches to exercise the guard.

Every process runs every hook; what only process 0 does (writing metrics, showing progress,
logging) the hooks' objects already know (MetricsLog(enabled=...), the primary logger).
"""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from copd_jax import checkpoint as ckpt
from copd_jax.errors import TrainingHalted
from copd_jax.periodic_eval import PeriodicEval
from copd_jax.run_setup import Run
from copd_jax.samples import SampleLog
from copd_jax.step_hook import Hook, StepInfo
from copd_jax.steps import RolloutBatch
from copd_jax.tag_names import branch_labels
from copd_jax.wandb_log import WandbLogger

__all__ = ['Hook', 'StepInfo', 'standard_hooks', 'closed_at_exit', 'NanGuard', 'MetricsWriter',
           'ProgressBar', 'Checkpointing', 'NanInjection', 'poison']


def _to_stderr(line: str) -> None:
  print(line, file=sys.stderr)


@contextlib.contextmanager
def closed_at_exit(hooks: Sequence[Hook], report: Callable[[str], None] = _to_stderr
                   ) -> Iterator[None]:
  """Closes every hook (in reverse order) when the block ends, however it ends. The first
  error is the one raised: the block's, else the first failing close's; a close failing after
  it (e.g. TensorBoard's writer after metrics.jsonl hit a full disk) goes to `report` as one
  line and closing goes on, so the message names what failed first."""
  first: BaseException | None = None
  try:
    yield
  except BaseException as e:
    first = e
    raise
  finally:
    block_failed = first is not None
    for hook in reversed(hooks):
      try:
        hook.close()
      except Exception as e:
        if first is None:
          first = e
        else:
          report(f'warning: closing {type(hook).__name__} also failed, after the error '
                 f'reported: {e}')
    if first is not None and not block_failed:
      raise first


def standard_hooks(run: Run, progress: bool) -> list[Hook]:
  """The hooks of every run, in the order they see a step: the guard first (a halted step is
  neither logged nor saved), the periodic evaluation before the writers (they log its
  scalars), the checkpoint last (it flushes the metric logs before saving)."""
  total, config = run.phases.total_steps, run.config
  hooks = [NanGuard(run.names, config.guard.max_bad_steps, run.checkpointer, run.workdir,
                    run.log)]
  if config.eval.every_steps:
    hooks.append(PeriodicEval(run, config.eval.every_steps, progress))
  hooks.append(MetricsWriter(run.metrics_log, config.metrics.log_every, total))
  if config.metrics.wandb:
    hooks.append(WandbLogger(run, config.metrics.log_every, total))
  if config.metrics.samples_every:
    hooks.append(SampleLog(run, config.metrics.samples_every, config.metrics.samples_per_branch))
  return hooks + [ProgressBar(total, run.start_step, run.names, progress),
                  Checkpointing(run, config.checkpoint.every_steps, total)]


class NanGuard(Hook):
  """Logs every step whose update a branch skipped for a non-finite loss or gradient (the step
  itself keeps that branch's parameters), and stops the run with TrainingHalted after
  max_bad_steps consecutive such steps, before that step is saved."""

  def __init__(self, names: Sequence[str], max_bad_steps: int,
               checkpointer: ckpt.RunCheckpointer, workdir: str, log: Callable[[str], None]):
    self.names, self.max_bad_steps = list(names), max_bad_steps
    self.checkpointer, self.workdir, self.log = checkpointer, workdir, log
    self.bad_steps = 0

  def after_step(self, info: StepInfo) -> None:
    skipped = np.asarray(info.metrics['skipped_nonfinite'])
    self.bad_steps = self.bad_steps + 1 if skipped.any() else 0
    if skipped.any():
      self.log(f'step {info.step}: non-finite loss or gradient in branch(es) '
               f'{[self.names[k] for k in np.flatnonzero(skipped)]}; update skipped '
               f'({self.bad_steps}/{self.max_bad_steps} consecutive)')
    if self.bad_steps >= self.max_bad_steps:
      raise TrainingHalted(
          f'{self.bad_steps} consecutive steps with non-finite losses (last: step {info.step}); '
          f'stopped before saving step {info.step}. Skipped updates leave parameters unchanged, '
          f'so the newest checkpoint (step {self.checkpointer.latest_step()} in '
          f'{self.workdir}/checkpoints) is finite')


class MetricsWriter(Hook):
  """Every log_every-th step's scalars (the last step's, and those of a step a hook added
  scalars to) to metrics.jsonl and TensorBoard."""

  def __init__(self, metrics_log, log_every: int, total_steps: int):
    self.metrics_log, self.log_every, self.total_steps = metrics_log, log_every, total_steps

  def after_step(self, info: StepInfo) -> None:
    if info.log_due(self.log_every, self.total_steps):
      self.metrics_log.write(info.step, dict(info.scalars))

  def close(self) -> None:
    self.metrics_log.close()


class ProgressBar(Hook):
  """A tqdm bar over the run's steps: cycle, phase and each branch's native reward, labelled
  with the branch's domain ('cycle 2 opd | reward count 0.62 sort 0.41')."""

  def __init__(self, total_steps: int, start_step: int, names: Sequence[str], enabled: bool):
    self.names, self.labels = list(names), branch_labels(names)
    self.bar = tqdm(total=total_steps, initial=start_step, desc='train', disable=not enabled,
                    dynamic_ncols=True)

  def after_step(self, info: StepInfo) -> None:
    self.bar.set_postfix_str(self.describe(info))
    self.bar.update(1)

  def describe(self, info: StepInfo) -> str:
    rewards = ' '.join(f'{self.labels[b]} {info.scalars[f"native/reward/{b}"]:.2f}'
                       for b in self.names)
    return f'cycle {info.cycle + 1} {info.phase} | reward {rewards}'

  def close(self) -> None:
    self.bar.close()


class Checkpointing(Hook):
  """Saves the state, the data iterators and the phase controller every every_steps steps, at
  the end of every phase (kept beyond keep_last) and after the last step."""

  def __init__(self, run: Run, every_steps: int, total_steps: int):
    self.run, self.every_steps, self.total_steps = run, every_steps, total_steps

  def after_step(self, info: StepInfo) -> None:
    run, step = self.run, info.step
    phase_end = run.phases.is_phase_end(step)
    if (step + 1) % self.every_steps and not phase_end and step != self.total_steps - 1:
      return
    run.metrics_log.flush()  # a resume from this checkpoint then finds every logged step
    run.checkpointer.save(step, info.state, ckpt.run_meta(
        cycle=info.cycle, phase=info.phase, step=step, model_config=run.model_config,
        tokenizer_dir=run.base_path, base_params=run.base_path, config=run.config,
        data_state=run.sources.get_state(), phases=run.phases.get_state(),
        data_files=run.data_files), keep=phase_end)

  def close(self) -> None:
    self.run.checkpointer.wait()


class NanInjection(Hook):
  """Fault injection: NaN advantages in chosen branches at chosen steps, what a numerical
  blow-up looks like to the update. {step: [branch, ...]}; see `parse`."""

  def __init__(self, at: Mapping[int, Sequence[int]]):
    self.at = {int(step): [int(b) for b in branches] for step, branches in at.items()}

  @classmethod
  def parse(cls, spec: str) -> 'NanInjection':
    """'BRANCH:STEP[,BRANCH:STEP...]', e.g. '1:1' or '0:1,0:2'."""
    at: dict[int, list[int]] = {}
    for item in (t.strip() for t in spec.split(',') if t.strip()):
      branch, step = (int(x) for x in item.split(':'))
      at.setdefault(step, []).append(branch)
    return cls(at)

  def before_update(self, step: int, batch: RolloutBatch) -> RolloutBatch:
    return poison(batch, self.at[step]) if step in self.at else batch


def poison(batch: RolloutBatch, branches: Sequence[int]) -> RolloutBatch:
  """NaN advantages in the given branches of a batch (host or device arrays; on the devices,
  so a global batch of several processes stays where it is)."""
  hit = np.zeros(batch.advantages.shape[0], bool)
  hit[list(branches)] = True
  nan_rows = jax.jit(lambda adv: jnp.where(hit.reshape((-1,) + (1,) * (adv.ndim - 1)),
                                           jnp.nan, adv))
  return batch._replace(advantages=nan_rows(batch.advantages))
