"""One jax device per CPU core on CPU hosts.

XLA:CPU runs a program on one device and splits each op over the cores (intra-op threads). For
the small matmuls of decoding and of small models that split is poor: each op's threads meet at
a barrier. With one device per core, a mesh splits the *program* instead (branches over
'branch', rows over 'fsdp') and every core runs its own share without per-op barriers
(measurements: BENCHMARKS.md, "Sampler" and "Train step").

`configure(count)` must run before jax starts its backends (the first call that asks jax about
devices); the `train` command does it from the config (copd_jax.commands.train.load_run_config),
before validating it. It only changes the number of *CPU* devices, so on a GPU / TPU host (where
jax.devices() are the accelerators) it changes nothing.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import jax

from copd_jax import mesh as mesh_lib

_USER_FLAG = 'xla_force_host_platform_device_count'


def cpu_cores() -> int:
  """Cores this process may run on (the affinity mask, not the host's total)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


def set_by_user() -> bool:
  """The CPU device count was chosen outside copd_jax (XLA_FLAGS, or jax's own option)."""
  return (_USER_FLAG in os.environ.get('XLA_FLAGS', '') or 'JAX_NUM_CPU_DEVICES' in os.environ
          or jax.config.jax_num_cpu_devices != -1)


def backends_started() -> bool:
  from jax._src import xla_bridge   # no public query for this
  return xla_bridge.backends_are_initialized()


def configure(count: int) -> bool:
  """Asks jax for `count` CPU devices. Returns False (and changes nothing) when the user chose
  a count already or jax's backends are running (too late to change it)."""
  if count < 1:
    raise ValueError(f'CPU device count must be >= 1, got {count}')
  if set_by_user() or backends_started():
    return False
  jax.config.update('jax_num_cpu_devices', count)
  return True


def count_for_mesh(fits: Callable[[int], bool], cores: int | None = None) -> int:
  """The largest n <= cores with fits(n): how many CPU devices a config's mesh can use."""
  for n in range(cores or cpu_cores(), 0, -1):
    if fits(n):
      return n
  return 1


def cpu_layout(axis_sizes: Mapping[str, int]) -> dict[str, int]:
  """The layout counted on a CPU host: when 'branch' is chosen (-1) together with other axes
  (the default mesh), those others count as 1, so the default makes one device per branch
  (the largest divisor of K that fits the cores, as the toy runs of BENCHMARKS.md measured)
  and the layout chooser then puts every device on 'branch'. A mesh that sets 'branch'
  (e.g. branch=1, fsdp=-1: rows over every core) is counted as written."""
  sizes = dict(axis_sizes)
  if sizes.get('branch') == -1 and sum(v == -1 for v in sizes.values()) > 1:
    sizes = {a: 1 if (v == -1 and a != 'branch') else v for a, v in sizes.items()}
  return sizes


def mesh_fits(axis_sizes: Mapping[str, int], num_branches: int,
              sampling_axis_sizes: Mapping[str, int] | None = None) -> Callable[[int], bool]:
  """fits(n): the training mesh (and the sampling mesh, when one is set), counted as
  `cpu_layout`, resolves on n devices with a 'branch' axis that divides K."""
  def fits(n: int) -> bool:
    layouts = [axis_sizes] + ([sampling_axis_sizes] if sampling_axis_sizes else [])
    try:
      for sizes in layouts:
        mesh_lib.branch_mesh_shape(cpu_layout(sizes), n, num_branches)
    except mesh_lib.MeshConfigError:
      return False
    return True
  return fits


def configure_for_config(config) -> bool:
  """Before the first device query: CPU devices for config (config.cpu_devices; 0 = the most
  its meshes can use, up to one per core). Malformed fields are left to config validation,
  which reports them (this runs first, so it must not fail on them)."""
  try:
    requested = int(config.cpu_devices)
    fits = mesh_fits(dict(config.mesh), len(config.branches),
                     dict(config.mesh_sampling) if any(config.mesh_sampling.values()) else None)
    count = requested if requested > 0 else count_for_mesh(fits)
  except (AttributeError, KeyError, TypeError, ValueError):
    return False
  return configure(count)
