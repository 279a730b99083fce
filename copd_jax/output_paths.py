"""Output folders of `merge` and `export-hf`: which paths they may write, and which existing
folders `--overwrite` may replace.

Two rules keep a command from deleting what it reads or what it did not write:

- An output path must not be, contain, or lie inside any input (a run workdir, a checkpoint, a
  base or HF folder): replacing it would delete the input (with a parent folder, sibling runs
  too). `check_not_overlapping` compares resolved paths (symlinks followed for local ones).
- Every output folder carries a small marker file (OUTPUT_MARKER, JSON naming the command that
  wrote it), written inside the folder while it is built, so it appears together with the
  output. `--overwrite` replaces an existing path only when it is a folder whose marker names
  the same command (`check_replaceable`); anything else (a folder of other files, a file, an
  older output without a marker) is refused, to be removed by hand if that is really meant.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
from typing import Iterable

from copd_jax import storage
from copd_jax.errors import UserInputError

OUTPUT_MARKER = '.copd_jax_output.json'


class OutputPathError(UserInputError):
  """An output path that would overwrite an input or something this command did not write."""


def _canonical(path: str) -> str:
  """Resolved path: remote URLs without a trailing '/', local ones absolute with symlinks
  followed (so a link to an input is still that input)."""
  path = storage.resolve(path)
  return path if storage.is_remote(path) else os.path.realpath(path)


def _inside(child: str, parent: str) -> bool:
  """Whether canonical `child` is `parent` or lies below it."""
  return child == parent or child.startswith(parent.rstrip('/' + os.sep) + (
      '/' if storage.is_remote(parent) else os.sep))


def overlap(out: str, source: str) -> str | None:
  """How output `out` overlaps input `source` ('is', 'contains', 'lies inside'), or None."""
  o, s = _canonical(out), _canonical(source)
  if o == s:
    return 'is'
  if _inside(s, o):
    return 'contains'
  if _inside(o, s):
    return 'lies inside'
  return None


def check_not_overlapping(flag: str, out: str, inputs: Iterable[tuple[str, str]]) -> None:
  """Refuses output `out` (given as `flag`) when it is, contains or lies inside an input;
  `inputs`: (how the input was given, e.g. '--workdir', its path)."""
  for given, source in inputs:
    how = overlap(out, source)
    if how is not None:
      raise OutputPathError(f'{flag} {out}: {how} the input {given} {source}; writing it would '
                            'delete what this command reads (choose an --out outside every input)')


def marker_text(command: str) -> str:
  """The marker file's content: which command wrote the folder, where and when."""
  return json.dumps({'written_by': f'copd_jax {command}', 'host': socket.gethostname(),
                     'pid': os.getpid(),
                     'time': datetime.datetime.now(datetime.timezone.utc).isoformat()})


def write_marker(folder: str, command: str) -> None:
  """Marks `folder` (being built) as an output of `command`."""
  storage.write_text(storage.join(folder, OUTPUT_MARKER), marker_text(command))


def written_by(path: str) -> str | None:
  """The command named by the marker of folder `path` ('merge', 'export-hf'), or None."""
  marker = storage.join(path, OUTPUT_MARKER)
  if not storage.is_dir(path) or not storage.is_file(marker):
    return None
  try:
    who = json.loads(storage.read_text(marker)).get('written_by', '')
  except (ValueError, AttributeError):
    return None
  return who[len('copd_jax '):] if isinstance(who, str) and who.startswith('copd_jax ') else None


def check_replaceable(flag: str, path: str, overwrite: bool, command: str) -> None:
  """Refuses an existing `path` unless `overwrite` is set and it is a previous output of
  `command` (its marker says so)."""
  if not storage.exists(path):
    return
  if not overwrite:
    raise OutputPathError(f'{flag} {path}: already exists (pass --overwrite to replace a '
                          f'previous output of `{command}`)')
  if not storage.is_dir(path):
    raise OutputPathError(f'{flag} {path}: is a file, not an output folder of `{command}`; '
                          '--overwrite replaces only those (remove it yourself if you mean it)')
  writer = written_by(path)
  if writer != command:
    what = (f'an output of `{writer}`' if writer
            else f'not an output of `{command}` (no {OUTPUT_MARKER})')
    raise OutputPathError(f'{flag} {path}: exists and is {what}; --overwrite replaces only '
                          f'previous outputs of `{command}` (remove it yourself if you mean it)')
