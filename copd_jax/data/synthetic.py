"""Built-in toy domains on the character tokenizer, each needing a different skill.

    arithmetic  '37+58' -> '95', '12-40' -> '-28'     two-digit addition / subtraction
    reverse     'rev kqzt' -> 'tzqk'                   reverse a 3-6 letter lowercase word
    sort        'sort 50382' -> '02358'                sort 3-6 digits ascending
    count       'count b:abbdcb' -> '3'                count one letter in a 4-8 letter string

Prompts are at most 16 characters and answers at most 6, so a ~1M-parameter model learns
something on CPU within a minute. Answers are scored with the 'exact' reward.

Generation is deterministic in (domain, seed): one stream of random prompts, deduplicated;
the first `num_eval` distinct prompts are the eval split and the next `num_train` the train
split, so the eval split does not depend on `num_train` and never shares a prompt with train.
"""
from __future__ import annotations

import random
import string
from typing import Callable

from copd_jax.data.domain import Example, content_id
from copd_jax.errors import UserInputError

_Generator = Callable[[random.Random], tuple[str, str]]


def _arithmetic(rng: random.Random) -> tuple[str, str]:
  a, b = rng.randrange(100), rng.randrange(100)
  if rng.random() < 0.5:
    return f'{a}+{b}', str(a + b)
  return f'{a}-{b}', str(a - b)


def _reverse(rng: random.Random) -> tuple[str, str]:
  word = ''.join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
  return f'rev {word}', word[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
  digits = ''.join(rng.choice(string.digits) for _ in range(rng.randint(3, 6)))
  return f'sort {digits}', ''.join(sorted(digits))


def _count(rng: random.Random) -> tuple[str, str]:
  letters = 'abcd'  # a small alphabet so that counts other than 0 and 1 are common
  text = ''.join(rng.choice(letters) for _ in range(rng.randint(4, 8)))
  target = rng.choice(letters)
  return f'count {target}:{text}', str(text.count(target))


_GENERATORS: dict[str, _Generator] = {
    'arithmetic': _arithmetic,
    'reverse': _reverse,
    'sort': _sort,
    'count': _count,
}
SYNTHETIC_DOMAINS: tuple[str, ...] = tuple(_GENERATORS)
MAX_PROMPT_CHARS = 16
MAX_ANSWER_CHARS = 8


def synthetic_domain(name: str, seed: int, num_train: int,
                     num_eval: int) -> tuple[list[Example], list[Example]]:
  """(train, eval) examples of a built-in domain; deterministic in (name, seed), disjoint
  prompts between the splits, no duplicate prompt within a split."""
  if name not in _GENERATORS:
    raise UserInputError(f'unknown synthetic domain {name!r}; choose from {", ".join(SYNTHETIC_DOMAINS)}')
  if num_train < 0 or num_eval < 0:
    raise UserInputError(f'synthetic domain {name!r}: num_train and num_eval must be >= 0, '
                         f'got {num_train} and {num_eval}')
  generate = _GENERATORS[name]
  rng = random.Random(f'{name}/{seed}')
  needed = num_train + num_eval
  seen: set[str] = set()
  examples: list[Example] = []
  # Each domain has far more distinct prompts than a toy run uses; the attempt cap only turns a
  # request beyond a domain's size (arithmetic has 20,000 prompts) into an error, not a hang.
  attempts = 0
  while len(examples) < needed:
    attempts += 1
    if attempts > 30 * needed + 10_000:
      raise UserInputError(f'synthetic domain {name!r} has fewer than {needed} distinct prompts '
                           f'(found {len(examples)}); lower num_train / num_eval')
    prompt, answer = generate(rng)
    if prompt in seen:
      continue
    seen.add(prompt)
    examples.append(Example(prompt=prompt, answer=answer, domain=name,
                            id=content_id(name, prompt), reward='exact'))
  return examples[num_eval:], examples[:num_eval]
