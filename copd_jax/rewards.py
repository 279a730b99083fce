"""Verifiable rewards: 1.0 when a completion's answer matches the example's answer, else 0.0.

Kinds:
  exact  the completion, whitespace-stripped, equals the answer (synthetic domains).
  math   math-verify 0.9.0: \\boxed{...}, '#### 42' (GSM8K) and plain final answers, compared
         numerically and symbolically with the reference.

Model output is only parsed, never executed. math-verify turns text into sympy objects with
its LaTeX grammar and, for digit/operator-only spans, `sympy.parse_expr` (whose input its regex
restricts to digits, dots, spaces and + - * / ^ ( ) × ÷). Its own timeouts use
`signal.alarm`, which only works on a process's main thread and cannot cut a long C call
short (a big-int power or a regex scan runs to its end before the handler does; without any
timeout `10**100000000` never returns). So 'math' is scored in worker processes
(`MathVerifierPool`), each on its own main thread:
  * before parsing, the parent keeps only the last `max_chars` characters of a completion and
    scores 0 without parsing when braces nest deeper than `max_brace_depth` (parse time grows
    steeply with nesting);
  * in the worker, one `setitimer` deadline of `timeout_s` covers parse + verify of an item;
  * the parent kills a worker that has not answered `grace_s` after that deadline (a C call
    the signal cannot interrupt), scores the item 0 and starts a fresh worker;
  * each worker runs under an address-space limit, so a runaway allocation fails with
    MemoryError (scored 0) instead of swapping the host.
A call therefore returns within about timeout_s + grace_s per item and worker (the first call
after a kill may also wait for a restart: a worker takes ~1 s, a few on a loaded host, to
import sympy).
"""
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
from typing import Callable, Sequence

import numpy as np

from copd_jax.data.domain import REWARD_KINDS, Example
from copd_jax.errors import UserInputError

DEFAULT_TIMEOUT_S = 1.0
DEFAULT_GRACE_S = 1.0
MAX_CHARS = 4096
MAX_BRACE_DEPTH = 12  # bare '{' nesting: depth 10 already takes ~1.5 s to parse
_STARTUP_TIMEOUT_S = 180.0
_WORKER_MEMORY_HEADROOM = 2 << 30  # bytes of address space a worker may add after start-up

_WORKER_ARGV = (sys.executable, '-c', 'import copd_jax.rewards as r; r._worker_main()')

RewardFn = Callable[[str, Example], float]


# ---------------------------------------------------------------------------------------------
# exact

def exact_match(completion: str, answer: str) -> float:
  """1.0 when the stripped completion equals the stripped answer."""
  return 1.0 if completion.strip() == answer.strip() else 0.0


# ---------------------------------------------------------------------------------------------
# input bounds applied in the parent, before a completion reaches a parser

def brace_depth(text: str) -> int:
  """Deepest nesting of '{' in `text` (unbalanced closers are ignored)."""
  depth = deepest = 0
  for ch in text:
    if ch == '{':
      depth += 1
      deepest = max(deepest, depth)
    elif ch == '}' and depth:
      depth -= 1
  return deepest


def bound_completion(completion: str, max_chars: int = MAX_CHARS,
                     max_brace_depth: int = MAX_BRACE_DEPTH) -> str | None:
  """The tail of `completion` that is parsed (final answers come last), or None when it is
  not worth parsing (empty, braces nested beyond `max_brace_depth`, or a single token longer
  than `max_chars`).

  A cut tail starts after its first whitespace, so no partial token is parsed: the last 4096
  digits of a 100,000-digit number must not read as a number.
  """
  tail = completion
  if 0 < max_chars < len(completion):
    tail = completion[-max_chars:]
    cut = next((i for i, ch in enumerate(tail) if ch.isspace()), None)
    if cut is None:
      return None
    tail = tail[cut + 1:]
  if not tail.strip() or brace_depth(tail) > max_brace_depth:
    return None
  return tail


# ---------------------------------------------------------------------------------------------
# math-verify, as run inside a worker process

def _gold_text(answer: str) -> str:
  """The reference as math-verify should read it: the part after the last '####' (GSM8K), the
  text itself when it already marks its answer (\\boxed, $...$, \\(...\\), \\[...\\]), else the
  bare answer wrapped in \\boxed{} so LaTeX such as '2\\sqrt{3}' is read whole."""
  if '####' in answer:
    return answer.rsplit('####', 1)[1].strip().replace(',', '')
  if any(marker in answer for marker in ('\\boxed', '$', '\\(', '\\[')):
    return answer
  return '\\boxed{' + answer.strip() + '}'


def _pred_text(completion: str) -> str:
  """A GSM8K-style completion is read from its last '#### ' line; anything else whole."""
  if '####' in completion and '\\boxed' not in completion:
    tail = completion.rsplit('####', 1)[1].strip()
    return tail.splitlines()[0] if tail else tail
  return completion


class _Deadline(BaseException):
  """Raised by the worker's timer; a BaseException so math-verify's `except Exception` does
  not swallow it and the whole item stops."""


def _worker_main() -> None:  # pragma: no cover (runs in the worker process)
  """Serve JSON-lines requests {'i', 'p' (prediction), 'g' (gold), 't' (seconds)} on stdin with
  {'i', 'r' (0/1), 's' (ok | timeout | error)} on the original stdout."""
  import logging
  import resource
  import signal

  protocol = os.fdopen(os.dup(1), 'wb', buffering=0)
  os.dup2(2, 1)  # anything a library prints goes to stderr, never into the protocol
  logging.basicConfig(level=logging.ERROR)
  logging.getLogger('math_verify').setLevel(logging.CRITICAL)
  from math_verify import parse, verify

  def on_alarm(signum, frame):
    raise _Deadline()

  signal.signal(signal.SIGALRM, on_alarm)
  gold_cache: collections.OrderedDict[str, list] = collections.OrderedDict()

  def parsed_gold(answer: str) -> list:
    if answer in gold_cache:
      gold_cache.move_to_end(answer)
      return gold_cache[answer]
    text = _gold_text(answer)
    gold = parse(text, parsing_timeout=None)
    if not gold and text != answer:
      gold = parse(answer, parsing_timeout=None)
    gold_cache[answer] = gold
    if len(gold_cache) > 4096:
      gold_cache.popitem(last=False)
    return gold

  def score(pred: str, answer: str) -> float:
    gold = parsed_gold(answer)
    if not gold:
      return 0.0
    target = parse(_pred_text(pred), parsing_timeout=None)
    return 1.0 if target and verify(gold, target, timeout_seconds=None) else 0.0

  score('The answer is \\boxed{\\frac{1}{2}}', '0.5')  # loads the grammar before 'ready'
  gold_cache.clear()
  try:
    with open('/proc/self/statm') as f:
      size = int(f.read().split()[0]) * os.sysconf('SC_PAGE_SIZE')
  except OSError:  # no procfs: no memory limit, the hard timeout still applies
    size = None
  if size is not None:
    limit = size + _WORKER_MEMORY_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
  protocol.write(b'{"ready": true}\n')
  for line in sys.stdin.buffer:
    request = json.loads(line)
    status, reward = 'ok', 0.0
    try:
      try:
        signal.setitimer(signal.ITIMER_REAL, float(request['t']))
        reward = score(request['p'], request['g'])
      finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    except _Deadline:
      status, reward = 'timeout', 0.0
    except Exception:  # MemoryError and RecursionError included
      status, reward = 'error', 0.0
    protocol.write(json.dumps({'i': request['i'], 'r': reward, 's': status}).encode() + b'\n')


# ---------------------------------------------------------------------------------------------
# the worker pool, as seen from the parent

class _Worker:
  """One worker process: its pipes, a read buffer, and the item it is working on."""

  def __init__(self, argv: Sequence[str] | None = None):
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env['PYTHONPATH'] = package_root + os.pathsep + env.get('PYTHONPATH', '')
    env.setdefault('JAX_PLATFORMS', 'cpu')
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

  def send(self, index: int, pred: str, gold: str, timeout_s: float, deadline: float) -> None:
    line = json.dumps({'i': index, 'p': pred, 'g': gold, 't': timeout_s}).encode() + b'\n'
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


class MathVerifierPool:
  """`num_workers` math-verify worker processes scoring (prediction, gold) pairs in parallel.

  Thread-safe (one batch at a time); workers start lazily and are restarted after a hard
  timeout or a crash. `close()` (also run at exit) stops them. `worker_argv` replaces the worker
  command (tests use it to stand in a worker that hangs or crashes).
  """

  def __init__(self, num_workers: int | None = None, worker_argv: Sequence[str] | None = None):
    self.num_workers = num_workers or max(1, min(4, os.cpu_count() or 1))
    self._worker_argv = worker_argv
    self._workers: list[_Worker] = []
    self._lock = threading.Lock()
    self.restarts = 0
    self.timeouts = 0

  def _ensure_started(self) -> None:
    while len(self._workers) < self.num_workers:
      self._workers.append(_Worker(self._worker_argv))

  def _replace(self, worker: _Worker) -> None:
    worker.kill()
    self._workers[self._workers.index(worker)] = _Worker(self._worker_argv)
    self.restarts += 1

  def score(self, preds: Sequence[str], golds: Sequence[str], timeout_s: float = DEFAULT_TIMEOUT_S,
            grace_s: float = DEFAULT_GRACE_S) -> np.ndarray:
    """[N] float32 rewards; an item that times out, crashes its worker or fails to parse is 0."""
    if len(preds) != len(golds):
      raise ValueError(f'{len(preds)} predictions but {len(golds)} gold answers')
    results = np.zeros(len(preds), np.float32)
    with self._lock:
      self._ensure_started()
      queue = collections.deque(range(len(preds)))
      while queue or any(w.item is not None for w in self._workers):
        now = time.monotonic()
        for w in self._workers:
          if w.ready and w.item is None and queue:
            i = queue.popleft()
            try:
              w.send(i, preds[i], golds[i], timeout_s, now + timeout_s + grace_s)
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
              raise RuntimeError(f'math-verify worker failed to start:\n{w.stderr_tail()}')
            self._replace(w)
            continue
          for message in messages:
            if message.get('ready'):
              w.ready = True
            elif w.item is not None and message['i'] == w.item[0]:
              results[message['i']] = message['r']
              self.timeouts += message['s'] == 'timeout'
              w.item = None
        now = time.monotonic()
        for w in list(self._workers):
          if w.item is not None and now > w.item[1]:
            self.timeouts += 1
            self._replace(w)
          elif not w.ready and now > w.started + _STARTUP_TIMEOUT_S:
            raise RuntimeError(f'math-verify worker did not start within {_STARTUP_TIMEOUT_S:.0f}'
                               f' s:\n{w.stderr_tail()}')
    return results

  def close(self) -> None:
    with self._lock:
      for w in self._workers:
        w.kill()
      self._workers = []


_POOL: MathVerifierPool | None = None
_POOL_LOCK = threading.Lock()


def math_pool() -> MathVerifierPool:
  """The process-wide pool used by the 'math' reward (created on first use)."""
  global _POOL
  with _POOL_LOCK:
    if _POOL is None:
      _POOL = MathVerifierPool()
      atexit.register(_POOL.close)
    return _POOL


def score_math(completions: Sequence[str], answers: Sequence[str],
               timeout_s: float = DEFAULT_TIMEOUT_S, max_chars: int = MAX_CHARS,
               max_brace_depth: int = MAX_BRACE_DEPTH,
               pool: MathVerifierPool | None = None) -> np.ndarray:
  """[N] float32 math-verify rewards of `completions` against `answers`."""
  results = np.zeros(len(completions), np.float32)
  bounded = [bound_completion(c, max_chars, max_brace_depth) for c in completions]
  todo = [i for i, text in enumerate(bounded) if text is not None]
  if todo:
    scores = (pool or math_pool()).score([bounded[i] for i in todo],
                                         [answers[i] for i in todo], timeout_s)
    results[todo] = scores
  return results


# ---------------------------------------------------------------------------------------------
# public entry points

def _check_kind(kind: str) -> None:
  if kind not in REWARD_KINDS:
    raise UserInputError(f'unknown reward kind {kind!r}; choose from {", ".join(REWARD_KINDS)}')


def reward_fn(kind: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> RewardFn:
  """A function (completion, example) -> reward in {0.0, 1.0} for one completion."""
  _check_kind(kind)
  if kind == 'exact':
    return lambda completion, example: exact_match(completion, example.answer)
  return lambda completion, example: float(
      score_math([completion], [example.answer], timeout_s)[0])


def score_completions(kind: str | None, completions: Sequence[str], examples: Sequence[Example],
                      timeout_s: float = DEFAULT_TIMEOUT_S,
                      pool: MathVerifierPool | None = None) -> np.ndarray:
  """[N] float32 rewards of completions[i] against examples[i].

  `kind` None scores each example with its own `Example.reward`; a kind name scores all with
  it. The driver calls this once per step with the decoded completions (text of the sampled
  tokens before <eos>, special tokens skipped). 'math' items go to `pool` (default: the
  process-wide `math_pool()`).
  """
  if len(completions) != len(examples):
    raise ValueError(f'{len(completions)} completions but {len(examples)} examples')
  kinds = [kind] * len(examples) if kind is not None else [ex.reward for ex in examples]
  for k in set(kinds):
    _check_kind(k)
  results = np.zeros(len(examples), np.float32)
  exact = [i for i, k in enumerate(kinds) if k == 'exact']
  math = [i for i, k in enumerate(kinds) if k == 'math']
  for i in exact:
    results[i] = exact_match(completions[i], examples[i].answer)
  if math:
    results[math] = score_math([completions[i] for i in math],
                               [examples[i].answer for i in math], timeout_s, pool=pool)
  return results
