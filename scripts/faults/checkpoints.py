"""Corrupted checkpoints: the newest checkpoint (step 2) of a tiny run stopped after 3 steps is
damaged, then goes through `export-hf` (branch 0), `merge` and `train`.

What each command must do follows from what the damage hit, read from the checkpoint's OCDBT
index (which byte range of which data file holds each array chunk), not from which file Orbax
happened to make largest: `train` (which restores the whole state) must warn and resume from
step 1 whenever anything it reads was hit, and end identical to an uninterrupted run;
`export-hf` and `merge` (which read only parameters) must refuse with one line naming the
checkpoint exactly when parameter chunks they read were hit, and otherwise write what the
undamaged checkpoint gives. Bit flips that leave every chunk decodable are caught by the
digests saved with the checkpoint (copd_jax/digests.py); plain Orbax restores them silently.
"""
from __future__ import annotations

import dataclasses
import os
import random
import shutil
from typing import Callable, Sequence

from scripts.faults import report, runs
from scripts.faults.cli import ROOT, cli_subprocess


# ---------------------------------------------------------------------------------------------
# Where the arrays lie on disk
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Chunk:
  """One stored array chunk: OCDBT key ('params.embed.value/0.0.0': array, then the chunk's
  index with the branch first) and its byte range in a data file."""
  key: str
  file: str
  offset: int
  length: int

  @property
  def array(self) -> str:
    return self.key.split('/', 1)[0]

  @property
  def branch(self) -> int:
    return int(self.key.split('/', 1)[1].split('.', 1)[0])

  @property
  def is_param(self) -> bool:
    return self.array.startswith('params.')


def array_chunks(step_dir: str) -> list[Chunk]:
  """The chunks of the step's 'state' item stored in data files (small chunks inline in the
  index are left out), from the newest version of its OCDBT index."""
  import tensorstore as ts
  state = os.path.join(step_dir, 'state')
  kvstore = ts.KvStore.open({'driver': 'file', 'path': state + os.sep}).result()
  newest = ts.ocdbt.dump(kvstore).result()['versions'][-1]
  if newest['root_height'] != 0:
    raise RuntimeError(f'{state}: OCDBT index of height {newest["root_height"]}; this harness '
                       'reads single-node indexes (tiny runs) only')
  node = ts.ocdbt.dump(kvstore, newest['root']['location']).result()
  chunks = []
  for entry in node['entries']:
    location = entry.get('indirect_value')
    if location is None:
      continue
    # 'value:PREFIX:d/NAME:OFFSET:LENGTH', PREFIX the folder of the writing process's store
    prefix, name, offset, length = location[len('value:'):].rsplit(':', 3)
    key = entry['key'].decode() if isinstance(entry['key'], bytes) else entry['key']
    chunks.append(Chunk(key, os.path.join(state, prefix, name), int(offset), int(length)))
  return sorted(chunks, key=lambda c: c.key)


def data_files(step_dir: str) -> list[str]:
  """Every file holding array chunks of the step."""
  return sorted({c.file for c in array_chunks(step_dir)})


# ---------------------------------------------------------------------------------------------
# Damages: each returns what it hit
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Hit:
  """What a damage hit: array chunks (keys), or the checkpoint's structure (an item or its
  metadata: nothing in it reads)."""
  chunks: frozenset[str] = frozenset()
  structure: bool = False

  def params(self, branch: int | None = None) -> list[str]:
    """Hit parameter chunks (of `branch`, or of any branch)."""
    return sorted(k for k in self.chunks if k.startswith('params.')
                  and (branch is None or k.split('/', 1)[1].split('.', 1)[0] == str(branch)))

  def describe(self) -> str:
    if self.structure:
      return 'checkpoint structure'
    if not self.chunks:
      return 'nothing the checkpoint reads'
    params = self.params()
    return (f'{_plural(len(params), "params chunk")} (branch 0: {len(self.params(0))}), '
            f'{_plural(len(self.chunks) - len(params), "optimizer / other chunk")}')


STRUCTURE = Hit(structure=True)


def _hit_ranges(step_dir: str, ranges: dict[str, tuple[int, int]]) -> Hit:
  """The chunks overlapping the damaged byte range [start, stop) of each file."""
  hit = [c.key for c in array_chunks(step_dir) if c.file in ranges
         and c.offset < ranges[c.file][1] and ranges[c.file][0] < c.offset + c.length]
  return Hit(frozenset(hit))


def _truncate_all(step_dir: str) -> Hit:
  ranges = {}
  for f in data_files(step_dir):
    size = os.path.getsize(f)
    ranges[f] = (size // 2, size)
  hit = _hit_ranges(step_dir, ranges)
  for f, (start, _) in ranges.items():
    os.truncate(f, start)
  return hit


def _garbage_all(step_dir: str) -> Hit:
  ranges = {}
  for f in data_files(step_dir):
    size = os.path.getsize(f)
    ranges[f] = (size // 4, size // 4 + size // 2)
  hit = _hit_ranges(step_dir, ranges)
  rng = random.Random(0)
  for f, (start, stop) in ranges.items():
    with open(f, 'r+b') as h:
      h.seek(start)
      h.write(rng.randbytes(stop - start))
  return hit


def _flip_bit(chunk: Chunk) -> None:
  """Flips the lowest bit of the chunk's middle byte."""
  offset = chunk.offset + chunk.length // 2
  with open(chunk.file, 'r+b') as h:
    h.seek(offset)
    byte = h.read(1)[0]
    h.seek(offset)
    h.write(bytes([byte ^ 0x01]))


def _first_chunk_per_array(chunks: Sequence[Chunk], count: int) -> list[Chunk]:
  picked: dict[str, Chunk] = {}
  for c in chunks:
    picked.setdefault(c.array, c)
  if len(picked) < count:
    raise RuntimeError(f'only {len(picked)} arrays with chunks in data files to flip bits in')
  return list(picked.values())[:count]


def _flip_params(step_dir: str) -> Hit:
  chunks = _first_chunk_per_array(
      [c for c in array_chunks(step_dir) if c.is_param and c.branch == 0], 3)
  for c in chunks:
    _flip_bit(c)
  return Hit(frozenset(c.key for c in chunks))


def _flip_optimizer(step_dir: str) -> Hit:
  (chunk,) = _first_chunk_per_array([c for c in array_chunks(step_dir) if not c.is_param], 1)
  _flip_bit(chunk)
  return Hit(frozenset([chunk.key]))


def _leftover_tmp(step_dir: str) -> Hit:
  """What a kill during an Orbax save of the next step leaves: a temporary folder."""
  parent, step = os.path.split(step_dir)
  partial = os.path.join(parent, f'{int(step) + 1}.orbax-checkpoint-tmp-1234567')
  os.makedirs(os.path.join(partial, 'state', 'd'))
  with open(os.path.join(partial, 'state', 'd', 'half'), 'wb') as f:
    f.write(b'\0' * 4096)
  return Hit()


def _structural(damage: Callable[[str], None]) -> Callable[[str], Hit]:
  def damaged(step_dir: str) -> Hit:
    damage(step_dir)
    return STRUCTURE
  return damaged


# name -> damage done to the newest step folder, returning what it hit
CORRUPTIONS: dict[str, Callable[[str], Hit]] = {
    'truncate every array data file to half': _truncate_all,
    'overwrite the middle half of every array data file with random bytes': _garbage_all,
    'delete the meta item': _structural(lambda d: shutil.rmtree(os.path.join(d, 'meta'))),
    'empty the meta JSON file':
        _structural(lambda d: open(os.path.join(d, 'meta', 'metadata'), 'w').close()),
    'delete the whole state item':
        _structural(lambda d: shutil.rmtree(os.path.join(d, 'state'))),
    'delete the state tree metadata (_METADATA)':
        _structural(lambda d: os.remove(os.path.join(d, 'state', '_METADATA'))),
    'leftover tmp folder of a newer, interrupted save': _leftover_tmp,
}
# Damage no reader of Orbax notices (no checksum covers the compressed chunks): only the digests.
BIT_FLIPS: dict[str, Callable[[str], Hit]] = {
    'flip one bit in 3 parameter chunks of branch 0': _flip_params,
    'flip one bit in one optimizer-state chunk': _flip_optimizer,
}
ALL_DAMAGES = {**CORRUPTIONS, **BIT_FLIPS}


@dataclasses.dataclass(frozen=True)
class Expected:
  """What each command must do with a damaged newest checkpoint."""
  train_falls_back: bool
  export_refuses: bool
  merge_refuses: bool


def expected(hit: Hit, export_branch: int) -> Expected:
  """train restores every chunk; export-hf reads the parameters of one branch; merge those of
  every branch."""
  return Expected(hit.structure or bool(hit.chunks),
                  hit.structure or bool(hit.params(export_branch)),
                  hit.structure or bool(hit.params()))


# ---------------------------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------------------------

EXPORT_BRANCH = 0


@dataclasses.dataclass
class CorruptionOutcome:
  name: str
  hit: Hit
  expected: Expected
  export_line: str
  export_code: int
  merge_line: str
  merge_code: int
  train_warning: str
  resumed_from: str
  problems: list[str]

  @property
  def ok(self) -> bool:
    return not self.problems


def partial_run(folder: str, env: dict[str, str]) -> str:
  """`folder`/partial: the tiny run stopped after 3 steps (checkpoints 0, 1, 2)."""
  partial = os.path.join(folder, 'partial')
  if runs.committed_steps(partial) != [0, 1, 2]:
    shutil.rmtree(partial, ignore_errors=True)
    runs.run_train(partial, env, ['--stop-after=3'])
  return partial


def damaged_copy(folder: str, name: str, partial: str,
                 damages: Sequence[Callable[[str], Hit]]) -> tuple[str, Hit]:
  """`folder`/`name`: a copy of the partial run with these damages done to its step 2, and
  what they hit together."""
  workdir = os.path.join(folder, name)
  shutil.rmtree(workdir, ignore_errors=True)
  shutil.copytree(partial, workdir)
  hits = [damage(os.path.join(workdir, 'checkpoints', '2')) for damage in damages]
  return workdir, Hit(frozenset().union(*(h.chunks for h in hits)),
                      any(h.structure for h in hits))


def _flat_params(tree) -> dict:
  from copd_jax import checkpoint as ckpt
  return dict(ckpt.flatten_paths(tree))


def _export_and_merge_checks(folder: str, i: int, workdir: str, partial: str, want: Expected,
                             env: dict[str, str]) -> tuple[int, str, int, str, list[str]]:
  """export-hf and merge of the damaged copy: their exit status and line, and the problems
  (a refusal that was not expected or the other way round; an output that differs from what
  the undamaged checkpoint gives)."""
  from copd_jax import checkpoint as ckpt
  from copd_jax.models import hf_io
  export_out, merge_out = os.path.join(folder, f'export_{i}'), os.path.join(folder, f'merge_{i}')
  export_code, export_line = cli_subprocess(
      ['export-hf', '--checkpoint', workdir, '--branch', str(EXPORT_BRANCH), '--out', export_out],
      env)
  merge_code, merge_line = cli_subprocess(['merge', '--workdir', workdir, '--out', merge_out],
                                          env)
  problems = []
  for command, code, refuses in (('export-hf', export_code, want.export_refuses),
                                 ('merge', merge_code, want.merge_refuses)):
    if code != (2 if refuses else 0):
      problems.append(f'{command} exit {code} (expected {2 if refuses else 0})')
  if export_code == 0 and not want.export_refuses:
    exported = _flat_params(hf_io.load_params(export_out))
    if runs.differing_leaves(exported, runs.branch_params(partial, EXPORT_BRANCH)):
      problems.append('export-hf output differs from the undamaged checkpoint\'s')
  if merge_code == 0 and not want.merge_refuses:
    merged = _flat_params(ckpt.load_params_checkpoint(merge_out)[0])
    if runs.differing_leaves(merged, reference_merge(folder, partial, env)):
      problems.append('merge output differs from the undamaged checkpoint\'s')
  for out in (export_out, merge_out):
    shutil.rmtree(out, ignore_errors=True)
  return export_code, export_line, merge_code, merge_line, problems


def reference_merge(folder: str, partial: str, env: dict[str, str]) -> dict:
  """The merge of the undamaged partial run (made once), flat {path: array}."""
  from copd_jax import checkpoint as ckpt
  out = os.path.join(folder, 'merge_undamaged')
  if not os.path.isdir(out):
    code, line = cli_subprocess(['merge', '--workdir', partial, '--out', out], env)
    if code != 0:
      raise RuntimeError(f'merge of the undamaged run failed ({code}): {line}')
  return _flat_params(ckpt.load_params_checkpoint(out)[0])


def corruption_experiment(folder: str, names: Sequence[str] | None = None,
                          cache_dir: str | None = None,
                          log: Callable[[str], None] = print) -> list[CorruptionOutcome]:
  """A tiny run stopped after 3 steps; for each damage of ALL_DAMAGES (or `names`), a copy with
  its newest checkpoint (step 2) damaged goes through export-hf, merge and then train to the
  end, compared with an uninterrupted run."""
  env = runs.run_env(folder, cache_dir)
  reference = runs.reference_run(folder, env)
  partial = partial_run(folder, env)
  outcomes = []
  for i, name in enumerate(names or list(ALL_DAMAGES)):
    workdir, hit = damaged_copy(folder, f'corrupt_{i}', partial, [ALL_DAMAGES[name]])
    want = expected(hit, EXPORT_BRANCH)
    export_code, export_line, merge_code, merge_line, problems = _export_and_merge_checks(
        folder, i, workdir, partial, want, env)
    result = runs.run_train(workdir, env)
    text = result.stdout + result.stderr
    warning = next((l.strip() for l in text.splitlines() if 'unreadable checkpoint' in l
                    and 'falling back' in l), '')
    resumed = next((l.strip() for l in text.splitlines() if l.startswith('resumed from')), '')
    problems += runs.compare_runs(workdir, reference)
    if want.train_falls_back != bool(warning):
      problems.append('no fallback warning' if want.train_falls_back else
                      'an unexpected fallback warning')
    expected_resume = 'resumed from step 1' if want.train_falls_back else 'resumed from step 2'
    if not resumed.startswith(expected_resume):
      problems.append(f'{resumed!r} (expected {expected_resume!r})')
    outcomes.append(CorruptionOutcome(name, hit, want, export_line, export_code, merge_line,
                                      merge_code, warning, resumed, problems))
    log(f'{name}: {"ok" if outcomes[-1].ok else outcomes[-1].problems}')
  return outcomes


def silent_in_orbax(folder: str, name: str) -> tuple[str, list[str]]:
  """Restores a copy of the partial run damaged by BIT_FLIPS[name] with plain Orbax (no digest
  check): ('restored' or the error it raised, the state leaves that differ from the saved
  values). The partial run of corruption_experiment must be in `folder`."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  from etils import epath
  partial = os.path.join(folder, 'partial')
  workdir, _ = damaged_copy(folder, 'bitflip', partial, [BIT_FLIPS[name]])

  def restore(path):
    tree = ocp.StandardCheckpointHandler().metadata(epath.Path(path)).tree
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    return ocp.StandardCheckpointer().restore(path, target)

  try:
    ours = jax.tree_util.tree_leaves_with_path(
        restore(os.path.join(workdir, 'checkpoints', '2', 'state')))
  except Exception as e:  # noqa: BLE001 -- the report says what plain Orbax raised
    return f'{type(e).__name__}', []
  theirs = dict(jax.tree_util.tree_leaves_with_path(
      restore(os.path.join(partial, 'checkpoints', '2', 'state'))))
  return 'restored', [jax.tree_util.keystr(p) for p, x in ours
                      if not np.array_equal(np.asarray(x), np.asarray(theirs[p]))]


def _plural(n: int, word: str) -> str:
  return f'{n} {word}' + ('' if n == 1 else 's')


def _expectation_cell(o: CorruptionOutcome) -> str:
  refuse = lambda r: 'refuses' if r else 'succeeds'
  return (f'train {"falls back" if o.expected.train_falls_back else "resumes at 2"}, export '
          f'{refuse(o.expected.export_refuses)}, merge {refuse(o.expected.merge_refuses)}')


def markdown(folder: str) -> report.Section:
  """Every damage of ALL_DAMAGES through export-hf, merge and train, as a table, and what plain
  Orbax makes of the bit flips."""
  outcomes = corruption_experiment(folder, log=report.log_stderr)
  lines = ['### Corrupted checkpoints (newest of steps 0-2 of a tiny run damaged)', '',
           f'`export-hf` exports branch {EXPORT_BRANCH}; "hit" is read from the checkpoint\'s '
           'OCDBT index before the damage (which chunks lie in the damaged byte ranges), and '
           'sets what each command must do.', '',
           '| # | damage to step 2 | hit | expected | `export-hf` (exit, line) | `merge` (exit, '
           'line) | `train` warning | `train` resumed | checks (final params, merge, metrics, '
           'eval.json vs uninterrupted run; outputs vs undamaged checkpoint) |',
           '|---|---|---|---|---|---|---|---|---|']
  short = lambda text, limit: report.cell(report.without_folders(text, folder, ROOT), limit)
  for i, o in enumerate(outcomes, 1):
    lines.append(f'| {i} | {o.name} | {o.hit.describe()} | {_expectation_cell(o)} | '
                 f'{o.export_code}: `{short(o.export_line, 160)}` | '
                 f'{o.merge_code}: `{short(o.merge_line, 160)}` | '
                 f'`{short(o.train_warning, 200)}` | {o.resumed_from} | '
                 f'{"all held" if o.ok else report.cell("; ".join(o.problems))} |')
  lines += ['', 'The same bit flips restored with plain Orbax (no digest check):', '']
  for name in BIT_FLIPS:
    status, leaves = silent_in_orbax(folder, name)
    differ = 'state leaf differs' if len(leaves) == 1 else 'state leaves differ'
    what = (f'restores without any error; {len(leaves)} {differ} from the saved values'
            + (f' ({report.cell(", ".join(leaves), 300)})' if leaves else '')
            if status == 'restored' else f'raises {status}')
    lines.append(f'* {name}: {what}.')
  flips = [o for o in outcomes if o.name in BIT_FLIPS]
  damaged = [o for o in outcomes if o.name not in BIT_FLIPS]
  rows = [('corrupted newest checkpoint', len(damaged), sum(o.ok for o in damaged),
           '`train` warns and resumes from the previous complete checkpoint (a leftover tmp folder '
           'is ignored); `export-hf` / `merge` exit 2 with one line naming the checkpoint when '
           'parameter chunks they read were hit',
           'nothing: final params, merge, metrics, eval.json identical to an uninterrupted run'),
          ('silent bit flips in array chunks', len(flips), sum(o.ok for o in flips),
           'caught by the digests saved with each checkpoint: `train` falls back; `export-hf` / '
           '`merge` refuse when parameters were flipped, else write what the undamaged '
           'checkpoint gives', 'nothing')]
  return '\n'.join(lines), all(o.ok for o in outcomes), rows
