"""Replicated arrays as one buffer on CPU hosts.

With one jax device per core (`host_devices`), every device holding a replicated weight gets its
own copy, although all devices address the same memory. For decoding that costs speed as well
as memory: the sampler streams every weight once per token, and two copies of the weights
crowd the cores' shared L3 (on the 2-core benchmark VM a [32, 256] x [256, 768] matmul ran ~20%
slower with one 12.6 MB weight set per core than with one set read by both;
BENCHMARKS.md, "Sampler"). PJRT's CPU client puts a 64-byte-aligned numpy array on a device
without copying, so the replicas of a shard can all be views of one buffer.

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


def _shard_views(x: jax.Array) -> list[tuple[jax.Device, np.ndarray]]:
  """(device, zero-copy host view of its shard) for every addressable shard."""
  return [(s.device, np.asarray(s.data)) for s in x.addressable_shards]


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


def _assemble(shape, sharding, devices, views) -> jax.Array:
  """One global array from host views, one per device; views of aligned memory are not copied,
  so devices given the same view share it."""
  buffers = jax.device_put(views, devices)
  return jax.make_array_from_single_device_arrays(shape, sharding, buffers)


def put(tree: Any, shardings: Any) -> Any:
  """`jax.device_put(tree, shardings)`, except that on CPU (one process) each shard is stored
  once and every device that holds it reads that buffer."""
  def put_one(x, sharding: NamedSharding):
    if (not all_cpu(sharding) or jax.process_count() > 1 or
        (isinstance(x, jax.Array) and x.sharding == sharding)):
      return jax.device_put(x, sharding)
    host = np.asarray(x)   # a view when x is one CPU buffer; else gathered once
    index_map = sharding.addressable_devices_indices_map(host.shape)
    shards: dict[str, np.ndarray] = {}   # one host array per distinct shard
    views = [shards.setdefault(str(index), _zero_copy_able(host[index]))
             for index in index_map.values()]
    return _assemble(host.shape, sharding, list(index_map), views)
  # shardings is a prefix of tree (an nnx Variable is a node holding its array).
  return jax.tree.map(lambda sharding, sub: jax.tree.map(lambda x: put_one(x, sharding), sub),
                      shardings, tree)


def unstack(x: jax.Array, axis: int) -> list[jax.Array] | None:
  """x's slices along an unsharded `axis`, as arrays that alias x's buffers (no copy, replicas
  stay shared); None off CPU or where x is sharded along `axis`."""
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
  out_shape = x.shape[:axis] + x.shape[axis + 1:]
  pieces = _shard_views(x)
  devices = [d for d, _ in pieces]
  take = lambda view, i: view[(slice(None),) * axis + (i,)]
  return [_assemble(out_shape, out_sharding, devices, [take(v, i) for _, v in pieces])
          for i in range(x.shape[axis])]
