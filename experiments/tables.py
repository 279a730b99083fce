"""Markdown tables in the paper's layouts from the runs' eval.json files: accuracy in %, mean ± std
over seeds (population std), per domain and overall (the mean over domains, per seed, then over
seeds).

Table 1 / 2 and the conflict table: rows = domains + overall, columns = methods (best non-base cell in bold, worst
non-base cell marked †, as in the paper). Table 3, the overlap-schedule comparison and the
phase-ratio sweep: rows = methods, columns = domains + overall.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from experiments import methods as M

METRICS = (('pass@1', 'greedy pass@1'), ('avg@k', 'sampled avg@k'))
TITLES = {
    'table1': 'Table 1 (toy): K=2, sort & reverse (a shared sub-skill)',
    'table2': 'Table 2 (toy): K=3, sort (hub), reverse & rsort',
    'conflict': 'Conflict (toy): K=2, sort & rsort (opposite orders on one prompt surface)',
    'table3': 'Table 3 (toy): ablations of CoPD, K=2',
    'overlap_schedule': 'Overlap-driven schedule vs every fixed S_RL : S_OPD ratio (same budget; '
                        'merged model)',
    'phase_ratio': 'Phase ratio S_RL : S_OPD (equal updates per branch; merged model)',
}


def load_eval(out: str, seed: int, run: str) -> dict | None:
  path = os.path.join(out, 'runs', f'seed{seed}', run, 'eval.json')
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)['results']


def read_records(out: str, seed: int, run: str) -> list[dict] | None:
  """A run's metrics.jsonl records, or None when the run has not written one."""
  path = os.path.join(out, 'runs', f'seed{seed}', run, 'metrics.jsonl')
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def method_scores(out: str, seeds: Sequence[int], method: M.Method, domains: Sequence[str],
                  metric: str) -> np.ndarray | None:
  """-> [num_seeds_found, len(domains) + 1] accuracies in % (last column: overall), or None."""
  rows = []
  for seed in seeds:
    results = load_eval(out, seed, method.run)
    if results is None or method.row not in results:
      continue
    accs = [100 * results[method.row][d][metric] for d in domains]
    rows.append(accs + [float(np.mean(accs))])
  return np.asarray(rows) if rows else None


def cell(values: np.ndarray | None) -> str:
  if values is None:
    return '—'
  if len(values) == 1:
    return f'{values[0]:.1f}'
  return f'{values.mean():.1f} ± {values.std():.1f}'


def missing_note(runs: dict[str, M.RunSpec], method: M.Method) -> str:
  if method.run not in runs:
    return 'not run: ' + M.absent_reason(method.run)
  return 'not run yet'


def column_table(out: str, seeds: Sequence[int], methods: Sequence[M.Method],
                 domains: Sequence[str], metric: str, runs: dict[str, M.RunSpec]) -> str:
  """Paper layout of Tables 1 and 2: one column per method."""
  scores = [method_scores(out, seeds, m, domains, metric) for m in methods]
  header = '| Domain | ' + ' | '.join(m.label for m in methods) + ' |'
  lines = [header, '|:---|' + ':---:|' * len(methods)]
  for j, name in enumerate(list(domains) + ['Overall']):
    means = [s[:, j].mean() if s is not None else None for s in scores]
    ranked = [(v, i) for i, v in enumerate(means) if v is not None and methods[i].row != 'base']
    best = max(ranked)[1] if ranked else None
    worst = min(ranked)[1] if len(ranked) > 1 else None
    cells = []
    for i, s in enumerate(scores):
      text = cell(s[:, j] if s is not None else None)
      text = f'**{text}**' if i == best else f'{text}†' if i == worst else text
      cells.append(text)
    label = f'**{name} Avg.**' if name == 'Overall' else f'{name} acc.'
    lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
  notes = [f'- {m.label}: {missing_note(runs, m)}' for m, s in zip(methods, scores) if s is None]
  seeds_found = {m.label: 0 if s is None else len(s) for m, s in zip(methods, scores)}
  lines.append('')
  lines.append('Seeds per column: ' + ', '.join(f'{k} {v}' for k, v in seeds_found.items()))
  return '\n'.join(lines + notes)


def row_table(out: str, seeds: Sequence[int], methods: Sequence[M.Method],
              domains: Sequence[str], metric: str, runs: dict[str, M.RunSpec],
              first: str = 'Method') -> str:
  """Layout of Table 3: one row per method."""
  lines = [f'| {first} | ' + ' | '.join(f'{d} acc.' for d in domains) + ' | Overall Avg. | seeds |',
           '|:---|' + ':---:|' * (len(domains) + 2)]
  notes = []
  for m in methods:
    s = method_scores(out, seeds, m, domains, metric)
    cells = [cell(s[:, j] if s is not None else None) for j in range(len(domains) + 1)]
    lines.append(f'| {m.label} | ' + ' | '.join(cells) + f' | {0 if s is None else len(s)} |')
    if s is None:
      notes.append(f'- {m.label}: {missing_note(runs, m)}')
  return '\n'.join(lines + notes)


def budget_lines(profile: M.Profile, K: int) -> str:
  N, R, O = profile.num_cycles, profile.s_rl, profile.s_opd
  U = profile.updates_per_branch
  return (f'Budget: U = {N} x ({R} + {O}) = {U} updates per CoPD branch; every method spends '
          f'{K} x {U} = {K * U} optimizer updates in total ({K * N * R} RL-only, '
          f'{K * N * O} with a distillation batch for CoPD / static OPD / MOPD; experts and '
          'mixed RLVR: all RL). See README.md.')


def overlap_header(out: str, seeds: Sequence[int], runs: dict[str, M.RunSpec],
                   updates: int) -> list[str]:
  """Budget, thresholds and the phases the overlap-driven runs actually took."""
  from experiments import thresholds as T
  lines = [f'{updates} updates per branch for every row (the phase-ratio sweep\'s budget).']
  limits = T.load(out, updates)
  if limits is None:
    return lines + ['Thresholds: not yet computed (the sweep has not finished).', '']
  lines.append(f'Thresholds overlap_low = {limits[0]:.4f}, overlap_high = {limits[1]:.4f}: the '
               f'{T.LOW_PERCENTILE}th percentile and the median of the min O_k logged at every '
               'OPD step of the fixed-ratio runs (all ratios and seeds), fixed before the '
               f'overlap-driven runs (`{os.path.basename(T.path(out, updates))}`, '
               'experiments/thresholds.py).')
  taken = []
  for seed in seeds:
    path = os.path.join(out, 'runs', f'seed{seed}', M.overlap_name(updates), 'metrics.jsonl')
    if not os.path.isfile(path):
      continue
    with open(path) as f:
      phases = [json.loads(line)['phase_is_opd'] for line in f if line.strip()]
    switches = sum(1 for a, b in zip(phases, phases[1:]) if a != b)
    taken.append(f'seed {seed}: {int(sum(phases))} OPD / {len(phases) - int(sum(phases))} RL '
                 f'steps, {switches} phase switch{"es" if switches != 1 else ""}')
  if taken:
    lines.append('Phases the overlap-driven schedule took: ' + '; '.join(taken) + '.')
  return lines + ['']


def best_fixed_line(out: str, seeds: Sequence[int], methods: Sequence[M.Method],
                    domains: Sequence[str], metric: str) -> str:
  """The best fixed ratio by mean overall score, and overlap-driven minus it, paired by seed."""
  fixed = [(m, method_scores(out, seeds, m, domains, metric)) for m in methods[:-1]]
  fixed = [(m, s) for m, s in fixed if s is not None]
  adaptive = method_scores(out, seeds, methods[-1], domains, metric)
  if not fixed or adaptive is None:
    return 'Best fixed ratio: not available yet.'
  best, scores = max(fixed, key=lambda ms: ms[1][:, -1].mean())
  diff = []
  for seed in seeds:
    a = method_scores(out, [seed], methods[-1], domains, metric)
    b = method_scores(out, [seed], best, domains, metric)
    if a is not None and b is not None:
      diff.append(a[0, -1] - b[0, -1])
  return (f'Best fixed ratio (by mean overall): {best.label} ({cell(scores[:, -1])}). '
          f'Overlap-driven minus it, paired by seed: {cell(np.asarray(diff))} points '
          f'({len(diff)} seeds).')


def render(command: str, out: str, seeds: Sequence[int], profile: M.Profile,
           runs: dict[str, M.RunSpec], sweep_updates: int = 60) -> str:
  methods = M.command_methods(command, sweep_updates)
  domains = M.TABLE_DOMAINS.get(command, M.K2_DOMAINS)
  parts = [f'# {TITLES[command]}', '']
  if command in M.TABLE_METHODS:
    parts += [budget_lines(profile, len(domains)), '']
  if command == 'overlap_schedule':
    parts += overlap_header(out, seeds, runs, sweep_updates)
  if command == 'phase_ratio':
    parts += [f'{sweep_updates} updates per branch. ' + 'Schedules (num_cycles, S_RL, S_OPD): ' + ', '.join(
        f'{m.label}: ' + ' '.join(o.split('=')[1] for o in runs[m.run].overrides[:3])
        for m in methods if m.run in runs), '']
  for metric, title in METRICS:
    parts.append(f'## {title} (%), mean ± std over seeds {list(seeds)}')
    parts.append('')
    if command in ('table1', 'table2', 'conflict'):
      parts.append(column_table(out, seeds, methods, domains, metric, runs))
    else:
      first = 'S_RL : S_OPD' if command == 'phase_ratio' else 'Method'
      parts.append(row_table(out, seeds, methods, domains, metric, runs, first))
      if command == 'overlap_schedule':
        parts += ['', best_fixed_line(out, seeds, methods, domains, metric)]
    parts.append('')
  return '\n'.join(parts)


def write_command(command: str, out: str, seeds: Sequence[int], profile: M.Profile,
                  runs: dict[str, M.RunSpec], sweep_updates: int = 60) -> list[str]:
  """Writes OUT/<command>.md (phase_ratio / overlap_schedule: OUT/<command>_u<updates>.md; the
  pilot's pilot.md is written by figures.pilot_gain); -> paths."""
  written = []
  if command in M.TABLE_METHODS or command in ('phase_ratio', 'overlap_schedule'):
    suffix = f'_u{sweep_updates}' if command in ('phase_ratio', 'overlap_schedule') else ''
    path = os.path.join(out, f'{command}{suffix}.md')
    os.makedirs(out, exist_ok=True)
    with open(path, 'w') as f:
      f.write(render(command, out, seeds, profile, runs, sweep_updates))
    written.append(path)
  written.append(write_run_log(out))
  return written


def write_run_log(out: str) -> str:
  """OUT/RUNS.md: every finished run's exact command, code commit, wall time and machine."""
  infos = []
  root = os.path.join(out, 'runs')
  for dirpath, _, files in os.walk(root):
    if 'run_info.json' in files:
      with open(os.path.join(dirpath, 'run_info.json')) as f:
        infos.append(json.load(f))
  infos.sort(key=lambda i: (i['seed'], i['finished']))
  lines = ['# Runs (exact commands; $WORK = the --work folder of experiments.run)', '',
           '| seed | run | commit | wall s | machine | finished | command |',
           '|---|---|---|---|---|---|---|']
  for i in infos:
    lines.append(f"| {i['seed']} | {i['run']} | {i.get('commit', 'not recorded')} | "
                 f"{i['wall_seconds']} | {i['machine']} | "
                 f"{i['finished']} | `{i['command']}` |")
  total = sum(i['wall_seconds'] for i in infos)
  lines += ['', f'Total wall time: {total / 60:.1f} min over {len(infos)} runs.']
  path = os.path.join(out, 'RUNS.md')
  os.makedirs(out, exist_ok=True)
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return path
