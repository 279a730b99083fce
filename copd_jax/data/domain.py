"""The unit of data: one prompt with its verifiable answer, and how it becomes model text.

Every source (synthetic generators, JSONL / Parquet files) produces `Example`s; the pipelines
batch them, the sampler renders their prompts, and the rewards compare completions with
`answer`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from typing import Sequence

from copd_jax.errors import UserInputError
from copd_jax.models.chat_template import render_chat, template_source

REWARD_KINDS = ('exact', 'math')
_FUNCTION_SPEC = re.compile(r'^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$')


def is_reward_name(kind: str) -> bool:
  """A built-in reward kind or a user function named 'package.module:function'."""
  return kind in REWARD_KINDS or (isinstance(kind, str) and bool(_FUNCTION_SPEC.match(kind)))


@dataclasses.dataclass(frozen=True)
class Example:
  """One prompt and its reference answer.

  prompt: the user's text, without any chat template (for a chat row: its last user turn).
  answer: the reference answer; compared by the reward named in `reward`.
  domain: the name of the domain / task the example belongs to (one branch's data).
  id: a stable identifier (same example, same id across runs and seeds).
  reward: what scores completions of this prompt ('exact', 'math' or 'package.module:function').
  messages: a chat row's turns as (role, content) pairs, ending with the user turn that
    `prompt` holds; () for a plain prompt row.
  source: where the row came from, 'path:line' (JSON Lines) or 'path: row N' (Parquet); '' for
    generated examples. Error messages about one prompt name it; not part of equality.
  images: paths of the row's images, in prompt order (checked when the file was loaded).
  video: paths of the frames of the row's video, in order; () when it has none.
  video_fps: the frame rate of that video, which its timestamp tokens follow (a row's 'fps', else
    its domain's video_fps, default 24); None for a row without a video (a video row built
    without one: transformers' default, vision_inputs.DEFAULT_VIDEO_FPS).
  """
  prompt: str
  answer: str
  domain: str
  id: str
  reward: str = 'exact'
  messages: tuple[tuple[str, str], ...] = ()
  source: str = dataclasses.field(default='', compare=False)
  images: tuple[str, ...] = ()
  video: tuple[str, ...] = ()
  video_fps: float | None = None


def where(example: Example) -> str:
  """The place an error about `example` names: its file and line when it has one, else its id
  and the start of its prompt (a generated example)."""
  if example.source:
    return example.source
  start = example.prompt if len(example.prompt) <= 30 else example.prompt[:30] + '...'
  return f'{example.id} (prompt {start!r})'



@dataclasses.dataclass(frozen=True)
class PromptFormat:
  """How a domain's prompts become model text (config `domains.<name>`): through the
  tokenizer's chat template or raw; a system prompt for rows that bring none; Qwen3's
  `enable_thinking` (False: the template closes an empty `<think></think>` block itself, so
  the model answers without reasoning; other templates ignore it)."""
  use_chat_template: bool = True
  system_prompt: str = ''
  enable_thinking: bool = True


def prompt_format(domain) -> PromptFormat:
  """The PromptFormat of a config's `domains.<name>` entry."""
  return PromptFormat(domain.use_chat_template, domain.system_prompt, domain.enable_thinking)


def chat_messages(example: Example, system_prompt: str = '') -> list[dict[str, str]]:
  """The example as chat messages; `system_prompt` leads unless the row has a system turn."""
  turns = list(example.messages) or [('user', example.prompt)]
  if system_prompt and not any(role == 'system' for role, _ in turns):
    turns.insert(0, ('system', system_prompt))
  return [{'role': role, 'content': content} for role, content in turns]


def content_id(domain: str, prompt: str) -> str:
  """A stable id from the domain and the prompt text (unique once prompts are deduplicated)."""
  digest = hashlib.sha1(f'{domain}\x00{prompt}'.encode('utf-8')).hexdigest()[:12]
  return f'{domain}:{digest}'


def render_prompt(tokenizer, example: Example, fmt: PromptFormat | bool = True) -> str:
  """The text the model is conditioned on: the chat template with a generation prompt (system
  prompt and enable_thinking from `fmt`), or the raw prompt. With the character tokenizer,
  '12+34' renders as '12+34\\n='. `fmt` may be a bool: use_chat_template with the defaults."""
  fmt = fmt if isinstance(fmt, PromptFormat) else PromptFormat(use_chat_template=bool(fmt))
  if not fmt.use_chat_template:
    if len(example.messages) > 1:
      raise UserInputError(f'{where(example)}: a chat row (messages) needs use_chat_template=True')
    return example.prompt
  source = template_source(getattr(tokenizer, 'name_or_path', None))
  if getattr(tokenizer, 'chat_template', None) is None:
    raise UserInputError(f'{source}: the tokenizer has no chat_template (needed by '
                         f'use_chat_template=True, {where(example)})')
  text = render_chat(tokenizer, chat_messages(example, fmt.system_prompt), source=source,
                     context=f'the prompt of {where(example)}',
                     enable_thinking=fmt.enable_thinking)
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


def prompt_key(example: Example) -> tuple:
  """What makes two prompts the same: the text and the images / video (one question asked of
  many pictures is many prompts)."""
  return example.prompt, example.images, example.video


def dedupe_by_prompt(examples: Sequence[Example]) -> list[Example]:
  """First occurrence of each prompt (`prompt_key`), order kept."""
  seen: set[tuple] = set()
  out = []
  for ex in examples:
    if prompt_key(ex) not in seen:
      seen.add(prompt_key(ex))
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
  eval_prompts = {prompt_key(ex) for ex in eval_examples}
  train = [ex for ex in order if prompt_key(ex) not in eval_prompts]
  return train, eval_examples
