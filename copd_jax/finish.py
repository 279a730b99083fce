"""The end of a run (Algorithm 1's last lines): merge the branches, evaluate the base model,
every branch and the merge, write the table, eval.json and the merged model.

The merge is the same streaming merge as `python -m copd_jax merge --workdir`, read from the
final checkpoint. The evaluation runs on the sampling mesh like the rollouts (`run_groups`):
the branches where the training state holds them, the base and merged models as a second group
of the same size, read from the base folder and the merged checkpoint straight into the
branches' layout (each process only its devices' blocks). Several processes: process 0 merges
and writes the merged checkpoint, every process reads its blocks back from there; every process
evaluates its share of each sampling call's rows and ends with the same results; process 0
alone writes and logs (the others return no results).
"""
from __future__ import annotations

import jax

from copd_jax import distributed
from copd_jax import storage
from copd_jax.evaluation import ModelGroup, evaluate_groups, markdown_table, save_results
from copd_jax.merge import merge_checkpoints
from copd_jax.models import hf_io, hf_io_vl
from copd_jax.models.qwen3_vl import Qwen3VLConfig
from copd_jax.run_setup import Run
from copd_jax.sampling.engine import EngineSettings
from copd_jax.start_params import BranchSource, load_branch_stacked
from copd_jax.steps import BranchState


def finish(run: Run, state: BranchState, progress: bool = False
           ) -> tuple[dict | None, str | None]:
  """(results, markdown table) of the final evaluation; (None, None) on processes other than 0.
  Call it after the run's checkpointer is closed: the merge reads the final checkpoint.
  Every process calls it (the evaluation is a collective).
  progress: tqdm bars for the merge (per tensor) and the evaluation (per sampling call)."""
  try:
    results, table = merge_and_evaluate(run, state.params, progress)
    return (results, table) if distributed.is_primary() else (None, None)
  finally:
    distributed.barrier('finish')


def run_groups(run: Run, branch_names, branch_params, singles=()) -> list[ModelGroup]:
  """The model groups of a run's evaluation on its sampling mesh: the K branches (params as the
  training state holds them) and, when `singles` (name, start_params.BranchSource) are given,
  those models read into a second group of K slots (filled up with the first, unnamed), laid
  out like the branches: each process reads only the blocks of the slots its devices hold
  (`load_branch_stacked`), so no host ever holds a whole model. Key numbers: singles[0], the
  branches, then the other singles (the order of the table: base, branches, merge)."""
  K = len(branch_names)
  groups = [ModelGroup(tuple(branch_names), branch_params,
                       tuple(range(min(len(singles), 1), min(len(singles), 1) + K)),
                       run.sample_mesh)]
  if singles:
    if len(singles) > K:
      raise ValueError(f'{len(singles)} single models do not fit a group of K={K} slots')
    slots = list(singles) + [(None, singles[0][1])] * (K - len(singles))
    key_index = (0,) + tuple(K + i for i in range(1, len(singles))) + (0,) * (K - len(singles))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), branch_params)
    stacked = load_branch_stacked([source for _, source in slots], abstract,
                                  jax.tree.map(lambda x: x.sharding, branch_params))
    groups.append(ModelGroup(tuple(n for n, _ in slots), stacked, key_index, run.sample_mesh))
  return groups


def evaluate(run: Run, groups, progress: bool = False) -> dict:
  """The run's evaluation of the models of `groups` (`run_groups`) on eval.num_examples
  examples of every domain: {name: {domain: {metric: acc}}}. Shared by the final evaluation
  and the periodic one (copd_jax.periodic_eval); sampled with the rollouts' decoder
  (sampling.decoder: the engine under the run's sampling settings, or the static decoder)."""
  config = run.config
  eval_sets = {name: split[1][:config.eval.num_examples] for name, split in run.domains.items()}
  return evaluate_groups(run.graphdef, groups, eval_sets, run.encoder, run.reward_kinds,
                         config.sampling.max_new_tokens, config.sampling.temperature,
                         config.eval.samples_k, config.seed, progress=progress,
                         engine=EngineSettings.from_config(config))


def merge_and_evaluate(run: Run, branch_params, progress: bool = False) -> tuple[dict, str]:
  """Merges (process 0 writes `merged/` and `merged_hf/`), evaluates on every process and
  writes eval.json / eval.md on process 0. branch_params: the final state's, on the mesh."""
  config, workdir = run.config, run.workdir
  K = len(config.branches)
  names = [f'branch{k}:{b}' for k, b in enumerate(config.branches)]
  singles = [('base', BranchSource(run.base_path, None, 'the base model'))]
  if config.merge.method != 'none' and K > 1:
    merged_dir = storage.join(workdir, 'merged')
    failed = None
    if distributed.is_primary():
      try:   # process 0 reads the checkpoint alone (checkpoint.this_process_only) and writes
        merged = merge_checkpoints(workdir, config.merge.method, lam=config.merge.lam,
                                   density=config.merge.density, out=merged_dir,
                                   overwrite=True, progress=progress).params
        out_dir = storage.join(workdir, 'merged_hf')
        if isinstance(run.model_config, Qwen3VLConfig):
          hf_io_vl.save_vl_hf_folder(merged, run.model_config, out_dir,
                                     tokenizer_from=run.base_path)
        else:
          hf_io.save_hf_folder(merged, run.model_config, out_dir, tokenizer_from=run.base_path)
        run.log(f'merged model ({config.merge.method}) written to {out_dir}')
      except BaseException as error:   # raised after the barrier, so no process waits on it
        failed = error
    distributed.barrier('merged')
    if failed is not None:
      raise failed
    singles.append((f'merged:{config.merge.method}',
                    BranchSource(merged_dir, None, 'the merged model')))
  results = evaluate(run, run_groups(run, names, branch_params, singles), progress)
  table = markdown_table(results, config.eval.samples_k)
  if distributed.is_primary():
    save_results(storage.join(workdir, 'eval.json'), results, config.eval.samples_k)
    storage.write_text(storage.join(workdir, 'eval.md'), table + '\n')
  run.log('\n' + table)
  return results, table
