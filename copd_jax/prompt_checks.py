"""Every prompt of a run checked against the tokenizer and the model, before any compute.

A run encodes all its prompts once at set-up (one prompt bucket for the whole run). Before the
base model is warm-started or loaded, `check_prompts` encodes them and stops with one line
naming the data file and line of the first prompt that cannot work:

* longer than the model's `max_position_embeddings` or than the largest prompt bucket (a
  200,000-character prompt would otherwise ask for terabytes in the warm start);
* holding a token id the model's embedding does not have (a tokenizer larger than the
  model's `vocab_size`).

Two decisions are logged once instead of made silently: prompts whose characters the tokenizer
does not know (encoded as its unknown token; the character model knows printable ASCII only),
and prompts that fit but leave less than `sampling.max_new_tokens` positions for the
completion.
"""
from __future__ import annotations

from typing import Callable, Sequence

from copd_jax.data.domain import Example, where
from copd_jax.errors import UserInputError
from copd_jax.rollouts import PROMPT_BUCKETS


class PromptError(UserInputError):
  """A prompt the model cannot take; the message names its file and line."""


def _first(found: list[tuple[Example, int]]) -> str:
  example, n = found[0]
  return f'{where(example)}, {n:,}'


def check_prompts(encoder, examples: Sequence[Example], *, vocab_size: int, max_positions: int,
                  max_new_tokens: int, model_source: str, log: Callable[[str], None]) -> int:
  """Encodes `examples` with `encoder` (a rollouts.PromptEncoder) and returns the longest prompt
  in tokens. Raises PromptError for the first prompt the model cannot take; logs one line for
  unknown characters and one for prompts that crowd out the completion."""
  unk = encoder.tokenizer.unk_token_id
  largest = max(PROMPT_BUCKETS)
  with_unknown: list[tuple[Example, int]] = []
  crowded: list[tuple[Example, int]] = []
  longest = 0
  for example in examples:
    ids = encoder.ids(example)
    n = len(ids)
    if n > min(max_positions, largest):
      limit = (f'the model holds {max_positions:,} positions (max_position_embeddings of '
               f'{model_source})' if n > max_positions else
               f'the largest prompt bucket is {largest:,} tokens')
      raise PromptError(f'{where(example)}: the prompt is {n:,} tokens; {limit}; shorten it or '
                        'remove the row')
    top = max(ids, default=0)
    if top >= vocab_size:
      raise PromptError(f'{where(example)}: the prompt encodes to token id {top:,} '
                        f'({encoder.tokenizer.convert_ids_to_tokens(top)!r}) but the model has '
                        f'{vocab_size:,} embeddings (vocab_size of {model_source}); the tokenizer '
                        'does not belong to this model')
    if unk is not None and unk in ids:
      with_unknown.append((example, ids.count(unk)))
    if n + max_new_tokens > max_positions:
      crowded.append((example, n))
    longest = max(longest, n)
  total = len(examples)
  if with_unknown:
    log(f'warning: {len(with_unknown):,} of {total:,} prompts hold characters the tokenizer does '
        f'not know, encoded as {encoder.tokenizer.unk_token!r} '
        f'({sum(n for _, n in with_unknown):,} tokens; first: {_first(with_unknown)} of them)')
  if crowded:
    log(f'warning: {len(crowded):,} of {total:,} prompts plus sampling.max_new_tokens='
        f'{max_new_tokens} exceed max_position_embeddings={max_positions:,} of {model_source} '
        f'(first: {_first(crowded)} prompt tokens); their completions run past the positions '
        'the model was trained on')
  return longest
