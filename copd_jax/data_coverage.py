"""Decisions about data size that a run makes on its own, said once at set-up: a domain with
fewer training prompts than one batch (its prompts repeat within each batch) and an evaluation
on fewer examples than eval.num_examples asks for (the eval split is smaller)."""
from __future__ import annotations

from typing import Mapping, Sequence

from copd_jax.data.domain import Example


def coverage_notes(config, domains: Mapping[str, tuple[Sequence[Example], Sequence[Example]]],
                   train: bool = True) -> list[str]:
  """One line per domain whose train split is smaller than grpo.prompts_per_step (train=False:
  not asked, as in `evaluate`) or whose eval split is smaller than eval.num_examples; [] when
  every domain fills both."""
  per_step, asked = config.grpo.prompts_per_step, config.eval.num_examples
  notes = []
  for name, (train_split, evaluation) in sorted(domains.items()):
    spec = config.domains[name]
    where = spec.train_path if spec.source == 'file' else 'synthetic'
    if train and len(train_split) < per_step:
      notes.append(f'note: domain {name} has {len(train_split):,} training prompt(s) ({where}), '
                   f'fewer than grpo.prompts_per_step={per_step:,}: each batch repeats them')
    if len(evaluation) < asked:
      where = spec.eval_path if spec.source == 'file' else 'synthetic'
      notes.append(f'note: domain {name} is evaluated on {len(evaluation):,} example(s) '
                   f'({where}), fewer than eval.num_examples={asked:,}')
  return notes
