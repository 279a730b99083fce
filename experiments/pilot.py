"""The paper's pilot study (OPD gain against top-k overlap), from the pilot_opd run's files.

For each (expert RL length, direction) pair of methods.pilot_layout:
  overlap_before  O_k of student <- expert logged by the driver at the first OPD step, i.e. on the
                  student's own distillation rollouts (teacher's domain), before any update
  gain_<metric>   student's accuracy on the teacher's domain after the OPD budget minus before
                  (the base row of the same eval.json: the student starts from the base)
  control_gain    the same difference for the teacherless control student of the same domain
                  (native GRPO only), so gain - control_gain is what distillation added
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from experiments import methods as M
from experiments import tables

METRICS = ('pass@1', 'avg@k')


def _edge_value(record: dict, kind: str, edge: str) -> float:
  """kind 'overlap_top' or 'symmetric_kl'; edge 'b0_reverse<-b1_sort'."""
  keys = [k for k in record if k.startswith(f'behaviour/{kind}') and k.endswith('/' + edge)]
  if len(keys) != 1:
    raise KeyError(f'behaviour/{kind}*/{edge}: found {keys}')
  return float(record[keys[0]])


def seed_points(out: str, seed: int, pilot: M.Pilot = M.Pilot()) -> list[dict] | None:
  """One dict per pilot pair of this seed, or None when the pilot_opd run is missing."""
  results = tables.load_eval(out, seed, 'pilot_opd')
  records = tables.read_records(out, seed, 'pilot_opd')
  if results is None or not records:
    return None
  records = sorted((r for r in records if r.get('phase_is_opd') == 1.0), key=lambda r: r['step'])
  pairs, controls = M.pilot_layout(pilot)
  control_of = {domain: branch for branch, domain in controls}
  points = []
  for q in pairs:
    edge = f'b{q.student}_{q.student_domain}<-b{q.teacher}_{q.teacher_domain}'
    student = results[f'branch{q.student}:{q.student_domain}'][q.teacher_domain]
    teacher = results[f'branch{q.teacher}:{q.teacher_domain}'][q.teacher_domain]
    base = results['base'][q.teacher_domain]
    c = control_of[q.student_domain]
    control = results[f'branch{c}:{q.student_domain}'][q.teacher_domain]
    point = dict(seed=seed, length=q.length, direction=f'{q.teacher_domain}→{q.student_domain}',
                 overlap_before=_edge_value(records[0], 'overlap_top', edge),
                 overlap_after=_edge_value(records[-1], 'overlap_top', edge),
                 sym_kl_before=_edge_value(records[0], 'symmetric_kl', edge))
    for metric in METRICS:
      point[f'base_{metric}'] = base[metric]
      point[f'teacher_{metric}'] = teacher[metric]
      point[f'gain_{metric}'] = student[metric] - base[metric]
      point[f'control_gain_{metric}'] = control[metric] - base[metric]
    points.append(point)
  return points


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
  """Pearson r; nan when either side has no spread or fewer than 3 points."""
  x, y = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
  if len(x) < 3 or x.std() == 0 or y.std() == 0:
    return float('nan')
  return float(np.corrcoef(x, y)[0, 1])


def summary(points: Sequence[dict]) -> dict:
  """Pearson r of gain (raw, and net of the control) against O_k before distillation."""
  out = {'n': len(points)}
  xs = [p['overlap_before'] for p in points]
  for metric in METRICS:
    out[f'r_gain_{metric}'] = pearson(xs, [p[f'gain_{metric}'] for p in points])
    out[f'r_net_gain_{metric}'] = pearson(
        xs, [p[f'gain_{metric}'] - p[f'control_gain_{metric}'] for p in points])
  out['r_overlap_vs_log_length'] = pearson([np.log(p['length']) for p in points], xs)
  # What else could drive the gain: the teacher's own accuracy edge over the base.
  out['r_gain_pass@1_vs_teacher_edge'] = pearson(
      [p['teacher_pass@1'] - p['base_pass@1'] for p in points], [p['gain_pass@1'] for p in points])
  for direction in sorted({p['direction'] for p in points}):
    group = [p for p in points if p['direction'] == direction]
    gx = [p['overlap_before'] for p in group]
    out[f'{direction}: n'] = len(group)
    for metric in METRICS:
      out[f'{direction}: r_gain_{metric}'] = pearson(gx, [p[f'gain_{metric}'] for p in group])
    out[f'{direction}: r_gain_pass@1_vs_teacher_edge'] = pearson(
        [p['teacher_pass@1'] - p['base_pass@1'] for p in group],
        [p['gain_pass@1'] for p in group])
  return out


def collect(out: str, seeds: Sequence[int], pilot: M.Pilot = M.Pilot()) -> list[dict]:
  points = []
  for seed in seeds:
    points += seed_points(out, seed, pilot) or []
  return points


def markdown(points: Sequence[dict], seeds_found: Sequence[int], pilot: M.Pilot) -> str:
  """pilot.md: per (length, direction), mean ± std over seeds; then Pearson r."""
  s = summary(points)
  lines = [
      '# Pilot study (toy): OPD gain against top-k overlap', '',
      f'Experts trained for {", ".join(map(str, pilot.lengths))} GRPO updates (checkpoints of one '
      'experts run) each teach a student started from the base by static OPD for '
      f'{pilot.opd_steps} updates (teacher frozen; each update also has the student\'s native GRPO '
      f'batch on its own domain). Accuracy on {pilot.eval_examples} eval prompts of the teacher\'s '
      'domain; gain = after − before (points of %). O_k (top-8) is logged by the driver on the '
      'student\'s own distillation rollouts at the first OPD step, before any update. Control: '
      'a student of the same domain with no teacher. Mean ± std over seeds '
      f'{list(seeds_found)}.', '',
      '| teacher→student | expert RL updates | O_k before | O_k after | expert acc. (pass@1) '
      '| gain pass@1 | gain avg@k | control gain pass@1 | control gain avg@k |',
      '|:---|---:|---:|---:|---:|---:|---:|---:|---:|']

  def ms(values, scale=1.0, digits=1):
    v = np.asarray(values) * scale
    return f'{v.mean():.{digits}f} ± {v.std():.{digits}f}'

  for direction in sorted({p['direction'] for p in points}):
    for length in pilot.lengths:
      group = [p for p in points if p['direction'] == direction and p['length'] == length]
      if not group:
        continue
      lines.append(
          f'| {direction} | {length} | {ms([p["overlap_before"] for p in group], digits=3)} | '
          f'{ms([p["overlap_after"] for p in group], digits=3)} | '
          f'{ms([p["teacher_pass@1"] for p in group], 100)} | '
          f'{ms([p["gain_pass@1"] for p in group], 100)} | '
          f'{ms([p["gain_avg@k"] for p in group], 100)} | '
          f'{ms([p["control_gain_pass@1"] for p in group], 100)} | '
          f'{ms([p["control_gain_avg@k"] for p in group], 100)} |')
  lines += ['', f'Pearson r over all n = {s["n"]} (seed, length, direction) points, against O_k '
            'before distillation:', '',
            f'- gain pass@1: r = {s["r_gain_pass@1"]:.2f}; net of control: '
            f'r = {s["r_net_gain_pass@1"]:.2f}',
            f'- gain avg@k: r = {s["r_gain_avg@k"]:.2f}; net of control: '
            f'r = {s["r_net_gain_avg@k"]:.2f}',
            f'- O_k against log(expert RL updates): r = {s["r_overlap_vs_log_length"]:.2f}',
            '- for comparison, gain pass@1 against the expert\'s own pass@1 minus the base\'s '
            f'(on the teacher\'s domain): r = {s["r_gain_pass@1_vs_teacher_edge"]:.2f}']
  for direction in sorted({p['direction'] for p in points}):
    lines.append(f'- {direction} only (n = {s[f"{direction}: n"]}): gain pass@1 r = '
                 f'{s[f"{direction}: r_gain_pass@1"]:.2f}, gain avg@k r = '
                 f'{s[f"{direction}: r_gain_avg@k"]:.2f}; gain pass@1 against the expert\'s edge '
                 f'over the base: r = {s[f"{direction}: r_gain_pass@1_vs_teacher_edge"]:.2f}')
  return '\n'.join(lines + [''])
