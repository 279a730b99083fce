"""The first N distinct items of a random stream: how the built-in domains (text and vision)
draw their examples, deterministic in the stream's seed."""
from __future__ import annotations

from typing import Callable, Collection, TypeVar

from copd_jax.errors import UserInputError

T = TypeVar('T')


def first_distinct(draw: Callable[[], T | None], key: Callable[[T], str], needed: int, what: str,
                   exclude: Collection[str] = ()) -> list[T]:
  """`needed` items of `draw()` (None: no item this time, draw again) with distinct `key`s, none
  in `exclude`, in stream order. Each built-in domain has far more distinct items than a run
  uses; the attempt cap only turns a request beyond a domain's size into a one-line error
  naming `what` (e.g. "synthetic domain 'sort'"), not a hang."""
  seen: set[str] = set()
  items: list[T] = []
  attempts = 0
  while len(items) < needed:
    attempts += 1
    if attempts > 30 * needed + 10_000:
      raise UserInputError(f'{what} has fewer than {needed} distinct prompts (found '
                           f'{len(items)}); lower num_train / num_eval')
    item = draw()
    if item is None:
      continue
    k = key(item)
    if k in seen or k in exclude:
      continue
    seen.add(k)
    items.append(item)
  return items
