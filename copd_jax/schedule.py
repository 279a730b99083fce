"""Which phase each global step of a run belongs to: Algorithm 1's fixed N x (S_RL, S_OPD) cycles,
or the overlap-driven schedule that switches phases on the measured top-k overlap O_k.

The controller's state (current phase and cycle of the adaptive schedule) is saved with every
checkpoint, so a resumed run takes the same phase decisions as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


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
