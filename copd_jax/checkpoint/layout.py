"""What every kind of checkpoint shares: item and folder names, the 'meta' item (its keys,
JSON check, reading), chunked save arguments, the errors readers raise, and Orbax options for a
read or write that one process does alone."""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from etils import epath

from copd_jax import storage
from copd_jax.errors import UserInputError
from copd_jax.models.qwen3 import Qwen3Config

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


class DigestMismatch(CheckpointError):
  """Arrays read back whose bits differ from what was saved (corruption on disk)."""


def first_line(e: BaseException) -> str:
  """The first line of an error's text, without TensorStore's pointer to its details (the repr
  of a bound method, of no use to a reader)."""
  text = str(e).strip()
  line = text.splitlines()[0] if text else repr(e)
  return line.split(' See full TensorStore details:')[0]


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
    if 'vision' in raw:   # a Qwen3-VL model: text and vision configs nested
      from copd_jax.models.hf_io_vl import vl_config_from_fields
      return vl_config_from_fields(raw)
    return Qwen3Config(**raw)
  except (TypeError, ValueError, KeyError) as e:
    raise CheckpointError(f'{where}: meta.{META_MODEL_CONFIG} is not a valid Qwen3Config '
                          f'({e})') from None


def check_json(meta: Mapping[str, Any]) -> None:
  for key, value in meta.items():
    try:
      json.dumps(value)
    except (TypeError, ValueError) as e:
      raise TypeError(f'checkpoint meta[{key!r}] is not JSON-serialisable: {e}') from None


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
# Arrays in chunks of one branch (and one layer)
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
