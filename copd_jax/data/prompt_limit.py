"""data.max_prompt_tokens: a cap on rendered prompt length, applied once at set-up.

Each batch is left-padded to the bucket of its own longest prompt (copd_jax/prompt_buckets.py),
but the memory check plans for the bucket of the run's longest prompt of all domains and splits
(rollouts.PromptEncoder.fix_length), so one very long prompt makes the whole run budget for it
and every batch that draws it pay for it. With max_prompt_tokens > 0, prompts longer than that (in tokens, after the chat template)
are handled by data.long_prompts:
  'drop'      removed from their domain's train and eval examples
  'truncate'  kept, cut to their last max_prompt_tokens tokens (the end of a chat prompt holds
              the assistant header the completion follows; PromptEncoder.ids does the cut)
Either way the run's largest bucket is at most the bucket of max_prompt_tokens. What happened is counted
per domain and split and logged once (`prompt_limit_lines`); a domain left without train or
eval examples stops the run with one line naming config.data.max_prompt_tokens.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from copd_jax.errors import ConfigError

LONG_PROMPT_POLICIES = ('drop', 'truncate')
SPLITS = ('train', 'eval')


@dataclasses.dataclass(frozen=True)
class LongPrompts:
  """Of one domain's split: how many prompts, how many over the limit, the longest (tokens)."""
  domain: str
  split: str
  total: int
  over: int
  longest: int


def count_long(domains: dict[str, tuple[list, list]], num_tokens: Callable[[object], int],
               max_tokens: int) -> list[LongPrompts]:
  """LongPrompts of every domain and split; num_tokens(example) is its rendered length."""
  out = []
  for name, splits in domains.items():
    for split, examples in zip(SPLITS, splits):
      lengths = [num_tokens(e) for e in examples]
      out.append(LongPrompts(name, split, len(lengths), sum(n > max_tokens for n in lengths),
                             max(lengths, default=0)))
  return out


def limit_prompts(domains: dict[str, tuple[list, list]], encoder, max_tokens: int,
                  policy: str) -> tuple[dict[str, tuple[list, list]], list[LongPrompts]]:
  """(domains, counts) after applying the cap: 'drop' filters the examples, 'truncate' sets
  encoder.max_tokens (the examples stay). max_tokens = 0: unchanged, no counts."""
  if not max_tokens:
    return domains, []
  counts = count_long(domains, lambda e: len(encoder.full_ids(e)), max_tokens)
  if policy == 'truncate':
    encoder.max_tokens = max_tokens
    return domains, counts
  kept = {name: tuple([e for e in examples if len(encoder.full_ids(e)) <= max_tokens]
                      for examples in splits) for name, splits in domains.items()}
  for c in counts:
    if c.over == c.total and c.total:
      raise ConfigError(f'config.data.max_prompt_tokens: all {c.total} {c.split} prompts of '
                        f"domain '{c.domain}' are longer than {max_tokens} tokens (the longest "
                        f"has {c.longest}); raise it or set data.long_prompts='truncate'")
  return kept, counts


def prompt_limit_lines(counts: Sequence[LongPrompts], max_tokens: int, policy: str) -> list[str]:
  """The set-up log: one line per domain, e.g. "data.max_prompt_tokens=512: domain 'math':
  dropped 3 of 2000 train and 0 of 200 eval prompts (longest 812 tokens)"."""
  verb = 'dropped' if policy == 'drop' else 'truncated'
  by_domain: dict[str, list[LongPrompts]] = {}
  for c in counts:
    by_domain.setdefault(c.domain, []).append(c)
  lines = []
  for name, parts in by_domain.items():
    what = ' and '.join(f'{c.over} of {c.total} {c.split}' for c in parts)
    longest = max(c.longest for c in parts)
    lines.append(f"data.max_prompt_tokens={max_tokens}: domain '{name}': {verb} {what} prompts "
                 f'(longest {longest} tokens)')
  return lines
