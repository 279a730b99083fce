"""`python -m scripts.faults.full_disk_train WHAT STEP ARGS...`: the command
`python -m copd_jax train ARGS...` with its disk running full after global step STEP (before
that step's metrics are logged); exit statuses and messages are the CLI's.

WHAT is `metrics`: the file system of `--workdir` is really filled (a filler file next to the
workdir, written until the disk refuses) at the first step from STEP on where (a) no checkpoint
save is still being written and (b) the next metrics.jsonl line cannot fit in the slack of the
file's last page (shorter than any line so far): so the next metrics.jsonl append is the write
that fails. Or `tensorboard`: the TensorBoard events file alone refuses every write from then on
(ENOSPC), since on a really full disk the synchronous metrics.jsonl append fails first.
"""
from __future__ import annotations

import errno
import glob
import os
import sys
import time

import tensorboardX.record_writer

from copd_jax.__main__ import main
from copd_jax.step_hook import Hook, StepInfo

FILLER = 'filler.bin'


def fill(folder: str) -> None:
  """Writes `folder`/FILLER until its file system has no room left."""
  block = b'\0' * (64 << 10)
  fd = os.open(os.path.join(folder, FILLER), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
  try:
    while True:
      try:
        os.write(fd, block)
      except OSError as e:
        if e.errno != errno.ENOSPC:
          raise
        if len(block) == 1:
          return
        block = block[:len(block) // 2]   # the last few pages too
  finally:
    os.close(fd)


class _RefusingFile:
  """A file object of the events writer that raises ENOSPC once `full` is set."""

  full = False

  def __init__(self, inner):
    self._inner = inner

  def _check(self) -> None:
    if _RefusingFile.full:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  def write(self, data):
    self._check()
    return self._inner.write(data)

  def flush(self):
    self._check()
    return self._inner.flush()

  def fileno(self):
    return self._inner.fileno()

  def close(self):
    return self._inner.close()


PAGE = 4096   # tmpfs allocates whole pages: a line that fits the last page's slack needs none


def saves_in_flight(workdir: str) -> bool:
  return bool(glob.glob(os.path.join(workdir, 'checkpoints', '*.orbax-checkpoint-tmp*')))


def metrics_slack(workdir: str) -> tuple[int, int]:
  """(free bytes in metrics.jsonl's last page, its shortest line; 0 when it has none)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return 0, 0
  with open(path, 'rb') as f:
    data = f.read()
  lines = [len(l) + 1 for l in data.splitlines()]
  return -len(data) % PAGE, min(lines, default=0)


class DiskFills(Hook):
  """From step `step` on, after a step and before the standard hooks log it: the disk is full
  (once; see the module docstring for when exactly)."""

  def __init__(self, what: str, step: int, workdir: str):
    self.what, self.step, self.workdir = what, step, os.path.abspath(workdir)
    self.done = False

  def after_step(self, info: StepInfo) -> None:
    if self.done or info.step < self.step:
      return
    if self.what == 'tensorboard':
      _RefusingFile.full = self.done = True
      return
    deadline = time.monotonic() + 120
    while saves_in_flight(self.workdir) and time.monotonic() < deadline:
      time.sleep(0.2)
    slack, shortest = metrics_slack(self.workdir)
    if slack < shortest or not shortest:
      fill(os.path.dirname(self.workdir))
      print(f'full_disk_train: disk filled after step {info.step}', file=sys.stderr)
      self.done = True


def run(argv: list[str]) -> int:
  what, step, args = argv[0], int(argv[1]), argv[2:]
  if what not in ('metrics', 'tensorboard'):
    raise SystemExit(f'WHAT must be metrics or tensorboard, got {what!r}')
  if what == 'tensorboard':
    opened = tensorboardX.record_writer.open_file
    tensorboardX.record_writer.open_file = lambda path: _RefusingFile(opened(path))
  workdir = args[args.index('--workdir') + 1]
  return main(['train', *args], hooks=[DiskFills(what, step, workdir)])


if __name__ == '__main__':
  sys.exit(run(sys.argv[1:]))
