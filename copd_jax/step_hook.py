"""The hook protocol of the training loop: `Hook` (before_update / after_step / close) and the
`StepInfo` every hook sees after a step. The standard hooks and how the loop calls them are in
copd_jax.hooks; hooks of their own module (copd_jax.samples, copd_jax.periodic_eval,
copd_jax.wandb_log) build on this one, which depends on none of them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from copd_jax.rollouts import Rollouts
from copd_jax.steps import BranchState, RolloutBatch


@dataclasses.dataclass(frozen=True)
class StepInfo:
  """One finished step: where it sits in the schedule, the state after it, its per-branch host
  metrics ([K] arrays, `steps.make_grpo_step`), the scalars logged for it and the native
  rollouts it trained on (texts, rewards; `rollouts.Rollouts`).

  A hook may add scalars for later hooks to log (`add_scalars`, e.g. the periodic evaluation):
  the metric writers then log that step even when it is not a log_every step."""
  step: int
  cycle: int
  phase: str                       # 'rl' or 'opd'
  state: BranchState
  metrics: Mapping[str, Any]
  scalars: dict[str, float]
  native: Rollouts | None = None
  added: set = dataclasses.field(default_factory=set)

  def add_scalars(self, scalars: Mapping[str, float]) -> None:
    self.scalars.update(scalars)
    self.added.update(scalars)

  def log_due(self, log_every: int, total_steps: int) -> bool:
    """Whether the metric writers log this step: every log_every-th, the last, and any step
    a hook added scalars to."""
    return (self.step % log_every == 0 or self.step == total_steps - 1) or bool(self.added)


class Hook:
  """Something done around every step; override what you need (the defaults do nothing)."""

  def before_update(self, step: int, batch: RolloutBatch) -> RolloutBatch:
    """The native batch [K, N, T] of `step` (device arrays in the sampling layout) just before
    it is placed in the update's layout."""
    return batch

  def after_step(self, info: StepInfo) -> None:
    pass

  def close(self) -> None:
    pass


