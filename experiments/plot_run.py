"""Figures of one training run from its metrics.jsonl: top-k overlap O_k and the symmetric-KL
estimate of every (student <- teacher) edge, and each branch's native reward, over steps.

  python -m experiments.plot_run --workdir runs/toy_copd --out experiments/results/toy_copd
"""
from __future__ import annotations

import argparse
import os
from collections import defaultdict

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

from copd_jax.metrics import read_metrics  # noqa: E402


def series(records: list[dict], prefix: str) -> dict[str, tuple[list[int], list[float]]]:
  """metric name suffix -> (steps, values) for every key starting with `prefix`."""
  out: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
  for r in records:
    for key, value in r.items():
      if key.startswith(prefix):
        steps, values = out[key[len(prefix):]]
        steps.append(r['step'])
        values.append(value)
  return dict(out)


def plot_run(workdir: str, out_prefix: str) -> list[str]:
  records = read_metrics(workdir)
  overlap_prefix = next((k.rsplit('/', 1)[0] + '/' for r in records for k in r
                         if k.startswith('behaviour/overlap_top')), None)
  panels = [('native/reward/', 'native reward (mean over rollouts)')]
  if overlap_prefix:
    panels += [(overlap_prefix, f'top-{overlap_prefix.split("top")[1][:-1]} overlap O_k'),
               ('behaviour/symmetric_kl/', 'symmetric KL estimate')]
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
  axes = [axes] if len(panels) == 1 else axes
  for ax, (prefix, title) in zip(axes, panels):
    for name, (steps, values) in sorted(series(records, prefix).items()):
      ax.plot(steps, values, marker='.', label=name)
    ax.set_title(title)
    ax.set_xlabel('global step')
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  path = out_prefix + '_curves.png'
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return [path]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--out', required=True, help='output path prefix')
  args = parser.parse_args()
  for path in plot_run(args.workdir, args.out):
    print(path)


if __name__ == '__main__':
  main()
