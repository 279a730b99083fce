"""Per-array digests of a state pytree, stored with each checkpoint and checked when it is read.

Orbax's array chunks carry no checksum: a flipped bit on disk restores silently as a wrong
weight. A digest here is two wrapping uint32 sums over an array's raw bits (uint32 words; items
of 1 or 2 bytes widened to one word, 8-byte items split into two): the plain sum of the words
and the sum of word * (flat word index + 1). Integer sums are exact and order-free, so the
digest does not depend on the sharding or the reduction order: a checkpoint saved on one mesh
verifies on another. Any single flipped bit changes the plain sum (by a power of two below
2^32); the weighted sum also catches values that moved position.

Both sums add up over disjoint blocks of an array (each word weighted by its index in the whole
array), so an array read block by block (a merge streams one layer, or one block of a layer, at
a time) is verified once its blocks cover it: `region_digest` and `Coverage`. For leaves with a
leading branch axis the digest of every branch x[k] is stored too ('branches'); the whole-leaf
digest follows from those, so saving costs one pass over the state either way.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}
_MOD = 2**32

Digest = list[int]   # [plain, weighted], each in [0, 2^32)


def _words(x: jax.Array) -> jax.Array:
  """The raw bits of `x` as uint32, shaped like `x` (8-byte items: a trailing axis of 2)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = x.dtype.itemsize
  if size == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jax.lax.bitcast_convert_type(x, _UNSIGNED[size]).astype(jnp.uint32)


def _strides(shape: Sequence[int]) -> list[int]:
  return [math.prod(shape[a + 1:]) for a in range(len(shape))]


def _digest(x: jax.Array, per_branch: bool) -> jax.Array:
  """[2] (whole array) or [K, 2] (each x[k]); the word index comes from iotas, not a reshape,
  so a sharded array is reduced where it lies."""
  words = _words(x)
  first = 1 if per_branch else 0
  index = jnp.ones(words.shape, jnp.uint32)
  for axis, stride in enumerate(_strides(words.shape[first:]), start=first):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(
        stride % _MOD)
  axes = tuple(range(first, words.ndim))
  return jnp.stack([jnp.sum(words, axis=axes, dtype=jnp.uint32),
                    jnp.sum(words * index, axis=axes, dtype=jnp.uint32)], axis=-1)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _digests(leaves: list[jax.Array], per_branch: tuple[bool, ...],
             replicated: tuple[jax.sharding.Sharding | None, ...]) -> list[jax.Array]:
  out = [_digest(x, b) for x, b in zip(leaves, per_branch)]
  # Per-branch digests of a branch-sharded leaf would stay sharded across processes; every
  # process reads them all.
  return [d if r is None else jax.lax.with_sharding_constraint(d, r)
          for d, r in zip(out, replicated)]


def _replicated(x) -> jax.sharding.Sharding | None:
  sharding = getattr(x, 'sharding', None)
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  return None


def _name(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
                  for k in path)


def _word_count(x) -> int:
  itemsize = 8 if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x.dtype.itemsize
  return math.prod(x.shape) * (2 if itemsize == 8 else 1)


def combine_branches(branches: Sequence[Digest], words_per_branch: int) -> Digest:
  """The digest of a leaf [K, ...] from the digests of its K branches."""
  plain = sum(p for p, _ in branches) % _MOD
  weighted = sum(w + k * words_per_branch * p for k, (p, w) in enumerate(branches)) % _MOD
  return [plain, weighted]


def tree_digests(tree: Any, per_branch: Callable[[str], bool] | None = None
                 ) -> dict[str, dict[str, Any]]:
  """{leaf path: {'dtype', 'shape', 'digest': [plain, weighted]}} for every array leaf, in one
  jitted pass on the devices where the leaves live. Leaves whose path satisfies `per_branch`
  (and that have an axis) also get 'branches': the digest of each x[k] along axis 0."""
  flat = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
          if isinstance(x, (jax.Array, np.ndarray))]
  split = tuple(bool(per_branch and np.ndim(x) >= 1 and per_branch(_name(p))) for p, x in flat)
  leaves = [jnp.asarray(x) for _, x in flat]
  values = jax.device_get(_digests(leaves, split, tuple(_replicated(x) for x in leaves)))
  out = {}
  for (p, x), d, b in zip(flat, values, split):
    record: dict[str, Any] = {'dtype': str(x.dtype), 'shape': list(x.shape)}
    if b:
      record['branches'] = [[int(v) for v in row] for row in np.asarray(d)]
      record['digest'] = combine_branches(record['branches'], _word_count(x) // x.shape[0])
    else:
      record['digest'] = [int(v) for v in np.asarray(d)]
    out[_name(p)] = record
  return out


def mismatches(saved: dict[str, dict[str, Any]], tree: Any) -> list[str]:
  """Leaf paths of `tree` whose digest differs from `saved` (leaves restored with another dtype
  or shape than saved, or absent from `saved`, are not compared)."""
  current = tree_digests(tree)
  return [name for name, record in current.items()
          if name in saved and saved[name]['dtype'] == record['dtype']
          and saved[name]['shape'] == record['shape']
          and saved[name]['digest'] != record['digest']]


# ---------------------------------------------------------------------------------------------
# Host side: digests of numpy arrays and of blocks of them
# ---------------------------------------------------------------------------------------------

def host_words(x: np.ndarray) -> np.ndarray:
  """numpy twin of `_words`: the raw bits as unsigned words (1- and 2-byte items keep their
  width; the sums widen them), shaped like `x`, 8-byte items with a trailing axis of 2."""
  x = np.ascontiguousarray(x)
  if x.dtype == np.bool_:
    x = x.view(np.uint8)
  size = x.dtype.itemsize
  if size == 8:
    return x.view(np.uint32).reshape(x.shape + (2,))
  return x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[size])


def word_shape(shape: Sequence[int], dtype: Any) -> tuple[int, ...]:
  """Shape of host_words of an array of this shape and dtype."""
  return tuple(shape) + ((2,) if np.dtype(dtype).itemsize == 8 else ())


def region_digest(words: np.ndarray, starts: Sequence[int], full_shape: Sequence[int]) -> Digest:
  """The contribution to the digest of an array of words shaped `full_shape` of its block
  `words` starting at index `starts` (so the contributions of disjoint blocks that cover the
  array add up, mod 2^32, to its digest). Memory: a few vectors of one row or column."""
  if words.ndim == 0:
    words, starts, full_shape = words.reshape(1, 1), (0, 0), (1, 1)
  elif words.ndim == 1:
    words, starts, full_shape = words[None], (0, *starts), (1, *full_shape)
  strides = _strides(full_shape)
  cols = words.shape[-1]
  table = words.reshape(-1, cols)
  rows = table.sum(axis=1, dtype=np.uint64)
  columns = table.sum(axis=0, dtype=np.uint64)
  offset = np.full(words.shape[:-1], starts[-1], np.uint64)
  for axis in range(words.ndim - 1):
    along = np.arange(starts[axis], starts[axis] + words.shape[axis], dtype=np.uint64)
    shape = [1] * (words.ndim - 1)
    shape[axis] = words.shape[axis]
    offset = offset + (along * np.uint64(strides[axis])).reshape(shape)
  plain = int(rows.sum(dtype=np.uint64)) % _MOD
  weighted = (int((rows * (offset.reshape(-1) + np.uint64(1))).sum(dtype=np.uint64))
              + int((columns * np.arange(cols, dtype=np.uint64)).sum(dtype=np.uint64))) % _MOD
  return [plain, weighted]


def array_digest(x: np.ndarray) -> Digest:
  """The digest of a whole host array (equal to what tree_digests gives for it)."""
  words = host_words(np.asarray(x))
  return region_digest(words, (0,) * words.ndim, words.shape)


def host_tree_digests(tree: Any) -> dict[str, dict[str, Any]]:
  """tree_digests computed on the host with numpy, leaf by leaf (for trees already in host
  memory, e.g. a merge's output written by one process alone)."""
  out = {}
  for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if isinstance(x, (jax.Array, np.ndarray)):
      out[_name(p)] = {'dtype': str(x.dtype), 'shape': list(x.shape),
                       'digest': array_digest(np.asarray(x))}
  return out


Region = tuple[tuple[int, int], ...]   # (start, stop) per axis


class Coverage:
  """Accumulates the digests of blocks of one array until the blocks cover it.

  `add` returns the array's digest once the blocks added so far cover it exactly (then starts
  afresh), else None. A block read again replaces its earlier contribution; blocks that overlap
  without being equal make the array unverifiable from these reads (`add` then keeps returning
  None)."""

  def __init__(self, shape: Sequence[int]):
    self.size = math.prod(shape)
    self.blocks: dict[Region, Digest] = {}
    self.overlapping = False

  def add(self, region: Region, digest: Digest) -> Digest | None:
    if self.overlapping:
      return None
    if region not in self.blocks and any(_intersect(region, r) for r in self.blocks):
      self.overlapping = True
      self.blocks.clear()
      return None
    self.blocks[region] = digest
    if sum(math.prod(b - a for a, b in r) for r in self.blocks) < self.size:
      return None
    total = [sum(d[i] for d in self.blocks.values()) % _MOD for i in range(2)]
    self.blocks.clear()
    return total


def _intersect(a: Region, b: Region) -> bool:
  return all(max(s0, s1) < min(e0, e1) for (s0, e0), (s1, e1) in zip(a, b))
