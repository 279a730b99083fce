"""The paper's methods as data: driver runs (config file + `--config.x=y` overrides) and the
eval.json rows that give each method's accuracy.

A *run* is one `python -m copd_jax train` invocation; a *method* (a table column) is one model
row of one run's eval.json, e.g. the count expert is row 'branch0:count' of the 'experts' run.

Equal budget (experiments/results/README.md states it in full): let U = N * (S_RL + S_OPD) be
the optimizer updates of one CoPD branch and K the number of domains. Every method spends
K * U optimizer updates in total, summed over all the models it trains, each update on a native
GRPO batch of prompts_per_step * group_size completions; the RL / OPD split of the static
pipelines equals CoPD's (K * N * S_RL RL updates, K * N * S_OPD OPD updates):
  experts      K experts x U GRPO updates
  mixed RLVR   1 model x K*U GRPO updates on the union of the domains
  static OPD   K experts x E = N*S_RL GRPO updates, then the student D = K*N*S_OPD OPD updates
               (each with its native GRPO batch, like CoPD's OPD steps); teachers frozen
  MOPD         same as static OPD with K frozen experts teaching one student trained from base
  CoPD         K branches x U (N cycles of S_RL GRPO + S_OPD OPD)
"""
from __future__ import annotations

import dataclasses
import glob
import os
from typing import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K2_CONFIG = 'configs/toy_copd.py'
K3_CONFIG = 'configs/toy_copd_k3.py'
K2_DOMAINS = ('count', 'sort')
K3_DOMAINS = ('count', 'sort', 'arithmetic')

# Driver features some methods need, by their config field (section, field, description).
FEATURES = {
    'freeze': ('copd', 'freeze', 'copd.freeze'),
    'branch_init': ('model', 'branch_init', 'branch_init'),
    'edges': ('copd', 'edges', 'copd.edges'),
    'overlap_schedule': ('copd', 'overlap_low', 'overlap_low'),
}


@dataclasses.dataclass(frozen=True)
class Profile:
  """Per-run cost knobs shared by all methods of a table (U = num_cycles * (s_rl + s_opd))."""
  num_cycles: int = 4
  s_rl: int = 3
  s_opd: int = 2
  eval_examples: int = 64
  extra: tuple[str, ...] = ()  # further overrides for every run (the fast test's TINY settings)

  @property
  def updates_per_branch(self) -> int:
    return self.num_cycles * (self.s_rl + self.s_opd)

  def common(self) -> tuple[str, ...]:
    return (f'--config.eval.num_examples={self.eval_examples}',) + self.extra


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One driver run. Overrides may hold '{run:NAME}', replaced by that run's workdir."""
  name: str
  config: str
  overrides: tuple[str, ...]
  domains: tuple[str, ...]          # domains the run trains on (fixes its warm-started base)
  needs: tuple[str, ...] = ()       # FEATURES keys
  after: tuple[str, ...] = ()       # runs that must finish first

  def resolved(self, run_dir) -> tuple[str, ...]:
    out = []
    for o in self.overrides:
      for dep in self.after:
        o = o.replace('{run:%s}' % dep, run_dir(dep))
      out.append(o)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Method:
  """A table column: eval.json row `row` of run `run`."""
  label: str
  run: str
  row: str


def schedule(n: int, s_rl: int, s_opd: int) -> tuple[str, ...]:
  return (f'--config.copd.num_cycles={n}', f'--config.copd.s_rl={s_rl}',
          f'--config.copd.s_opd={s_opd}')


def k_runs(p: Profile, suffix: str, config: str, domains: tuple[str, ...]) -> dict[str, RunSpec]:
  """base/experts/mixed/CoPD/static-pipeline runs for a K-domain table (K = len(domains))."""
  K = len(domains)
  N, R, O = p.num_cycles, p.s_rl, p.s_opd
  c = p.common()
  none = ('--config.copd.topology=none',)
  runs = {
      f'copd{suffix}': RunSpec(f'copd{suffix}', config, schedule(N, R, O) + c, domains),
      f'experts{suffix}': RunSpec(f'experts{suffix}', config,
                                  schedule(N, R + O, 0) + none + c, domains),
      f'mixed{suffix}': RunSpec(f'mixed{suffix}', config,
                                schedule(N, K * (R + O), 0) + none +
                                (f"--config.branches=('{'+'.join(domains)}',)",) + c, domains),
      f'experts_short{suffix}': RunSpec(f'experts_short{suffix}', config,
                                        schedule(N, R, 0) + none + c, domains),
  }
  return runs


def static_opd_run(p: Profile, name: str, student: int, teacher: int) -> RunSpec:
  """Static RLVR -> OPD, K=2: both experts (E updates each) start the branches; `teacher` frozen."""
  short = 'experts_short'
  return RunSpec(
      name, K2_CONFIG,
      schedule(p.num_cycles, 0, 2 * p.s_opd) + (
          "--config.model.branch_init=('{run:%s}:0','{run:%s}:1')" % (short, short),
          '--config.copd.topology=edges', f'--config.copd.edges={student}<-{teacher}',
          f'--config.copd.freeze={teacher}') + p.common(),
      K2_DOMAINS, needs=('freeze', 'branch_init', 'edges'), after=(short,))


def mopd_run(p: Profile) -> RunSpec:
  """Multi-teacher OPD, K=3 domains: a mixed-data student from base, three frozen experts."""
  short = 'experts_short_k3'
  student = '+'.join(K3_DOMAINS)
  inits = ",".join(["''"] + ["'{run:%s}:%d'" % (short, k) for k in range(3)])
  return RunSpec(
      'mopd_k3', K3_CONFIG,
      schedule(p.num_cycles, 0, 3 * p.s_opd) + (
          "--config.branches=('%s',%s)" % (student, ','.join(f"'{d}'" for d in K3_DOMAINS)),
          f'--config.model.branch_init=({inits})', '--config.copd.topology=edges',
          '--config.copd.edges=0<-1,0<-2,0<-3', '--config.copd.freeze=1,2,3') + p.common(),
      K3_DOMAINS, needs=('freeze', 'branch_init', 'edges'), after=(short,))


OVERLAP_LOW, OVERLAP_HIGH = 0.93, 0.95

# Phase-ratio sweep: S_RL : S_OPD with the same total updates per branch.
PHASE_RATIOS = (0.5, 1.0, 1.5, 2.0, 3.0)
SWEEP_CYCLES = 5  # preferred number of cycles (the one closest to it is taken)


def phase_schedule(ratio: float, updates: int, cycles: int = SWEEP_CYCLES
                   ) -> tuple[int, int, int] | None:
  """(num_cycles, s_rl, s_opd) with s_rl / s_opd == ratio and num_cycles * (s_rl + s_opd) ==
  updates, num_cycles closest to `cycles`; None when no integer schedule exists."""
  from fractions import Fraction
  f = Fraction(ratio).limit_denominator(10)
  base = f.numerator + f.denominator
  options = [(updates // (base * m), f.numerator * m, f.denominator * m)
             for m in range(1, updates // base + 1) if updates % (base * m) == 0]
  return min(options, key=lambda o: (abs(o[0] - cycles), o[0])) if options else None


def ratio_name(ratio: float, updates: int) -> str:
  return f'ratio_{ratio:g}_u{updates}'.replace('.', 'p')


def all_runs(p: Profile, sweep_updates: int = 60) -> dict[str, RunSpec]:
  """Every run of every command; the phase-ratio runs have `sweep_updates` updates per branch
  (60 = lcm of the cycle lengths 3, 2, 5, 3, 4 fits all five ratios; ratios without an
  integer schedule are left out)."""
  runs = {}
  runs.update(k_runs(p, '', K2_CONFIG, K2_DOMAINS))
  runs.update(k_runs(p, '_k3', K3_CONFIG, K3_DOMAINS))
  runs['static_s2c'] = static_opd_run(p, 'static_s2c', student=0, teacher=1)
  runs['static_c2s'] = static_opd_run(p, 'static_c2s', student=1, teacher=0)
  runs['mopd_k3'] = mopd_run(p)
  N, R, O = p.num_cycles, p.s_rl, p.s_opd
  for name, edge in (('copd_no_s2c', '0<-1'), ('copd_no_c2s', '1<-0')):
    runs[name] = RunSpec(name, K2_CONFIG, schedule(N, R, O) + (f'--config.copd.drop_edges={edge}',)
                         + p.common(), K2_DOMAINS)
  # Thresholds set to the O_k range CoPD's seed-0 logs show at this scale (0.91-0.97) before any
  # overlap-schedule run; the config defaults (0.85 / 0.92) would never leave RL in 20 steps.
  runs['copd_overlap'] = RunSpec('copd_overlap', K2_CONFIG, schedule(N, R, O) + (
      '--config.copd.schedule=overlap', f'--config.copd.overlap_low={OVERLAP_LOW}',
      f'--config.copd.overlap_high={OVERLAP_HIGH}') + p.common(), K2_DOMAINS,
      needs=('overlap_schedule',))
  for ratio in PHASE_RATIOS:
    plan = phase_schedule(ratio, sweep_updates)
    if plan is not None:
      name = ratio_name(ratio, sweep_updates)
      runs[name] = RunSpec(name, K2_CONFIG, schedule(*plan) + p.common(), K2_DOMAINS)
  return runs


# Table columns (paper layouts). count plays the paper's text role (K=3 hub), sort the image role.
TABLE1 = (
    Method('Base', 'copd', 'base'),
    Method('Count-Expert', 'experts', 'branch0:count'),
    Method('Sort-Expert', 'experts', 'branch1:sort'),
    Method('Mixed RLVR', 'mixed', 'branch0:count+sort'),
    Method('OPD (S→C)', 'static_s2c', 'branch0:count'),
    Method('OPD (C→S)', 'static_c2s', 'branch1:sort'),
    Method('CoPD', 'copd', 'merged:mean'),
)
TABLE2 = (
    Method('Base', 'copd_k3', 'base'),
    Method('Count-Exp.', 'experts_k3', 'branch0:count'),
    Method('Sort-Exp.', 'experts_k3', 'branch1:sort'),
    Method('Arith-Exp.', 'experts_k3', 'branch2:arithmetic'),
    Method('Mixed RLVR', 'mixed_k3', 'branch0:count+sort+arithmetic'),
    Method('MOPD', 'mopd_k3', 'branch0:count+sort+arithmetic'),
    Method('CoPD', 'copd_k3', 'merged:mean'),
)
TABLE3 = (
    Method('CoPD (Full)', 'copd', 'merged:mean'),
    Method('w/o S-OPD (count branch gets no distillation from sort)', 'copd_no_s2c',
           'merged:mean'),
    Method('w/o C-OPD (sort branch gets no distillation from count)', 'copd_no_c2s',
           'merged:mean'),
    Method('Count-Branch Only (no merge)', 'copd', 'branch0:count'),
    Method('Sort-Branch Only (no merge)', 'copd', 'branch1:sort'),
)
OVERLAP = (
    Method('CoPD fixed 1.5:1 (table profile)', 'copd', 'merged:mean'),
    Method('CoPD overlap-driven schedule', 'copd_overlap', 'merged:mean'),
)


def phase_methods(updates: int) -> tuple[Method, ...]:
  return tuple(Method(f'{r:g}', ratio_name(r, updates), 'merged:mean') for r in PHASE_RATIOS)


# Which runs each command needs (in run order).
COMMAND_RUNS = {
    'table1': ('copd', 'experts', 'mixed', 'static_s2c', 'static_c2s'),
    'table3': ('copd', 'copd_no_s2c', 'copd_no_c2s'),
    'table2': ('copd_k3', 'experts_k3', 'mixed_k3', 'mopd_k3'),
    'pilot': ('experts', 'copd', 'static_s2c', 'static_c2s'),
    'overlap_schedule': ('copd', 'copd_overlap'),
}
TABLE_METHODS = {'table1': TABLE1, 'table2': TABLE2, 'table3': TABLE3,
                 'overlap_schedule': OVERLAP}


def command_runs(command: str, sweep_updates: int) -> tuple[str, ...]:
  if command == 'phase_ratio':
    return tuple(ratio_name(r, sweep_updates) for r in PHASE_RATIOS)
  return COMMAND_RUNS[command]


def command_methods(command: str, sweep_updates: int) -> tuple[Method, ...]:
  return phase_methods(sweep_updates) if command == 'phase_ratio' else TABLE_METHODS[command]


def feature_available(name: str) -> bool:
  """True when the run-config schema (configs/base.py) has the feature's field: the driver
  implements every field of the schema."""
  import importlib.util
  section, field, _ = FEATURES[name]
  spec = importlib.util.spec_from_file_location('_copd_base_cfg', os.path.join(ROOT, 'configs',
                                                                                'base.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return field in module.base_config()[section]


def missing_features(run: RunSpec) -> list[str]:
  return [f for f in run.needs if not feature_available(f)]


def _override(spec: RunSpec, field: str, default: str) -> str:
  prefix = f'--config.{field}='
  values = [o[len(prefix):] for o in spec.overrides if o.startswith(prefix)]
  return values[-1] if values else default


def run_updates(spec: RunSpec, default_k: int) -> int:
  """Optimizer updates summed over the run's trained (non-frozen) branches."""
  steps = int(_override(spec, 'copd.num_cycles', '0')) * (
      int(_override(spec, 'copd.s_rl', '0')) + int(_override(spec, 'copd.s_opd', '0')))
  branches = _override(spec, 'branches', '')
  K = branches.count("'") // 2 if branches else default_k
  frozen = [t for t in _override(spec, 'copd.freeze', '').split(',') if t.strip()]
  return steps * (K - len(frozen))


def method_updates(method: Method, runs: dict[str, RunSpec], default_k: int) -> int:
  """Total optimizer updates behind a method's model, its teachers' training included."""
  spec = runs[method.run]
  return run_updates(spec, default_k) + sum(run_updates(runs[d], default_k) for d in spec.after)
