"""Per-domain accuracy of several models at once: greedy pass@1 and sampled avg@k.

Models are stacked on a leading axis (branches, base, merge) and sampled together with the
branch-vmapped sampler, so M models cost one compiled program per prompt bucket. Models can be
split into groups that each run as one program (`ModelGroup`): a run's branches where they are,
sharded on its sampling mesh, and the base and merged models stacked into a group of the same
size; every model keeps the sampling key it has when all are sampled together, so the grouping
does not change the results.

On a mesh, every process decodes and scores only its own rows of each call (the rows its
devices hold, copd_jax.rollouts.sample_and_score) and the rewards come back as small [S, rows]
arrays, so every process ends with the same table and no process holds another's parameters.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from copd_jax import storage
from copd_jax.data import Example
from copd_jax.rollouts import PromptEncoder, sample_and_score
from copd_jax.sampling import SamplingParams, place_weights
from copd_jax.sampling.engine import EngineSettings

GREEDY, SAMPLED = 'pass@1', 'avg@k'


@dataclasses.dataclass(frozen=True)
class ModelGroup:
  """Models sampled by one program: `params` stacked [S, ...] on a leading slot axis; slot s
  holds model `names[s]` (None: a filler slot, sampled and ignored, so that the slot count fits
  the mesh's 'branch' axis) and samples with the key of model number `key_index[s]` among all
  models evaluated together. mesh: the sampling mesh (None: this process's default device)."""
  names: tuple[str | None, ...]
  params: Any
  key_index: tuple[int, ...]
  mesh: Mesh | None = None


def evaluate_models(graphdef, stacked_params, model_names: Sequence[str],
                    eval_sets: dict[str, list[Example]], encoder: PromptEncoder,
                    reward_kinds: dict[str, Any], max_new_tokens: int, temperature: float,
                    samples_k: int, seed: int, rows_per_call: int = 256,
                    progress: bool = False, engine: EngineSettings | None = None
                    ) -> dict[str, dict[str, dict[str, float]]]:
  """-> {model: {domain: {'pass@1': acc, 'avg@k': acc}}} (accuracies in [0, 1]) of the models
  stacked in `stacked_params` (one per name), sampled together on this process's device.
  reward_kinds: per domain, a reward kind or copd_jax.rewards.RewardSpec.
  progress: a tqdm bar over the sampling calls, labelled with the domain and metric.
  engine: sample with the continuous-batching engine under these settings
  (`EngineSettings.from_config`: sampling.decoder 'engine'); None: the static decoder. The
  same tokens either way, so the same results."""
  group = ModelGroup(tuple(model_names), stacked_params, tuple(range(len(model_names))))
  return evaluate_groups(graphdef, [group], eval_sets, encoder, reward_kinds, max_new_tokens,
                         temperature, samples_k, seed, rows_per_call, progress, engine)


def evaluate_groups(graphdef, groups: Sequence[ModelGroup], eval_sets: dict[str, list[Example]],
                    encoder: PromptEncoder, reward_kinds: dict[str, Any], max_new_tokens: int,
                    temperature: float, samples_k: int, seed: int, rows_per_call: int = 256,
                    progress: bool = False, engine: EngineSettings | None = None
                    ) -> dict[str, dict[str, dict[str, float]]]:
  """`evaluate_models` of the named models of every group, each group sampled on its own mesh;
  results ordered by key_index. Model m samples each call with key m of
  `jax.random.split(call_key, M)` (M named models), whatever group it is in."""
  named = sorted((index, name) for g in groups for name, index in zip(g.names, g.key_index)
                 if name is not None)
  if [index for index, _ in named] != list(range(len(named))):
    raise ValueError(f'key_index of the named models must number them 0..M-1: {named}')
  M = len(named)
  calls = sum(-(-len(e) * r // min(rows_per_call, len(e) * r))
              for e in eval_sets.values() for r in (1, samples_k) if e) * len(groups)
  bar = tqdm(total=calls, desc='eval', disable=not progress, dynamic_ncols=True, leave=False)
  greedy = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, greedy=True)
  sampled = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
  results = {name: {} for _, name in named}
  key = jax.random.key(seed)
  # Placed once for every sampling call below.
  placed = [place_weights(g.params, g.mesh) for g in groups]
  split = math.lcm(*(g.mesh.shape['fsdp'] if g.mesh is not None else 1 for g in groups))
  for d, (domain, examples) in enumerate(sorted(eval_sets.items())):
    for metric, sampling, repeats in ((GREEDY, greedy, 1), (SAMPLED, sampled, samples_k)):
      rows = [e for e in examples for _ in range(repeats)]
      rewards = {name: [] for _, name in named}
      # Every chunk padded to `size` (one compile), a multiple of the meshes' 'fsdp' sizes: rows
      # are split over 'fsdp' only when it divides them, else each process scores them all.
      size = -(-min(rows_per_call, len(rows)) // split) * split
      for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        real = len(chunk)
        chunk = chunk + [chunk[-1]] * (size - real)
        call_key = jax.random.fold_in(jax.random.fold_in(key, d), start + (metric == SAMPLED))
        keys = jax.random.split(call_key, M)
        for group, weights in zip(groups, placed):
          # Chunks hold whole groups of `repeats` copies when size is a multiple of it (padding
          # repeats the last example): then each group's prompt is prefilled once.
          out = sample_and_score(graphdef, weights, [chunk] * len(group.names), encoder,
                                 sampling, None, reward_kinds, mesh=group.mesh,
                                 group_size=repeats if size % repeats == 0 else 1,
                                 keys=keys[np.asarray(group.key_index)], engine=engine)
          for s, name in enumerate(group.names):
            if name is not None:
              rewards[name].append(out.rewards[s, :real])
          bar.set_postfix_str(f'{domain} {metric}')
          bar.update(1)
      for name, per_call in rewards.items():
        results[name].setdefault(domain, {})[metric] = float(np.concatenate(per_call).mean())
  bar.close()
  return results


def markdown_table(results: dict[str, dict[str, dict[str, float]]], samples_k: int) -> str:
  """Rows: models; columns: each domain's pass@1 and avg@k (in %), then their overall means."""
  domains = sorted(next(iter(results.values())))
  header = ['model'] + [f'{d} pass@1' for d in domains] + [f'{d} avg@{samples_k}' for d in domains]
  header += ['overall pass@1', f'overall avg@{samples_k}']
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for model, per_domain in results.items():
    greedy = [per_domain[d][GREEDY] for d in domains]
    sampled = [per_domain[d][SAMPLED] for d in domains]
    cells = [f'{100 * v:.1f}' for v in greedy + sampled + [np.mean(greedy), np.mean(sampled)]]
    lines.append('| ' + ' | '.join([model] + cells) + ' |')
  return '\n'.join(lines)


def save_results(path: str, results, samples_k: int) -> None:
  storage.write_text(path, json.dumps({'samples_k': samples_k, 'results': results}, indent=2,
                                      sort_keys=True))
