"""A researcher's own reward function: `domains.<name>.reward = 'package.module:function'`.

The function's signature:

    def my_reward(response: str, reference: str, example: dict) -> float

  response   the answer that the domain's `answer_extraction` took from the completion's final
             text (after `</think>`; copd_jax/answers.py). A completion without one scores 0
             and the function is not called.
  reference  the example's answer from the data file (numbers as text, e.g. '3', '2.5').
  example    {'prompt', 'messages' (list of {'role', 'content'}; [] for a prompt row),
             'domain', 'id', 'completion' (the whole decoded completion, reasoning included)}.
  returns    a finite number (bool and int count). Usually in [0, 1]: evaluation reports the
             mean as the domain's accuracy.

It runs in the same worker processes as the built-in math reward (copd_jax/rewards/): each
call has `domains.<name>.reward_timeout_s` seconds and a bounded address space, so a function
that raises, returns something else, runs too long or crashes its process scores 0 for that
completion, and the run logs why (one warning line per batch); training goes on.

The module is imported like any other: from an installed package, or from the config file's
folder or the current directory, which `load_config` puts on sys.path when a domain names a
function (the workers inherit that path). A name that does not import, or does not name a
callable, stops the run at config load with one line naming the field.
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Callable, Iterable

from copd_jax.data.domain import REWARD_KINDS, is_reward_name
from copd_jax.errors import UserInputError


def is_function_spec(text: str) -> bool:
  """True for 'package.module:function' (a name, not yet resolved)."""
  return is_reward_name(text) and text not in REWARD_KINDS


def add_search_path(folders: Iterable[str]) -> None:
  """Puts `folders` (absolute) at the front of sys.path, each once."""
  for folder in reversed([os.path.abspath(f) for f in folders]):
    if folder not in sys.path:
      sys.path.insert(0, folder)


def resolve(spec: str) -> Callable:
  """The callable named by 'package.module:function'; UserInputError saying what is wrong."""
  if not is_function_spec(spec):
    raise UserInputError(f"{spec!r} is not 'package.module:function'")
  module_name, function_name = spec.split(':')
  try:
    module = importlib.import_module(module_name)
  except Exception as e:  # ImportError, or the module's own code failing
    raise UserInputError(f'cannot import {module_name!r} ({type(e).__name__}: '
                         f'{str(e).splitlines()[0] if str(e) else ""})') from None
  function = getattr(module, function_name, None)
  if not callable(function):
    raise UserInputError(f'{module_name!r} ({getattr(module, "__file__", "?")}) has no '
                         f'function {function_name!r}')
  return function
