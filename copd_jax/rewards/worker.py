"""The reward worker process: serves (prediction, gold) items on stdin, scoring each with
math-verify or the researcher's function under one `setitimer` deadline and an address-space
limit, and answers on its original stdout (copd_jax/rewards/__init__.py says why it is a
separate process)."""
from __future__ import annotations

import collections
import json
import logging
import math
import os
import sys
from typing import Any, Callable

import numpy as np

MATH = 'math'
SCORER_ENV = 'COPD_JAX_REWARD_SCORER'  # what a worker scores: 'math' or 'package.module:function'
_WORKER_MEMORY_HEADROOM = 2 << 30  # bytes of address space a worker may add after start-up


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


def main() -> None:  # pragma: no cover (runs in the worker process)
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
  name = os.environ.get(SCORER_ENV, MATH)
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

