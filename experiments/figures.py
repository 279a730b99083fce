"""PNG figures of the toy experiments (paper Fig. 4 and the pilot study), from the metrics.jsonl
and eval.json files that experiments.run copies to OUT/runs/seed<s>/<run>/.

- fig4ab_behaviour.png: O_k and symmetric-KL estimate of every (student <- teacher) edge over the
  student's updates, CoPD vs the static RLVR -> OPD pipeline (its OPD phase starts after the
  expert's E RL updates). Both are logged by the driver on the student's distillation rollouts.
- fig4c_phase_ratio.png: merged-model accuracy vs S_RL : S_OPD.
- pilot_rl_drift.png: O_k of RL-only experts against the base and against each other at their
  kept checkpoints (experiments/probe.py; needs the experts' workdir).
- pilot_gain_vs_overlap.png: per OPD phase of every K=2 run, the student's reward gain on the
  teacher's domain (its distillation rollouts, last step minus first step of the phase) against
  the phase's mean O_k, with Pearson r.
- overlap_schedule.png: O_k and phase of the overlap-driven schedule vs the fixed one.
"""
from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from typing import Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments import methods as M  # noqa: E402
from experiments import tables  # noqa: E402

EDGE_KEY = re.compile(r'behaviour/(overlap_top\d+|symmetric_kl)/(b\d+_[\w+]+)<-(b\d+_[\w+]+)$')


def read_records(out: str, seed: int, run: str) -> list[dict] | None:
  path = os.path.join(out, 'runs', f'seed{seed}', run, 'metrics.jsonl')
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def edge_series(records: list[dict], kind: str) -> dict[str, dict[int, float]]:
  """'overlap' | 'symmetric_kl' -> {edge: {step: value}} of the logged OPD steps."""
  out: dict[str, dict[int, float]] = defaultdict(dict)
  for r in records:
    for key, value in r.items():
      m = EDGE_KEY.match(key)
      if m and m.group(1).startswith(kind):
        out[f'{m.group(2)}<-{m.group(3)}'][r['step']] = value
  return dict(out)


def seed_mean(per_seed: list[dict[int, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  steps = sorted(set().union(*per_seed))
  values = [[s[t] for s in per_seed if t in s] for t in steps]
  return (np.asarray(steps), np.asarray([np.mean(v) for v in values]),
          np.asarray([np.std(v) for v in values]))


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def fig4ab(out: str, seeds: Sequence[int], runs: dict[str, M.RunSpec]) -> str | None:
  """CoPD edges vs static-pipeline edges: O_k (left) and symmetric KL (right)."""
  sources = [('CoPD', 'copd', 0, '-')]
  short = runs.get('experts_short')
  offset = 0
  if short is not None:  # the static student's OPD steps follow its E expert updates
    args = dict(a.split('=', 1) for a in short.overrides if a.startswith('--config.copd.'))
    offset = int(args['--config.copd.num_cycles']) * int(args['--config.copd.s_rl'])
  sources += [('static', 'static_s2c', offset, '--'), ('static', 'static_c2s', offset, '--')]
  fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
  drawn = False
  for ax, kind, title in ((axes[0], 'overlap', 'top-8 overlap O_k'),
                          (axes[1], 'symmetric_kl', 'symmetric KL estimate')):
    for label, run, shift, style in sources:
      per_edge: dict[str, list] = defaultdict(list)
      for seed in seeds:
        records = read_records(out, seed, run)
        if records:
          for edge, series in edge_series(records, kind).items():
            per_edge[edge].append(series)
      for edge, per_seed in sorted(per_edge.items()):
        x, mean, std = seed_mean(per_seed)
        x = x + 1 + shift
        line, = ax.plot(x, mean, style, marker='.', label=f'{label} {edge}')
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15)
        drawn = True
    ax.set_title(title + f' (mean ± std, {len(seeds)} seeds)')
    ax.set_xlabel("student's optimizer updates")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  if not drawn:
    plt.close(fig)
    return None
  return _save(fig, os.path.join(out, 'fig4ab_behaviour.png'))


def fig4c(out: str, seeds: Sequence[int], updates: int) -> str | None:
  ratios, means, stds = [], [], []
  per_domain = defaultdict(list)
  for method in M.phase_methods(updates):
    s = tables.method_scores(out, seeds, method, M.K2_DOMAINS, 'pass@1')
    if s is None:
      continue
    ratios.append(float(method.label))
    means.append(s[:, -1].mean())
    stds.append(s[:, -1].std())
    for j, d in enumerate(M.K2_DOMAINS):
      per_domain[d].append(s[:, j].mean())
  if not ratios:
    return None
  fig, ax = plt.subplots(figsize=(5, 3.6))
  ax.errorbar(ratios, means, yerr=stds, marker='o', capsize=3, label='merged, overall')
  for d, v in per_domain.items():
    ax.plot(ratios, v, '--', marker='.', alpha=0.7, label=f'merged, {d}')
  ax.set_xlabel('S_RL : S_OPD')
  ax.set_ylabel('greedy pass@1 (%)')
  ax.set_title(f'accuracy vs phase ratio ({updates} updates per branch, {len(seeds)} seed(s))')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return _save(fig, os.path.join(out, f'fig4c_phase_ratio_u{updates}.png'))


def opd_phase_points(records: list[dict]) -> list[tuple[float, float]]:
  """(mean O_k, student's distillation-reward gain) per OPD phase and edge of a K=2 run."""
  phases: dict[int, list[dict]] = defaultdict(list)
  for r in records:
    if r.get('phase_is_opd') == 1.0:
      phases[int(r['cycle'])].append(r)
  points = []
  for rows in phases.values():
    rows.sort(key=lambda r: r['step'])
    if len(rows) < 2:
      continue
    edges = edge_series(rows, 'overlap')
    for edge, series in edges.items():
      student = edge.split('<-')[0]
      key = f'distill_round0/reward/{student}'
      if key not in rows[0] or key not in rows[-1]:
        continue
      points.append((float(np.mean(list(series.values()))), rows[-1][key] - rows[0][key]))
  return points


K2_RUNS_WITH_OPD = ('copd', 'copd_no_s2c', 'copd_no_c2s', 'static_s2c', 'static_c2s',
                    'copd_overlap') + tuple(M.ratio_name(r, u) for r in M.PHASE_RATIOS
                                            for u in (30, 60))


def pilot_gain(out: str, seeds: Sequence[int]) -> str | None:
  xs, ys, labels = [], [], []
  for run in K2_RUNS_WITH_OPD:
    for seed in seeds:
      records = read_records(out, seed, run)
      for o, g in opd_phase_points(records or []):
        xs.append(o)
        ys.append(g)
        labels.append(run)
  if len(xs) < 3:
    return None
  r = float(np.corrcoef(xs, ys)[0, 1])
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for run in sorted(set(labels)):
    idx = [i for i, l in enumerate(labels) if l == run]
    ax.scatter([xs[i] for i in idx], [ys[i] for i in idx], s=14, label=run)
  slope, icpt = np.polyfit(xs, ys, 1)
  grid = np.linspace(min(xs), max(xs), 10)
  ax.plot(grid, slope * grid + icpt, 'k--', lw=1)
  ax.set_xlabel('mean O_k in the OPD phase')
  ax.set_ylabel("gain of student's reward on teacher domain")
  ax.set_title(f'OPD gain vs overlap: Pearson r = {r:.2f} (n = {len(xs)})')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=6)
  with open(os.path.join(out, 'pilot_gain_vs_overlap.json'), 'w') as f:
    json.dump({'pearson_r': r, 'n': len(xs), 'points': [
        {'run': l, 'overlap': x, 'gain': y} for l, x, y in zip(labels, xs, ys)]}, f, indent=1)
  return _save(fig, os.path.join(out, 'pilot_gain_vs_overlap.png'))


def pilot_drift(out: str, seeds: Sequence[int], work: str) -> str | None:
  """O_k under pure RLVR (experts run) and under CoPD, from their kept checkpoints."""
  from experiments import probe
  cache = os.path.join(out, 'pilot_rl_drift.json')
  data = {}
  if os.path.isfile(cache):
    with open(cache) as f:
      data = json.load(f)
  for seed in seeds:
    for run in ('experts', 'copd'):
      key = f'seed{seed}/{run}'
      workdir = os.path.join(work, f'seed{seed}', run)
      if key in data or not os.path.isdir(os.path.join(workdir, 'checkpoints')):
        continue
      data[key] = probe.rl_drift(workdir, M.K2_DOMAINS)
      with open(cache, 'w') as f:
        json.dump(data, f, indent=1)
  if not data:
    return None
  fig, axes = plt.subplots(2, 2, figsize=(11, 7))
  for col, run in enumerate(('experts', 'copd')):
    for row, (field, start, name) in enumerate((('overlap', 1.0, 'top-8 overlap O_k'),
                                                ('sym_kl', 0.0, 'symmetric KL (exact)'))):
      ax = axes[row][col]
      per_pair: dict[str, list[dict[int, float]]] = defaultdict(list)
      for key, rows in data.items():
        if key.endswith('/' + run):
          series: dict[str, dict[int, float]] = defaultdict(lambda: {0: start})
          for r in rows:
            series[r['pair']][r['step']] = r[field]
          for pair, s in series.items():
            per_pair[pair].append(s)
      for pair, per_seed in sorted(per_pair.items()):
        x, mean, std = seed_mean(per_seed)
        line, = ax.plot(x, mean, marker='o', label=pair)
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15)
      seeds_n = sum(1 for k in data if k.endswith('/' + run))
      ax.set_title(f'{run}: {name} at kept checkpoints ({seeds_n} seeds)')
      ax.set_xlabel('optimizer updates per branch')
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
  return _save(fig, os.path.join(out, 'pilot_rl_drift.png'))


def overlap_schedule_fig(out: str, seeds: Sequence[int]) -> str | None:
  fig, ax = plt.subplots(figsize=(6, 3.8))
  drawn = False
  for run, style in (('copd', '-'), ('copd_overlap', '--')):
    per_edge: dict[str, list] = defaultdict(list)
    for seed in seeds:
      records = read_records(out, seed, run)
      for edge, series in edge_series(records or [], 'overlap').items():
        per_edge[edge].append(series)
    for edge, per_seed in sorted(per_edge.items()):
      x, mean, _ = seed_mean(per_seed)
      ax.plot(x + 1, mean, style, marker='.', label=f'{run} {edge}')
      drawn = True
  if not drawn:
    plt.close(fig)
    return None
  ax.set_xlabel('global step')
  ax.set_ylabel('top-8 overlap O_k')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return _save(fig, os.path.join(out, 'overlap_schedule.png'))


def write_command(command: str, out: str, seeds: Sequence[int], runs: dict[str, M.RunSpec],
                  work: str | None = None, sweep_updates: int = 60) -> list[str]:
  paths: list[str | None] = []
  if command == 'table1':
    paths.append(fig4ab(out, seeds, runs))
  elif command == 'phase_ratio':
    paths.append(fig4c(out, seeds, sweep_updates))
  elif command == 'pilot':
    paths.append(pilot_gain(out, seeds))
    if work is not None:
      paths.append(pilot_drift(out, seeds, work))
  elif command == 'overlap_schedule':
    paths.append(overlap_schedule_fig(out, seeds))
  return [p for p in paths if p]
