"""Built-in toy domains on the character tokenizer, and the warm-start split of each.

The designed toy world (experiments/results/README.md explains it) is three digit domains:

    sort     'sort 50382' -> '02358'      the digits ascending
    rsort    'sort:50382' -> '85320'      the digits descending: the same surface as sort but
                                          for one character, so sort and rsort conflict
    reverse  'rev 50382'  -> '28305'      the digits in reverse order: like sort, it copies
                                          the prompt's digits into the answer (shared sub-skill)

RL training and evaluation use instances of 3-6 digits. The warm start (`warmstart_examples`)
uses its own instances of 2-6 digits, never an RL or eval prompt, and a share of them
(`warmstart.wrong_share`) carry the domain's near-miss answer: sort's descending order, rsort's
ascending, reverse's digits unchanged. The base so knows the format and both answers and is
right on only part of its samples of every prompt; GRPO has to find out which answer the
reward prefers, on prompts it has never seen.

Two older domains stay for the mechanics tests and user configs; they are not part of the
designed world (the audit of issue 18 found count's warm-started base at chance):

    arithmetic  '37+58' -> '95', '12-40' -> '-28'     two-digit addition / subtraction
    count       'count b:abbdcb' -> '3'                count one letter in a 4-8 letter string

Their warm-start split is a held-out split of the same distribution. Answers are scored with the
'exact' reward.

Generation is deterministic in (domain, seed): one stream of random prompts, deduplicated;
the first `num_eval` distinct prompts are the eval split and the next `num_train` the train
split, so the eval split does not depend on `num_train` and never shares a prompt with train.
The warm-start split is a second stream that skips every train and eval prompt.
"""
from __future__ import annotations

import dataclasses
import random
import string
from typing import Callable, Collection

from copd_jax.data.distinct import first_distinct
from copd_jax.data.domain import Example, content_id
from copd_jax.errors import UserInputError


def _digits(rng: random.Random, size: int) -> str:
  return ''.join(rng.choice(string.digits) for _ in range(size))


def _sort(rng: random.Random, size: int) -> tuple[str, str]:
  digits = _digits(rng, size)
  return f'sort {digits}', ''.join(sorted(digits))


def _rsort(rng: random.Random, size: int) -> tuple[str, str]:
  digits = _digits(rng, size)
  return f'sort:{digits}', ''.join(sorted(digits, reverse=True))


def _reverse(rng: random.Random, size: int) -> tuple[str, str]:
  digits = _digits(rng, size)
  return f'rev {digits}', digits[::-1]


def _digits_of(prompt: str) -> str:
  return prompt[5:] if prompt.startswith('sort') else prompt.split(' ', 1)[1]


def _descending(prompt: str) -> str:
  return ''.join(sorted(_digits_of(prompt), reverse=True))


def _ascending(prompt: str) -> str:
  return ''.join(sorted(_digits_of(prompt)))


def _unchanged(prompt: str) -> str:
  return _digits_of(prompt)


def _arithmetic(rng: random.Random, size: int) -> tuple[str, str]:
  a, b = rng.randrange(10 ** size), rng.randrange(10 ** size)
  if rng.random() < 0.5:
    return f'{a}+{b}', str(a + b)
  return f'{a}-{b}', str(a - b)


def _count(rng: random.Random, size: int) -> tuple[str, str]:
  letters = 'abcd'  # a small alphabet so that counts other than 0 and 1 are common
  text = ''.join(rng.choice(letters) for _ in range(size))
  target = rng.choice(letters)
  return f'count {target}:{text}', str(text.count(target))


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
  """A domain's generator `(rng, size) -> (prompt, answer)` and its instance sizes (inclusive
  ranges): `sizes` for the train and eval splits, `warm_sizes` for the warm start.
  `near_miss(prompt)` is the plausible wrong answer a share of the warm-start examples carry
  (None: the warm start is always right)."""
  generate: Callable[[random.Random, int], tuple[str, str]]
  sizes: tuple[int, int]
  warm_sizes: tuple[int, int]
  near_miss: Callable[[str], str] | None = None


SPECS: dict[str, SyntheticSpec] = {
    'sort': SyntheticSpec(_sort, sizes=(3, 6), warm_sizes=(2, 6), near_miss=_descending),
    'rsort': SyntheticSpec(_rsort, sizes=(3, 6), warm_sizes=(2, 6), near_miss=_ascending),
    'reverse': SyntheticSpec(_reverse, sizes=(3, 6), warm_sizes=(2, 6), near_miss=_unchanged),
    'arithmetic': SyntheticSpec(_arithmetic, sizes=(2, 2), warm_sizes=(2, 2)),
    'count': SyntheticSpec(_count, sizes=(4, 8), warm_sizes=(4, 8)),
}
SYNTHETIC_DOMAINS: tuple[str, ...] = tuple(SPECS)
MAX_PROMPT_CHARS = 16
MAX_ANSWER_CHARS = 8


def _spec(name: str) -> SyntheticSpec:
  if name not in SPECS:
    raise UserInputError(f'unknown synthetic domain {name!r}; choose from {", ".join(SYNTHETIC_DOMAINS)}')
  return SPECS[name]


def _distinct(name: str, rng: random.Random, sizes: tuple[int, int], needed: int,
              exclude: Collection[str] = ()) -> list[Example]:
  """`needed` distinct examples from one random stream, none with a prompt in `exclude`."""
  generate = _spec(name).generate

  def draw() -> tuple[str, str]:
    return generate(rng, rng.randint(*sizes))
  pairs = first_distinct(draw, lambda pair: pair[0], needed, f'synthetic domain {name!r}', exclude)
  return [Example(prompt=prompt, answer=answer, domain=name, id=content_id(name, prompt),
                  reward='exact') for prompt, answer in pairs]


def synthetic_domain(name: str, seed: int, num_train: int,
                     num_eval: int) -> tuple[list[Example], list[Example]]:
  """(train, eval) examples of a built-in domain; deterministic in (name, seed), disjoint
  prompts between the splits, no duplicate prompt within a split."""
  spec = _spec(name)
  if num_train < 0 or num_eval < 0:
    raise UserInputError(f'synthetic domain {name!r}: num_train and num_eval must be >= 0, '
                         f'got {num_train} and {num_eval}')
  examples = _distinct(name, random.Random(f'{name}/{seed}'), spec.sizes, num_train + num_eval)
  return examples[num_eval:], examples[:num_eval]


def warmstart_examples(name: str, seed: int, count: int, exclude: Collection[str],
                       wrong_share: float = 0.0) -> list[Example]:
  """`count` warm-start examples of a built-in domain at its warm-start sizes, none with a prompt
  in `exclude` (the run's train and eval prompts); deterministic in (name, seed). A random
  `wrong_share` of them carry the domain's near-miss answer instead of the right one (domains
  without a near miss: none), so the base is right on only part of its samples."""
  if count < 1:
    raise UserInputError(f'synthetic domain {name!r}: warm-start count must be >= 1, got {count}')
  if not 0.0 <= wrong_share < 1.0:
    raise UserInputError(f'synthetic domain {name!r}: wrong_share must be in [0, 1), got {wrong_share}')
  spec = _spec(name)
  rng = random.Random(f'{name}/{seed}/warmstart')
  examples = _distinct(name, rng, spec.warm_sizes, count, exclude=frozenset(exclude))
  if spec.near_miss is None:
    return examples
  return [dataclasses.replace(e, answer=spec.near_miss(e.prompt)) if rng.random() < wrong_share
          else e for e in examples]
