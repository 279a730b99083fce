"""Replicated arrays as one buffer on CPU hosts.

With one jax device per core (`host_devices`), every device holding a replicated weight gets its
own copy, although all devices address the same memory. For decoding that costs speed as well
as memory: the sampler streams every weight once per token, and one copy of the weights per
core crowds the cores' shared cache where one copy read by all would not (measurements in
BENCHMARKS.md, "Sampler"). PJRT's CPU client puts a 64-byte-aligned numpy array on a device
without copying, so the replicas of a shard can all be views of one buffer.

Views pin their buffers: while one is alive, a jitted call that donates the viewed array gets
no donation (jax keeps the buffer and the call allocates a new one), so values stay right.

Everything here is a no-op in effect off CPU: the functions fall back to `jax.device_put` /
return None, and the caller keeps its usual path.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


# The alignment PJRT's CPU client needs to use host memory in place.
_ALIGNMENT = 64


def all_cpu(sharding: jax.sharding.Sharding) -> bool:
  return all(d.platform == 'cpu' for d in sharding.device_set)


class _Pieces:
  """Global arrays to build from host views: add() each array's (shape, sharding, devices,
  views), then build() places every view with one batched `jax.device_put` (much cheaper per
  view than one call each) and assembles the arrays in order."""

  def __init__(self):
    self.arrays, self.views, self.devices = [], [], []

  def add(self, shape, sharding, devices, views) -> None:
    self.arrays.append((shape, sharding, len(views)))
    self.views += views
    self.devices += devices

  def build(self) -> list[jax.Array]:
    buffers = jax.device_put(self.views, self.devices) if self.views else []
    out, at = [], 0
    for shape, sharding, n in self.arrays:
      out.append(jax.make_array_from_single_device_arrays(shape, sharding, buffers[at:at + n]))
      at += n
    return out


def _zero_copy_able(view: np.ndarray) -> np.ndarray:
  """view itself when PJRT can place it without a copy (C-contiguous, 64-byte aligned), else a
  copy that is."""
  if view.flags.c_contiguous and view.ctypes.data % _ALIGNMENT == 0:
    return view
  raw = np.empty(view.nbytes + _ALIGNMENT, np.uint8)
  start = -raw.ctypes.data % _ALIGNMENT
  out = raw[start:start + view.nbytes].view(view.dtype).reshape(view.shape)
  out[...] = view
  return out


class _Placement:
  """(array, sharding): a pytree leaf, unlike a tuple."""
  __slots__ = ('x', 'sharding')

  def __init__(self, x, sharding):
    self.x, self.sharding = x, sharding

  def __iter__(self):
    return iter((self.x, self.sharding))


def put(tree: Any, shardings: Any) -> Any:
  """`jax.device_put(tree, shardings)`, except that on CPU (one process) each shard is stored
  once and every device that holds it reads that buffer (also when tree is already placed
  with one copy per device)."""
  # shardings is a prefix of tree (an nnx Variable is a node holding its array).
  pairs = jax.tree.leaves(jax.tree.map(lambda sharding, sub: jax.tree.map(
      lambda x: _Placement(x, sharding), sub), shardings, tree))
  if jax.process_count() > 1 or not all(all_cpu(sharding) for _, sharding in pairs):
    return jax.device_put(tree, shardings)
  pieces = _Pieces()
  for x, sharding in pairs:
    host = np.asarray(x)   # a view when x is (replicated) CPU buffers; else gathered once
    index_map = sharding.addressable_devices_indices_map(host.shape)
    shards: dict[str, np.ndarray] = {}   # one host array per distinct shard
    views = [shards.setdefault(str(index), _zero_copy_able(np.asarray(host[index])))
             for index in index_map.values()]
    pieces.add(host.shape, sharding, list(index_map), views)
  placed = iter(pieces.build())
  return jax.tree.map(lambda sharding, sub: jax.tree.map(lambda _: next(placed), sub),
                      shardings, tree)


def unstack(arrays: list[jax.Array], axis: int) -> list[list[jax.Array]] | None:
  """Each array's slices along an unsharded `axis` (all arrays the same length there), as arrays
  that alias its buffers: no copy, and replicas stay shared. None off CPU, or where an array is
  sharded along `axis`."""
  pieces = _Pieces()
  for x in arrays:
    sharding = getattr(x, 'sharding', None)
    if isinstance(sharding, jax.sharding.SingleDeviceSharding) and all_cpu(sharding):
      out_sharding = sharding
    elif isinstance(sharding, NamedSharding) and all_cpu(sharding):
      spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
      if spec[axis] is not None:
        return None
      out_sharding = NamedSharding(sharding.mesh, P(*spec[:axis], *spec[axis + 1:]))
    else:
      return None
    shards = [(s.device, np.asarray(s.data)) for s in x.addressable_shards]
    devices = [d for d, _ in shards]
    for i in range(x.shape[axis]):
      pieces.add(x.shape[:axis] + x.shape[axis + 1:], out_sharding, devices,
                 [view[(slice(None),) * axis + (i,)] for _, view in shards])
  built = pieces.build()
  n = len(built) // max(len(arrays), 1)
  return [built[j * n:(j + 1) * n] for j in range(len(arrays))]
