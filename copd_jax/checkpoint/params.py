"""Params-only checkpoints (the merge output): one model's pure-dict parameters + meta, plus an
optional bundled 'tokenizer/' folder, published so that an interrupted write never reads as
complete."""
from __future__ import annotations

import shutil
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from copd_jax import digests, output_paths, storage
from copd_jax.checkpoint.layout import (DIGESTS, META, PARAMS, TOKENIZER_SUBDIR, CheckpointError,
                                        check_json, chunked_save_args, this_process_only)
from copd_jax.checkpoint.source import open_source
from copd_jax.models import hf_io

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
  check_json(meta)
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
      for name in hf_io.TOKENIZER_FILES + hf_io.PROCESSOR_FILES:
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

