"""Multi-host runs: starting JAX's distributed runtime, process-0-only logging, global arrays
from host data, host values from global arrays, and barriers (run paths that may be local or
gs:// are copd_jax/storage.py's).

How a multi-host (multi-controller) run works: every process runs the same program on the same
config and seed, so every process builds the same host-side data (prompts, rewards, advantages,
data iterator states) in full. Device data crosses that boundary in two directions only:

  host -> device  `host_to_global` / `global_keys`: a global jax.Array of a given sharding from a
                  host array every process holds; each process copies only the blocks its own
                  devices hold (jax.make_array_from_callback). Arrays built from process-local
                  rows instead: `global_batch` (jax.make_array_from_process_local_data).
  device -> host  `to_host`: numpy values of global arrays; on several processes an array that
                  is not fully addressable is all-gathered first (process_allgather). It is a
                  collective: every process calls it on the same values, in the same order.
                  `local_block`: only this process's rows of a global batch (no communication),
                  e.g. sampled tokens to decode and score (its `local_share`: every row by one
                  process); `gather_rows`: per-row numbers computed from them (rewards,
                  lengths) back to every process, small arrays; `sum_over_processes`: sums
                  and counts of per-process metric terms.

Everything else (the jitted sampler and train steps) runs on global arrays unchanged. Process 0
alone writes metrics, logs and files outside Orbax; Orbax checkpoints are written by all
processes together. `barrier` and `primary_first` order the one-off file writes (the warm-started
base model) between processes.

One host needs none of this: `maybe_initialize()` is then a no-op, `to_host` is
jax.device_get, barriers return at once. On several hosts each process must call
`maybe_initialize()` before anything else touches JAX devices.

Batch layout (the train steps' `_rows_constraint`, the sampler's prompts): a global batch
[K, B, ...] is split over the mesh's 'branch' axis on K and over 'fsdp' on B (when 'fsdp'
divides B; otherwise B is replicated), and replicated over 'tensor'. A process feeds the block of
rows that its own devices hold: `process_rows` computes it from the mesh's device-to-process
map, `global_batch` assembles the global jax.Array from every process's block with
`jax.make_array_from_process_local_data`. Decoding and scoring use `process_shares` instead:
processes that hold the same rows (B replicated over 'fsdp', or a 'tensor' axis across
processes) split them, so no row is decoded or scored twice.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from copd_jax.errors import UserInputError

MULTIHOST_ENV = 'COPD_JAX_MULTIHOST'
COORDINATOR_ENVS = ('JAX_COORDINATOR_ADDRESS', 'COORDINATOR_ADDRESS')
PROCESS_COUNT_ENVS = ('JAX_PROCESS_COUNT', 'JAX_NUM_PROCESSES', 'NUM_PROCESSES')
PROCESS_ID_ENVS = ('JAX_PROCESS_ID', 'PROCESS_ID')
_TRUE = ('1', 'true', 'yes', 'on')


class DistributedConfigError(UserInputError):
  """A launch environment that cannot describe a multi-host run (names the variable)."""


# ---------------------------------------------------------------------------------------------
# Start-up
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LaunchSpec:
  """Arguments of `jax.distributed.initialize`; None lets JAX detect them (Cloud TPU, SLURM,
  Open MPI, Kubernetes)."""
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  def kwargs(self) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def _first(env: Mapping[str, str], names: tuple[str, ...]) -> tuple[str | None, str | None]:
  for name in names:
    if env.get(name, '').strip():
      return name, env[name].strip()
  return None, None


def _int_env(env: Mapping[str, str], names: tuple[str, ...], minimum: int) -> int | None:
  name, raw = _first(env, names)
  if name is None:
    return None
  try:
    value = int(raw)
  except ValueError:
    value = None
  if value is None or value < minimum:
    raise DistributedConfigError(f'environment variable {name}={raw!r}: expected an integer '
                                 f'>= {minimum}')
  return value


def launch_spec(env: Mapping[str, str], multihost: bool | None = None) -> LaunchSpec | None:
  """How this process joins a multi-host run, or None on a single host.

  Multi-host when `multihost` is True (a --multihost flag), or, with multihost None, when
  COPD_JAX_MULTIHOST is true, a coordinator address is set (JAX_COORDINATOR_ADDRESS or
  COORDINATOR_ADDRESS) or the process count (JAX_PROCESS_COUNT, JAX_NUM_PROCESSES,
  NUM_PROCESSES) exceeds 1. multihost=False forces a single host.
  """
  _, coordinator = _first(env, COORDINATOR_ENVS)
  count = _int_env(env, PROCESS_COUNT_ENVS, minimum=1)
  process_id = _int_env(env, PROCESS_ID_ENVS, minimum=0)
  if count is not None and process_id is not None and process_id >= count:
    name, _ = _first(env, PROCESS_ID_ENVS)
    raise DistributedConfigError(f'environment variable {name}={process_id}: must be smaller '
                                 f'than the process count {count}')
  if multihost is None:
    multihost = (env.get(MULTIHOST_ENV, '').strip().lower() in _TRUE
                 or coordinator is not None or (count or 1) > 1)
  if not multihost:
    return None
  return LaunchSpec(coordinator, count, process_id)


def maybe_initialize(multihost: bool | None = None,
                     env: Mapping[str, str] | None = None) -> bool:
  """Calls `jax.distributed.initialize` when this is a multi-host launch (see `launch_spec`);
  returns whether the distributed runtime is on. Safe to call twice; a no-op on one host."""
  spec = launch_spec(os.environ if env is None else env, multihost)
  if spec is None:
    return False
  if not jax.distributed.is_initialized():
    jax.distributed.initialize(**spec.kwargs())
  return True


def is_primary() -> bool:
  """True on process 0 (the one that logs, writes metrics and non-Orbax files)."""
  return jax.process_index() == 0


def primary_logger(log: Callable[[str], None] = print) -> Callable[[str], None]:
  """`log` on process 0, a no-op elsewhere (pass it as the driver's `log`)."""
  def primary_only(message: str) -> None:
    if is_primary():
      log(message)
  return primary_only


# ---------------------------------------------------------------------------------------------
# Per-process batch rows
# ---------------------------------------------------------------------------------------------

def batch_spec(mesh: Mesh, global_shape: tuple[int, ...]) -> P:
  """PartitionSpec of a [K, B, ...] batch: K on 'branch', B on 'fsdp' when it divides B."""
  rows = 'fsdp' if len(global_shape) > 1 and global_shape[1] % mesh.shape['fsdp'] == 0 else None
  return P('branch', rows, *([None] * (len(global_shape) - 2)))


def mesh_process_ids(mesh: Mesh) -> np.ndarray:
  """The process index of every device, in the mesh's shape."""
  return np.vectorize(lambda d: d.process_index, otypes=[int])(mesh.devices)


def process_rows(process_ids: np.ndarray, process: int, num_branches: int, batch: int
                 ) -> tuple[slice, slice]:
  """(branch rows, batch rows) of a [K, B] global batch that `process` feeds.

  process_ids: [branch, fsdp, tensor] process index of each mesh device. K is split into
  `branch` blocks and B into `fsdp` blocks (B whole when 'fsdp' does not divide it); the process
  feeds every block one of its devices holds, which must form one rectangle of blocks.
  """
  n_branch, n_fsdp = process_ids.shape[:2]
  if num_branches % n_branch:
    raise ValueError(f'mesh axis branch={n_branch} does not divide K={num_branches}')
  owned = np.any(process_ids.reshape(n_branch, n_fsdp, -1) == process, axis=-1)
  if batch % n_fsdp:  # B replicated over 'fsdp': a process needs every row of its branches
    owned = np.broadcast_to(owned.any(axis=1, keepdims=True), owned.shape)
    n_fsdp_used = 1
  else:
    n_fsdp_used = n_fsdp
  if not owned.any():
    raise ValueError(f'process {process} holds no device of the mesh')
  ii, jj = np.nonzero(owned.any(axis=1))[0], np.nonzero(owned.any(axis=0))[0]
  block = owned[ii[0]:ii[-1] + 1, jj[0]:jj[-1] + 1]
  if not block.all() or block.size != owned.sum():
    raise ValueError(f'the devices of process {process} do not hold one rectangle of batch '
                     f'blocks ({owned.astype(int).tolist()}); order the mesh devices by process')
  k_step = num_branches // n_branch
  k_rows = slice(int(ii[0]) * k_step, (int(ii[-1]) + 1) * k_step)
  if n_fsdp_used == 1:
    return k_rows, slice(0, batch)
  b_step = batch // n_fsdp
  return k_rows, slice(int(jj[0]) * b_step, (int(jj[-1]) + 1) * b_step)


def local_rows(mesh: Mesh, num_branches: int, batch: int) -> tuple[slice, slice]:
  """`process_rows` for this process on `mesh`."""
  return process_rows(mesh_process_ids(mesh), jax.process_index(), num_branches, batch)


def process_shares(process_ids: np.ndarray, num_branches: int, batch: int
                   ) -> dict[int, tuple[slice, slice]]:
  """Per process, the (branch rows, batch rows) of a [K, B] batch that it decodes and scores:
  every row by exactly one process.

  A process's devices hold its `process_rows`; processes that hold the same rows (B replicated
  because 'fsdp' does not divide it, or rows replicated over a 'tensor' axis that spans
  processes) split those rows' batch range evenly in process order, so none repeats another's
  work (a process may get no row when B is smaller than their number). Should two processes'
  rows overlap without being equal (meshes whose devices are ordered unlike their processes),
  each keeps all its rows: repeated work, the same values."""
  processes = sorted({int(p) for p in np.asarray(process_ids).flat})
  feeds = {p: process_rows(process_ids, p, num_branches, batch) for p in processes}
  groups: dict[tuple[int, int, int, int], list[int]] = {}
  for p, (k, b) in feeds.items():
    groups.setdefault((k.start, k.stop, b.start, b.stop), []).append(p)
  cover = np.zeros((num_branches, batch), int)
  for k0, k1, b0, b1 in groups:
    cover[k0:k1, b0:b1] += 1
  if (cover > 1).any():
    return feeds
  shares = {}
  for (k0, k1, b0, b1), members in groups.items():
    n, m = b1 - b0, len(members)
    for i, p in enumerate(members):  # members are in process order
      shares[p] = slice(k0, k1), slice(b0 + i * n // m, b0 + (i + 1) * n // m)
  return shares


def local_share(mesh: Mesh, num_branches: int, batch: int) -> tuple[slice, slice]:
  """This process's rows of `process_shares` on `mesh` (all rows on one process)."""
  return process_shares(mesh_process_ids(mesh), num_branches, batch)[jax.process_index()]


def global_batch(local: Any, mesh: Mesh, global_shape: tuple[int, ...]) -> jax.Array:
  """The global [K, B, ...] jax.Array from this process's rows `local` (its `local_rows` block,
  the whole batch on one host), sharded by `batch_spec`."""
  sharding = NamedSharding(mesh, batch_spec(mesh, tuple(global_shape)))
  return jax.make_array_from_process_local_data(sharding, np.asarray(local), tuple(global_shape))


def global_batch_tree(tree: Any, mesh: Mesh, num_branches: int, batch: int) -> Any:
  """`global_batch` of every [K, B, ...] leaf of a pytree of full host batches (each process
  built the same global batch from the same seed): each process hands over only its rows."""
  k_rows, b_rows = local_rows(mesh, num_branches, batch)
  def one(x):
    x = np.asarray(x)
    return global_batch(x[k_rows, b_rows], mesh, x.shape)
  return jax.tree.map(one, tree)


# ---------------------------------------------------------------------------------------------
# Host data <-> global arrays, barriers
# ---------------------------------------------------------------------------------------------

def is_multiprocess() -> bool:
  return jax.process_count() > 1


def host_to_global(x: Any, sharding: NamedSharding) -> jax.Array:
  """The global jax.Array of `sharding` holding host array `x`, which every process holds in
  full with the same value; each process copies only the blocks its own devices hold."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def global_keys(keys: jax.Array, sharding: NamedSharding) -> jax.Array:
  """Typed PRNG keys [K, ...] (the same on every process) as a global array of `sharding`;
  built from their raw key data, as make_array_from_callback takes no key dtypes."""
  data = np.asarray(jax.random.key_data(keys))
  spec = P(*sharding.spec, *([None] * (data.ndim - len(sharding.spec))))
  data = host_to_global(data, NamedSharding(sharding.mesh, spec))
  return jax.random.wrap_key_data(data, impl=jax.random.key_impl(keys))


def to_host(tree: Any) -> Any:
  """Every array leaf of `tree` as a numpy array of its global value.

  One process: jax.device_get (no extra copy). Several: a leaf that is not fully addressable
  is all-gathered first (`process_allgather`, every process ends with the whole value), so this
  is a collective that every process must call with the same tree at the same point."""
  if not is_multiprocess():
    return jax.device_get(tree)
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(one, tree)


_BARRIERS: dict[str, int] = {}


def barrier(name: str, timeout_s: float = 3600.0) -> None:
  """Waits until every process reaches the barrier `name` (a no-op on one process). Uses the
  coordination service (no device collective), so a long wait (process 0 evaluating) is fine.
  Every process must pass the same barriers in the same order."""
  if not is_multiprocess():
    return
  count = _BARRIERS[name] = _BARRIERS.get(name, 0) + 1
  key = f'copd_jax:{name}:{count}'  # a barrier id is used once
  from jax._src import distributed as jax_distributed  # the runtime's own client
  client = jax_distributed.global_state.client
  if client is None:
    multihost_utils.sync_global_devices(key)
  else:
    client.wait_at_barrier(key, timeout_in_ms=int(timeout_s * 1000))


def primary_first(fn: Callable[[], Any], name: str) -> Any:
  """fn() on process 0, then, after a barrier, on every other process: for a one-off write
  that the others can then reuse (with a shared filesystem they find process 0's result; with
  per-host disks each writes its own copy, with no two writers on one disk)."""
  if not is_multiprocess():
    return fn()
  result = fn() if is_primary() else None
  barrier(name)
  return result if is_primary() else fn()


# ---------------------------------------------------------------------------------------------
# This process's rows of a global batch
# ---------------------------------------------------------------------------------------------

def all_rows(num_branches: int, batch: int) -> tuple[slice, slice]:
  """(branch rows, batch rows) of a whole [K, B] batch: one process without a mesh."""
  return slice(0, num_branches), slice(0, batch)


def local_block(x: jax.Array, rows: tuple[slice, ...]) -> np.ndarray:
  """x[rows] (the block of `rows` over x's leading axes, e.g. this process's `local_share` of a
  [K, B, ...] array) as numpy, copied from the shards this process holds: no communication,
  and only the rows asked for leave the devices (a block replicated on several local devices is
  copied once). Fails when a row of the block is on no local device."""
  if not isinstance(x, jax.Array):  # a host array (one process): nothing to copy from devices
    return np.asarray(x)[tuple(rows)]
  n = len(rows)
  lead = tuple(range(*r.indices(size)) for r, size in zip(rows, x.shape[:n]))
  out = np.empty(tuple(len(r) for r in lead) + x.shape[n:], x.dtype)
  filled = np.zeros(out.shape[:n], bool)
  for shard in x.addressable_shards:
    # The shard's extent in global rows, intersected with the block.
    spans = [range(*s.indices(size)) for s, size in zip(shard.index[:n], x.shape[:n])]
    want = [range(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(spans, lead)]
    if not all(want):
      continue
    dst = tuple(slice(w.start - b.start, w.stop - b.start) for w, b in zip(want, lead))
    if filled[dst].all():
      continue
    src = tuple(slice(w.start - s.start, w.stop - s.start) for w, s in zip(want, spans))
    out[dst] = np.asarray(shard.data[src])
    filled[dst] = True
  if not filled.all():
    raise ValueError(f'rows {rows} of a {x.shape} array are not all on this process\'s devices')
  return out


def sum_over_processes(x: Any) -> np.ndarray:
  """The sum over processes of each process's array `x` (the same shape on every process), the
  same float64 value on every process: the terms are all-gathered and added in process order.
  A collective on several processes; `x` itself on one."""
  x = np.ascontiguousarray(x, np.float64)
  if not is_multiprocess():
    return x
  # As raw 32-bit words: without jax_enable_x64 a float64 array would be cast to float32.
  who, words = multihost_utils.process_allgather(
      (np.int32(jax.process_index()), x.reshape(-1).view(np.uint32)), tiled=False)
  terms = np.ascontiguousarray(words).view(np.float64).reshape((len(who),) + x.shape)
  total = np.zeros_like(x)
  for i in np.argsort(who, kind='stable'):
    total = total + terms[i]
  return total


def gather_rows(local: Any, mesh: Mesh | None, num_branches: int, batch: int) -> Any:
  """Every process's [K_share, B_share, ...] block (`local_share`) of small per-row values
  (rewards, lengths) -> the whole [K, B, ...] numpy arrays on every process. On several
  processes a collective: each block, padded to the largest share, is all-gathered
  (`multihost_utils.process_allgather`) and put at its rows (`assemble_rows`). One process:
  `local` unchanged."""
  if mesh is None or not is_multiprocess():
    return jax.tree.map(np.asarray, local)
  shares = process_shares(mesh_process_ids(mesh), num_branches, batch)
  height = max(k.stop - k.start for k, _ in shares.values())
  width = max(b.stop - b.start for _, b in shares.values())
  def one(x):
    x = np.asarray(x)
    padded = np.zeros((height, width) + x.shape[2:], x.dtype)
    padded[:x.shape[0], :x.shape[1]] = x
    who, blocks = multihost_utils.process_allgather(
        (np.int32(jax.process_index()), padded), tiled=False)
    return assemble_rows(dict(zip(who.tolist(), blocks)), shares, num_branches, batch)
  return jax.tree.map(one, local)


def assemble_rows(blocks: Mapping[int, np.ndarray], shares: Mapping[int, tuple[slice, slice]],
                  num_branches: int, batch: int) -> np.ndarray:
  """The [K, B, ...] array from each process's block of its `shares` rows (a block may be
  padded beyond its share); fails when a row is in no share."""
  first = next(iter(blocks.values()))
  out = np.zeros((num_branches, batch) + first.shape[2:], first.dtype)
  filled = np.zeros((num_branches, batch), bool)
  for p, block in blocks.items():
    k, b = shares[p]
    out[k, b] = block[:k.stop - k.start, :b.stop - b.start]
    filled[k, b] = True
  if not filled.all():
    raise ValueError(f'rows {np.argwhere(~filled)[:4].tolist()}... are in no process\'s share')
  return out
