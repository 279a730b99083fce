"""Replicas as one buffer on CPU: the values of `jax.device_put`, with one physical copy per shard,
and per-layer views that alias the stacked weights (what the sampler reads; BENCHMARKS.md,
"Sampler")."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from copd_jax import cpu_sharing, mesh as mesh_lib


def pointers(x: jax.Array) -> list[int]:
  return [s.data.unsafe_buffer_pointer() for s in x.addressable_shards]


def test_put_equals_device_put_with_one_buffer_per_shard():
  mesh = mesh_lib.make_mesh({'branch': 2, 'fsdp': 2, 'tensor': 2})
  x = jnp.arange(2 * 6 * 16 * 8, dtype=jnp.float32).reshape(2, 6, 16, 8)
  specs = (P(), P('branch'), P('branch', None, None, 'tensor'))
  # A tree (tuples included), placed in one call; an array placed with one copy per device
  # (device_put's replicas) is re-placed as shared views.
  trees = cpu_sharing.put({'a': (x, x), 'b': [jax.device_put(x, NamedSharding(mesh, P()))] * 2},
                          {'a': (NamedSharding(mesh, specs[0]), NamedSharding(mesh, specs[1])),
                           'b': [NamedSharding(mesh, specs[0]), NamedSharding(mesh, specs[2])]})
  for shared, spec in zip([*trees['a'], *trees['b']], [*specs[:2], specs[0], specs[2]]):
    sharding = NamedSharding(mesh, spec)
    ref = jax.device_put(x, sharding)
    assert shared.sharding == sharding
    np.testing.assert_array_equal(np.asarray(shared), np.asarray(ref))
    for a, b in zip(shared.addressable_shards, ref.addressable_shards):
      np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))
    # Devices holding the same shard index read one buffer; different indices, different ones.
    by_index = {}
    for shard in shared.addressable_shards:
      by_index.setdefault(str(shard.index), set()).add(shard.data.unsafe_buffer_pointer())
    assert all(len(p) == 1 for p in by_index.values())
    assert len({next(iter(p)) for p in by_index.values()}) == len(by_index)
  # Then a computation on it gives device_put's result.
  sharding = NamedSharding(mesh, P('branch'))
  f = jax.jit(lambda a: jnp.tanh(a) @ a[0, 0].T)
  np.testing.assert_array_equal(np.asarray(f(cpu_sharing.put(x, sharding))),
                                np.asarray(f(jax.device_put(x, sharding))))


def test_unstack_aliases_the_stacked_array():
  mesh = mesh_lib.make_mesh({'branch': 2, 'fsdp': 2, 'tensor': 2})
  x = cpu_sharing.put(jnp.arange(2 * 3 * 16 * 8, dtype=jnp.float32).reshape(2, 3, 16, 8),
                      NamedSharding(mesh, P('branch', None, None, 'tensor')))
  y = cpu_sharing.put(2 * x, x.sharding)
  layers, y_layers = cpu_sharing.unstack([x, y], axis=1)
  assert len(layers) == len(y_layers) == 3
  np.testing.assert_array_equal(np.asarray(y_layers[2]), 2 * np.asarray(x)[:, 2])
  for i, layer in enumerate(layers):
    assert layer.sharding.spec == P('branch', None, 'tensor')
    np.testing.assert_array_equal(np.asarray(layer), np.asarray(x)[:, i])
  # Each device's layer i sits inside its own stacked shard, at layer i's offset (no copy),
  # so replicas of the stacked array stay shared.
  stride = 16 * 4 * 4   # one layer of a [1, 3, 16, 4] shard, in bytes
  for i, layer in enumerate(layers):
    assert pointers(layer) == [p + i * stride for p in pointers(x)]
  # Sharded along the axis, or off a NamedSharding on CPU: nothing to alias.
  assert cpu_sharing.unstack([y, x], axis=3) is None
  single = jnp.ones((3, 4, 8))
  [single_layers] = cpu_sharing.unstack([single], axis=0)
  assert pointers(single_layers[2])[0] == pointers(single)[0] + 2 * 128


def test_a_donating_call_leaves_views_intact():
  mesh = mesh_lib.make_mesh({'branch': 1, 'fsdp': 8, 'tensor': 1})
  x = jnp.arange(1 << 14, dtype=jnp.float32)
  placed = cpu_sharing.put(x, NamedSharding(mesh, P()))
  y = jnp.arange(1 << 14, dtype=jnp.float32).reshape(4, -1)
  [views] = cpu_sharing.unstack([y], axis=0)
  donating = jax.jit(lambda a: a * 2 + 1, donate_argnums=0)
  donating(x), donating(y)
  jnp.full(1 << 14, 7.0).block_until_ready()   # would reuse freed memory
  np.testing.assert_array_equal(np.asarray(placed), np.arange(1 << 14))
  np.testing.assert_array_equal(np.asarray(views[3]), np.arange(3 << 12, 4 << 12))
