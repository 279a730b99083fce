"""`python -m scripts.faults.full_disk_train WHAT STEP ARGS...`: the command
`python -m copd_jax train ARGS...` with its disk running full after global step STEP (before
that step's metrics are logged); exit statuses and messages are the CLI's.

WHAT is `metrics`: the file system of `--workdir` is really filled (a filler file next to the
workdir, written until the disk refuses), so the next metrics.jsonl append is the write that
fails; or `tensorboard`: the TensorBoard events file alone refuses every write from then on
(ENOSPC), since on a really full disk the synchronous metrics.jsonl append always fails first.
"""
from __future__ import annotations

import errno
import os
import sys

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


class DiskFills(Hook):
  """After step `step`, before the standard hooks log it: the disk is full."""

  def __init__(self, what: str, step: int, workdir: str):
    self.what, self.step, self.workdir = what, step, workdir

  def after_step(self, info: StepInfo) -> None:
    if info.step != self.step:
      return
    if self.what == 'metrics':
      fill(os.path.dirname(os.path.abspath(self.workdir)))
    else:
      _RefusingFile.full = True


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
