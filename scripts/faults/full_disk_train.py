"""`python -m scripts.faults.full_disk_train WHAT STEP ARGS...`: the command
`python -m copd_jax train ARGS...` with its disk running full from global step STEP on; exit
statuses and messages are the CLI's.

WHAT is `metrics`: the file system of `--workdir` is really filled (a filler file next to the
workdir, written until the disk refuses) inside the run's own append of a metrics.jsonl record,
right before its write, at the first record of a step >= STEP that cannot fit in the free bytes
of the file's last page. Why that trigger makes the append the write that fails:

* tmpfs (like any file system) hands out whole pages: once the filler holds every free page, a
  write can only use the slack of its file's last page, so a record longer than that slack
  needs one more page and fails, and a shorter one would succeed (so it is not a trigger);
* the record is the exact bytes the run appends (this wraps `copd_jax.metrics.append_whole`),
  so the comparison is exact, not a guess from earlier lines;
* nothing else writes in between: the checkpointer is first waited for (its save committed and
  the old checkpoints it deletes gone, which would free space again), and TensorBoard's pending
  events are flushed to disk before the fill.

Which step that is depends only on the run's record lengths, so for a seeded run it is the
same step every time; it is printed (`full_disk_train: ...` on stderr) with the record's length
and the slack. When no record from STEP on qualifies, the disk is never filled (and the probe
says so).

Or `tensorboard`: the TensorBoard events file alone refuses every write (ENOSPC) after step
STEP, since on a really full disk the synchronous metrics.jsonl append fails first.
"""
from __future__ import annotations

import errno
import json
import os
import sys

import tensorboardX.record_writer

import copd_jax.driver
import copd_jax.metrics
from copd_jax.__main__ import main
from copd_jax.step_hook import Hook, StepInfo

FILLER = 'filler.bin'
PAGE = 4096   # tmpfs allocates whole pages: a write into the last page's slack needs none


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


def last_page_slack(path: str) -> int:
  """Bytes a file can grow by without a new page (0 when it ends on a page boundary)."""
  return -os.path.getsize(path) % PAGE if os.path.exists(path) else 0


class MetricsDiskFill:
  """Fills the workdir's disk inside the append of the first metrics.jsonl record of a step >=
  `step` that is longer than the file's last-page slack (see the module docstring)."""

  def __init__(self, step: int, workdir: str):
    self.step, self.workdir = step, os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, 'metrics.jsonl')
    self.run = None      # the driver's Run (its checkpointer and metrics log), once set up
    self.filled = False

  def install(self) -> None:
    """Wraps the driver's run set-up (to reach the Run) and the metrics log's append."""
    setup_run, append_whole = copd_jax.driver.setup_run, copd_jax.metrics.append_whole

    def keeping_run(*args, **kwargs):
      self.run = setup_run(*args, **kwargs)
      return self.run

    def filling_append(path: str, data: bytes) -> None:
      if not self.filled and os.path.abspath(path) == self.path:
        self.before_append(data)
      append_whole(path, data)

    copd_jax.driver.setup_run = keeping_run
    copd_jax.metrics.append_whole = filling_append

  def before_append(self, data: bytes) -> None:
    step = json.loads(data)['step']
    if step < self.step:
      return
    self.run.checkpointer.wait()    # no save in flight, old checkpoints deleted
    self.run.metrics_log.flush()    # TensorBoard's events so far on disk
    slack = last_page_slack(self.path)
    if len(data) <= slack:          # it would fit without a new page: not this record
      return
    fill(os.path.dirname(self.workdir))
    self.filled = True
    print(f'full_disk_train: disk filled at the metrics.jsonl record of step {step} '
          f'({len(data):,} bytes; {slack:,} bytes left in the last page)', file=sys.stderr,
          flush=True)


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


class EventsRefuse(Hook):
  """From step `step` on, after a step and before the standard hooks log it, the TensorBoard
  events file refuses every write."""

  def __init__(self, step: int):
    self.step = step

  def after_step(self, info: StepInfo) -> None:
    if info.step >= self.step:
      _RefusingFile.full = True


def run(argv: list[str]) -> int:
  what, step, args = argv[0], int(argv[1]), argv[2:]
  if what == 'metrics':
    MetricsDiskFill(step, args[args.index('--workdir') + 1]).install()
    return main(['train', *args])
  if what == 'tensorboard':
    opened = tensorboardX.record_writer.open_file
    tensorboardX.record_writer.open_file = lambda path: _RefusingFile(opened(path))
    return main(['train', *args], hooks=[EventsRefuse(step)])
  raise SystemExit(f'WHAT must be metrics or tensorboard, got {what!r}')


if __name__ == '__main__':
  sys.exit(run(sys.argv[1:]))
