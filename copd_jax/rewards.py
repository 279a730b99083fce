"""Verifiable rewards: a completion's answer against the example's reference answer.

What is scored is the answer in the completion's final text, never its reasoning: the text after
the last `</think>`, then the domain's `answer_extraction` ('final', 'boxed', 'last_number';
copd_jax/answers.py). A completion without an answer scores 0. Kinds (`domains.<name>.reward`):
  exact                      the answer equals the reference up to whitespace and one trailing
                             period (synthetic domains, exact outputs).
  math                       math-verify 0.9.0: \\boxed{...}, '#### 42' (GSM8K) and plain final
                             answers, compared numerically and symbolically with the reference.
  package.module:function    the researcher's own function (signature: copd_jax/user_rewards.py),
                             run in worker processes like 'math'; its failures score 0 and are
                             logged (logger 'copd_jax.rewards', one line per batch).

Model output is only parsed, never executed. math-verify turns text into sympy objects with
its LaTeX grammar and, for digit/operator-only spans, `sympy.parse_expr` (whose input its regex
restricts to digits, dots, spaces and + - * / ^ ( ) × ÷). Its own timeouts use
`signal.alarm`, which only works on a process's main thread and cannot cut a long C call
short (a big-int power or a regex scan runs to its end before the handler does; without any
timeout `10**100000000` never returns). So 'math' and user functions are scored in worker
processes (`RewardWorkerPool`, one pool per scorer), each on its own main thread:
  * before parsing, the parent keeps only the last `max_chars` characters of a math answer and
    scores 0 without parsing when braces nest deeper than `max_brace_depth` (parse time grows
    steeply with nesting);
  * in the worker, one `setitimer` deadline of `timeout_s` covers parse + verify of an item
    (or one call of a user function);
  * the parent kills a worker that has not answered `grace_s` after that deadline (a C call
    the signal cannot interrupt), scores the item 0 and starts a fresh worker;
  * each worker runs under an address-space limit, so a runaway allocation fails with
    MemoryError (scored 0) instead of swapping the host.
A call therefore returns within about timeout_s + grace_s per item and worker (the first call
after a kill may also wait for a restart: a worker takes ~1 s, a few on a loaded host, to
import sympy, or as long as the user's module takes to import).
"""
from __future__ import annotations

import atexit
import collections
import dataclasses
import json
import logging
import math
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from copd_jax import answers
from copd_jax.data.domain import REWARD_KINDS, Example, is_reward_name
from copd_jax.errors import UserInputError

DEFAULT_TIMEOUT_S = 1.0
DEFAULT_GRACE_S = 1.0
MAX_CHARS = 4096
MAX_BRACE_DEPTH = 12  # bare '{' nesting: depth 10 already takes ~1.5 s to parse
_STARTUP_TIMEOUT_S = 180.0
_WORKER_MEMORY_HEADROOM = 2 << 30  # bytes of address space a worker may add after start-up
_SCORER_ENV = 'COPD_JAX_REWARD_SCORER'  # what a worker scores: 'math' or 'package.module:function'
MATH = 'math'

_WORKER_ARGV = (sys.executable, '-c', 'import copd_jax.rewards as r; r._worker_main()')
_log = logging.getLogger(__name__)

RewardFn = Callable[[str, Example], float]


@dataclasses.dataclass(frozen=True)
class RewardSpec:
  """How one domain is scored: `kind` ('exact', 'math' or 'package.module:function'), the
  answer extraction, and seconds per completion (None: the caller's timeout_s)."""
  kind: str
  extraction: str = 'final'
  timeout_s: float | None = None

  @property
  def is_function(self) -> bool:
    return self.kind not in REWARD_KINDS


def reward_spec(domain) -> RewardSpec:
  """The RewardSpec of a config's `domains.<name>` entry."""
  return RewardSpec(domain.reward, domain.answer_extraction, float(domain.reward_timeout_s))


# ---------------------------------------------------------------------------------------------
# exact

def exact_match(completion: str, answer: str) -> float:
  """1.0 when the completion's final answer (after any `</think>`) equals the answer, both
  normalised (copd_jax.answers.normalize_exact)."""
  return answers.exact_match(answers.extract_answer(completion), answer)


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
# math-verify and user functions, as run inside a worker process

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


def _math_scorer() -> Callable[[str, str, Any], float]:  # pragma: no cover (worker process)
  """math-verify's (prediction, gold) -> 0/1, its grammar loaded."""
  logging.getLogger('math_verify').setLevel(logging.CRITICAL)
  from math_verify import parse, verify
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

  def score(pred: str, answer: str, example: Any = None) -> float:
    gold = parsed_gold(answer)
    if not gold:
      return 0.0
    target = parse(_pred_text(pred), parsing_timeout=None)
    return 1.0 if target and verify(gold, target, timeout_seconds=None) else 0.0

  score('The answer is \\boxed{\\frac{1}{2}}', '0.5')  # loads the grammar before 'ready'
  gold_cache.clear()
  return score


def _function_scorer(spec: str) -> Callable[[str, str, Any], float]:  # pragma: no cover
  """The user's function, its return value checked to be a finite number."""
  from copd_jax import user_rewards
  function = user_rewards.resolve(spec)

  def score(pred: str, answer: str, example: Any) -> float:
    value = function(pred, answer, example)
    if isinstance(value, (bool, int, float, np.integer, np.floating)) and math.isfinite(value):
      return float(value)
    raise TypeError(f'returned {type(value).__name__} {str(value)[:60]!r}, not a finite number')

  return score


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return f'{type(e).__name__}: {text.splitlines()[0][:200] if text else ""}'.rstrip(': ')


def _worker_main() -> None:  # pragma: no cover (runs in the worker process)
  """Serve JSON-lines requests {'i', 'p' (prediction), 'g' (gold), 'x' (example dict or null),
  't' (seconds)} on stdin with {'i', 'r' (reward), 's' (ok | timeout | error), 'e' (why)} on
  the original stdout. The scorer ($COPD_JAX_REWARD_SCORER) is loaded before 'ready'."""
  import resource
  import signal

  protocol = os.fdopen(os.dup(1), 'wb', buffering=0)
  os.dup2(2, 1)  # anything a library prints goes to stderr, never into the protocol
  logging.basicConfig(level=logging.ERROR)

  def on_alarm(signum, frame):
    raise _Deadline()

  signal.signal(signal.SIGALRM, on_alarm)
  name = os.environ.get(_SCORER_ENV, MATH)
  score = _math_scorer() if name == MATH else _function_scorer(name)
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
    status, reward, why = 'ok', 0.0, ''
    try:
      try:
        signal.setitimer(signal.ITIMER_REAL, float(request['t']))
        reward = score(request['p'], request['g'], request.get('x'))
      finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    except _Deadline:
      status, reward, why = 'timeout', 0.0, f'took longer than {request["t"]:g} s'
    except BaseException as e:  # MemoryError, RecursionError, SystemExit included
      status, reward, why = 'error', 0.0, _first_line(e)
    protocol.write(json.dumps({'i': request['i'], 'r': reward, 's': status,
                               'e': why}).encode() + b'\n')


# ---------------------------------------------------------------------------------------------
# the worker pool, as seen from the parent

class _Worker:
  """One worker process: its pipes, a read buffer, and the item it is working on."""

  def __init__(self, argv: Sequence[str] | None = None, scorer: str = MATH):
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    # The parent's import path (a user function's module may live in the config's folder).
    path = [package_root] + [p for p in sys.path if p and os.path.isdir(p)]
    path += [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p]
    env['PYTHONPATH'] = os.pathsep.join(dict.fromkeys(path))
    env.setdefault('JAX_PLATFORMS', 'cpu')
    env[_SCORER_ENV] = scorer
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


def score_math(completions: Sequence[str], answers: Sequence[str],
               timeout_s: float = DEFAULT_TIMEOUT_S, max_chars: int = MAX_CHARS,
               max_brace_depth: int = MAX_BRACE_DEPTH,
               pool: RewardWorkerPool | None = None) -> np.ndarray:
  """[N] float32 math-verify rewards of the texts `completions` against `answers` (the texts
  as given: score_completions first takes the answer out of a completion)."""
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

def _as_spec(kind: str | RewardSpec) -> RewardSpec:
  spec = kind if isinstance(kind, RewardSpec) else RewardSpec(kind)
  if not is_reward_name(spec.kind):
    raise UserInputError(f'unknown reward kind {spec.kind!r}; choose from '
                         f"{', '.join(REWARD_KINDS)} or 'package.module:function'")
  if spec.extraction not in answers.EXTRACTIONS:
    raise UserInputError(f'unknown answer extraction {spec.extraction!r}; choose from '
                         f'{", ".join(answers.EXTRACTIONS)}')
  return spec


def reward_fn(kind: str | RewardSpec, timeout_s: float = DEFAULT_TIMEOUT_S) -> RewardFn:
  """A function (completion, example) -> reward for one completion."""
  spec = _as_spec(kind)
  return lambda completion, example: float(
      score_completions(spec, [completion], [example], timeout_s)[0])


def example_dict(example: Example, completion: str) -> dict[str, Any]:
  """The `example` argument of a user reward function (copd_jax/user_rewards.py)."""
  return {'prompt': example.prompt, 'domain': example.domain, 'id': example.id,
          'messages': [{'role': r, 'content': c} for r, c in example.messages],
          'completion': completion}


def _score_spec(spec: RewardSpec, completions: Sequence[str], examples: Sequence[Example],
                timeout_s: float, pool: RewardWorkerPool | None) -> np.ndarray:
  """[N] rewards of completions of examples that one RewardSpec scores."""
  timeout_s = spec.timeout_s if spec.timeout_s is not None else timeout_s
  found = [answers.extract_answer(c, spec.extraction) for c in completions]
  results = np.zeros(len(completions), np.float32)
  todo = [i for i, a in enumerate(found) if a is not None]  # no answer: 0, nothing to call
  if not todo:
    return results
  if spec.kind == 'exact':
    results[todo] = [answers.exact_match(found[i], examples[i].answer) for i in todo]
  elif spec.kind == MATH:
    texts = [f'\\boxed{{{found[i]}}}' if spec.extraction == 'boxed' else found[i] for i in todo]
    results[todo] = score_math(texts, [examples[i].answer for i in todo], timeout_s, pool=pool)
  else:
    scores, reasons = function_pool(spec.kind).score_with_reasons(
        [found[i] for i in todo], [examples[i].answer for i in todo], timeout_s,
        examples=[example_dict(examples[i], completions[i]) for i in todo])
    results[todo] = scores
    _log_failures(spec.kind, reasons)
  return results


def _log_failures(name: str, reasons: Sequence[str]) -> None:
  failed = [r for r in reasons if r]
  if failed:
    counts = collections.Counter(failed)
    _log.warning('reward %s: %d of %d completions scored 0 by failure: %s', name, len(failed),
                 len(reasons), '; '.join(f'{r} (x{n})' for r, n in counts.most_common(3)))


def score_completions(kind: str | RewardSpec | None, completions: Sequence[str],
                      examples: Sequence[Example], timeout_s: float = DEFAULT_TIMEOUT_S,
                      pool: RewardWorkerPool | None = None) -> np.ndarray:
  """[N] float32 rewards of completions[i] against examples[i].

  `kind` None scores each example with its own `Example.reward` (answer extraction 'final');
  a kind name or RewardSpec scores all with it. The driver calls this once per step and domain
  with the decoded completions (text of the sampled tokens before <eos>, special tokens
  skipped; `<think>` and `</think>` are not special and stay). 'math' items go to `pool`
  (default: the process-wide `math_pool()`), a user function's to its `function_pool`.
  """
  if len(completions) != len(examples):
    raise ValueError(f'{len(completions)} completions but {len(examples)} examples')
  specs = [_as_spec(kind if kind is not None else ex.reward) for ex in examples]
  results = np.zeros(len(examples), np.float32)
  for spec in dict.fromkeys(specs):
    rows = [i for i, s in enumerate(specs) if s == spec]
    results[rows] = _score_spec(spec, [completions[i] for i in rows],
                                [examples[i] for i in rows], timeout_s, pool)
  return results
