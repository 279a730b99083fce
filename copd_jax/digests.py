"""Per-array digests of a state pytree, stored with each checkpoint and checked on restore.

Orbax's array chunks carry no checksum: a flipped bit on disk restores silently as a wrong
weight. A digest here is two wrapping uint32 sums over an array's raw bits (one plain, one
weighted by the flat index), computed on the device where the array lives. Integer sums are
exact and order-free, so the digest does not depend on the sharding or the reduction order: a
checkpoint saved on one mesh verifies on another. Any single flipped bit changes the plain sum
(by a power of two below 2^32); the weighted sum also catches values that moved position.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _words(x: jax.Array) -> jax.Array:
  """The raw bits of `x` as a flat uint32 vector (8-byte items as two words)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = x.dtype.itemsize
  if size == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
  return jax.lax.bitcast_convert_type(x, _UNSIGNED[size]).astype(jnp.uint32).reshape(-1)


def _digest(x: jax.Array) -> jax.Array:
  words = _words(x)
  index = jnp.arange(1, words.size + 1, dtype=jnp.uint32)
  return jnp.stack([jnp.sum(words, dtype=jnp.uint32),
                    jnp.sum(words * index, dtype=jnp.uint32)])


@functools.partial(jax.jit)
def _digests(leaves: list[jax.Array]) -> list[jax.Array]:
  return [_digest(x) for x in leaves]


def _name(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
                  for k in path)


def tree_digests(tree: Any) -> dict[str, dict[str, Any]]:
  """{leaf path: {'dtype', 'shape', 'digest': [plain, weighted]}} for every array leaf."""
  flat = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
          if isinstance(x, (jax.Array, np.ndarray))]
  values = jax.device_get(_digests([jnp.asarray(x) for _, x in flat]))
  return {_name(p): {'dtype': str(x.dtype), 'shape': list(x.shape),
                     'digest': [int(v) for v in np.asarray(d)]}
          for (p, x), d in zip(flat, values)}


def mismatches(saved: dict[str, dict[str, Any]], tree: Any) -> list[str]:
  """Leaf paths of `tree` whose digest differs from `saved` (leaves restored with another dtype
  or shape than saved, or absent from `saved`, are not compared)."""
  current = tree_digests(tree)
  return [name for name, record in current.items()
          if name in saved and saved[name]['dtype'] == record['dtype']
          and saved[name]['shape'] == record['shape']
          and saved[name]['digest'] != record['digest']]
