"""An optional Weights & Biases logger next to metrics.jsonl and TensorBoard (metrics.wandb).

`wandb` is not a dependency of copd_jax: it is imported only when metrics.wandb is True, and a
run that asks for it without the package stops at config load with one line
(copd_jax.config_checks). The logger sends the steps the metric log writes, under the same
readable names as TensorBoard (copd_jax.tag_names), to project metrics.wandb_project; the run's
id is derived from the workdir, so a resumed run continues the same W&B run. WANDB_MODE=offline
(or `wandb offline`) keeps everything on disk under <workdir>/wandb for a later `wandb sync`.
Written by process 0 only.
"""
from __future__ import annotations

import hashlib
import importlib

from copd_jax import distributed, storage
from copd_jax.config_checks import WANDB_MISSING
from copd_jax.errors import ConfigError
from copd_jax.step_hook import Hook, StepInfo
from copd_jax.run_setup import Run
from copd_jax.tag_names import tag_namer

def import_wandb():
  """The wandb module, or ConfigError with one line when it is not installed."""
  try:
    return importlib.import_module('wandb')
  except ImportError:
    raise ConfigError(WANDB_MISSING) from None


class WandbLogger(Hook):

  def __init__(self, run: Run, log_every: int, total_steps: int):
    self.log_every, self.total_steps = log_every, total_steps
    self.tag = tag_namer(run.names)
    self.run = None
    if not distributed.is_primary():
      return
    wandb = import_wandb()
    workdir = storage.resolve(run.workdir)
    run_id = 'copd-' + hashlib.sha1(workdir.encode()).hexdigest()[:12]
    self.run = wandb.init(project=run.config.metrics.wandb_project, id=run_id,
                          resume='allow', config=run.config.to_dict(),
                          dir=None if storage.is_remote(workdir) else workdir,
                          name=workdir.rstrip('/').rsplit('/', 1)[-1])

  def after_step(self, info: StepInfo) -> None:
    if self.run is not None and info.log_due(self.log_every, self.total_steps):
      self.run.log({self.tag(k): float(v) for k, v in info.scalars.items() if v is not None},
                   step=info.step)

  def close(self) -> None:
    if self.run is not None:
      self.run.finish()
