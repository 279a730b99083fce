"""overlap_low / overlap_high of the overlap-driven schedule, from the O_k that the fixed-ratio
runs measure, never from accuracy.

Rule (fixed before any overlap-driven run, the same for every seed): pool the logged
`behaviour/min_overlap` (the smallest O_k over the teaching edges: the quantity the schedule
reads) over every OPD step of every fixed-ratio sweep run of every seed, at the same budget;
overlap_low = its 25th percentile, overlap_high = its median. So the schedule starts distilling
once the branches have drifted into the lowest quarter of what the fixed schedules see when
they distil, and goes back to RL once the overlap is back at their median. The values are
written once to OUT/overlap_thresholds_u<U>.json with the data they came from, and reused from
there.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from experiments import methods as M

LOW_PERCENTILE, HIGH_PERCENTILE = 25, 50
KEY = 'behaviour/min_overlap'


def path(out: str, updates: int) -> str:
  return os.path.join(out, f'overlap_thresholds_u{updates}.json')


def sweep_overlaps(out: str, seeds: Sequence[int], updates: int) -> list[float] | None:
  """Every OPD step's min O_k of the sweep's runs; None while any (ratio, seed) run is missing."""
  values = []
  for ratio in M.PHASE_RATIOS:
    if M.phase_schedule(ratio, updates) is None:
      continue
    for seed in seeds:
      file = os.path.join(out, 'runs', f'seed{seed}', M.ratio_name(ratio, updates),
                          'metrics.jsonl')
      if not os.path.isfile(os.path.join(os.path.dirname(file), 'eval.json')):
        return None
      with open(file) as f:
        records = [json.loads(line) for line in f if line.strip()]
      values += [r[KEY] for r in records if r.get('phase_is_opd') == 1.0 and KEY in r]
  return values


def from_values(values: Sequence[float]) -> tuple[float, float]:
  """Pooled O_k values -> (overlap_low, overlap_high), 4 decimals."""
  low, high = np.percentile(np.asarray(values, np.float64), [LOW_PERCENTILE, HIGH_PERCENTILE])
  return round(float(low), 4), round(float(high), 4)


def load(out: str, updates: int) -> tuple[float, float] | None:
  """The recorded (overlap_low, overlap_high), or None before they are computed."""
  file = path(out, updates)
  if not os.path.isfile(file):
    return None
  with open(file) as f:
    data = json.load(f)
  return data['overlap_low'], data['overlap_high']


def load_or_compute(out: str, seeds: Sequence[int], updates: int) -> tuple[float, float] | None:
  """The recorded thresholds, or computes and records them once the whole sweep has run for
  every seed in `seeds` (the runner's call; tables and figures only `load`)."""
  recorded = load(out, updates)
  if recorded is not None:
    return recorded
  file = path(out, updates)
  values = sweep_overlaps(out, seeds, updates)
  if not values:
    return None
  low, high = from_values(values)
  os.makedirs(out, exist_ok=True)
  with open(file, 'w') as f:
    json.dump({'overlap_low': low, 'overlap_high': high, 'rule': __doc__.split('\n\n')[1],
               'seeds': list(seeds), 'updates_per_branch': updates, 'num_values': len(values),
               'percentiles_0_10_25_50_75_90_100': [round(float(v), 4) for v in np.percentile(
                   values, [0, 10, 25, 50, 75, 90, 100])]}, f, indent=1)
  return low, high
