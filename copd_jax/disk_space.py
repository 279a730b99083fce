"""A full disk (or an exceeded quota) as one line instead of a cascade of tracebacks.

Writers report it in many shapes: an OSError with errno ENOSPC / EDQUOT, safetensors'
SafetensorError ("No space left on device (os error 28)"), TensorStore's RESOURCE_EXHAUSTED
inside Orbax's background save threads (each logged by absl with its traceback, then raised
again by the next wait). `out_of_space` recognises them anywhere in an exception's chain; the
CLI prints `describe(e)` and exits 2. Before each checkpoint save after the first,
`check_room_for_checkpoint` stops the run (exit 3, one `stopped:` line) when the disk cannot
hold another checkpoint the size of the newest, so that the usual case (a disk filling up over a
long run) never starts a save that fails halfway. The absl filter drops Orbax's logged copies
of the same error, so the one line is all the user sees. Checkpoints committed before a failed
save are untouched (Orbax writes each step under a temporary name and removes those at the next
start).
"""
from __future__ import annotations

import errno
import logging
import re

from copd_jax.errors import TrainingHalted

_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_MARKERS = ('No space left on device', 'Disk quota exceeded', 'os error 28', 'os error 122',
            "os_error_code='28'")
_QUOTED_PATH = re.compile(r'"(/[^"]+)"')


def _chain(error: BaseException):
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def out_of_space(error: BaseException) -> bool:
  """Whether `error`, or an error it was raised from, is a full disk or an exceeded quota."""
  return any((isinstance(e, OSError) and e.errno in _ERRNOS)
             or any(m in str(e) for m in _MARKERS) for e in _chain(error))


def failed_path(error: BaseException) -> str:
  """The path a full-disk error names (an OSError's filename, or a quoted path in its text), or
  '' when it names none."""
  for e in _chain(error):
    if isinstance(e, OSError) and e.filename:
      return str(e.filename)
    match = _QUOTED_PATH.search(str(e))
    if match:
      return match.group(1)
  return ''


def free_space(path: str) -> str:
  """'N MiB free of M MiB' on the file system holding `path` (its nearest existing folder), or
  '' when that cannot be told."""
  import os
  import shutil
  folder = path
  while folder and not os.path.isdir(folder):
    parent = os.path.dirname(folder.rstrip('/'))
    folder = '' if parent == folder else parent
  try:
    usage = shutil.disk_usage(folder)
  except (OSError, ValueError):
    return ''
  return f'{usage.free / 2**20:,.1f} MiB free of {usage.total / 2**20:,.1f} MiB'


def describe(error: BaseException) -> str:
  """One line: where the write failed and how much room its file system has, when the error
  names the path, and what to do."""
  path = failed_path(error)
  room = free_space(path) if path else ''
  where = f' writing {path}' + (f' ({room} on its file system)' if room else '') if path else ''
  return (f'no space left on device{where}; what was saved before (checkpoints, base model, '
          'metrics) is intact: free space and run the command again (train resumes from its '
          'newest checkpoint)')


class _SameErrorLogged(logging.Filter):
  """Drops absl records of Orbax's background threads that carry a full-disk error."""

  def filter(self, record: logging.LogRecord) -> bool:
    if any(m in record.getMessage() for m in _MARKERS):
      return False
    exc = record.exc_info[1] if record.exc_info else None
    return not (exc is not None and out_of_space(exc))


logging.getLogger('absl').addFilter(_SameErrorLogged())


class NotEnoughSpace(TrainingHalted):
  """Too little free space for the next checkpoint: the run stops before starting the save
  (exit 3), so the committed checkpoints stay as they are and no save fails halfway."""


# Headroom over the newest checkpoint's bytes: a state that grew, file-system blocks.
CHECKPOINT_OVERHEAD = 1.1
CHECKPOINT_SLACK_BYTES = 64 << 10


def folder_bytes(folder: str) -> int:
  """Bytes of the files under a local folder."""
  import os
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(folder) for name in names)


def check_room_for_checkpoint(directory: str, state_bytes: int, step: int) -> None:
  """Stops the run (NotEnoughSpace) when `directory`'s file system has less free space than a
  checkpoint of `state_bytes` (the previous one's size) needs. Local paths only; object stores
  have no free-space query. The first save has no estimate and is not checked."""
  import shutil
  try:
    free = shutil.disk_usage(directory).free
  except OSError:
    return  # cannot tell: let the save try
  need = int(state_bytes * CHECKPOINT_OVERHEAD) + CHECKPOINT_SLACK_BYTES
  if free < need:
    raise NotEnoughSpace(f'{directory}: {free / 2**20:,.1f} MiB free, the checkpoint of step '
                         f'{step} needs about {need / 2**20:,.1f} MiB; stopped before saving it. '
                         'The checkpoints saved so far are intact: free space and run the same '
                         'command to resume')
