"""Prompts padded per batch: each sampler call pads its prompts to the smallest bucket
(`rollouts.PROMPT_BUCKETS`) that holds its own longest prompt, not to the run's longest, so a
few long prompts in a data set no longer make every batch pay for them.

What that asks of the train steps:

* GRPO scores each group's shared prompt once (`steps.shared_prompt_logprobs`), which needs the
  prompt length as a static number: `StepPerPromptLength` builds one jitted step per prompt
  length it meets (P = T - max_new_tokens of the batch), at most one per bucket.
* An OPD step trains on the native batch and every round's distillation batch as one
  [rows, T] batch, and the edge probe stacks the rounds: those batches, sampled with their own
  buckets, are left-padded to the longest of them (`pad_batch`). Left padding adds positions
  that are neither valid nor scored; positions count valid tokens only, so the math is that of
  the longer bucket (equal up to float summation order: on the README's toy run, whose prompts
  of 10 to 18 tokens now take buckets 16 and 32 instead of 32 throughout, the evaluation table
  and every reward, length and overlap are unchanged, while some later steps' loss and KL
  values differ by about 1e-7).

The memory estimate and `grpo.logits_chunk='auto'` use the run's largest bucket (the bucket of
its longest prompt, `PromptEncoder.length`), the most any batch can need.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from copd_jax.step_config import StepConfig
from copd_jax.steps import RolloutBatch


def pad_batch(batch: RolloutBatch, length: int, pad_id: int = 0) -> RolloutBatch:
  """Batch [..., T] (host or device arrays) left-padded to `length` tokens: pad_id tokens,
  nothing valid, scored or advantaged in the added columns. Device arrays are padded on their
  devices (no host copy: on several processes they are global arrays)."""
  extra = length - batch.tokens.shape[-1]
  if extra < 0:
    raise ValueError(f'cannot pad a batch of {batch.tokens.shape[-1]} tokens to {length}')
  if extra == 0:
    return batch
  return _left_pad(batch, extra, pad_id)


@functools.partial(jax.jit, static_argnames=('extra', 'pad_id'))
def _left_pad(batch: RolloutBatch, extra: int, pad_id: int) -> RolloutBatch:
  def pad(x, value):
    widths = [(0, 0)] * (x.ndim - 1) + [(extra, 0)]
    return jnp.pad(x, widths, constant_values=jnp.asarray(value, x.dtype))
  vision = batch.vision
  if vision is not None:   # Qwen3-VL: added columns are text (slot 0) at position 0
    vision = vision._replace(visual_slot=pad(vision.visual_slot, 0),
                             positions=pad(vision.positions, 0))
  return RolloutBatch(tokens=pad(batch.tokens, pad_id), token_valid=pad(batch.token_valid, False),
                      completion_mask=pad(batch.completion_mask, False),
                      sampler_logprobs=pad(batch.sampler_logprobs, 0),
                      advantages=pad(batch.advantages, 0), vision=vision)


class StepPerPromptLength:
  """`step(state, batch, *rest)` dispatching to a step built for the batch's prompt length
  P = T - config.max_completion_tokens: `build(dataclasses.replace(config, prompt_length=P))`,
  built at its first use and kept (a config with prompt_length 0, shared prompts off, stays
  so)."""

  def __init__(self, build: Callable[[StepConfig], Callable], config: StepConfig):
    self.build, self.config = build, config
    self.steps: dict[int, Callable] = {}

  def prompt_length(self, batch: RolloutBatch) -> int:
    return batch.tokens.shape[-1] - self.config.max_completion_tokens

  def __call__(self, state, batch: RolloutBatch, *rest):
    length = self.prompt_length(batch)
    if length not in self.steps:
      shared = length if self.config.prompt_length else 0
      self.steps[length] = self.build(dataclasses.replace(self.config, prompt_length=shared))
    return self.steps[length](state, batch, *rest)
