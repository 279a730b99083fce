"""Scoring completions: reward kinds and answer extraction (RewardSpec), the exact reward, the
bounds a math answer passes before it reaches a parser, and the entry points the driver and the
evaluation call (`score_completions`, `reward_fn`)."""
from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any, Callable, Sequence

import numpy as np

from copd_jax import answers
from copd_jax.data.domain import REWARD_KINDS, Example, is_reward_name
from copd_jax.errors import UserInputError
from copd_jax.rewards.pool import DEFAULT_TIMEOUT_S, RewardWorkerPool, function_pool, math_pool
from copd_jax.rewards.worker import MATH

MAX_CHARS = 4096
MAX_BRACE_DEPTH = 12  # bare '{' nesting: depth 10 already takes ~1.5 s to parse
_log = logging.getLogger('copd_jax.rewards')  # the name the package docstring gives

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
