"""The pool of reward worker processes, as seen from the parent: items go to idle workers, a
worker that misses its hard deadline or dies is replaced and its item scores 0, and one
process-wide pool per scorer is created on first use."""
from __future__ import annotations

import atexit
import collections
import json
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
from typing import Sequence

import numpy as np

from copd_jax.rewards.worker import MATH, SCORER_ENV

DEFAULT_TIMEOUT_S = 1.0
DEFAULT_GRACE_S = 1.0
_STARTUP_TIMEOUT_S = 180.0
_WORKER_ARGV = (sys.executable, '-c', 'import copd_jax.rewards.worker as w; w.main()')


class _Worker:
  """One worker process: its pipes, a read buffer, and the item it is working on."""

  def __init__(self, argv: Sequence[str] | None = None, scorer: str = MATH):
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    env = dict(os.environ)
    # The parent's import path (a user function's module may live in the config's folder).
    path = [package_root] + [p for p in sys.path if p and os.path.isdir(p)]
    path += [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p]
    env['PYTHONPATH'] = os.pathsep.join(dict.fromkeys(path))
    env.setdefault('JAX_PLATFORMS', 'cpu')
    env[SCORER_ENV] = scorer
    self.stderr = tempfile.TemporaryFile()
    self.proc = subprocess.Popen(
        list(argv or _WORKER_ARGV),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, env=env,
        close_fds=True)
    self.fd = self.proc.stdout.fileno()
    self.buffer = b''
    self.ready = False
    self.started = time.monotonic()
    self.item: tuple[int, float] | None = None  # (index, hard deadline)

  def send(self, index: int, pred: str, gold: str, timeout_s: float, deadline: float,
           example: dict | None = None) -> None:
    line = json.dumps({'i': index, 'p': pred, 'g': gold, 'x': example,
                       't': timeout_s}).encode() + b'\n'
    self.proc.stdin.write(line)
    self.proc.stdin.flush()
    self.item = (index, deadline)

  def read_messages(self) -> list[dict] | None:
    """Complete messages available now; None at end of file (the worker died)."""
    data = os.read(self.fd, 1 << 16)
    if not data:
      return None
    self.buffer += data
    *lines, self.buffer = self.buffer.split(b'\n')
    return [json.loads(line) for line in lines if line.strip()]

  def stderr_tail(self, limit: int = 2000) -> str:
    self.stderr.seek(0)
    return self.stderr.read().decode('utf-8', 'replace')[-limit:]

  def kill(self) -> None:
    if self.proc.poll() is None:
      self.proc.kill()
    self.proc.wait()
    for stream in (self.proc.stdin, self.proc.stdout):
      try:
        stream.close()
      except OSError:
        pass
    self.stderr.close()


class RewardWorkerPool:
  """`num_workers` worker processes scoring (prediction, gold) pairs in parallel with one
  scorer: 'math' (math-verify) or a user function 'package.module:function'.

  Thread-safe (one batch at a time); workers start lazily and are restarted after a hard
  timeout or a crash. `close()` (also run at exit) stops them. `worker_argv` replaces the worker
  command (tests use it to stand in a worker that hangs or crashes).
  """

  def __init__(self, num_workers: int | None = None, worker_argv: Sequence[str] | None = None,
               scorer: str = MATH):
    self.num_workers = num_workers or max(1, min(4, os.cpu_count() or 1))
    self.scorer = scorer
    self._worker_argv = worker_argv
    self._workers: list[_Worker] = []
    self._lock = threading.Lock()
    self.restarts = 0
    self.timeouts = 0

  def _new_worker(self) -> _Worker:
    return _Worker(self._worker_argv, self.scorer)

  def _ensure_started(self) -> None:
    while len(self._workers) < self.num_workers:
      self._workers.append(self._new_worker())

  def _replace(self, worker: _Worker) -> None:
    worker.kill()
    self._workers[self._workers.index(worker)] = self._new_worker()
    self.restarts += 1

  def score(self, preds: Sequence[str], golds: Sequence[str], timeout_s: float = DEFAULT_TIMEOUT_S,
            grace_s: float = DEFAULT_GRACE_S) -> np.ndarray:
    """[N] float32 rewards; an item that times out, crashes its worker or fails to parse is 0."""
    return self.score_with_reasons(preds, golds, timeout_s, grace_s)[0]

  def score_with_reasons(self, preds: Sequence[str], golds: Sequence[str],
                         timeout_s: float = DEFAULT_TIMEOUT_S, grace_s: float = DEFAULT_GRACE_S,
                         examples: Sequence[dict] | None = None
                         ) -> tuple[np.ndarray, list[str]]:
    """([N] float32 rewards, [N] reasons: '' when scored, else why the item scored 0 by
    failure: a timeout, an exception, a killed or dead worker). `examples` [N] go to a user
    function as its third argument."""
    if len(preds) != len(golds):
      raise ValueError(f'{len(preds)} predictions but {len(golds)} gold answers')
    results = np.zeros(len(preds), np.float32)
    reasons = [''] * len(preds)
    with self._lock:
      self._ensure_started()
      queue = collections.deque(range(len(preds)))
      while queue or any(w.item is not None for w in self._workers):
        now = time.monotonic()
        for w in self._workers:
          if w.ready and w.item is None and queue:
            i = queue.popleft()
            try:
              w.send(i, preds[i], golds[i], timeout_s, now + timeout_s + grace_s,
                     examples[i] if examples is not None else None)
            except OSError:  # died while idle: retry the item on a fresh worker
              queue.appendleft(i)
              w.item = None
              self._replace(w)
        waiting = [w for w in self._workers if w.item is not None or not w.ready]
        deadlines = [w.item[1] if w.item else w.started + _STARTUP_TIMEOUT_S for w in waiting]
        ready, _, _ = select.select([w.fd for w in waiting], [], [],
                                    max(0.0, min(deadlines) - time.monotonic()))
        for w in [w for w in waiting if w.fd in ready]:
          messages = w.read_messages()
          if messages is None:  # the worker died: its item scores 0, a fresh one takes over
            if not w.ready:
              raise RuntimeError(f'reward worker ({self.scorer}) failed to start:\n'
                                 f'{w.stderr_tail()}')
            if w.item is not None:
              code = w.proc.poll() if w.proc.poll() is not None else w.proc.wait()
              reasons[w.item[0]] = f'the worker process died (exit status {code})'
            self._replace(w)
            continue
          for message in messages:
            if message.get('ready'):
              w.ready = True
            elif w.item is not None and message['i'] == w.item[0]:
              results[message['i']] = message['r']
              reasons[message['i']] = message.get('e', '') if message['s'] != 'ok' else ''
              self.timeouts += message['s'] == 'timeout'
              w.item = None
        now = time.monotonic()
        for w in list(self._workers):
          if w.item is not None and now > w.item[1]:
            self.timeouts += 1
            reasons[w.item[0]] = (f'no answer {timeout_s + grace_s:g} s after the start '
                                  '(worker killed)')
            self._replace(w)
          elif not w.ready and now > w.started + _STARTUP_TIMEOUT_S:
            raise RuntimeError(f'reward worker ({self.scorer}) did not start within '
                               f'{_STARTUP_TIMEOUT_S:.0f} s:\n{w.stderr_tail()}')
    return results, reasons

  def close(self) -> None:
    with self._lock:
      for w in self._workers:
        w.kill()
      self._workers = []


MathVerifierPool = RewardWorkerPool  # the name scripts/faults and older callers use

_POOLS: dict[str, RewardWorkerPool] = {}
_POOL: RewardWorkerPool | None = None  # the math pool (tests swap it)
_POOL_LOCK = threading.Lock()


def math_pool() -> RewardWorkerPool:
  """The process-wide pool used by the 'math' reward (created on first use)."""
  global _POOL
  with _POOL_LOCK:
    if _POOL is None:
      _POOL = RewardWorkerPool()
      atexit.register(_POOL.close)
    return _POOL


def function_pool(spec: str) -> RewardWorkerPool:
  """The process-wide pool of the user function `spec` (created on first use)."""
  with _POOL_LOCK:
    if spec not in _POOLS:
      _POOLS[spec] = RewardWorkerPool(scorer=spec)
      atexit.register(_POOLS[spec].close)
    return _POOLS[spec]
