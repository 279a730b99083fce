"""An exclusive lock on a run workdir, so two `train` commands never write one workdir at once.

Local (and shared POSIX) file systems: a POSIX record lock (`fcntl.lockf`) on
`<workdir>/.copd_jax.lock`. The kernel drops it when the holding process dies, however it dies
(SIGKILL included), so a crashed run never leaves a stale lock; NFS (v4, or v3 with lockd),
Lustre and GPFS pass these locks between hosts. The file itself stays: it holds the holder's
host, pid and start time, which a refused run names. It is never deleted while a run may want it
(deleting a lock file lets two processes lock two different files of one name); after taking
the lock the holder checks the path still names the file it locked.

Object stores (gs://...): no file locks, and etils.epath offers no conditional (create-if-absent)
write. The lock is a lease object `<workdir>/_COPD_JAX_LEASE.json` (holder, start time, expiry)
that a background thread renews every `LEASE_SECONDS / 4`. A run refuses a lease that has not
expired, unless the holder is a process of this host that is gone. To settle two runs starting
at the same moment, each writes its lease, waits `SETTLE_SECONDS` and reads it back: only the
last writer finds its own lease and proceeds. What this cannot exclude: a run whose write stalls
for longer than SETTLE_SECONDS after it found no lease, or a holder whose renewals stall past
the expiry; and a run killed on another host keeps its workdir locked until the lease expires
(at most LEASE_SECONDS). Release deletes the lease.

Multi-process runs of one job share one lock: process 0 takes it (`acquire(..., primary=True)`
on process 0 only; see copd_jax/commands/train.py).
"""
from __future__ import annotations

import dataclasses
import datetime
import errno
import json
import os
import socket
import threading
import time
import uuid

from copd_jax import storage
from copd_jax.errors import UserInputError

LOCK_FILE = '.copd_jax.lock'
LEASE_OBJECT = '_COPD_JAX_LEASE.json'
LEASE_SECONDS = 120.0
SETTLE_SECONDS = 2.0

_HELD_HERE: set[str] = set()   # workdirs this process holds (a second lock of one is refused)


class WorkdirLocked(UserInputError):
  """Another run holds the workdir; the message names it (host, pid, start time)."""


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')


def holder_record(token: str = '') -> dict:
  """Who holds the lock: this host, this process, now."""
  return {'host': socket.gethostname(), 'pid': os.getpid(), 'started': _now(), 'token': token}


def describe_holder(raw: str) -> str:
  """'host H, pid P, started T' from a lock file's text (or what can be said without it)."""
  try:
    record = json.loads(raw)
    return f'host {record["host"]}, pid {record["pid"]}, started {record["started"]}'
  except (ValueError, KeyError, TypeError):
    return 'a process that has not recorded itself yet'


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


@dataclasses.dataclass
class WorkdirLock:
  """A held lock (local: the open, locked file; remote: the lease and its renewing thread)."""
  workdir: str
  fd: int | None = None
  token: str = ''
  previous_record: bytes = b''   # local: the lock file's text before this holder wrote its own
  _stop: threading.Event | None = None
  _thread: threading.Thread | None = None

  def release(self, restore_record: bool = False) -> None:
    """Gives the lock up (idempotent). restore_record: put back the lock file's previous holder
    record first (a run refused after taking the lock leaves the file as it found it)."""
    _HELD_HERE.discard(self.workdir)
    if self.fd is not None:
      if restore_record:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, self.previous_record, 0)
      os.close(self.fd)   # drops the POSIX lock
      self.fd = None
    if self._stop is not None:
      self._stop.set()
      self._thread.join(timeout=10)
      self._stop = None
      lease = storage.join(self.workdir, LEASE_OBJECT)
      try:
        if json.loads(storage.read_text(lease)).get('token') == self.token:
          storage.rmtree(lease)
      except (OSError, ValueError):
        pass

  def __enter__(self) -> 'WorkdirLock':
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def _refuse(workdir: str, holder: str) -> WorkdirLocked:
  return WorkdirLocked(f'--workdir {workdir}: in use by another run ({holder}); wait for it to '
                       'end or stop it first (two runs in one workdir would corrupt it)')


def acquire(workdir: str) -> WorkdirLock:
  """Takes the workdir's lock (the workdir must exist) or raises WorkdirLocked naming the
  holder."""
  workdir = storage.resolve(workdir)
  if workdir in _HELD_HERE:
    raise _refuse(workdir, f'this process, pid {os.getpid()}')
  lock = _acquire_remote(workdir) if storage.is_remote(workdir) else _acquire_local(workdir)
  _HELD_HERE.add(workdir)
  return lock


def _acquire_local(workdir: str) -> WorkdirLock:
  import fcntl
  path = os.path.join(workdir, LOCK_FILE)
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EACCES, errno.EAGAIN):
        raise
      try:
        with open(path) as f:
          raw = f.read()
      except OSError:
        raw = ''
      raise _refuse(workdir, describe_holder(raw)) from None
    try:
      same = os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
      same = False
    if same:
      break
    os.close(fd)   # the file was replaced between open and lock: lock the current one
  previous = os.pread(fd, os.fstat(fd).st_size, 0)
  os.ftruncate(fd, 0)
  os.pwrite(fd, json.dumps(holder_record()).encode(), 0)
  os.fsync(fd)
  return WorkdirLock(workdir, fd=fd, previous_record=previous)


def _lease_text(holder: dict) -> str:
  """The lease of `holder` (a holder_record), valid for LEASE_SECONDS from now."""
  return json.dumps({**holder, 'expires': time.time() + LEASE_SECONDS})


def _read_lease(path: str) -> dict | None:
  try:
    record = json.loads(storage.read_text(path))
  except (OSError, ValueError):
    return None
  return record if isinstance(record, dict) else None


def _lease_is_live(record: dict) -> bool:
  """An unexpired lease whose holder may be running (a gone process of this host is not)."""
  if not isinstance(record.get('expires'), (int, float)) or record['expires'] < time.time():
    return False
  if record.get('host') == socket.gethostname() and isinstance(record.get('pid'), int):
    return _pid_alive(record['pid'])
  return True


def _acquire_remote(workdir: str) -> WorkdirLock:
  path = storage.join(workdir, LEASE_OBJECT)
  current = _read_lease(path)
  if current is not None and _lease_is_live(current):
    raise _refuse(workdir, describe_holder(json.dumps(current)) + ', lease expires '
                  + datetime.datetime.fromtimestamp(current['expires'],
                                                    datetime.timezone.utc).isoformat(
                                                        timespec='seconds'))
  token = uuid.uuid4().hex
  holder = holder_record(token)
  storage.write_text(path, _lease_text(holder))
  time.sleep(SETTLE_SECONDS)
  settled = _read_lease(path)
  if settled is None or settled.get('token') != token:
    raise _refuse(workdir, describe_holder(json.dumps(settled or {})))
  stop = threading.Event()

  def renew() -> None:
    while not stop.wait(LEASE_SECONDS / 4):
      try:
        if (_read_lease(path) or {}).get('token') != token:
          return   # taken over after a stall: renewing would overwrite the new holder's lease
        storage.write_text(path, _lease_text(holder))
      except OSError:
        pass   # the next renewal retries; the lease lasts LEASE_SECONDS

  thread = threading.Thread(target=renew, name='copd_jax-lease', daemon=True)
  thread.start()
  return WorkdirLock(workdir, token=token, _stop=stop, _thread=thread)
