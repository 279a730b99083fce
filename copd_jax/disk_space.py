"""A full disk (or an exceeded quota) as one line instead of a cascade of tracebacks.

Writers report it in many shapes: an OSError with errno ENOSPC / EDQUOT, safetensors'
SafetensorError ("No space left on device (os error 28)"), TensorStore's RESOURCE_EXHAUSTED
inside Orbax's background save threads (each logged by absl with its traceback, then raised
again by the next wait). `out_of_space` recognises them anywhere in an exception's chain; the
CLI prints `describe(e)` and exits 2. The absl filter drops Orbax's logged copies of the same
error, so the one line is all the user sees. Checkpoints committed before the failed save are
untouched (Orbax writes each step under a temporary name and removes those at the next start).
"""
from __future__ import annotations

import errno
import logging
import re

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


def describe(error: BaseException) -> str:
  """One line: where the write failed, when the error names it, and what to do."""
  where = ''
  for e in _chain(error):
    if isinstance(e, OSError) and e.filename:
      where = f' writing {e.filename}'
      break
    match = _QUOTED_PATH.search(str(e))
    if match:
      where = f' writing {match.group(1)}'
      break
  return (f'no space left on device{where}; what was saved before (checkpoints, base model) is '
          'intact: free space and run the command again (train resumes from its newest '
          'checkpoint)')


class _SameErrorLogged(logging.Filter):
  """Drops absl records of Orbax's background threads that carry a full-disk error."""

  def filter(self, record: logging.LogRecord) -> bool:
    if any(m in record.getMessage() for m in _MARKERS):
      return False
    exc = record.exc_info[1] if record.exc_info else None
    return not (exc is not None and out_of_space(exc))


logging.getLogger('absl').addFilter(_SameErrorLogged())
