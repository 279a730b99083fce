"""Run paths that may be local or remote (gs://bucket/run, any scheme etils.epath serves): the
file operations copd_jax does itself, over `etils.epath` (Orbax writes its own items through
epath and TensorStore).

What each kind of path guarantees:

- Local paths keep POSIX semantics. A single file is written under a temporary name and
  `os.replace`d over the old one (atomic: a reader or a kill sees the old file or the new one). An
  output folder is built under a hidden sibling `.NAME.tmp-PID-HOST` and renamed into place
  (atomic), so nothing complete-looking exists until it is complete.
- Remote paths (object stores such as GCS) have no atomic rename -- a "rename" copies every
  object and deletes the originals -- and folders are only name prefixes. What remains: one object
  upload is atomic (readers see the whole old object or the whole new one), so a single file is
  written in one upload straight to its name. An output folder is written in place and a marker
  object (COMPLETE_MARKER) is written last; `is_complete` tells a finished folder from one a
  crash left half written, and the next write replaces such a folder. Between deleting an old
  folder and finishing the new one there is no copy of either (overwrites are not atomic).

Temporary siblings left by killed local writes are removed by the next write of the same output
when the process that made them is gone (`remove_stale_tmp_siblings`).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
from typing import Callable

from etils import epath

COMPLETE_MARKER = '_COPD_COMPLETE'
_SCHEME = re.compile(r'^[A-Za-z][A-Za-z0-9+.-]*://')
_HOST = re.sub(r'[^A-Za-z0-9_.-]', '_', socket.gethostname()) or 'host'


def is_remote(path: str | os.PathLike) -> bool:
  """True for URLs such as gs://bucket/run."""
  return bool(_SCHEME.match(os.fspath(path)))


def resolve(path: str | os.PathLike) -> str:
  """Canonical form: remote URLs without a trailing '/', local paths absolute."""
  path = os.fspath(path)
  return path.rstrip('/') if is_remote(path) else os.path.abspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
  return epath.Path(resolve(path))


def join(path: str | os.PathLike, *parts: str) -> str:
  """Path join that keeps a URL's scheme and uses '/' for remote paths."""
  path = os.fspath(path)
  if is_remote(path):
    return '/'.join([path.rstrip('/')] + [p.strip('/') for p in parts])
  return os.path.join(path, *parts)


def parent(path: str | os.PathLike) -> str:
  path = resolve(path)
  return path.rsplit('/', 1)[0] if is_remote(path) else os.path.dirname(path)


def basename(path: str | os.PathLike) -> str:
  return resolve(path).rsplit('/', 1)[-1]


def exists(path: str | os.PathLike) -> bool:
  return os.path.exists(path) if not is_remote(path) else as_path(path).exists()


def is_dir(path: str | os.PathLike) -> bool:
  return os.path.isdir(path) if not is_remote(path) else as_path(path).is_dir()


def is_file(path: str | os.PathLike) -> bool:
  if not is_remote(path):
    return os.path.isfile(path)
  p = as_path(path)
  return p.exists() and not p.is_dir()


def listdir(path: str | os.PathLike) -> list[str]:
  """Entry names of a folder (sorted)."""
  if not is_remote(path):
    return sorted(os.listdir(path))
  return sorted(p.name for p in as_path(path).iterdir())


def makedirs(path: str | os.PathLike) -> None:
  """Creates a folder and its parents (on object stores only a name prefix: a no-op)."""
  as_path(path).mkdir(parents=True, exist_ok=True)


def rmtree(path: str | os.PathLike) -> None:
  """Deletes a folder (or file) if it exists."""
  if not is_remote(path):
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    elif os.path.lexists(path):
      os.remove(path)
    return
  p = as_path(path)
  if p.is_dir():
    p.rmtree()
  elif p.exists():
    p.unlink()


def read_bytes(path: str | os.PathLike) -> bytes:
  return as_path(path).read_bytes()


def read_text(path: str | os.PathLike) -> str:
  return as_path(path).read_text()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Replaces the file at `path` with `data`: atomically (temporary name + os.replace) on local
  paths, in one object upload on remote ones."""
  if is_remote(path):
    as_path(path).write_bytes(data)
    return
  tmp = os.fspath(path) + f'.tmp-{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)


def write_text(path: str | os.PathLike, text: str) -> None:
  write_bytes(path, text.encode())


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
  """Copies one file (either side may be remote)."""
  if not is_remote(src) and not is_remote(dst):
    shutil.copy(src, dst)
    return
  with as_path(src).open('rb') as fin, as_path(dst).open('wb') as fout:
    shutil.copyfileobj(fin, fout, 2**20)


def move(src: str | os.PathLike, dst: str | os.PathLike) -> None:
  """Moves a folder or file: os.replace (atomic) locally; copy-then-delete on object stores."""
  if not is_remote(src) and not is_remote(dst):
    os.replace(src, dst)
  else:
    as_path(src).rename(resolve(dst))


# ---------------------------------------------------------------------------------------------
# Output folders
# ---------------------------------------------------------------------------------------------

def tmp_sibling(out_dir: str | os.PathLike) -> str:
  """The hidden sibling a local output folder is built in: `.NAME.tmp-PID-HOST`."""
  out_dir = resolve(out_dir)
  return join(parent(out_dir), f'.{basename(out_dir)}.tmp-{os.getpid()}-{_HOST}')


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  return True


def remove_stale_tmp_siblings(out_dir: str | os.PathLike) -> list[str]:
  """Deletes the temporary siblings `.NAME.tmp-PID[-HOST]` of local `out_dir` whose process is
  gone: made on this host (or named without a host, as older versions did) by a PID that is not
  running and is not this process. Siblings of other hosts (a shared file system) and anything
  else are left alone. Returns the deleted paths."""
  out_dir = resolve(out_dir)
  folder = parent(out_dir)
  if is_remote(out_dir) or not os.path.isdir(folder):
    return []
  pattern = re.compile(rf'^\.{re.escape(basename(out_dir))}\.tmp-(\d+)(?:-(.+))?$')
  removed = []
  for name in sorted(os.listdir(folder)):
    match = pattern.match(name)
    if not match:
      continue
    pid, host = int(match.group(1)), match.group(2)
    if (host is not None and host != _HOST) or pid == os.getpid() or _pid_alive(pid):
      continue
    path = os.path.join(folder, name)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path, ignore_errors=True)
      removed.append(path)
  return removed


def publish_dir(out_dir: str | os.PathLike, build: Callable[[str], None]) -> None:
  """Writes the folder `out_dir` with `build(folder)`, replacing any old one, so that it looks
  complete only once `build` returned (see the module docstring for remote paths)."""
  out_dir = resolve(out_dir)
  if is_remote(out_dir):
    rmtree(out_dir)
    build(out_dir)
    write_bytes(join(out_dir, COMPLETE_MARKER), b'')
    return
  remove_stale_tmp_siblings(out_dir)
  tmp = tmp_sibling(out_dir)
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(parent(out_dir), exist_ok=True)
  try:
    build(tmp)
  except BaseException:  # a full disk, a failed write, Ctrl-C: no half-built sibling stays
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.exists(out_dir):
    shutil.rmtree(out_dir)
  os.replace(tmp, out_dir)


def is_complete(folder: str | os.PathLike) -> bool:
  """Whether a folder written by `publish_dir` is finished: locally, that it exists (it appears
  only when complete); remotely, that its marker object exists."""
  if is_remote(folder):
    return exists(join(folder, COMPLETE_MARKER))
  return os.path.isdir(folder)


def local_copy(folder: str | os.PathLike) -> str:
  """A local folder with the files (not subfolders) of `folder`: `folder` itself when local; for
  a remote folder, a cache copy under the temp dir (for readers that need local files, such as
  `transformers` tokenizers). The copy is refreshed on every call."""
  if not is_remote(folder) or not is_dir(folder):
    return os.fspath(folder)  # a missing folder is reported by the reader, under its own name
  folder = resolve(folder)
  cache = os.path.join(tempfile.gettempdir(), 'copd_jax_remote',
                       hashlib.sha256(folder.encode()).hexdigest()[:16])
  os.makedirs(cache, exist_ok=True)
  for name in listdir(folder):
    src = join(folder, name)
    if is_file(src):
      copy_file(src, os.path.join(cache, name))
  return cache
