"""Reading parameters leaf by leaf from any kind of checkpoint (a run step, a params-only
checkpoint, a Hugging Face folder): `open_source` gives a ParamsSource whose reads are checked
against the digests saved with the checkpoint."""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from flax import nnx

from copd_jax import digests, storage
from copd_jax.checkpoint.layout import (CHECKPOINTS_SUBDIR, DIGESTS, META, META_TOKENIZER_DIR,
                                        PARAMS, STATE, TOKENIZER_SUBDIR, CheckpointError, DigestMismatch,
                                        first_line, model_config_from_meta, read_meta,
                                        this_process_only)
from copd_jax.models import hf_io, hf_io_vl
from copd_jax.models.hf_io.format import read_config_json
from copd_jax.models.qwen3 import Qwen3, Qwen3Config
from copd_jax.models.qwen3_vl import Qwen3VLConfig
from copd_jax.tree_paths import flatten_paths, get_path, set_path

def _variable_leaves(tree: Any, short: tuple[str, ...] = (), full: tuple[str, ...] = ()
                     ) -> Iterator[tuple[tuple[str, ...], tuple[str, ...], Any]]:
  """(path, stored path, leaf) of Orbax metadata. Metadata of an nnx.State nests each array as
  {'value': array}: `path` drops that level, the stored path (as saved) keeps it."""
  if isinstance(tree, Mapping):
    if set(tree) == {'value'} and not isinstance(tree['value'], Mapping):
      yield short, full + ('value',), tree['value']
      return
    for key in sorted(tree):
      yield from _variable_leaves(tree[key], short + (str(key),), full + (str(key),))
  else:
    yield short, full, tree


def _abstract_params(config: Qwen3Config | Qwen3VLConfig) -> dict[str, Any]:
  if isinstance(config, Qwen3VLConfig):
    return hf_io_vl.abstract_vl_params(config)
  model = nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0)))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@dataclasses.dataclass
class ParamsSource:
  """One checkpoint's model parameters, readable a tensor (or one layer of it) at a time.

  kind: 'run' (a step of a run: params stacked [K, ...] on a branch axis), 'params' (a
  params-only checkpoint) or 'hf' (a Hugging Face folder). `shapes` and `dtypes` describe ONE
  model (branch axis removed), as nested dicts in the layout of `nnx.to_pure_dict`.
  """
  path: str
  kind: str
  model_config: Qwen3Config | Qwen3VLConfig
  tokenizer_dir: str | None
  meta: dict[str, Any]
  shapes: dict[str, Any]
  dtypes: dict[str, Any]
  num_branches: int | None = None
  _arrays: dict[tuple[str, ...], Any] = dataclasses.field(default_factory=dict, repr=False)
  _open: dict[tuple[str, ...], Any] = dataclasses.field(default_factory=dict, repr=False)
  _hf_files: dict[str, str] = dataclasses.field(default_factory=dict, repr=False)
  _ts_context: Any = dataclasses.field(default=None, repr=False)
  _use_zarr3: bool = dataclasses.field(default=False, repr=False)
  _use_ocdbt: bool = dataclasses.field(default=True, repr=False)
  _hf_last: Any = dataclasses.field(default=None, repr=False)
  # Saved digest per leaf path: one per branch (run) or of the whole tensor (params).
  _expected: dict[tuple[str, ...], Any] = dataclasses.field(default_factory=dict, repr=False)
  _coverage: dict[tuple[Any, ...], digests.Coverage] = dataclasses.field(default_factory=dict,
                                                                         repr=False)

  def leaf_paths(self) -> list[tuple[str, ...]]:
    return [p for p, _ in flatten_paths(self.shapes)]

  def read(self, path: Sequence[str], branch: int | None = None, layer: int | None = None,
           block: tuple[slice, ...] | None = None) -> np.ndarray:
    """The tensor at key path `path` of one model (branch `branch` of a run checkpoint); with
    `layer`, only that index of its leading (layers) axis; with `block`, only that index tuple
    (ints and slices of step 1) of what remains.

    Checked against the digests saved with the checkpoint (DigestMismatch naming the folder and
    tensor): a tensor read whole, by that read; a tensor read in pieces (layers, blocks), by the
    read that completes its coverage, which raises instead of returning its piece. Not checked:
    a piece read on its own, pieces that overlap without being equal, and checkpoints without
    digests (written before digests existed; HF folders)."""
    path = tuple(path)
    if self.kind == 'run':
      if branch is None or not 0 <= branch < self.num_branches:
        raise CheckpointError(f'{self.path}: branch {branch} is out of range (the checkpoint has '
                              f'{self.num_branches} branches)')
    if self.kind == 'hf':
      value = self._read_hf(path, layer)
      return value if block is None else value[block]
    index: tuple[Any, ...] = ((branch,) if self.kind == 'run' else ()) + (
        (layer,) if layer is not None else ()) + (tuple(block) if block is not None else ())
    try:
      value = np.asarray(self._tensorstore(path)[index].read().result())
    except Exception as e:
      raise CheckpointError(f'{self.path}: cannot read tensor {".".join(path)} '
                            f'({type(e).__name__}: {first_line(e)})') from None
    self._verify(path, branch, layer, block, value)
    return value

  def _verify(self, path: tuple[str, ...], branch: int | None, layer: int | None,
              block: tuple[Any, ...] | None, value: np.ndarray) -> None:
    expected = self._expected.get(path)
    if expected is None:
      return
    shape = get_path(self.shapes, path)
    region = _region(shape, layer, block)
    if region is None:
      return
    words_shape = digests.word_shape(shape, value.dtype)
    words = digests.host_words(value.reshape([b - a for a, b in region]))
    region += ((0, 2),) if len(words_shape) > len(shape) else ()
    part = digests.region_digest(words, [a for a, _ in region], words_shape)
    key = (path, branch)
    digest = self._coverage.setdefault(key, digests.Coverage(words_shape)).add(region, part)
    if digest is None:
      return
    del self._coverage[key]
    saved = expected[branch] if self.kind == 'run' else expected
    if list(saved) != digest:
      of = f' of branch {branch}' if self.kind == 'run' else ''
      raise DigestMismatch(f'{self.path}: tensor {".".join(path)}{of} differs from the digest '
                           'saved with it (corrupted on disk)')

  def read_all(self, branch: int | None = None) -> dict[str, Any]:
    """Every tensor of one model as a pure dict of numpy arrays."""
    if self.kind == 'hf' and isinstance(self.model_config, Qwen3VLConfig):
      return hf_io_vl.load_vl_params(self.path, self.model_config, np.float32)
    if self.kind == 'hf':
      return hf_io.load_params(self.path, self.model_config, np.float32)
    out: dict[str, Any] = {}
    for path in self.leaf_paths():
      set_path(out, path, self.read(path, branch))
    return out

  def _tensorstore(self, path: tuple[str, ...]):
    if path not in self._open:
      array = self._arrays[path]
      info = ocp.type_handlers.ParamInfo(name=array.name, parent_dir=epath.Path(array.directory),
                                         use_zarr3=self._use_zarr3, ts_context=self._ts_context)
      spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self._use_ocdbt)
      self._open[path] = ts.open(spec, open=True, context=self._ts_context).result()
    return self._open[path]

  def _read_hf(self, path: tuple[str, ...], layer: int | None) -> np.ndarray:
    # Remembers the last tensor: a merge reads one tensor in several blocks in a row.
    if self._hf_last is not None and self._hf_last[0] == (path, layer):
      return self._hf_last[1]
    self._hf_last = None
    value = self._read_hf_uncached(path, layer)
    self._hf_last = ((path, layer), value)
    return value

  def _read_hf_uncached(self, path: tuple[str, ...], layer: int | None) -> np.ndarray:
    if isinstance(self.model_config, Qwen3VLConfig):
      names, to_ours = next((names, conv) for p, names, conv, _ in
                            hf_io_vl.tensor_plan(self.model_config) if p == path)
      if not hf_io_vl.is_stacked(path):
        return to_ours(self._hf_tensor(names[0]))
      chosen = names if layer is None else [names[layer]]
      arrays = [to_ours(self._hf_tensor(name)) for name in chosen]
      return arrays[0] if layer is not None else np.stack(arrays)
    if path[0] == 'layers':
      hf_name, to_ours, _ = hf_io.layer_mapping(self.model_config)[path[1]]
      layers = range(self.model_config.num_layers) if layer is None else [layer]
      arrays = [to_ours(self._hf_tensor(f'model.layers.{i}.{hf_name}')) for i in layers]
      return arrays[0] if layer is not None else np.stack(arrays)
    hf_name, to_ours, _ = hf_io.top_mapping(self.model_config)[path[0]]
    return to_ours(self._hf_tensor(hf_name))

  def _hf_tensor(self, name: str) -> np.ndarray:
    file = self._hf_files.get(name)
    if file is None:
      raise CheckpointError(f'{self.path}: missing tensor {name}')
    with hf_io.open_safetensors(file) as f:
      tensor = np.asarray(f.get_tensor(name))
    hf_io.check_weight_values(tensor, name, file)   # NaN / inf or integer weights, by name
    return tensor.astype(np.float32)


def _region(shape: Sequence[int], layer: int | None, block: tuple[Any, ...] | None
            ) -> digests.Region | None:
  """(start, stop) per axis of `shape` that read(layer=, block=) returns; None when the index
  is not plain ints and step-1 slices."""
  index = ((layer,) if layer is not None else ()) + (tuple(block) if block is not None else ())
  if len(index) > len(shape):
    return None
  region = []
  for i, dim in zip(index, shape):
    if isinstance(i, (int, np.integer)) and not isinstance(i, bool):
      i = int(i) + dim if i < 0 else int(i)
      region.append((i, i + 1))
    elif isinstance(i, slice):
      start, stop, step = i.indices(dim)
      if step != 1:
        return None
      region.append((start, max(start, stop)))
    else:
      return None
  return tuple(region) + tuple((0, d) for d in shape[len(index):])


def _orbax_arrays(item_dir: str, subtree: str | None, where: str):
  try:
    metadata = ocp.StandardCheckpointHandler().metadata(epath.Path(item_dir))
  except Exception as e:
    raise CheckpointError(f'{item_dir}: unreadable checkpoint metadata ({type(e).__name__}: '
                          f'{first_line(e)})') from None
  tree = metadata.tree
  if subtree is not None:
    if not isinstance(tree, Mapping) or subtree not in tree:
      raise CheckpointError(f'{where}: the state has no {subtree!r} field')
    tree = tree[subtree]
  leaves = list(_variable_leaves(tree))
  arrays = {path: array for path, _, array in leaves}
  stored = {path: ((subtree,) if subtree else ()) + full for path, full, _ in leaves}
  use_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(epath.Path(item_dir))
  return arrays, stored, bool(metadata.use_zarr3), use_ocdbt


def _expected_digests(meta: Mapping[str, Any], kind: str, arrays: Mapping[tuple[str, ...], Any],
                      stored: Mapping[tuple[str, ...], tuple[str, ...]]
                      ) -> dict[tuple[str, ...], Any]:
  """Saved digest per leaf that ParamsSource can check: per branch for a run, whole for params;
  leaves whose record is missing or describes another dtype or shape are left out."""
  saved = meta.get(DIGESTS) or {}
  out = {}
  for path, array in arrays.items():
    record = saved.get('/'.join(stored[path]))
    if (not isinstance(record, Mapping) or record.get('shape') != list(array.shape)
        or record.get('dtype') != str(np.dtype(array.dtype))):
      continue
    if kind == 'run':
      if len(record.get('branches') or ()) == array.shape[0]:
        out[path] = [list(d) for d in record['branches']]
    elif record.get('digest'):
      out[path] = list(record['digest'])
  return out


def _bundled_tokenizer(checkpoint_dir: str, meta: Mapping[str, Any]) -> str | None:
  bundled = storage.join(checkpoint_dir, TOKENIZER_SUBDIR)
  if storage.is_dir(bundled) and storage.listdir(bundled):
    return bundled
  return meta.get(META_TOKENIZER_DIR)


def _has_tokenizer(folder: str) -> bool:
  return any(storage.is_file(storage.join(folder, f))
             for f in ('tokenizer.json', 'tokenizer_config.json', 'vocab.json'))


def latest_step_dir(workdir: str) -> str:
  """The newest committed step folder of a run workdir."""
  directory = storage.join(storage.resolve(workdir), CHECKPOINTS_SUBDIR)
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      read_only=True, create=False, multiprocessing_options=this_process_only()))
  step = manager.latest_step()
  manager.close()
  if step is None:
    raise CheckpointError(f'{directory}: no checkpoint')
  return str(ocp.step.build_step_path(epath.Path(directory), ocp.step.standard_name_format(), step))


def open_source(path: str) -> ParamsSource:
  """A ParamsSource for a HF folder, a run workdir (its newest checkpoint), a run step folder or
  a params-only checkpoint."""
  path = storage.resolve(path)
  if not storage.is_dir(path):
    raise CheckpointError(f'{path}: no such directory')
  if storage.is_file(storage.join(path, 'config.json')):
    raw, config_path = read_config_json(path)
    config = (hf_io_vl.vl_config_from_hf_dict(raw, config_path) if hf_io_vl.is_vl_config(raw)
              else hf_io.config_from_hf_dict(raw, config_path))
    abstract = _abstract_params(config)
    source = ParamsSource(path, 'hf', config, path if _has_tokenizer(path) else None, {},
                          jax.tree.map(lambda s: tuple(s.shape), abstract),
                          jax.tree.map(lambda s: np.dtype(np.float32), abstract))
    source._hf_files = hf_io.tensor_files(path)
    return source
  if storage.is_dir(storage.join(path, CHECKPOINTS_SUBDIR)):
    path = latest_step_dir(path)
  if storage.is_dir(storage.join(path, STATE)):
    kind, item, subtree = 'run', STATE, PARAMS
  elif storage.is_dir(storage.join(path, PARAMS)):
    kind, item, subtree = 'params', PARAMS, None
    if not storage.is_complete(path):
      raise CheckpointError(f'{path}: incomplete params checkpoint (no {storage.COMPLETE_MARKER}:'
                            ' its write was interrupted; write it again)')
  else:
    raise CheckpointError(f'{path}: not a checkpoint (expected config.json, checkpoints/, '
                          f'{STATE}/ or {PARAMS}/ inside)')
  meta = read_meta(path)
  config = model_config_from_meta(meta, storage.join(path, META))
  arrays, stored, use_zarr3, use_ocdbt = _orbax_arrays(storage.join(path, item), subtree, path)
  drop = 1 if kind == 'run' else 0
  shapes, dtypes, branches = {}, {}, set()
  for p, a in arrays.items():
    set_path(shapes, p, tuple(a.shape)[drop:])
    set_path(dtypes, p, np.dtype(a.dtype))
    if drop:
      branches.add(a.shape[0])
  if len(branches) > 1:
    raise CheckpointError(f'{path}: params leaves disagree on the branch count {sorted(branches)}')
  source = ParamsSource(path, kind, config, _bundled_tokenizer(path, meta), meta, shapes, dtypes,
                        branches.pop() if branches else None)
  source._arrays = arrays
  source._expected = _expected_digests(meta, kind, arrays, stored)
  source._use_zarr3, source._use_ocdbt = use_zarr3, use_ocdbt
  source._ts_context = ocp.type_handlers.get_ts_context(use_ocdbt=use_ocdbt)
  return source


def read_leaf(path: str, key_path: Sequence[str], branch: int | None = None,
              layer: int | None = None) -> np.ndarray:
  """One parameter tensor (e.g. ('layers', 'q_proj')) of one branch, without reading the rest."""
  return open_source(path).read(key_path, branch, layer)


def load_params_for_inference(path: str, branch: int | None = None
                              ) -> tuple[Qwen3Config, dict[str, Any], str | None]:
  """(config, pure-dict numpy params, tokenizer_dir) of one model from a HF folder, a run
  workdir or step folder (`branch` selects the branch; optional when there is only one) or a
  params-only / merged checkpoint."""
  source = open_source(path)
  branch = model_branch(source, branch)
  return source.model_config, source.read_all(branch), source.tokenizer_dir


def model_branch(source: ParamsSource, branch: int | None) -> int | None:
  """The `branch` argument of source.read for one model of `source`: the requested branch of a
  run checkpoint (optional when it has only one), None for a single model (where only None or 0
  may be asked for)."""
  if source.kind == 'run':
    if branch is None:
      if source.num_branches != 1:
        raise CheckpointError(f'{source.path}: has {source.num_branches} branches; choose one '
                              f'(--branch 0..{source.num_branches - 1})')
      branch = 0
    return branch
  if branch not in (None, 0):
    raise CheckpointError(f'{source.path}: a single model ({source.kind} checkpoint); '
                          f'--branch {branch} does not apply')
  return None
