"""Batches whose rows come in groups that repeat one prompt: rows k*G .. k*G+G-1 (G =
group_size) share a prompt, as GRPO samples G completions per prompt. The sampler and the GRPO
step then run each group's prompt once and give its KV cache to the group's rows.

One definition each of what that needs, for the sampler (`copd_jax.sampling`), the host glue
(`rollouts`) and the train step (`steps`): the group-size check, the rows that break the
layout (numpy or jax arrays alike) and the repetition of a KV cache's rows.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def check_group_size(batch: int, group_size: int) -> None:
  """Raises ValueError unless group_size is a positive integer that divides the batch."""
  if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
    raise ValueError(f'group_size must be a positive integer, got {group_size!r}')
  if batch % group_size:
    raise ValueError(f'group_size={group_size} does not divide the batch B={batch}')


def rows_off_group(x, group_size: int):
  """x [..., B, L] -> [..., B] bool: the rows that differ from their group's first row. Works on
  numpy arrays (host) and jax arrays (in a program) alike."""
  *lead, batch, length = x.shape
  grouped = x.reshape(*lead, batch // group_size, group_size, length)
  return (grouped != grouped[..., :1, :]).any(axis=-1).reshape(*lead, batch)


def check_groups(tokens: np.ndarray, valid: np.ndarray, group_size: int) -> None:
  """Raises ValueError unless rows k*G .. k*G+G-1 of every branch of the encoded prompts
  tokens, valid [K, B, P] are identical (G = group_size, which must divide B)."""
  check_group_size(tokens.shape[1], group_size)
  for name, x in (('tokens', tokens), ('valid', valid)):
    off = rows_off_group(np.asarray(x), group_size)
    if off.any():
      k, row = (int(i) for i in np.argwhere(off)[0])
      first = row // group_size * group_size
      raise ValueError(f'group_size={group_size}: prompt {name} of branch {k} rows '
                       f'{first}..{first + group_size - 1} are not all the same')


def repeat_cache(cache, times: int):
  """Each batch row of a KV cache `times` times in place (row b -> rows b*times ..
  b*times+times-1). For the model's `KVCache` (k, v [layers, B, ...]) and for caches held as
  one buffer per layer (k, v: tuples of [B, ...]) alike; valid [B, S]; the index is shared."""
  rows = lambda x, axis: jnp.repeat(x, times, axis=axis)
  kv = lambda x: tuple(rows(layer, 0) for layer in x) if isinstance(x, tuple) else rows(x, 1)
  return cache._replace(k=kv(cache.k), v=kv(cache.v), valid=rows(cache.valid, 0))
