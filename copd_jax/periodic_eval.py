"""Evaluation during training (eval.every_steps; 0 = off): every branch on every domain's eval
set, with the final evaluation's code and settings (copd_jax.evaluation: greedy pass@1 and
sampled avg@k on eval.num_examples examples, the run's seed), logged as scalars of that step:
'eval/{domain}/pass@1/{branch}' and 'eval/{domain}/avg@k/{branch}'.

The evaluation draws no randomness from the run and changes nothing in it, so a run with it on
trains exactly like one with it off. Greedy pass@1 does not depend on the sampling key; avg@k
at the last step may differ a little from the final table's (the final evaluation samples
base, branches and merge together, so each model's key differs). It runs on the sampling
mesh with the branches' params where they are (copd_jax.finish.run_groups). Several processes:
every process evaluates its share of the rows (a collective); process 0 logs.
"""
from __future__ import annotations

from copd_jax import distributed
from copd_jax.evaluation import GREEDY, SAMPLED
from copd_jax.finish import evaluate, run_groups
from copd_jax.step_hook import Hook, StepInfo
from copd_jax.run_setup import Run


class PeriodicEval(Hook):

  def __init__(self, run: Run, every_steps: int, progress: bool = False):
    self.run, self.every, self.progress = run, every_steps, progress

  def after_step(self, info: StepInfo) -> None:
    if (info.step + 1) % self.every:
      return
    scalars = eval_scalars(self.run, info.state.params, self.progress)
    if distributed.is_primary():
      info.add_scalars(scalars)


def eval_scalars(run: Run, branch_params, progress: bool = False) -> dict[str, float]:
  """{'eval/{domain}/{pass@1|avg@k}/{branch}': accuracy} of the branch-stacked params (host
  arrays or the training state's)."""
  results = evaluate(run, run_groups(run, run.names, branch_params), progress)
  return {f'eval/{domain}/{metric}/{name}': value
          for name, per_domain in results.items() for domain, metrics in per_domain.items()
          for metric, value in metrics.items() if metric in (GREEDY, SAMPLED)}
