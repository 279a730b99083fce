"""Which run checkpoints stay on disk, and the disk space that takes (printed by `plan`).

The driver saves every `checkpoint.every_steps` steps, at the end of each phase and at the last
step. It keeps the newest `checkpoint.keep_phase_ends` phase-end checkpoints (-1 = all) and the
newest `checkpoint.keep_last` of the others; a phase end beyond keep_phase_ends counts as an
ordinary checkpoint, so the newest checkpoint always survives. Orbax deletes an old checkpoint
only once the next one is committed.

A run checkpoint holds the whole branch-stacked state (K branches' parameters, optimizer state,
step and rng), so one checkpoint takes about the state's bytes (Orbax writes the arrays as they
are, plus small metadata).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence


def preserved_steps(steps: Sequence[int], is_marked: Callable[[int], bool], keep_last: int,
                    keep_marked: int) -> set[int]:
  """The steps kept on disk: the newest `keep_marked` marked steps (-1 = all), then the newest
  `keep_last` of the rest."""
  ordered = sorted(steps)
  marked = [s for s in ordered if is_marked(s)]
  pinned = set(marked if keep_marked < 0 else marked[len(marked) - keep_marked:])
  rolling = [s for s in ordered if s not in pinned]
  return pinned | set(rolling[max(0, len(rolling) - keep_last):])


def phase_end_steps(copd) -> set[int]:
  """Global steps that end a phase under the fixed schedule (the driver's PhaseSchedule); none
  under 'overlap', whose phases have no fixed ends."""
  if copd.schedule != 'fixed':
    return set()
  per_cycle = copd.s_rl + copd.s_opd
  ends = {copd.s_rl - 1, per_cycle - 1} - {-1}
  return {cycle * per_cycle + w for cycle in range(copd.num_cycles) for w in ends}


def saved_steps(config) -> set[int]:
  """Every step the driver saves a checkpoint at."""
  total = config.copd.num_cycles * (config.copd.s_rl + config.copd.s_opd)
  every = config.checkpoint.every_steps
  return ({s for s in range(every - 1, total, every)} | {total - 1}
          | phase_end_steps(config.copd))


@dataclasses.dataclass(frozen=True)
class DiskPlan:
  checkpoint_bytes: int   # one run checkpoint
  kept: int               # checkpoints on disk at the end of the run (their most)
  phase_ends: int         # phase-end checkpoints the run writes

  @property
  def total_bytes(self) -> int:
    return self.checkpoint_bytes * self.kept

  @property
  def peak_bytes(self) -> int:
    """While a save is in flight, one more checkpoint than kept is on disk."""
    return self.checkpoint_bytes * (self.kept + 1)


def disk_plan(config, state_bytes: int) -> DiskPlan:
  """The DiskPlan of `config`, whose branch-stacked state takes `state_bytes` bytes."""
  ends = phase_end_steps(config.copd)
  kept = preserved_steps(saved_steps(config), ends.__contains__, config.checkpoint.keep_last,
                         config.checkpoint.keep_phase_ends)
  return DiskPlan(int(state_bytes), len(kept), len(ends))


def format_disk_plan(plan: DiskPlan, checkpoint) -> str:
  """One line for `plan`; `checkpoint` is the config's checkpoint section."""
  gib = lambda n: f'{n / 2**30:.3f} GiB'
  return (f'checkpoints on disk: {gib(plan.checkpoint_bytes)} each (all branches\' parameters '
          f'and optimizer state); keep_last={checkpoint.keep_last} and keep_phase_ends='
          f'{checkpoint.keep_phase_ends} (of {plan.phase_ends} phase ends) keep '
          f'{plan.kept}: {gib(plan.total_bytes)} ({gib(plan.peak_bytes)} while the next is '
          f'written)')
