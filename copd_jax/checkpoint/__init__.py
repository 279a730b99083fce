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

  layout.py   item and folder names, the meta item, chunked save arguments, errors
  run.py      RunCheckpointer (a run's steps: save, restore, retention, unreadable steps)
  params.py   params-only checkpoints (save_params_checkpoint, load_params_checkpoint)
  source.py   ParamsSource / open_source: one tensor (or layer, or block) at a time from any
              kind, load_params_for_inference
"""
from copd_jax.checkpoint.layout import (CHECKPOINTS_SUBDIR, CHUNK_BYTES, DIGESTS, META,
                                        META_BASE_PARAMS, META_MODEL_CONFIG, META_TOKENIZER_DIR,
                                        PARAMS, STATE, TOKENIZER_SUBDIR, UNREADABLE_SUBDIR,
                                        CheckpointError, DigestMismatch, chunked_save_args,
                                        model_config_from_meta, read_meta, run_meta,
                                        this_process_only)
from copd_jax.checkpoint.params import load_params_checkpoint, save_params_checkpoint
from copd_jax.checkpoint.run import RunCheckpointer
from copd_jax.checkpoint.source import (ParamsSource, latest_step_dir, load_params_for_inference,
                                        model_branch, open_source, read_leaf)
from copd_jax.tree_paths import flatten_paths, get_path, set_path

__all__ = ['CHECKPOINTS_SUBDIR', 'CHUNK_BYTES', 'DIGESTS', 'META', 'META_BASE_PARAMS',
           'META_MODEL_CONFIG', 'META_TOKENIZER_DIR', 'PARAMS', 'STATE', 'TOKENIZER_SUBDIR',
           'UNREADABLE_SUBDIR', 'CheckpointError', 'DigestMismatch', 'ParamsSource',
           'RunCheckpointer', 'chunked_save_args', 'flatten_paths', 'get_path',
           'latest_step_dir', 'load_params_checkpoint', 'load_params_for_inference',
           'model_branch', 'model_config_from_meta', 'open_source', 'read_leaf', 'read_meta', 'run_meta',
           'save_params_checkpoint', 'set_path', 'this_process_only']
