"""File systems that refuse writes (issue 21, point 8): the tiny run on a read-only workdir, on a
disk too small for its base model, for its first checkpoint or for its third, on a disk that
fills up while metrics.jsonl is written, and with a TensorBoard events file that refuses writes.

Each probe mounts what it needs under the work folder (a read-only bind mount, a small tmpfs),
which takes root: without it the probes are reported as skipped, not as failures. A probe must
exit 2 with one `error:` line; the full disk must leave no half-written `base/` sibling, and
the checkpoints saved before the failed one must restore (the resume after freeing space
finishes from them); a full disk while logging must keep every whole line written before it.
The events-file probe injects the error (scripts/faults/full_disk_train.py) and needs no root.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import subprocess
import sys
from typing import Iterator

from scripts.faults import report, runs
from scripts.faults.cli import ROOT, is_logging_noise

# tmpfs sizes for the tiny run: its base/ takes about 144 KiB and each checkpoint about 336 KiB
# (train asks for 1.1 x the state's bytes + 64 KiB before a save), so 100 KiB cannot hold the
# base model and 1,000 KiB holds two checkpoints but not the third.
BASE_DOES_NOT_FIT = '100k'
FIRST_SAVE_DOES_NOT_FIT = '300k'
THIRD_SAVE_DOES_NOT_FIT = '1000k'
ROOM_FOR_THE_RUN = '16m'


def _mount(*args: str) -> bool:
  return subprocess.run(['mount', *args], capture_output=True).returncode == 0


@contextlib.contextmanager
def small_disk(path: str, size: str) -> Iterator[bool]:
  """A tmpfs of `size` at `path` inside the block; yields False when it cannot be mounted."""
  os.makedirs(path, exist_ok=True)
  mounted = _mount('-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', path)
  try:
    yield mounted
  finally:
    if mounted:
      subprocess.run(['umount', path], capture_output=True)


@contextlib.contextmanager
def read_only(path: str) -> Iterator[bool]:
  """`path` (an existing folder) read-only inside the block; False when it cannot be."""
  mounted = _mount('--bind', path, path)
  remounted = mounted and _mount('-o', 'remount,ro,bind', path)
  try:
    yield remounted
  finally:
    if mounted:
      subprocess.run(['umount', path], capture_output=True)


def _errors(result: subprocess.CompletedProcess) -> list[str]:
  return [l for l in result.stderr.splitlines() if not is_logging_noise(l)]


def probe_read_only(folder: str, env: dict) -> tuple[str, str, bool | None]:
  target = os.path.join(folder, 'read_only')
  os.makedirs(target, exist_ok=True)
  with read_only(target) as ok:
    if not ok:
      return 'skipped (no root: cannot mount read-only)', '', None
    result = runs.train_process(os.path.join(target, 'run'), env, ['--stop-after=1'])
  lines = _errors(result)
  held = result.returncode == 2 and len(lines) == 1 and 'cannot write there' in lines[0]
  return str(result.returncode), lines[-1] if lines else '', held


def probe_base_full(folder: str, env: dict) -> tuple[str, str, bool | None]:
  disk = os.path.join(folder, 'disk_base')
  with small_disk(disk, BASE_DOES_NOT_FIT) as ok:
    if not ok:
      return 'skipped (no root: cannot mount a tmpfs)', '', None
    result = runs.train_process(os.path.join(disk, 'run'), env, ['--stop-after=1'])
    left = sorted(os.listdir(disk))
  lines = _errors(result)
  held = (result.returncode == 2 and len(lines) == 1 and 'no space left on device' in lines[0]
          and not left)  # the claim removes the workdir it made; no .base.tmp-* sibling
  return str(result.returncode), (lines[-1] if lines else '') + (
      f' (left: {", ".join(left)})' if left else ''), held


def probe_save_full(folder: str, env: dict) -> tuple[str, str, bool | None]:
  disk = os.path.join(folder, 'disk_save')
  with small_disk(disk, THIRD_SAVE_DOES_NOT_FIT) as ok:
    if not ok:
      return 'skipped (no root: cannot mount a tmpfs)', '', None
    workdir = os.path.join(disk, 'run')
    result = runs.train_process(workdir, env, ['--stop-after=4'])
    kept = runs.committed_steps(workdir)
    copy = os.path.join(folder, 'save_full_copy')
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(workdir, copy)
  lines = _errors(result)
  resumed = runs.train_process(copy, env, ['--stop-after=4'])
  resumed_from = next((l for l in resumed.stdout.splitlines() if l.startswith('resumed from')),
                      '')
  held = (result.returncode == 3 and len(lines) == 1 and lines[0].startswith('stopped: ')
          and 'stopped before saving it' in lines[0] and kept == [0, 1]
          and resumed.returncode == 0
          and resumed_from.startswith('resumed from step 1'))
  return str(result.returncode), (lines[-1] if lines else '') + (
      f' (checkpoints kept: {kept}; on a larger disk: {resumed_from or "no resume"})'), held


def _full_disk_train(what: str, step: int, workdir: str, env: dict,
                     extra: list[str]) -> subprocess.CompletedProcess:
  """The tiny run whose disk fills from `step` on (scripts/faults/full_disk_train.py)."""
  argv = runs.train_argv(workdir, extra)
  argv = [sys.executable, '-m', 'scripts.faults.full_disk_train', what, str(step),
          *argv[argv.index('train') + 1:]]
  return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)


def _metric_steps(path: str) -> list[int] | None:
  """Steps of metrics.jsonl's records; None when a line does not read as one (a torn line)."""
  with open(path) as f:
    lines = f.read().splitlines()
  try:
    return [json.loads(line)['step'] for line in lines]
  except (ValueError, KeyError, TypeError):
    return None


def _whole_records(path: str) -> int | None:
  """Records of a TensorBoard events file (TFRecord framing); None when it ends in a torn one."""
  with open(path, 'rb') as f:
    data = f.read()
  at = count = 0
  while at < len(data):
    if at + 12 > len(data):
      return None
    length = struct.unpack('<Q', data[at:at + 8])[0]
    at += 12 + length + 4
    count += 1
  return count if at == len(data) else None


def probe_first_save_full(folder: str, env: dict) -> tuple[str, str, bool | None]:
  disk = os.path.join(folder, 'disk_first_save')
  with small_disk(disk, FIRST_SAVE_DOES_NOT_FIT) as ok:
    if not ok:
      return 'skipped (no root: cannot mount a tmpfs)', '', None
    workdir = os.path.join(disk, 'run')
    result = runs.train_process(workdir, env, ['--stop-after=2'])
    base_kept = os.path.isfile(os.path.join(workdir, 'base', 'config.json'))
    kept = runs.committed_steps(workdir)
    copy = os.path.join(folder, 'first_save_copy')
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(workdir, copy)
  lines = _errors(result)
  resumed = runs.train_process(copy, env, ['--stop-after=1'])
  line = lines[-1] if lines else ''
  held = (result.returncode == 2 and len(lines) == 1
          and 'no space left on device writing ' in line and '/checkpoints/0.' in line
          and 'MiB free of' in line and base_kept and kept == []
          and resumed.returncode == 0 and runs.committed_steps(copy) == [0])
  return str(result.returncode), line + (
      f' (base model kept: {"yes" if base_kept else "no"}; on a larger disk the same command '
      f'{"saves step 0" if runs.committed_steps(copy) == [0] else "fails"})'), held


def probe_metrics_full(folder: str, env: dict) -> tuple[str, str, bool | None]:
  """The 2-cycle tiny run whose disk fills inside a metrics.jsonl append (full_disk_train's
  trigger); after the filler is removed, the same command must resume and end as the
  uninterrupted run (parameters, merge, metrics, eval.json)."""
  disk = os.path.join(folder, 'disk_metrics')
  two_cycles = ['--config.copd.num_cycles=2']
  with small_disk(disk, ROOM_FOR_THE_RUN) as ok:
    if not ok:
      return 'skipped (no root: cannot mount a tmpfs)', '', None
    reference = runs.reference_run(folder, env, 'reference_two_cycles', two_cycles)
    workdir = os.path.join(disk, 'run')
    result = _full_disk_train('metrics', 1, workdir, env, two_cycles)
    path = os.path.join(workdir, 'metrics.jsonl')
    written = _metric_steps(path)
    kept = runs.committed_steps(workdir)
    filler = os.path.join(disk, 'filler.bin')
    if not os.path.exists(filler):   # the fill condition never came: report it, do not crash
      return str(result.returncode), (f'the disk was never filled (no metrics.jsonl record '
                                      f'outgrew its last page; metrics.jsonl steps {written}, '
                                      f'checkpoints {kept})'), False
    os.remove(filler)   # space freed: the same command resumes
    resumed = runs.train_process(workdir, env, two_cycles)
    differences = (runs.compare_runs(workdir, reference) if resumed.returncode == 0
                   else [f'the resume exited {resumed.returncode}'])
  filled = next((l.split(': ', 1)[1] for l in result.stderr.splitlines()
                 if l.startswith('full_disk_train:')), '')
  lines = [l for l in _errors(result) if not l.startswith('full_disk_train:')]
  line = lines[-1] if lines else ''
  held = (result.returncode == 2 and len(lines) == 1 and '/metrics.jsonl (' in line
          and 'MiB free of' in line and bool(written) and written == list(range(len(written)))
          and kept and kept[-1] == written[-1] and not differences)
  return str(result.returncode), line + (
      f' ({filled}; metrics.jsonl kept steps {written}, no torn line; checkpoints: {kept}; after '
      f'freeing space the same command resumed and ended '
      + ('identical to an uninterrupted run: params, merge, metrics, eval.json)' if not
         differences else f'differing: {"; ".join(differences)})')), held


def probe_events_full(folder: str, env: dict) -> tuple[str, str, bool | None]:
  workdir = os.path.join(folder, 'events_full')
  shutil.rmtree(workdir, ignore_errors=True)
  result = _full_disk_train('tensorboard', 1, workdir, env, ['--stop-after=3'])
  events = sorted(os.path.join(workdir, 'tensorboard', n)
                  for n in os.listdir(os.path.join(workdir, 'tensorboard')))
  records = [_whole_records(e) for e in events]
  written = _metric_steps(os.path.join(workdir, 'metrics.jsonl'))
  lines = _errors(result)
  line = lines[-1] if lines else ''
  held = (result.returncode == 2 and len(lines) == 1 and 'no space left on device writing ' in
          line and '/tensorboard/events.out.tfevents.' in line and None not in records
          and bool(written) and written == sorted(written))
  return str(result.returncode), line + (
      f' (events files read back whole: {records} records; metrics.jsonl steps: {written})'), held


PROBES = (('read-only workdir', probe_read_only),
          ("disk full while writing `base/` (tmpfs of 100 KiB)", probe_base_full),
          ('disk too small for the first checkpoint (tmpfs of 300 KiB)', probe_first_save_full),
          ('disk too small for the third checkpoint (tmpfs of 1,000 KiB)', probe_save_full),
          ('disk fills while a metrics.jsonl record is written (tmpfs of 16 MiB)',
           probe_metrics_full),
          ('TensorBoard events file refuses writes (ENOSPC) after step 1 (injected)',
           probe_events_full))


def markdown(folder: str) -> report.Section:
  env = runs.run_env(folder)
  lines = ['### File systems that refuse writes', '',
           '| # | probe | exit | what the program said | held |', '|---|---|---|---|---|']
  tried = held = 0
  for i, (label, probe) in enumerate(PROBES, 1):
    code, message, ok = probe(folder, env)
    message = report.without_folders(message, folder)
    if ok is not None:
      tried, held = tried + 1, held + ok
    lines.append(f'| {i} | {label} | {code} | `{report.cell(message, 600)}` | '
                 f'{"skipped" if ok is None else "yes" if ok else "no"}'
                 f'{report.check_failed(ok is not False)} |')
  rows = [('read-only workdir, disk full (base model, first and later checkpoint saves, '
           'metrics.jsonl, TensorBoard)', tried, held,
           'exit 2 with one `error:` line, or (no room for the next checkpoint) exit 3 with one '
           '`stopped:` line before the save; no half-written folder, no torn log line',
           'nothing: the checkpoints saved before resume; logs keep every whole line')]
  return '\n'.join(lines), held == tried, rows
