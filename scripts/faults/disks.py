"""File systems that refuse writes (issue 21, point 8): the tiny run on a read-only workdir, on a
disk too small for its base model, and on a disk that fills up during its third checkpoint save.

Each probe mounts what it needs under the work folder (a read-only bind mount, a small tmpfs),
which takes root: without it the probes are reported as skipped, not as failures. A probe must
exit 2 with one `error:` line; the full disk must leave no half-written `base/` sibling, and
the checkpoints saved before the failed one must restore (the resume after freeing space
finishes from them).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from typing import Iterator

from scripts.faults import report, runs
from scripts.faults.cli import is_logging_noise

# tmpfs sizes for the tiny run: its base/ takes about 144 KiB and each checkpoint about 336 KiB
# (train asks for 1.1 x the state's bytes + 64 KiB before a save), so 100 KiB cannot hold the
# base model and 1,000 KiB holds two checkpoints but not the third.
BASE_DOES_NOT_FIT = '100k'
THIRD_SAVE_DOES_NOT_FIT = '1000k'


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


PROBES = (('read-only workdir', probe_read_only),
          ("disk full while writing `base/` (tmpfs of 100 KiB)", probe_base_full),
          ('disk too small for the third checkpoint (tmpfs of 1,000 KiB)', probe_save_full))


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
    lines.append(f'| {i} | {label} | {code} | `{report.cell(message, 300)}` | '
                 f'{"skipped" if ok is None else "yes" if ok else "no"}'
                 f'{report.check_failed(ok is not False)} |')
  rows = [('read-only workdir, disk full (base model, checkpoint save)', tried, held,
           'exit 2 with one `error:` line, or (no room for the next checkpoint) exit 3 with one '
           '`stopped:` line before the save; no half-written folder', 'nothing: the '
           'checkpoints saved before resume')]
  return '\n'.join(lines), held == tried, rows
