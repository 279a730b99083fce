"""The end of a run (Algorithm 1's last lines): merge the branches, evaluate the base model,
every branch and the merge, write the table, eval.json and the merged model.

The merge is the same streaming merge as `python -m copd_jax merge --workdir`, read from the
final checkpoint. Several processes: every process gathers the final params (a collective);
process 0 alone merges, evaluates on its own devices and writes, while the others wait for it
and return no results.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from copd_jax import distributed
from copd_jax import storage
from copd_jax.evaluation import evaluate_models, markdown_table, save_results
from copd_jax.merge import merge_checkpoints
from copd_jax.models import hf_io
from copd_jax.run_setup import Run, state_from_pure_dict
from copd_jax.steps import BranchState


def finish(run: Run, state: BranchState, progress: bool = False
           ) -> tuple[dict | None, str | None]:
  """(results, markdown table) of the final evaluation; (None, None) on processes other than 0.
  Call it after the run's checkpointer is closed: the merge reads the final checkpoint.
  progress: tqdm bars for the merge (per tensor) and the evaluation (per sampling call)."""
  branch_params = distributed.to_host(state.params)
  # The base model lives sharded on the mesh (run_setup); the evaluation here wants it on the host.
  run = dataclasses.replace(run, base_params=distributed.to_host(run.base_params))
  try:
    if not distributed.is_primary():
      return None, None
    return merge_and_evaluate(run, branch_params, progress)
  finally:
    distributed.barrier('finish')


def evaluate(run: Run, names, stacked_params, progress: bool = False) -> dict:
  """The run's evaluation of the models stacked in `stacked_params` (host arrays, one per
  name) on eval.num_examples examples of every domain: {name: {domain: {metric: acc}}}.
  Shared by the final evaluation and the periodic one (copd_jax.periodic_eval)."""
  config = run.config
  eval_sets = {name: split[1][:config.eval.num_examples] for name, split in run.domains.items()}
  return evaluate_models(run.graphdef, stacked_params, names, eval_sets, run.encoder,
                         run.reward_kinds, config.sampling.max_new_tokens,
                         config.sampling.temperature, config.eval.samples_k, config.seed,
                         progress=progress)


def merge_and_evaluate(run: Run, branch_params, progress: bool = False) -> tuple[dict, str]:
  config, workdir = run.config, run.workdir
  K = len(config.branches)
  names = ['base'] + [f'branch{k}:{b}' for k, b in enumerate(config.branches)]
  models = [jax.tree.map(lambda x: np.asarray(x)[None], run.base_params),
            jax.tree.map(np.asarray, branch_params)]
  if config.merge.method != 'none' and K > 1:
    # On several processes, process 0 alone reads the checkpoint (checkpoint.this_process_only).
    merged = merge_checkpoints(workdir, config.merge.method, lam=config.merge.lam,
                               density=config.merge.density,
                               out=storage.join(workdir, 'merged'), overwrite=True,
                               progress=progress)
    out_dir = storage.join(workdir, 'merged_hf')
    hf_io.save_hf_folder(merged.params, run.model_config, out_dir, tokenizer_from=run.base_path)
    run.log(f'merged model ({config.merge.method}) written to {out_dir}')
    models.append(jax.tree.map(lambda x: np.asarray(x)[None],
                               state_from_pure_dict(run.base_params, merged.params)))
    names.append(f'merged:{config.merge.method}')
  all_params = jax.tree.map(lambda *xs: np.concatenate(xs), *models)
  results = evaluate(run, names, all_params, progress)
  table = markdown_table(results, config.eval.samples_k)
  save_results(storage.join(workdir, 'eval.json'), results, config.eval.samples_k)
  storage.write_text(storage.join(workdir, 'eval.md'), table + '\n')
  run.log('\n' + table)
  return results, table
