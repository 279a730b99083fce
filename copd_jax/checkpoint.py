"""Orbax checkpoints of a run, params-only checkpoints, and reading parameters leaf by leaf.

Run checkpoints live in `<workdir>/checkpoints/<step>/` with two items: 'state' (any pytree of
arrays, e.g. BranchState with every leaf stacked [K, ...]) and 'meta' (JSON: counters, data
iterator states, run config, model_config, tokenizer_dir, base_params). Orbax writes each step
under a temporary name and renames it when every item is on disk, so a crash or kill -9 during
an (asynchronous) save leaves only a temporary folder that is never listed as a step.

Arrays are stored in chunks within one branch (and one layer for leaves under 'layers') of at
most 16 MiB, so one branch's or one layer's slice of a leaf, or a block of it, is read without
decoding the rest: the merge streams tensor by tensor and inference loads a single branch.

A params-only checkpoint (the merge output) is a folder with items 'params' (the pure-dict
parameter tree of one model) and 'meta', plus an optional bundled 'tokenizer/' folder.

Both kinds carry per-array digests in their meta (copd_jax/digests.py; run checkpoints also one
per branch of each params leaf). `RunCheckpointer.restore` checks the whole state; `ParamsSource`
checks each parameter tensor once its reads have covered it (see `ParamsSource.read`), so
export-hf, merge, evaluate and generate refuse a checkpoint whose bits changed on disk.
Checkpoints written before digests existed are read without a check.

Every path may be local or remote (gs://...): see copd_jax/storage.py for what each guarantees.
On a remote path a params-only checkpoint counts only once its completion marker is written.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import shutil
import warnings
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from flax import nnx

from copd_jax import digests, disk_space, output_paths, storage
from copd_jax.retention import preserved_steps
from copd_jax.errors import UserInputError
from copd_jax.models import hf_io
from copd_jax.models.qwen3 import Qwen3, Qwen3Config

STATE, META, PARAMS = 'state', 'meta', 'params'
DIGESTS = 'digests'   # meta key: copd_jax.digests.tree_digests of the saved state / params
TOKENIZER_SUBDIR = 'tokenizer'
CHECKPOINTS_SUBDIR = 'checkpoints'
UNREADABLE_SUBDIR = 'checkpoints_unreadable'
# Keys of the 'meta' item that readers rely on.
META_MODEL_CONFIG = 'model_config'
META_TOKENIZER_DIR = 'tokenizer_dir'
META_BASE_PARAMS = 'base_params'


class CheckpointError(UserInputError):
  """A checkpoint path that cannot be read; the message names the path (and tensor or field)."""


# ---------------------------------------------------------------------------------------------
# Meta
# ---------------------------------------------------------------------------------------------

def run_meta(*, cycle: int, phase: str, step: int, model_config: Qwen3Config,
             tokenizer_dir: str | None, base_params: str | None, config: Mapping[str, Any],
             data_state: Mapping[str, Any] | None = None, **extra) -> dict[str, Any]:
  """The 'meta' item of a run checkpoint. data_state: JSON-able iterator states per domain
  (Grain's `get_state()` bytes decoded to str); extra: further JSON-able fields."""
  return {'cycle': int(cycle), 'phase': phase, 'step': int(step),
          META_MODEL_CONFIG: dataclasses.asdict(model_config),
          META_TOKENIZER_DIR: storage.resolve(tokenizer_dir) if tokenizer_dir else None,
          META_BASE_PARAMS: storage.resolve(base_params) if base_params else None,
          'config': _plain_dict(config), 'data_state': dict(data_state or {}), **extra}


def _plain_dict(config: Mapping[str, Any]) -> dict[str, Any]:
  to_dict = getattr(config, 'to_dict', None)  # ml_collections.ConfigDict
  return to_dict() if callable(to_dict) else dict(config)


def model_config_from_meta(meta: Mapping[str, Any], where: str) -> Qwen3Config:
  raw = meta.get(META_MODEL_CONFIG)
  if not isinstance(raw, Mapping):
    raise CheckpointError(f'{where}: meta has no {META_MODEL_CONFIG!r} (not a copd_jax model '
                          'checkpoint?)')
  try:
    return Qwen3Config(**raw)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f'{where}: meta.{META_MODEL_CONFIG} is not a valid Qwen3Config '
                          f'({e})') from None


def _check_json(meta: Mapping[str, Any]) -> None:
  for key, value in meta.items():
    try:
      json.dumps(value)
    except (TypeError, ValueError) as e:
      raise TypeError(f'checkpoint meta[{key!r}] is not JSON-serialisable: {e}') from None


# ---------------------------------------------------------------------------------------------
# Run checkpoints
# ---------------------------------------------------------------------------------------------

def _key_name(k) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


CHUNK_BYTES = 16 * 2**20


def chunked_save_args(tree: Any) -> Any:
  """SaveArgs storing each leaf in chunks of one index of axis 0 (the branch axis), and of
  axis 1 too under a 'layers' key (stacked decoder layers), of at most CHUNK_BYTES (Orbax then
  splits the largest remaining dimension)."""
  def args(path, x):
    ndim = len(getattr(x, 'shape', ()))
    under_layers = any(_key_name(k) == 'layers' for k in path)
    axes = tuple(range(min(ndim, 2 if under_layers else 1)))
    return ocp.SaveArgs(shard_axes=axes, chunk_byte_size=CHUNK_BYTES)
  return jax.tree_util.tree_map_with_path(args, tree)


@dataclasses.dataclass
class _RunPreservation:
  """Orbax preservation policy: the newest `keep_marked` checkpoints marked kept (saved with
  keep=True, or whose step satisfies keep_fn; -1 = all of them), plus the newest `keep_last`
  of the others. A marked checkpoint beyond `keep_marked` counts as an ordinary one, so the
  newest checkpoint always survives and at most keep_last + keep_marked stay on disk."""
  keep_last: int
  kept: set[int]
  keep_fn: Callable[[int], bool] | None = None
  keep_marked: int = -1

  def is_kept(self, step: int) -> bool:
    return step in self.kept or bool(self.keep_fn and self.keep_fn(step))

  def should_preserve(self, checkpoints, *, context) -> list[bool]:
    steps = [c.step for c in checkpoints]
    keep = preserved_steps(steps, self.is_kept, self.keep_last, self.keep_marked)
    return [s in keep for s in steps]


class RunCheckpointer:
  """Saves and restores a run's (state pytree, meta dict) in `<workdir>/checkpoints`.

  Saves are asynchronous by default (device-to-host copy blocks; writing runs in the
  background; call `wait()` before reading the files, `close()` at the end). Old checkpoints
  are deleted only after a newer one is committed.
  """

  def __init__(self, workdir: str, *, keep_last: int = 3, save_interval_steps: int = 1,
               keep_fn: Callable[[int], bool] | None = None, keep_marked: int = -1,
               async_save: bool = True, read_only: bool = False):
    """keep_last: how many of the newest ordinary checkpoints stay; keep_marked: how many of the
    newest checkpoints saved with keep=True (or keep_fn) stay besides them (-1 = all; the run
    passes config.checkpoint.keep_phase_ends, its phase ends being the marked ones)."""
    if keep_last < 1:
      raise ValueError(f'keep_last must be >= 1, got {keep_last}')
    if keep_marked < -1:
      raise ValueError(f'keep_marked must be >= 0, or -1 for all, got {keep_marked}')
    self.workdir = storage.resolve(workdir)
    self.directory = storage.join(self.workdir, CHECKPOINTS_SUBDIR)
    self.read_only = read_only
    self._policy = _RunPreservation(keep_last, set(), keep_fn, keep_marked)
    policies = ocp.checkpoint_managers
    # Saves land on multiples of the interval (or when forced / kept, or on preemption).
    save_policy = policies.AnySavePolicy([policies.FixedIntervalPolicy(save_interval_steps),
                                          policies.PreemptionCheckpointingPolicy()])
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=save_policy, preservation_policy=self._policy,
        enable_async_checkpointing=async_save, read_only=read_only, create=not read_only,
        cleanup_tmp_directories=not read_only)
    if read_only and not storage.is_dir(self.directory):
      raise CheckpointError(f'{self.directory}: no checkpoints directory')
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={STATE: ocp.StandardCheckpointHandler(), META: ocp.JsonCheckpointHandler()})
    for step in self._manager.all_steps():
      if self._marked_keep(step):
        self._policy.kept.add(step)

  def _marked_keep(self, step: int) -> bool:
    try:
      return bool((self._manager.metadata(step).custom_metadata or {}).get('keep'))
    except Exception:  # an unreadable step is not kept; restore() reports it
      return False

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def kept_steps(self) -> list[int]:
    return sorted(s for s in self.all_steps() if self._policy.is_kept(s))

  def save(self, step: int, state: Any, meta: Mapping[str, Any], *, force: bool = False,
           keep: bool = False) -> bool:
    """Starts saving `state` and `meta` at `step`; returns False (writing nothing) when the save
    interval skips this step or a checkpoint at or after `step` exists. keep=True (or keep_fn)
    saves regardless of the interval and exempts the checkpoint from keep_last while it is
    among the newest `keep_marked` marked ones."""
    _check_json(meta)
    keep = keep or self._policy.is_kept(step)
    if keep:
      self._policy.kept.add(step)
    latest = self.latest_step()
    if latest is not None and step <= latest:
      return False
    if latest is not None and not storage.is_remote(self.directory) and (
        force or keep or self._manager.should_save(step)):
      self._manager.wait_until_finished()  # the previous save's bytes count as used
      # The newest checkpoint's size on disk (compressed as this one will be) is the estimate.
      disk_space.check_room_for_checkpoint(
          self.directory, disk_space.folder_bytes(self._step_dir(latest)), step)
    meta = {**meta, DIGESTS: digests.tree_digests(state, per_branch=_is_params_leaf)}
    args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state, chunked_save_args(state)),
                                 META: ocp.args.JsonSave(meta)})
    return bool(self._manager.save(step, args=args, force=force or keep,
                                   custom_metadata={'keep': keep}))

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """(state, meta) of `step`, or of the newest checkpoint that reads back completely.

    abstract_state: the target pytree of jax.ShapeDtypeStruct (with `.sharding` for device
    placement) or arrays. Unreadable newer checkpoints are reported with a warning and moved to
    `<workdir>/checkpoints_unreadable/` (unless read-only) so the resumed run can save those
    steps again.
    """
    self._manager.wait_until_finished()
    self._manager.reload()
    steps = [step] if step is not None else sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      raise CheckpointError(f'{self.directory}: no checkpoint to restore')
    failed: list[tuple[int, Exception]] = []
    for s in steps:
      args = ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state),
                                   META: ocp.args.JsonRestore()})
      try:
        restored = self._manager.restore(s, args=args)
        _verify_digests(restored[META], restored[STATE])
      except Exception as e:  # a damaged step raises whatever its reader hits; fall back
        if step is not None:
          raise CheckpointError(f'{self._step_dir(s)}: cannot restore ({type(e).__name__}: '
                                f'{_first_line(e)})') from e
        failed.append((s, e))
        continue
      moved = self._set_aside([f for f, _ in failed]) if failed and not self.read_only else {}
      for f, e in failed:  # one line per damaged step, said once the fallback has worked
        warnings.warn(f'{self._step_dir(f)}: unreadable checkpoint ({type(e).__name__}: '
                      f'{_first_line(e)}); falling back to step {s}'
                      + (f'; moved it to {moved[f]}' if f in moved else ''), stacklevel=2)
      return restored[STATE], dict(restored[META])
    newest, error = failed[0]
    raise CheckpointError(f'{self.directory}: no checkpoint restores; newest (step {newest}) '
                          f'failed with {type(error).__name__}: {_first_line(error)}') from error

  def restore_meta(self, step: int | None = None) -> dict[str, Any]:
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'{self.directory}: no checkpoint')
    return read_meta(self._step_dir(step))

  def _step_dir(self, step: int) -> str:
    return str(ocp.step.build_step_path(epath.Path(self.directory),
                                        ocp.step.standard_name_format(), step))

  def _set_aside(self, steps: Sequence[int]) -> dict[int, str]:
    """Moves these steps to checkpoints_unreadable/; returns where each went."""
    stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
    target = storage.join(self.workdir, UNREADABLE_SUBDIR)
    storage.makedirs(target)
    moved = {}
    for s in steps:
      moved[s] = storage.join(target, f'{s}-{stamp}')
      storage.move(self._step_dir(s), moved[s])
    self._manager.reload()
    return moved

  def wait(self) -> None:
    """Blocks until every started save is committed to disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> 'RunCheckpointer':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _is_params_leaf(name: str) -> bool:
  """Leaves of the state's 'params' field, read one branch at a time by ParamsSource."""
  return name.split('/', 1)[0] == PARAMS


class DigestMismatch(CheckpointError):
  """Arrays read back whose bits differ from what was saved (corruption on disk)."""


def _verify_digests(meta: Mapping[str, Any], state: Any) -> None:
  """Raises DigestMismatch when a restored array differs from the digest saved with it
  (checkpoints written before digests existed are not checked)."""
  saved = meta.get(DIGESTS)
  if not saved:
    return
  bad = digests.mismatches(saved, state)
  if len(bad) == 1:
    raise DigestMismatch(f'array {bad[0]} differs from the digest saved with it (corrupted on '
                         'disk)')
  if bad:
    raise DigestMismatch(f'arrays {bad[0]} and {len(bad) - 1} more differ from the digests '
                         'saved with them (corrupted on disk)')


def _first_line(e: BaseException) -> str:
  """The first line of an error's text, without TensorStore's pointer to its details (the repr
  of a bound method, of no use to a reader)."""
  text = str(e).strip()
  line = text.splitlines()[0] if text else repr(e)
  return line.split(' See full TensorStore details:')[0]


def read_meta(checkpoint_dir: str) -> dict[str, Any]:
  """The 'meta' item of a run step folder or a params-only checkpoint folder."""
  path = storage.join(checkpoint_dir, META)
  try:
    return dict(ocp.JsonCheckpointHandler().restore(epath.Path(path), ocp.args.JsonRestore()))
  except FileNotFoundError:
    raise CheckpointError(f'{path}: missing meta item') from None
  except json.JSONDecodeError as e:
    raise CheckpointError(f'{path}: invalid JSON ({e.msg})') from None


# ---------------------------------------------------------------------------------------------
# Params-only checkpoints
# ---------------------------------------------------------------------------------------------

_PARAMS_DATA_FILE_BYTES = 32 * 2**20


def save_params_checkpoint(out_dir: str, params: Mapping[str, Any], meta: Mapping[str, Any], *,
                           tokenizer_dir: str | None = None, overwrite: bool = False,
                           output_of: str | None = None) -> None:
  """Writes one model's pure-dict params + meta (+ a copy of tokenizer_dir's files) to out_dir.
  output_of: the command whose output this is, recorded in the folder's marker file
  (copd_jax/output_paths.py: what `--overwrite` may replace).

  Written with `storage.publish_dir`: locally built under a temporary sibling and renamed into
  place, remotely written in place with a completion marker last; either way an interrupted write
  never leaves a checkpoint that reads as complete. The meta gets the digest of every tensor,
  computed on the host (one pass over the params, by this process alone)."""
  out_dir = storage.resolve(out_dir)
  if storage.exists(out_dir) and not overwrite:
    raise CheckpointError(f'{out_dir}: already exists (remove it or choose another --out)')
  _check_json(meta)
  if jax.process_count() > 1:  # Orbax refuses host-local jax.Arrays on several processes
    params = jax.tree.map(lambda x: np.asarray(x) if isinstance(x, jax.Array) else x, params)
  meta = {**meta, DIGESTS: digests.host_tree_digests(params)}
  # Small OCDBT data files: the writer buffers a whole data file in memory before flushing it.
  save = ocp.args.PyTreeSave(params, chunked_save_args(params),
                             ocdbt_target_data_file_size=_PARAMS_DATA_FILE_BYTES)
  args = ocp.args.Composite(**{PARAMS: save, META: ocp.args.JsonSave(dict(meta))})

  def build(folder: str) -> None:
    one = this_process_only()   # every layer of Orbax's save syncs processes unless told
    handler = ocp.CompositeCheckpointHandler(
        composite_options=ocp.CompositeOptions(multiprocessing_options=one),
        **{PARAMS: ocp.PyTreeCheckpointHandler(multiprocessing_options=one),
           META: ocp.JsonCheckpointHandler(multiprocessing_options=one)})
    with ocp.Checkpointer(handler, multiprocessing_options=one) as checkpointer:
      checkpointer.save(epath.Path(folder), args=args)
    if tokenizer_dir:
      dest = storage.join(folder, TOKENIZER_SUBDIR)
      storage.makedirs(dest)
      for name in hf_io.TOKENIZER_FILES:
        src = storage.join(tokenizer_dir, name)
        if not storage.is_file(src):
          continue
        if storage.is_remote(src) or storage.is_remote(dest):
          storage.copy_file(src, storage.join(dest, name))
        else:
          shutil.copy(src, dest)
    if output_of:
      output_paths.write_marker(folder, output_of)

  storage.publish_dir(out_dir, build)


def load_params_checkpoint(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """(pure-dict numpy params, meta) of a params-only checkpoint."""
  source = open_source(path)
  if source.kind != 'params':
    raise CheckpointError(f'{path}: not a params-only checkpoint (found a {source.kind} '
                          'checkpoint)')
  return source.read_all(), source.meta


# ---------------------------------------------------------------------------------------------
# Reading parameters leaf by leaf from any kind of checkpoint
# ---------------------------------------------------------------------------------------------

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


def flatten_paths(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()
                  ) -> Iterator[tuple[tuple[str, ...], Any]]:
  """(key path, leaf) pairs of a nested dict, in sorted key order."""
  for key in sorted(tree):
    value = tree[key]
    if isinstance(value, Mapping):
      yield from flatten_paths(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def set_path(tree: dict[str, Any], path: Sequence[str], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def get_path(tree: Mapping[str, Any], path: Sequence[str]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _abstract_params(config: Qwen3Config) -> dict[str, Any]:
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
  model_config: Qwen3Config
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
                            f'({type(e).__name__}: {_first_line(e)})') from None
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
                          f'{_first_line(e)})') from None
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


def this_process_only() -> ocp.options.MultiprocessingOptions:
  """Orbax options for a read or write that one process does alone (process 0 merging at the
  end of a multi-process run): Orbax's default waits at barriers for every process."""
  if jax.process_count() == 1:
    return ocp.options.MultiprocessingOptions()
  me = jax.process_index()
  return ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me},
                                            barrier_sync_key_prefix=f'process{me}')


class _ReadOnlyNotices(logging.Filter):
  """Drops Orbax's notices that a manager opened read-only is read-only (we open readers so on
  purpose; each would print a `WARNING:absl:` line on every resume, merge and export)."""

  NOTICES = ('CheckpointManagerOptions.read_only=True', 'Given directory is read only')

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(self.NOTICES)


logging.getLogger('absl').addFilter(_ReadOnlyNotices())


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
    config = hf_io.read_config(path)
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
  if source.kind == 'run':
    if branch is None:
      if source.num_branches != 1:
        raise CheckpointError(f'{source.path}: has {source.num_branches} branches; choose one '
                              f'(--branch 0..{source.num_branches - 1})')
      branch = 0
  elif branch not in (None, 0):
    raise CheckpointError(f'{source.path}: a single model ({source.kind} checkpoint); '
                          f'--branch {branch} does not apply')
  return source.model_config, source.read_all(branch), source.tokenizer_dir
