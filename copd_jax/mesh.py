"""Device mesh ('branch', 'fsdp', 'tensor') from config, and logical-axis sharding rules.

Parameters name their dimensions with logical axes ('embed', 'mlp', 'q_heads', ...); a rule
table maps each logical axis to a mesh axis. A mesh axis that does not divide a dimension is
dropped for that dimension (the leaf is replicated along it) rather than failing, so one rule
table serves a tiny test model and an 8B model alike. Branch-stacked state carries a leading
'branch' dimension that always maps to the 'branch' mesh axis.

Layouts are chosen for you: config.mesh's default (branch=-1, fsdp=-1, tensor=1) resolves on
any device count by LAYOUT_RULE (e.g. K=3 on 8 devices -> (1, 8, 1), on 48 -> (3, 16, 1)),
sizes a user sets are kept, and `plan --layouts` lists every valid layout with its peaks.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from copd_jax.errors import ConfigError

MESH_AXES = ('branch', 'fsdp', 'tensor')

# logical axis -> mesh axis (or None: replicated).
DEFAULT_RULES: dict[str, str | None] = {
    'branch': 'branch',
    'layers': None,
    'vocab': 'tensor',
    'embed': 'fsdp',
    'mlp': 'tensor',
    'q_heads': 'tensor',
    'kv_heads': 'tensor',
    'head_dim': None,
    'norm': None,
}


# Plain data parallelism over 'fsdp': the batch is split, parameters and optimizer state are
# replicated (gradients are all-reduced). Faster than FSDP for models far from filling a device,
# e.g. on CPU devices (BENCHMARKS.md, "Train step"); FSDP is what large models need.
REPLICATED_OVER_FSDP_RULES: dict[str, str | None] = {**DEFAULT_RULES, 'embed': None}


def param_rules(shard_params_over_fsdp: bool) -> dict[str, str | None]:
  """The rules config.shard_params_over_fsdp selects."""
  return DEFAULT_RULES if shard_params_over_fsdp else REPLICATED_OVER_FSDP_RULES


class MeshConfigError(ConfigError):
  pass


# How -1 ('choose') axis sizes are resolved; the docs quote this rule (configs/base.py, README).
LAYOUT_RULE = ("positive sizes are kept; the devices they leave go to the -1 axes: 'branch', "
               "when another axis is -1 too, takes the largest divisor of K that divides them "
               "(gcd), then the first other -1 axis ('fsdp' before 'tensor') takes the rest and "
               "any later one 1; a lone -1 axis takes all of them")


def resolve_mesh_shape(axis_sizes: Mapping[str, int], num_devices: int,
                       field: str = 'config.mesh', num_branches: int | None = None
                       ) -> tuple[int, ...]:
  """Sizes for MESH_AXES on `num_devices`, -1 axes chosen by LAYOUT_RULE (which needs K,
  `num_branches`, when 'branch' and another axis are both -1). Errors name `field`."""
  unknown = set(axis_sizes) - set(MESH_AXES)
  if unknown:
    raise MeshConfigError(f'{field}: unknown axis {sorted(unknown)[0]!r}; axes are {MESH_AXES}')
  sizes = [int(axis_sizes.get(a, 1)) for a in MESH_AXES]
  for axis, s in zip(MESH_AXES, sizes):
    if s == 0 or s < -1:
      raise MeshConfigError(f'{field}.{axis}: must be a positive integer or -1, got {s}')
  known = math.prod(s for s in sizes if s != -1)
  chosen = [i for i, s in enumerate(sizes) if s == -1]
  if chosen:
    if num_devices % known:
      raise MeshConfigError(f'{field}: {num_devices} devices are not divisible by the fixed '
                            f'axes {dict(zip(MESH_AXES, sizes))} (product {known})')
    rest = num_devices // known
    if len(chosen) > 1 and chosen[0] == 0:
      if num_branches is None:
        raise MeshConfigError(f'{field}: branch=-1 with another -1 axis needs the number of '
                              'branches K')
      sizes[0] = math.gcd(num_branches, rest)
      rest //= sizes[0]
      chosen = chosen[1:]
    for i in chosen:
      sizes[i], rest = rest, 1
  if math.prod(sizes) != num_devices:
    raise MeshConfigError(f'{field}: axes {dict(zip(MESH_AXES, sizes))} use '
                          f'{math.prod(sizes)} devices but {num_devices} are available')
  return tuple(sizes)


def branch_mesh_shape(axis_sizes: Mapping[str, int], num_devices: int, num_branches: int,
                      field: str = 'config.mesh') -> tuple[int, ...]:
  """resolve_mesh_shape for K = num_branches, also checking that 'branch' divides K."""
  shape = resolve_mesh_shape(axis_sizes, num_devices, field, num_branches)
  if num_branches % shape[0]:
    raise MeshConfigError(f'{field}.branch: {shape[0]} does not divide the number of branches '
                          f'K={num_branches}')
  return shape


def candidate_layouts(num_devices: int, num_branches: int) -> list[tuple[int, int, int]]:
  """Every (branch, fsdp, tensor) with product `num_devices` and 'branch' dividing K: the
  layouts `plan --layouts` compares (most branches first, then most 'fsdp')."""
  divisors = [d for d in range(1, num_devices + 1) if num_devices % d == 0]
  out = [(b, f, num_devices // (b * f)) for b in divisors if num_branches % b == 0
         for f in divisors if (num_devices // b) % f == 0]
  return sorted(out, key=lambda s: (-s[0], -s[1]))


def describe_layout(axis_sizes: Mapping[str, int], num_devices: int, num_branches: int,
                    field: str = 'config.mesh') -> str:
  """One line: the layout `axis_sizes` resolves to, and whether it was chosen or configured
  (what `train` logs and `plan` prints)."""
  shape = branch_mesh_shape(axis_sizes, num_devices, num_branches, field)
  got = ' '.join(f'{a}={s}' for a, s in zip(MESH_AXES, shape))
  asked = ' '.join(f'{a}={int(axis_sizes.get(a, 1))}' for a in MESH_AXES)
  how = (f'chosen from {asked}' if any(int(axis_sizes.get(a, 1)) == -1 for a in MESH_AXES)
         else 'as configured')
  return f'{field}: {got} ({how}; K={num_branches}, {num_devices} devices)'


def make_mesh(axis_sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None,
              num_branches: int | None = None, field: str = 'config.mesh') -> Mesh:
  """Mesh over `devices` (default: all). With num_branches, checks the 'branch' axis divides K."""
  devices = list(devices if devices is not None else jax.devices())
  if num_branches is None:
    shape = resolve_mesh_shape(axis_sizes, len(devices), field)
  else:
    shape = branch_mesh_shape(axis_sizes, len(devices), num_branches, field)
  device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def sampling_layout(config) -> tuple[Mapping[str, int], str]:
  """(axis sizes, config field) of the layout sampling runs on: config.mesh_sampling, or
  config.mesh when mesh_sampling is all 0."""
  if any(config.mesh_sampling.values()):
    return config.mesh_sampling, 'config.mesh_sampling'
  return config.mesh, 'config.mesh'


def sampling_mesh(config, devices: Sequence[jax.Device], num_branches: int) -> Mesh:
  """The mesh sampling runs on (`sampling_layout`), over the training mesh's devices."""
  sizes, field = sampling_layout(config)
  return make_mesh(sizes, devices=devices, num_branches=num_branches, field=field)


def layout_lines(config, num_devices: int) -> list[str]:
  """`describe_layout` of the training mesh, and of the sampling mesh when one is set."""
  K = len(config.branches)
  lines = [describe_layout(config.mesh, num_devices, K)]
  sizes, field = sampling_layout(config)
  if field != 'config.mesh':
    lines.append(describe_layout(sizes, num_devices, K, field))
  return lines


def check_mesh_config(config, num_devices: int) -> None:
  """config.mesh and config.mesh_sampling fit `num_devices` and K; errors name the field."""
  K = len(config.branches)
  branch_mesh_shape(config.mesh, num_devices, K)
  sizes, field = sampling_layout(config)
  branch_mesh_shape(sizes, num_devices, K, field)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Mapping[str, str | None] = DEFAULT_RULES) -> P:
  """PartitionSpec for one array; mesh axes of size 1 or that do not divide the dimension are
  dropped (the array is replicated along them)."""
  if len(logical_axes) != len(shape):
    raise ValueError(f'logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}')
  spec, used = [], set()
  for name, dim in zip(logical_axes, shape):
    axis = rules.get(name) if name is not None else None
    if axis is None or axis in used or mesh.shape[axis] == 1 or dim % mesh.shape[axis]:
      spec.append(None)
    else:
      spec.append(axis)
      used.add(axis)
  return P(*spec)


def _logical_tree(state: nnx.State, branch_stacked: bool) -> Any:
  def axes_of(v: nnx.Variable):
    axes = tuple(v.get_metadata().get('logical_axes') or (None,) * (v.ndim - branch_stacked))
    return ('branch',) + axes if branch_stacked else axes
  return jax.tree.map(axes_of, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(state: nnx.State, mesh: Mesh, rules: Mapping[str, str | None] = DEFAULT_RULES,
                    branch_stacked: bool = False) -> Any:
  """NamedSharding for every Variable in an (abstract or concrete) nnx.State."""
  logical = _logical_tree(state, branch_stacked)
  def to_sharding(v: nnx.Variable, axes):
    return NamedSharding(mesh, logical_to_spec(axes, v.shape, mesh, rules))
  return jax.tree.map(to_sharding, state, logical,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def branch_sharded(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading dimension on 'branch', the rest replicated (per-branch scalars, rng keys, batches)."""
  return NamedSharding(mesh, P('branch', *([None] * (ndim - 1))))
