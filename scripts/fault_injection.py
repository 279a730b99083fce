#!/usr/bin/env python
"""Fault injection for copd_jax: bad configs, bad data files, corrupted checkpoints, adversarial
model outputs, and random SIGKILLs of a tiny toy run. Every mode prints markdown: what was
tried, what the program did (its actual one-line message), and whether anything was lost.

  python scripts/fault_injection.py inputs                  # bad configs and data files
  python scripts/fault_injection.py checkpoints             # corrupt, then train / export / merge
  python scripts/fault_injection.py nan                     # NaN in one branch: the guard
  python scripts/fault_injection.py rewards [--completions 1000]
  python scripts/fault_injection.py kills [--kills 5] [--seed 0]
  python scripts/fault_injection.py workdirs                # data loss: outputs, locks, resumes
  python scripts/fault_injection.py disks                   # read-only / full disks (needs root)
  python scripts/fault_injection.py all                     # everything (docs/reliability.md)

The cases live in scripts/faults/, one module per fault kind (configs, data_files, checkpoints,
nan_guard, rewards, kills, workdirs, disks); this file only parses the command line and prints the
report.
`kills` runs the tiny toy experiment of tests/test_driver.py (TINY, plus --cycles) once
uninterrupted, then again while killing it with SIGKILL at random points and resuming, and
checks that every output equals the uninterrupted run's (see scripts/faults/kills.py).

Exit status: 0 when every check held, 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from scripts.faults import (checkpoints, configs, data_files, disks,  # noqa: E402
                            kills, model_inputs, nan_guard, report, rewards, workdirs)
from scripts.faults.cli import IN_PROCESS_DEVICES  # noqa: E402

MODES = ('inputs', 'checkpoints', 'nan', 'rewards', 'kills', 'workdirs', 'disks')


def section(mode: str, folder: str, args: argparse.Namespace) -> report.Section:
  """The report section of one mode, run in `folder`."""
  if mode == 'inputs':
    return report.join_sections([configs.markdown(folder), data_files.markdown(folder),
                                 model_inputs.markdown(folder)])
  if mode == 'checkpoints':
    return checkpoints.markdown(folder)
  if mode == 'nan':
    return nan_guard.markdown(folder)
  if mode == 'rewards':
    return rewards.markdown(args.completions, args.seed)
  if mode == 'workdirs':
    return workdirs.markdown(folder)
  if mode == 'disks':
    return disks.markdown(folder)
  return kills.markdown(folder, args.kills, args.seed, args.cycles)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('mode', choices=(*MODES, 'all'))
  parser.add_argument('--folder', default=None, help='work folder (default: a new temp folder)')
  parser.add_argument('--kills', type=int, default=5)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--cycles', type=int, default=2, help='num_cycles of the killed run')
  parser.add_argument('--completions', type=int, default=1000)
  args = parser.parse_args(argv)
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_'
                             f'device_count={IN_PROCESS_DEVICES}').strip()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  folder = os.path.abspath(args.folder or tempfile.mkdtemp(prefix='copd_fault_injection_'))
  os.makedirs(folder, exist_ok=True)
  print(f'work folder: {folder}', file=sys.stderr)
  sections = []
  for mode in MODES if args.mode == 'all' else (args.mode,):
    sections.append(section(mode, folder, args))
    print(f'{mode} done', file=sys.stderr, flush=True)
  text, ok, rows = report.join_sections(sections)
  print(report.summary_markdown(rows) + '\n\n' + text + '\n')
  print(f'overall: {"every check held" if ok else "SOME CHECKS FAILED"}')
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(main())
