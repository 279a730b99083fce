"""The parameters a run starts from, read tensor by tensor straight into their shardings.

The base model (a Hugging Face folder) is placed in the un-stacked training shardings
(`load_base_params`: the branch-stacked ones without 'branch', as the frozen reference uses
them); the branch state is then broadcast from it on the devices (`steps.init_branch_state`).
With `config.model.branch_init`, branch k starts from its own checkpoint instead and the
branch-stacked parameters are read leaf by leaf (`load_branch_stacked`): per leaf, each process
reads the tensor only of the branches its devices hold, every device receives its shard, and
the host copies are dropped before the next leaf. Host memory thus stays near one
branch-stacked tensor (K layer-stacked tensors at most), the whole model is never on one host,
and no parameter passes through a device other than the ones that hold it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from copd_jax import checkpoint as ckpt
from copd_jax.errors import ConfigError
from copd_jax.mesh import state_shardings
from copd_jax.models import hf_io
from copd_jax.models.qwen3 import Qwen3Config
from copd_jax.tree_paths import flatten_paths, get_path, set_path


def state_from_pure_dict(template: nnx.State, pure: dict) -> nnx.State:
  """An nnx.State shaped like `template` holding the arrays of the pure dict `pure`."""
  state = jax.tree.map(lambda x: x, template)
  nnx.replace_by_pure_dict(state, pure)
  return state


def load_base_params(folder: str, abstract_params: nnx.State, model_config: Qwen3Config,
                     mesh: jax.sharding.Mesh, rules) -> nnx.State:
  """The HF folder's parameters as an nnx.State like `abstract_params` (the abstract model's
  Params), every leaf sharded over `mesh` by its logical axes and `rules` (replicated over
  'branch'); read and placed one device block at a time, each from only its bytes, so a process
  reads only its own devices' blocks (`hf_io.load_params_sharded`)."""
  shardings = state_shardings(abstract_params, mesh, rules)
  dtype = jax.tree.leaves(abstract_params)[0].dtype
  pure = hf_io.load_params_sharded(folder, shardings, model_config, dtype)
  return state_from_pure_dict(abstract_params, pure)


@dataclasses.dataclass(frozen=True)
class BranchSource:
  """Where one branch's starting tensors come from: a checkpoint (`open_source` kinds) and the
  branch of it (None for a single model). `field` names the config entry in errors."""
  path: str
  branch: int | None
  field: str

  @property
  def key(self) -> tuple[str, int | None]:
    return self.path, self.branch


def branch_sources(paths: Sequence[str], base_path: str, model_config: Qwen3Config
                   ) -> list[BranchSource]:
  """config.model.branch_init resolved per branch ('' = the base model's folder): a HF folder,
  a params-only / merged checkpoint, or a run workdir / step folder with ':k' selecting its
  branch. Each is opened once here to check it has the base model's architecture."""
  out = []
  for k, path in enumerate(paths):
    field = f'config.model.branch_init[{k}]'
    if not path:
      out.append(BranchSource(base_path, None, field))
      continue
    folder, branch = path, None
    if ':' in path and path.rsplit(':', 1)[1].isdigit():
      folder, branch = path.rsplit(':', 1)[0], int(path.rsplit(':', 1)[1])
    source = ckpt.open_source(folder)
    branch = ckpt.model_branch(source, branch)
    if source.model_config != model_config:
      raise ConfigError(f'{field}: {path} has architecture {source.model_config}, the base '
                        f'model has {model_config}')
    out.append(BranchSource(source.path, branch, field))
  return out


def needed_branches(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> list[int]:
  """The branches (indices of the leading axis) that this process's devices hold of a
  branch-stacked array of `shape` placed with `sharding`."""
  needed: set[int] = set()
  for index in sharding.addressable_devices_indices_map(shape).values():
    needed.update(range(shape[0])[index[0]])
  return sorted(needed)


def load_branch_stacked(sources: Sequence[BranchSource], abstract_stacked: nnx.State,
                        shardings: nnx.State, open_source=ckpt.open_source) -> nnx.State:
  """Branch-stacked parameters [K, ...] like `abstract_stacked`, branch k's slice read from
  sources[k], each leaf placed with its sharding in `shardings` as it is read.

  Per leaf, a process reads the tensor of each distinct source among the branches its devices
  hold (so branches starting from one checkpoint cost one read), casts it to the leaf's dtype
  and hands every addressable device its block; those host tensors are dropped before the next
  leaf. A tensor whose shape differs from the model's stops with ConfigError naming the branch's
  config field. `open_source` opens a checkpoint (a parameter for tests that count reads)."""
  template = nnx.to_pure_dict(abstract_stacked)
  placement = nnx.to_pure_dict(shardings)
  opened: dict[str, Any] = {}
  out: dict[str, Any] = {}
  for path, leaf in flatten_paths(template):
    shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
    sharding = get_path(placement, path)
    tensors: dict[tuple[str, int | None], np.ndarray] = {}  # one read per (checkpoint, branch)
    for k in needed_branches(sharding, shape):
      src = sources[k]
      if src.key not in tensors:
        if src.path not in opened:
          opened[src.path] = open_source(src.path)
        tensors[src.key] = read_tensor(opened[src.path], src, path, shape[1:], dtype)

    def block(index, tensors=tensors):
      rows = range(len(sources))[index[0]]
      return np.stack([tensors[sources[k].key][index[1:]] for k in rows])
    set_path(out, path, hf_io.place_blocks(shape, sharding, block))
    del tensors, block  # the next leaf is read only after this one's host copies are released
  return state_from_pure_dict(abstract_stacked, out)


def read_tensor(source, src: BranchSource, path: tuple[str, ...], shape: tuple[int, ...],
                dtype) -> np.ndarray:
  """One model's tensor at `path` from `source` (opened from src.path) as `dtype`; a leaf under
  'layers' is read layer by layer into one array, so the host holds it and one layer."""
  try:
    stored = tuple(get_path(source.shapes, path))
  except (KeyError, TypeError):
    raise ConfigError(f'{src.field}: {src.path} has no tensor {".".join(path)}') from None
  if stored != shape:
    raise ConfigError(f'{src.field}: {src.path} has tensor {".".join(path)} of shape {stored}; '
                      f'the model needs {shape}')
  if path[0] != 'layers':
    return hf_io.as_float_numpy(source.read(path, src.branch), dtype)
  out = np.empty(shape, dtype)
  for layer in range(shape[0]):
    out[layer] = hf_io.as_float_numpy(source.read(path, src.branch, layer=layer), dtype)
  return out
