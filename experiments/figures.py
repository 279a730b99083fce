"""PNG figures of the toy experiments (paper Fig. 4 and the pilot study), from the metrics.jsonl
and eval.json files that experiments.run copies to OUT/runs/seed<s>/<run>/.

- fig4ab_behaviour.png: O_k and symmetric-KL estimate of every (student <- teacher) edge over the
  student's updates, CoPD vs the static RLVR -> OPD pipeline (its OPD phase starts after the
  expert's E RL updates). Both are logged by the driver on the student's distillation rollouts.
- fig4c_phase_ratio.png: merged-model accuracy vs S_RL : S_OPD.
- pilot_rl_drift.png: O_k of RL-only experts against the base and against each other at their
  kept checkpoints (experiments/probe.py; needs the experts' workdir).
- pilot_gain_vs_overlap.png (+ .json, pilot.md): the paper's pilot (experiments/pilot.py):
  experts trained for different numbers of RL updates teach a base student by static OPD;
  accuracy gain on the teacher's domain against O_k before distillation, with Pearson r, and
  O_k against the expert's RL updates.
- overlap_schedule_u<U>.png: min O_k and phase of the overlap-driven schedule vs the fixed
  1.5 : 1 schedule at the same budget, with the thresholds.
"""
from __future__ import annotations

import dataclasses
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
  sources += [('static', 'static_r2s', offset, '--'), ('static', 'static_s2r', offset, '--')]
  fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
  drawn = False
  for ax, kind, title in ((axes[0], 'overlap', 'top-8 overlap O_k'),
                          (axes[1], 'symmetric_kl', 'symmetric KL estimate')):
    for label, run, shift, style in sources:
      per_edge: dict[str, list] = defaultdict(list)
      for seed in seeds:
        records = tables.read_records(out, seed, run)
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
  ax.set_title(f'accuracy vs phase ratio ({updates} updates/branch, mean ± std, '
               f'{len(seeds)} seeds)', fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return _save(fig, os.path.join(out, f'fig4c_phase_ratio_u{updates}.png'))


def pilot_gain(out: str, seeds: Sequence[int], pilot: M.Pilot = M.Pilot()) -> str | None:
  """Paper's pilot: OPD gain against O_k before distillation (pass@1, avg@k), and O_k against
  the expert's RL updates; writes pilot_gain_vs_overlap.json and pilot.md beside the figure."""
  from experiments import pilot as P
  points = P.collect(out, seeds, pilot)
  if not points:
    return None
  found = sorted({p['seed'] for p in points})
  summary = P.summary(points)
  directions = sorted({p['direction'] for p in points})
  colours = dict(zip(directions, ('tab:blue', 'tab:orange', 'tab:green', 'tab:red')))
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  for ax, metric in zip(axes[:2], P.METRICS):
    xs = [p['overlap_before'] for p in points]
    ys = [100 * p[f'gain_{metric}'] for p in points]
    for d in directions:
      group = [p for p in points if p['direction'] == d]
      ax.scatter([p['overlap_before'] for p in group], [100 * p[f'gain_{metric}'] for p in group],
                 s=[12 + 3 * np.log2(p['length']) ** 2 for p in group], color=colours[d],
                 alpha=0.8, label=f'{d} (size: expert RL updates)')
      control = 100 * np.mean([p[f'control_gain_{metric}'] for p in group])
      ax.axhline(control, color=colours[d], ls=':', lw=1, label=f'{d} control (no teacher)')
    if np.std(xs) > 0:
      slope, icpt = np.polyfit(xs, ys, 1)
      grid = np.linspace(min(xs), max(xs), 10)
      ax.plot(grid, slope * grid + icpt, 'k--', lw=1)
    ax.axhline(0, color='grey', lw=0.5)
    ax.set_xlabel('O_k (top-8) before distillation, on the student\'s rollouts')
    ax.set_ylabel(f'gain of {metric} on teacher domain (points)')
    ax.set_title(f'{metric}: Pearson r = {summary[f"r_gain_{metric}"]:.2f} '
                 f'(n = {len(points)}, seeds {found})', fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
  ax = axes[2]
  for d in directions:
    per_seed = [{p['length']: p['overlap_before'] for p in points
                 if p['direction'] == d and p['seed'] == s} for s in found]
    x, mean, std = seed_mean(per_seed)
    ax.errorbar(x, mean, yerr=std, marker='o', capsize=3, color=colours[d],
                label=f'{d.split("→")[0]} expert vs base student')
  ax.set_xscale('log', base=2)
  ax.set_xlabel("expert's GRPO updates")
  ax.set_ylabel('O_k before distillation')
  ax.set_title('O_k falls under RLVR (mean ± std over seeds)', fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  with open(os.path.join(out, 'pilot_gain_vs_overlap.json'), 'w') as f:
    json.dump({'summary': summary, 'seeds': found, 'pilot': dataclasses.asdict(pilot),
               'points': points}, f, indent=1)
  with open(os.path.join(out, 'pilot.md'), 'w') as f:
    f.write(P.markdown(points, found, pilot))
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


def overlap_schedule_fig(out: str, seeds: Sequence[int], updates: int) -> str | None:
  """Min O_k over the edges (top) and phase (bottom) of the overlap-driven schedule per seed,
  against the fixed 1.5 : 1 schedule at the same budget, with the two thresholds."""
  from experiments import thresholds as T
  limits = T.load(out, updates)
  fig, axes = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True,
                           gridspec_kw={'height_ratios': [3, 1]})
  drawn = False
  runs = ((M.ratio_name(1.5, updates), 'fixed 1.5 : 1', '-'),
          (M.overlap_name(updates), 'overlap-driven', '--'))
  for run, label, style in runs:
    for seed in seeds:
      records = tables.read_records(out, seed, run) or []
      points = [(r['step'] + 1, r[T.KEY]) for r in records if T.KEY in r]
      if not points:
        continue
      x, y = zip(*points)
      line, = axes[0].plot(x, y, style, marker='.', ms=3, lw=0.8, label=f'{label}, seed {seed}')
      steps = [r['step'] + 1 for r in records]
      axes[1].step(steps, [r['phase_is_opd'] + 0.03 * seed for r in records], style,
                   where='post', color=line.get_color(), lw=0.8)
      drawn = True
  if not drawn:
    plt.close(fig)
    return None
  if limits is not None:
    for value, name in zip(limits, ('overlap_low', 'overlap_high')):
      axes[0].axhline(value, color='k', ls=':', lw=1)
      axes[0].text(1, value, f' {name} = {value:.3f}', fontsize=7, va='bottom')
  axes[0].set_ylabel('min O_k over edges')
  axes[0].set_title(f'overlap-driven vs fixed 1.5 : 1 schedule ({updates} updates per branch)')
  axes[0].grid(alpha=0.3)
  axes[0].legend(fontsize=6, ncol=2)
  axes[1].set_yticks([0, 1], ['RL', 'OPD'])
  axes[1].set_xlabel('step (optimizer update per branch)')
  axes[1].grid(alpha=0.3)
  return _save(fig, os.path.join(out, f'overlap_schedule_u{updates}.png'))


def write_command(command: str, out: str, seeds: Sequence[int], runs: dict[str, M.RunSpec],
                  work: str | None = None, sweep_updates: int = 60,
                  pilot: M.Pilot = M.Pilot()) -> list[str]:
  paths: list[str | None] = []
  if command == 'table1':
    paths.append(fig4ab(out, seeds, runs))
  elif command == 'phase_ratio':
    paths.append(fig4c(out, seeds, sweep_updates))
  elif command == 'pilot':
    paths.append(pilot_gain(out, seeds, pilot))
    if work is not None:
      paths.append(pilot_drift(out, seeds, work))
  elif command == 'overlap_schedule':
    paths.append(overlap_schedule_fig(out, seeds, sweep_updates))
  return [p for p in paths if p]
