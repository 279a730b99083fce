"""The paper's methods as data: driver runs (config file + `--config.x=y` overrides) and the
eval.json rows that give each method's accuracy.

A *run* is one `python -m copd_jax train` invocation; a *method* (a table column) is one model
row of one run's eval.json, e.g. the sort expert is row 'branch0:sort' of the 'experts' run.

Domains (experiments/results/README.md has the design): K=2 is sort & reverse, the pair that
shares a sub-skill (configs/toy_copd.py); K=3 adds rsort with sort as hub
(configs/toy_copd_k3.py); the conflict runs train sort & rsort, the pair with opposite answers
on one prompt surface, where mixed-data RLVR shows its trade-off.

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
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K2_CONFIG = 'configs/toy_copd.py'
K3_CONFIG = 'configs/toy_copd_k3.py'
K2_DOMAINS = ('sort', 'reverse')
K3_DOMAINS = ('sort', 'reverse', 'rsort')
CONFLICT_DOMAINS = ('sort', 'rsort')


def _config_defaults() -> tuple[int, int, int, int]:
  """(num_cycles, s_rl, s_opd, eval.num_examples) of the K=2 config: the tables' default
  schedule is the README main run's, so a table method spends what the main run spends."""
  from copd_jax.config import read_config
  c = read_config(os.path.join(ROOT, K2_CONFIG))
  return c.copd.num_cycles, c.copd.s_rl, c.copd.s_opd, c.eval.num_examples


_CYCLES, _S_RL, _S_OPD, _EVAL_EXAMPLES = _config_defaults()

@dataclasses.dataclass(frozen=True)
class Profile:
  """Per-run cost knobs shared by all methods of a table (U = num_cycles * (s_rl + s_opd));
  the defaults are configs/toy_copd.py's."""
  num_cycles: int = _CYCLES
  s_rl: int = _S_RL
  s_opd: int = _S_OPD
  eval_examples: int = _EVAL_EXAMPLES
  extra: tuple[str, ...] = ()  # further overrides for every run (the fast test's TINY settings)

  @property
  def updates_per_branch(self) -> int:
    return self.num_cycles * (self.s_rl + self.s_opd)

  def common(self) -> tuple[str, ...]:
    # Every phase-end checkpoint stays: the pilot's students start from the experts run's, and
    # the drift figures probe the runs' checkpoints at every phase end.
    return (f'--config.eval.num_examples={self.eval_examples}',
            '--config.checkpoint.keep_phase_ends=-1') + self.extra


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One driver run. Overrides may hold '{run:NAME}', replaced by that run's workdir."""
  name: str
  config: str
  overrides: tuple[str, ...]
  domains: tuple[str, ...]          # domains the run trains on (fixes its warm-started base)
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


def k_runs(p: Profile, suffix: str, config: str, domains: tuple[str, ...],
           set_branches: bool = False) -> dict[str, RunSpec]:
  """base/experts/mixed/CoPD/static-pipeline runs for a K-domain table (K = len(domains)).
  set_branches: the runs train `domains` instead of the config file's branches."""
  K = len(domains)
  N, R, O = p.num_cycles, p.s_rl, p.s_opd
  c = p.common()
  per_domain = ("--config.branches=(%s,)" % ','.join(f"'{d}'" for d in domains),
                ) if set_branches else ()
  none = ('--config.copd.topology=none',)
  runs = {
      f'copd{suffix}': RunSpec(f'copd{suffix}', config, schedule(N, R, O) + per_domain + c,
                               domains),
      f'experts{suffix}': RunSpec(f'experts{suffix}', config,
                                  schedule(N, R + O, 0) + none + per_domain + c, domains),
      f'mixed{suffix}': RunSpec(f'mixed{suffix}', config,
                                schedule(N, K * (R + O), 0) + none +
                                (f"--config.branches=('{'+'.join(domains)}',)",) + c, domains),
      f'experts_short{suffix}': RunSpec(f'experts_short{suffix}', config,
                                        schedule(N, R, 0) + none + per_domain + c, domains),
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
      K2_DOMAINS, after=(short,))


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
      K3_DOMAINS, after=(short,))


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


@dataclasses.dataclass(frozen=True)
class Pilot:
  """The paper's pilot study: experts trained for `lengths` RL updates (one K=2 experts run;
  its kept checkpoints at every multiple of gcd(lengths) are the shorter experts) each teach a
  student started from the base, by static OPD for `opd_steps` updates, teacher frozen. All
  (expert length, direction) pairs run side by side as branches of one driver run, with one
  control student per domain that has no teacher (its native GRPO batch only). opd_steps
  defaults to a Table 1 static-OPD student's distillation updates (K N S_OPD at the config's
  schedule), so a pilot student gets the distillation budget of the table's."""
  lengths: tuple[int, ...] = (5, 10, 20, 40, 80)
  opd_steps: int = len(K2_DOMAINS) * _CYCLES * _S_OPD
  eval_examples: int = 200
  experts_run: str = 'pilot_experts'


@dataclasses.dataclass(frozen=True)
class PilotPair:
  """One distillation of the pilot: branch `student` (domain `student_domain`, from the base)
  learns from frozen branch `teacher`, the `teacher_domain` expert after `length` RL updates."""
  length: int
  student: int
  teacher: int
  student_domain: str
  teacher_domain: str


def pilot_layout(pilot: Pilot) -> tuple[tuple[PilotPair, ...], tuple[tuple[int, str], ...]]:
  """-> (pairs, controls): per length, for each expert domain d (branch k of the experts run),
  a student on the other domain and the frozen expert; then (branch, domain) of one teacherless
  control student per domain, last."""
  pairs = []
  for length in pilot.lengths:
    for k, teacher_domain in enumerate(K2_DOMAINS):
      b = 2 * len(pairs)
      pairs.append(PilotPair(length, b, b + 1, K2_DOMAINS[1 - k], teacher_domain))
  first = 2 * len(pairs)
  controls = tuple((first + i, d) for i, d in enumerate(K2_DOMAINS))
  return tuple(pairs), controls


def pilot_runs(p: Profile, pilot: Pilot = Pilot()) -> dict[str, RunSpec]:
  """The pilot's experts run (unless `pilot.experts_run` names another run) and its OPD run."""
  import math
  step = math.gcd(*pilot.lengths)
  runs = {}
  if pilot.experts_run == 'pilot_experts':
    runs['pilot_experts'] = RunSpec(
        'pilot_experts', K2_CONFIG, schedule(max(pilot.lengths) // step, step, 0) + (
            '--config.copd.topology=none',) + p.common(), K2_DOMAINS)
  pairs, controls = pilot_layout(pilot)
  branches, inits = [], []
  for pair in pairs:
    k = K2_DOMAINS.index(pair.teacher_domain)
    branches += [pair.student_domain, pair.teacher_domain]
    inits += ["''", "'{run:%s}/checkpoints/%d:%d'" % (pilot.experts_run, pair.length - 1, k)]
  for _, domain in controls:
    branches.append(domain)
    inits.append("''")
  runs['pilot_opd'] = RunSpec(
      'pilot_opd', K2_CONFIG, schedule(1, 0, pilot.opd_steps) + (
          "--config.branches=(%s,)" % ','.join(f"'{b}'" for b in branches),
          '--config.model.branch_init=(%s,)' % ','.join(inits),
          '--config.copd.topology=edges',
          '--config.copd.edges=' + ','.join(f'{q.student}<-{q.teacher}' for q in pairs),
          '--config.copd.freeze=' + ','.join(str(q.teacher) for q in pairs),
          '--config.merge.method=none', f'--config.eval.num_examples={pilot.eval_examples}')
      + p.extra, K2_DOMAINS, after=(pilot.experts_run,))
  return runs


def overlap_name(updates: int) -> str:
  return f'copd_overlap_u{updates}'


def overlap_run(p: Profile, updates: int, low: float, high: float) -> RunSpec:
  """CoPD with the overlap-driven schedule, `updates` steps per branch (the sweep's budget)."""
  return RunSpec(overlap_name(updates), K2_CONFIG, schedule(*phase_schedule(1.5, updates)) + (
      '--config.copd.schedule=overlap', f'--config.copd.overlap_low={low:.4f}',
      f'--config.copd.overlap_high={high:.4f}') + p.common(), K2_DOMAINS)


def all_runs(p: Profile, sweep_updates: int = 60,
             thresholds: tuple[float, float] | None = None,
             pilot: Pilot = Pilot()) -> dict[str, RunSpec]:
  """Every run of every command; the phase-ratio runs have `sweep_updates` updates per branch
  (60 = lcm of the cycle lengths 3, 2, 5, 3, 4 fits all five ratios; ratios without an
  integer schedule are left out). The overlap-driven run, at the sweep's budget, exists once
  its (overlap_low, overlap_high) are known (experiments/thresholds.py)."""
  runs = {}
  runs.update(k_runs(p, '', K2_CONFIG, K2_DOMAINS))
  runs.update(k_runs(p, '_k3', K3_CONFIG, K3_DOMAINS))
  runs.update(k_runs(p, '_conflict', K2_CONFIG, CONFLICT_DOMAINS, set_branches=True))
  runs['static_r2s'] = static_opd_run(p, 'static_r2s', student=0, teacher=1)
  runs['static_s2r'] = static_opd_run(p, 'static_s2r', student=1, teacher=0)
  runs['mopd_k3'] = mopd_run(p)
  N, R, O = p.num_cycles, p.s_rl, p.s_opd
  for name, edge in (('copd_no_r2s', '0<-1'), ('copd_no_s2r', '1<-0')):
    runs[name] = RunSpec(name, K2_CONFIG, schedule(N, R, O) + (f'--config.copd.drop_edges={edge}',)
                         + p.common(), K2_DOMAINS)
  for ratio in PHASE_RATIOS:
    plan = phase_schedule(ratio, sweep_updates)
    if plan is not None:
      name = ratio_name(ratio, sweep_updates)
      runs[name] = RunSpec(name, K2_CONFIG, schedule(*plan) + p.common(), K2_DOMAINS)
  runs.update(pilot_runs(p, pilot))
  if thresholds is not None:
    runs[overlap_name(sweep_updates)] = overlap_run(p, sweep_updates, *thresholds)
  return runs


# Table columns (paper layouts). sort plays the paper's text role (K=3 hub), reverse the image
# role; OPD (X→Y) is the static pipeline whose Y student learns from the frozen X expert.
TABLE1 = (
    Method('Base', 'copd', 'base'),
    Method('Sort-Expert', 'experts', 'branch0:sort'),
    Method('Reverse-Expert', 'experts', 'branch1:reverse'),
    Method('Mixed RLVR', 'mixed', 'branch0:sort+reverse'),
    Method('OPD (R→S)', 'static_r2s', 'branch0:sort'),
    Method('OPD (S→R)', 'static_s2r', 'branch1:reverse'),
    Method('CoPD', 'copd', 'merged:mean'),
)
TABLE2 = (
    Method('Base', 'copd_k3', 'base'),
    Method('Sort-Exp.', 'experts_k3', 'branch0:sort'),
    Method('Reverse-Exp.', 'experts_k3', 'branch1:reverse'),
    Method('Rsort-Exp.', 'experts_k3', 'branch2:rsort'),
    Method('Mixed RLVR', 'mixed_k3', 'branch0:sort+reverse+rsort'),
    Method('MOPD', 'mopd_k3', 'branch0:sort+reverse+rsort'),
    Method('CoPD', 'copd_k3', 'merged:mean'),
)
TABLE3 = (
    Method('CoPD (Full)', 'copd', 'merged:mean'),
    Method('w/o R-OPD (sort branch gets no distillation from reverse)', 'copd_no_r2s',
           'merged:mean'),
    Method('w/o S-OPD (reverse branch gets no distillation from sort)', 'copd_no_s2r',
           'merged:mean'),
    Method('Sort-Branch Only (no merge)', 'copd', 'branch0:sort'),
    Method('Reverse-Branch Only (no merge)', 'copd', 'branch1:reverse'),
)
# The conflicting pair (Table 1's layout): does mixed RLVR trade one order for the other, and
# does CoPD keep both? The unmerged branches show what the mean merge has to reconcile.
TABLE_CONFLICT = (
    Method('Base', 'copd_conflict', 'base'),
    Method('Sort-Expert', 'experts_conflict', 'branch0:sort'),
    Method('Rsort-Expert', 'experts_conflict', 'branch1:rsort'),
    Method('Mixed RLVR', 'mixed_conflict', 'branch0:sort+rsort'),
    Method('CoPD', 'copd_conflict', 'merged:mean'),
    Method('CoPD Sort-Branch', 'copd_conflict', 'branch0:sort'),
    Method('CoPD Rsort-Branch', 'copd_conflict', 'branch1:rsort'),
)


def phase_methods(updates: int) -> tuple[Method, ...]:
  return tuple(Method(f'{r:g}', ratio_name(r, updates), 'merged:mean') for r in PHASE_RATIOS)


def overlap_methods(updates: int) -> tuple[Method, ...]:
  """Every fixed ratio of the sweep, then the overlap-driven schedule, at the same budget."""
  return tuple(Method(f'fixed {m.label} : 1', m.run, m.row) for m in phase_methods(updates)) + (
      Method('overlap-driven', overlap_name(updates), 'merged:mean'),)


# Which runs each command needs (in run order).
COMMAND_RUNS = {
    'table1': ('copd', 'experts', 'mixed', 'static_r2s', 'static_s2r'),
    'table3': ('copd', 'copd_no_r2s', 'copd_no_s2r'),
    'table2': ('copd_k3', 'experts_k3', 'mixed_k3', 'mopd_k3'),
    'conflict': ('copd_conflict', 'experts_conflict', 'mixed_conflict'),
    'pilot': ('experts', 'copd', 'pilot_experts', 'pilot_opd'),
}
TABLE_METHODS = {'table1': TABLE1, 'table2': TABLE2, 'table3': TABLE3,
                 'conflict': TABLE_CONFLICT}
TABLE_DOMAINS = {'table1': K2_DOMAINS, 'table2': K3_DOMAINS, 'table3': K2_DOMAINS,
                 'conflict': CONFLICT_DOMAINS}


def command_runs(command: str, sweep_updates: int) -> tuple[str, ...]:
  if command == 'phase_ratio':
    return tuple(ratio_name(r, sweep_updates) for r in PHASE_RATIOS)
  if command == 'overlap_schedule':
    return tuple(ratio_name(r, sweep_updates) for r in PHASE_RATIOS) + (
        overlap_name(sweep_updates),)
  return COMMAND_RUNS[command]


def command_methods(command: str, sweep_updates: int) -> tuple[Method, ...]:
  if command == 'phase_ratio':
    return phase_methods(sweep_updates)
  if command == 'overlap_schedule':
    return overlap_methods(sweep_updates)
  return TABLE_METHODS[command]


def absent_reason(name: str) -> str:
  """Why a run that a command names is not in all_runs()."""
  if name.startswith('copd_overlap_u'):
    return ('its overlap thresholds come from the phase-ratio sweep at the same budget, which '
            'has not finished for every seed (run phase_ratio first)')
  return 'no integer (num_cycles, S_RL, S_OPD) schedule for this budget (methods.phase_schedule)'


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
