"""Whose run a workdir holds, so a fresh start never deletes another run's logs.

A `train` that starts in a workdir without a checkpoint writes RUN_MARKER (the run's config) at
once. Later starts in that workdir decide from what is there:

- 'resume': the workdir has a checkpoint (its config is checked against this run's by the
  driver, which refuses a different run).
- 'fresh': the workdir does not exist or is empty (the lock file aside).
- 'restart': no checkpoint yet, but RUN_MARKER records this run's config: the same run killed
  before its first checkpoint, which starts again (its partial metrics.jsonl is replaced).
- anything else (files of another run, a marker of another config) is refused with one line,
  unless the user passes --overwrite: the run then starts there and replaces metrics.jsonl.
"""
from __future__ import annotations

import datetime
import json
from typing import Any

from copd_jax import storage
from copd_jax.checkpoint import CHECKPOINTS_SUBDIR
from copd_jax.config import resume_differences
from copd_jax.errors import UserInputError
from copd_jax.workdir_lock import LEASE_OBJECT, LOCK_FILE

RUN_MARKER = 'copd_run.json'
IGNORED = frozenset({LOCK_FILE, LEASE_OBJECT})


class WorkdirInUse(UserInputError):
  """A workdir holding another run's files; the message says what is there."""


def _entries(workdir: str) -> list[str]:
  return [n for n in storage.listdir(workdir) if n not in IGNORED] \
      if storage.is_dir(workdir) else []


def has_checkpoint(workdir: str) -> bool:
  """Whether the workdir has a committed step folder (a plain integer name)."""
  folder = storage.join(workdir, CHECKPOINTS_SUBDIR)
  return storage.is_dir(folder) and any(n.isdigit() for n in storage.listdir(folder))


def read_marker(workdir: str) -> dict[str, Any] | None:
  path = storage.join(workdir, RUN_MARKER)
  if not storage.is_file(path):
    return None
  try:
    record = json.loads(storage.read_text(path))
  except ValueError:
    return None
  return record if isinstance(record, dict) and isinstance(record.get('config'), dict) else None


def start_mode(workdir: str, config, overwrite: bool) -> str:
  """'fresh', 'restart' or 'resume' (see the module docstring); raises WorkdirInUse for a
  workdir that holds something else, unless `overwrite`."""
  entries = _entries(workdir)
  if not entries:
    return 'fresh'
  if has_checkpoint(workdir):
    return 'resume'
  marker = read_marker(workdir)
  if marker is not None:
    changed, _ = resume_differences(marker['config'], config.to_dict())
    if not changed or overwrite:
      return 'restart'
    raise WorkdirInUse(
        f'--workdir {workdir}: holds the start of another run (no checkpoint yet; {changed[0]} '
        f'differs{f" and {len(changed) - 1} more field(s)" if len(changed) > 1 else ""}); '
        'use a new --workdir, or pass --overwrite to start this run there (replacing its '
        'metrics.jsonl)')
  if overwrite:
    return 'restart'
  shown = ', '.join(entries[:5]) + (', ...' if len(entries) > 5 else '')
  raise WorkdirInUse(f'--workdir {workdir}: not empty ({shown}) and holds no checkpoint or '
                     f'{RUN_MARKER} of this run; use an empty --workdir, or pass --overwrite to '
                     'start this run there (replacing its metrics.jsonl)')


def write_marker(workdir: str, config) -> None:
  """Records that `workdir` holds the run of `config`."""
  record = {'config': config.to_dict(),
            'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}
  storage.write_text(storage.join(workdir, RUN_MARKER), json.dumps(record, default=str,
                                                                   sort_keys=True))
