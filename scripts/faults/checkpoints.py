"""Corrupted checkpoints: the newest checkpoint (step 2) of a tiny run stopped after 3 steps is
damaged, then goes through `export-hf`, `merge` (both must refuse with one line naming it) and
`train` (must warn, resume from step 1 and end identical to an uninterrupted run). Bit flips
that Orbax cannot see are measured, not fixed."""
from __future__ import annotations

import dataclasses
import glob
import os
import random
import shutil
from typing import Callable, Sequence

from scripts.faults import report, runs
from scripts.faults.cli import ROOT, cli_subprocess


def largest_array_file(step_dir: str) -> str:
  """The largest of the step's array data files (OCDBT 'd/' blobs). Which arrays it holds
  depends on how Orbax's writers split the data between files, which varies from run to run."""
  files = glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'), recursive=True)
  return sorted((f for f in files if os.path.isfile(f)), key=os.path.getsize)[-1]


def _truncate(step_dir: str) -> None:
  f = largest_array_file(step_dir)
  os.truncate(f, os.path.getsize(f) // 2)


def _garbage(step_dir: str) -> None:
  f = largest_array_file(step_dir)
  size = os.path.getsize(f)
  with open(f, 'r+b') as h:
    h.seek(size // 4)
    h.write(random.Random(0).randbytes(size // 2))


def _bit_flips(step_dir: str) -> None:
  f = largest_array_file(step_dir)
  size = os.path.getsize(f)
  with open(f, 'r+b') as h:
    for offset in (size // 3, size // 2, 2 * size // 3):
      h.seek(offset)
      byte = h.read(1)[0]
      h.seek(offset)
      h.write(bytes([byte ^ 0x01]))


def _leftover_tmp(step_dir: str) -> None:
  """What a kill during an Orbax save of the next step leaves: a temporary folder."""
  parent, step = os.path.split(step_dir)
  partial = os.path.join(parent, f'{int(step) + 1}.orbax-checkpoint-tmp-1234567')
  os.makedirs(os.path.join(partial, 'state', 'd'))
  with open(os.path.join(partial, 'state', 'd', 'half'), 'wb') as f:
    f.write(b'\0' * 4096)


# name -> (damage applied to the newest step folder, whether that step becomes unreadable)
CORRUPTIONS: dict[str, tuple[Callable[[str], None], bool]] = {
    'truncate the largest array file to half': (_truncate, True),
    'overwrite half an array file with random bytes': (_garbage, True),
    'delete the meta item': (lambda d: shutil.rmtree(os.path.join(d, 'meta')), True),
    'empty the meta JSON file':
        (lambda d: open(os.path.join(d, 'meta', 'metadata'), 'w').close(), True),
    'delete the whole state item': (lambda d: shutil.rmtree(os.path.join(d, 'state')), True),
    'delete the state tree metadata (_METADATA)':
        (lambda d: os.remove(os.path.join(d, 'state', '_METADATA')), True),
    'leftover tmp folder of a newer, interrupted save': (_leftover_tmp, False),
}
# Damage Orbax cannot see: no checksum covers the compressed chunks (documented limitation).
UNDETECTED_CORRUPTIONS: dict[str, Callable[[str], None]] = {
    'flip one bit in 3 bytes of an array file': _bit_flips,
}


@dataclasses.dataclass
class CorruptionOutcome:
  name: str
  export_line: str
  export_code: int
  merge_line: str
  merge_code: int
  train_warning: str
  resumed_from: str
  problems: list[str]
  expected_unreadable: bool

  @property
  def ok(self) -> bool:
    refused = self.export_code == 2 and self.merge_code == 2
    return not self.problems and (refused or not self.expected_unreadable)


def partial_run(folder: str, env: dict[str, str]) -> str:
  """`folder`/partial: the tiny run stopped after 3 steps (checkpoints 0, 1, 2)."""
  partial = os.path.join(folder, 'partial')
  if runs.committed_steps(partial) != [0, 1, 2]:
    shutil.rmtree(partial, ignore_errors=True)
    runs.run_train(partial, env, ['--stop-after=3'])
  return partial


def damaged_copy(folder: str, name: str, partial: str,
                 damages: Sequence[Callable[[str], None]]) -> str:
  """`folder`/`name`: a copy of the partial run with these damages done to its step 2."""
  workdir = os.path.join(folder, name)
  shutil.rmtree(workdir, ignore_errors=True)
  shutil.copytree(partial, workdir)
  for damage in damages:
    damage(os.path.join(workdir, 'checkpoints', '2'))
  return workdir


def corruption_experiment(folder: str, names: Sequence[str] | None = None,
                          cache_dir: str | None = None,
                          log: Callable[[str], None] = print) -> list[CorruptionOutcome]:
  """A tiny run stopped after 3 steps; for each corruption, a copy with its newest checkpoint
  (step 2) damaged goes through export-hf, merge and then train to the end, compared with an
  uninterrupted run."""
  env = runs.run_env(folder, cache_dir)
  reference = runs.reference_run(folder, env)
  partial = partial_run(folder, env)
  outcomes = []
  for i, name in enumerate(names or list(CORRUPTIONS)):
    damage, unreadable = CORRUPTIONS[name]
    workdir = damaged_copy(folder, f'corrupt_{i}', partial, [damage])
    export_code, export_line = cli_subprocess(
        ['export-hf', '--checkpoint', workdir, '--branch', '0', '--out',
         os.path.join(folder, f'export_{i}')], env)
    merge_code, merge_line = cli_subprocess(
        ['merge', '--workdir', workdir, '--out', os.path.join(folder, f'merge_{i}')], env)
    for out in (f'export_{i}', f'merge_{i}'):
      shutil.rmtree(os.path.join(folder, out), ignore_errors=True)
    result = runs.run_train(workdir, env)
    text = result.stdout + result.stderr
    warning = next((l.strip() for l in text.splitlines() if 'unreadable checkpoint' in l
                    and 'falling back' in l), '')
    resumed = next((l.strip() for l in text.splitlines() if l.startswith('resumed from')), '')
    problems = runs.compare_runs(workdir, reference)
    if unreadable and not warning:
      problems.append('no fallback warning')
    expected = 'resumed from step 1' if unreadable else 'resumed from step 2'
    if not resumed.startswith(expected):
      problems.append(f'{resumed!r} (expected {expected!r})')
    outcomes.append(CorruptionOutcome(name, export_line, export_code, merge_line, merge_code,
                                      warning, resumed, problems, unreadable))
    log(f'{name}: {"ok" if outcomes[-1].ok else outcomes[-1].problems}')
  return outcomes


def undetected_corruption(folder: str) -> list[str]:
  """Parameters that differ after restoring a bit-flipped checkpoint without any error (the
  partial run of corruption_experiment must be in `folder`)."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  from etils import epath
  partial = os.path.join(folder, 'partial')
  workdir = damaged_copy(folder, 'bitflip', partial, list(UNDETECTED_CORRUPTIONS.values()))

  def restore(path):
    tree = ocp.StandardCheckpointHandler().metadata(epath.Path(path)).tree
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    return ocp.StandardCheckpointer().restore(path, target)

  ours = jax.tree_util.tree_leaves_with_path(
      restore(os.path.join(workdir, 'checkpoints', '2', 'state')))
  theirs = dict(jax.tree_util.tree_leaves_with_path(
      restore(os.path.join(partial, 'checkpoints', '2', 'state'))))
  return [jax.tree_util.keystr(p) for p, x in ours
          if not np.array_equal(np.asarray(x), np.asarray(theirs[p]))]


def markdown(folder: str) -> report.Section:
  """Every corruption of CORRUPTIONS through export-hf, merge and train, as a table, and the
  undetected bit flips."""
  outcomes = corruption_experiment(folder, log=report.log_stderr)
  lines = ['### Corrupted checkpoints (newest of steps 0-2 of a tiny run damaged)', '',
           '| # | damage to step 2 | `export-hf` (exit, line) | `merge` (exit, line) | '
           '`train` warning | `train` resumed | final params, merge, metrics, eval.json vs '
           'uninterrupted run |',
           '|---|---|---|---|---|---|---|']
  short = lambda text, limit: report.cell(report.without_folders(text, folder, ROOT), limit)
  for i, o in enumerate(outcomes, 1):
    lines.append(f'| {i} | {o.name} | {o.export_code}: `{short(o.export_line, 160)}` | '
                 f'{o.merge_code}: `{short(o.merge_line, 160)}` | '
                 f'`{short(o.train_warning, 200)}` | {o.resumed_from} | '
                 f'{"identical" if not o.problems else report.cell("; ".join(o.problems))} |')
  flipped = undetected_corruption(folder)
  lines += ['', f'Not detected: {", ".join(UNDETECTED_CORRUPTIONS)} restores without any error; '
            f'{len(flipped)} leaves differ from the saved values'
            + (f' ({report.cell(", ".join(flipped), 300)})' if flipped else '') + '.']
  rows = [('corrupted newest checkpoint', len(outcomes), sum(o.ok for o in outcomes),
           '`train` warns and resumes from the previous complete checkpoint (a leftover tmp folder '
           'is ignored); `export-hf` / `merge` exit 2 with one line naming the checkpoint',
           'nothing: final params, merge, metrics, eval.json identical to an uninterrupted run'),
          ('silent bit flips in an array file', len(UNDETECTED_CORRUPTIONS), 0,
           f'NOT detected: restores without error, {len(flipped)} leaves differ', 'those leaves')]
  return '\n'.join(lines), all(o.ok for o in outcomes), rows
