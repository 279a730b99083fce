"""What `train` does with its workdir before and after the run: take the workdir's lock, decide
whether this is a fresh start, a restart or a resume (copd_jax/run_owner.py), check that the
data files are those the newest checkpoint was trained on (copd_jax/data_digests.py), and
release the lock when the run ends, however it ends.

A start refused here, or one that fails before writing anything of its own (a bad data file),
leaves the workdir as it found it: a workdir this claim created is removed again, and in an
existing one only the lock file and run marker it added are.

Multi-process runs of one job: every process runs the read-only checks; process 0 alone
(primary=True) creates the workdir, takes the lock and writes the marker, so the job's processes
share one lock. A second job's process 0 is refused; its other processes then stop with it when
the distributed runtime loses process 0.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

from copd_jax import data_digests, run_owner, storage, workdir_lock
from copd_jax.errors import UserInputError


def _print_warning(message: str) -> None:
  print(message, file=sys.stderr)


def newest_meta(workdir: str) -> tuple[int, dict] | None:
  """(step, meta) of the newest checkpoint whose meta reads, or None."""
  from copd_jax import checkpoint as ckpt
  checkpointer = ckpt.RunCheckpointer(workdir, read_only=True)
  try:
    for step in reversed(checkpointer.all_steps()):
      try:
        return step, checkpointer.restore_meta(step)
      except Exception:  # a damaged checkpoint: restore() falls back past it later
        continue
    return None
  finally:
    checkpointer.close()


def _remove_own_leftovers(workdir: str, created: bool, before: set[str]) -> None:
  """After a failed start, while still holding the lock: removes the lock file and marker this
  claim added, and empty folders the run made, when nothing else was written (and the workdir,
  when the claim created it)."""
  if not storage.is_dir(workdir):
    return
  added = set(storage.listdir(workdir)) - before
  ours = {workdir_lock.LOCK_FILE, workdir_lock.LEASE_OBJECT, run_owner.RUN_MARKER}
  empty = {n for n in added if storage.is_dir(storage.join(workdir, n))
           and not storage.listdir(storage.join(workdir, n))}   # e.g. checkpoints/, made early
  if not added <= ours | empty:
    return
  for name in added - {workdir_lock.LEASE_OBJECT}:   # the lease goes with the lock's release
    storage.rmtree(storage.join(workdir, name))
  if created and not storage.listdir(workdir):
    storage.rmtree(workdir)


class WorkdirNotWritable(UserInputError):
  """A workdir that cannot be created or written (read-only file system, no permission)."""


def _make_and_lock(workdir: str):
  """Creates `workdir` if needed and takes its lock; a folder that cannot be written is refused
  with one line before anything else happens."""
  try:
    storage.makedirs(workdir)
    return workdir_lock.acquire(workdir)
  except OSError as e:
    raise WorkdirNotWritable(f'--workdir {workdir}: cannot write there ({e.strerror or e}'
                             f'{": " + str(e.filename) if e.filename else ""}); choose a '
                             'writable folder') from None


@contextlib.contextmanager
def claim(workdir: str, config, *, overwrite: bool = False, accept_changed_data: bool = False,
          primary: bool = True, log: Callable[[str], None] = _print_warning) -> Iterator[str]:
  """Holds `workdir` for the run of `config` inside the `with` block; yields the start mode
  ('fresh', 'restart' or 'resume'). Raises a UserInputError (one line) when the workdir is
  locked by another run, holds another run's files (unless `overwrite`), or a data file changed
  since the newest checkpoint (unless `accept_changed_data`)."""
  workdir = storage.resolve(workdir)
  created = not storage.exists(workdir)
  before = set() if created or not storage.is_dir(workdir) else set(storage.listdir(workdir))
  lock = None
  ok = False
  try:
    if not created and not storage.is_dir(workdir):
      raise run_owner.WorkdirInUse(f'--workdir {workdir}: is a file, not a folder')
    if primary:
      lock = _make_and_lock(workdir)
    mode = run_owner.start_mode(workdir, config, overwrite)
    if mode == 'resume':
      newest = newest_meta(workdir)
      if newest is not None:
        step, meta = newest
        data_digests.check_resume(meta.get(data_digests.META_KEY), config, step,
                                  accept_changed_data, log)
    elif primary:
      run_owner.write_marker(workdir, config)
    ok = True
    yield mode
  except BaseException:
    ok = False
    raise
  finally:
    if lock is not None:
      if not ok:
        _remove_own_leftovers(workdir, created, before)
      # A refused start leaves an existing lock file's holder record as it was.
      lock.release(restore_record=not ok and workdir_lock.LOCK_FILE in before)
