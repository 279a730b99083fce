"""Per-domain accuracy of several models at once: greedy pass@1 and sampled avg@k.

Models are stacked on a leading axis (branches, base, merge) and sampled together with the
branch-vmapped sampler, so M models cost one compiled program per prompt bucket.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

import jax
import numpy as np
from tqdm import tqdm

from copd_jax import storage
from copd_jax.data import Example
from copd_jax.rollouts import PromptEncoder, sample_and_score
from copd_jax.sampling import SamplingParams, place_weights

GREEDY, SAMPLED = 'pass@1', 'avg@k'


def evaluate_models(graphdef, stacked_params, model_names: Sequence[str],
                    eval_sets: dict[str, list[Example]], encoder: PromptEncoder,
                    reward_kinds: dict[str, Any], max_new_tokens: int, temperature: float,
                    samples_k: int, seed: int, rows_per_call: int = 256,
                    progress: bool = False) -> dict[str, dict[str, dict[str, float]]]:
  """-> {model: {domain: {'pass@1': acc, 'avg@k': acc}}} (accuracies in [0, 1]).
  reward_kinds: per domain, a reward kind or copd_jax.rewards.RewardSpec.
  progress: a tqdm bar over the sampling calls, labelled with the domain and metric."""
  M = len(model_names)
  calls = sum(-(-len(e) * r // min(rows_per_call, len(e) * r))
              for e in eval_sets.values() for r in (1, samples_k) if e)
  bar = tqdm(total=calls, desc='eval', disable=not progress, dynamic_ncols=True, leave=False)
  greedy = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, greedy=True)
  sampled = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
  results = {name: {} for name in model_names}
  key = jax.random.key(seed)
  stacked_params = place_weights(stacked_params)   # once for every sampling call below
  for d, (domain, examples) in enumerate(sorted(eval_sets.items())):
    for metric, sampling, repeats in ((GREEDY, greedy, 1), (SAMPLED, sampled, samples_k)):
      rows = [e for e in examples for _ in range(repeats)]
      rewards = []
      size = min(rows_per_call, len(rows))  # every chunk padded to `size`: one compile
      for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        real = len(chunk)
        chunk = chunk + [chunk[-1]] * (size - real)
        call_key = jax.random.fold_in(jax.random.fold_in(key, d), start + (metric == SAMPLED))
        # Chunks hold whole groups of `repeats` copies when size is a multiple of it (padding
        # repeats the last example): then each group's prompt is prefilled once.
        out = sample_and_score(graphdef, stacked_params, [chunk] * M, encoder, sampling,
                               call_key, reward_kinds,
                               group_size=repeats if size % repeats == 0 else 1)
        rewards.append(out.rewards[:, :real])
        bar.set_postfix_str(f'{domain} {metric}')
        bar.update(1)
      per_model = np.concatenate(rewards, axis=1).mean(axis=1)
      for name, acc in zip(model_names, per_model):
        results[name].setdefault(domain, {})[metric] = float(acc)
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
