"""The unit of data: one prompt with its verifiable answer, and how it becomes model text.

Every source (synthetic generators, JSONL / Parquet files) produces `Example`s; the pipelines
batch them, the sampler renders their prompts, and the rewards compare completions with
`answer`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import random
from typing import Sequence

from copd_jax.errors import UserInputError

REWARD_KINDS = ('exact', 'math')


@dataclasses.dataclass(frozen=True)
class Example:
  """One prompt and its reference answer.

  prompt: the user's text, without any chat template.
  answer: the reference answer; compared by the reward named in `reward`.
  domain: the name of the domain / task the example belongs to (one branch's data).
  id: a stable identifier (same example, same id across runs and seeds).
  reward: the reward kind that scores completions of this prompt ('exact' or 'math').
  """
  prompt: str
  answer: str
  domain: str
  id: str
  reward: str = 'exact'


def content_id(domain: str, prompt: str) -> str:
  """A stable id from the domain and the prompt text (unique once prompts are deduplicated)."""
  digest = hashlib.sha1(f'{domain}\x00{prompt}'.encode('utf-8')).hexdigest()[:12]
  return f'{domain}:{digest}'


def render_prompt(tokenizer, example: Example, use_chat_template: bool) -> str:
  """The text the model is conditioned on: the chat template with a generation prompt, or the
  raw prompt. With the character tokenizer, '12+34' renders as '12+34\\n='."""
  if not use_chat_template:
    return example.prompt
  if getattr(tokenizer, 'chat_template', None) is None:
    raise UserInputError('data.use_chat_template is true but the tokenizer has no chat_template')
  text = tokenizer.apply_chat_template([{'role': 'user', 'content': example.prompt}],
                                       tokenize=False, add_generation_prompt=True)
  if not isinstance(text, str):
    raise TypeError(f'apply_chat_template returned {type(text).__name__}, expected str')
  return text


def sft_pairs(tokenizer, examples: Sequence[Example],
              use_chat_template: bool = True) -> list[tuple[str, str]]:
  """Supervised warm-start pairs: (rendered prompt, answer + eos text).

  The driver tokenizes both without adding special tokens (the eos text maps to the eos id) and
  trains on the target tokens only; the sampled completions of a trained model then look like
  the answer followed by <eos>, which is what the 'exact' reward expects after decoding.
  """
  eos = tokenizer.eos_token
  if not eos:
    raise UserInputError('the tokenizer has no eos_token; warm-start targets need one')
  return [(render_prompt(tokenizer, ex, use_chat_template), ex.answer + eos) for ex in examples]


def dedupe_by_prompt(examples: Sequence[Example]) -> list[Example]:
  """First occurrence of each prompt, order kept."""
  seen: set[str] = set()
  out = []
  for ex in examples:
    if ex.prompt not in seen:
      seen.add(ex.prompt)
      out.append(ex)
  return out


def split_examples(examples: Sequence[Example], num_eval: int,
                   seed: int) -> tuple[list[Example], list[Example]]:
  """Deterministic (train, eval) split with disjoint prompts.

  Examples are shuffled with `seed`, the first `num_eval` distinct prompts form the eval split,
  and every example whose prompt is in the eval split is dropped from train (duplicated rows in a
  data file never leak an eval prompt into training).
  """
  if num_eval < 0:
    raise UserInputError(f'num_eval must be >= 0, got {num_eval}')
  order = list(examples)
  random.Random(f'split/{seed}').shuffle(order)
  eval_examples = dedupe_by_prompt(order)[:num_eval]
  if len(eval_examples) < num_eval:
    raise UserInputError(f'num_eval={num_eval} but only {len(eval_examples)} distinct prompts '
                         'are available')
  eval_prompts = {ex.prompt for ex in eval_examples}
  train = [ex for ex in order if ex.prompt not in eval_prompts]
  return train, eval_examples
