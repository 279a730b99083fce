"""What the model writes: a few native completions of every branch, every `every` steps, to
<workdir>/samples.jsonl and TensorBoard's Text tab (metrics.samples_every,
metrics.samples_per_branch).

One JSON line per completion: step, cycle, phase, branch, domain, prompt, completion, reward,
answer. The rows shown are spread over the step's prompts (the first completion of each
prompt's group, then the second, ...), so N samples show N prompts when there are that many.
A resumed run first drops the lines at or after its first step (like metrics.jsonl), so the
file equals an uninterrupted run's. Written by process 0 only; on several processes every
process gathers the shown rows' tokens (`Rollouts.texts_of`), as process 0 decoded only its own.
"""
from __future__ import annotations

from copd_jax.step_hook import Hook, StepInfo
from copd_jax.metrics import MetricsLog
from copd_jax.run_setup import Run


class SampleLog(Hook):

  def __init__(self, run: Run, every: int, per_branch: int):
    self.every, self.per_branch, self.names = every, per_branch, run.names
    self.group_size = run.config.grpo.group_size
    self.metrics_log = run.metrics_log   # its TensorBoard writer takes the text
    self.log = MetricsLog(run.workdir, resume_step=run.start_step or None,
                          enabled=run.metrics_log.enabled, tensorboard=False,
                          filename='samples.jsonl')

  def after_step(self, info: StepInfo) -> None:
    if info.step % self.every or info.native is None:
      return
    records = sample_records(info, self.names, self.per_branch, self.group_size)
    for record in records:
      self.log.append(record)
    self.log.flush()
    for name in self.names:
      mine = [r for r in records if r['branch'] == name]
      self.metrics_log.text(f'samples/{name}', markdown(mine), info.step)

  def close(self) -> None:
    self.log.close()


def sample_records(info: StepInfo, names, per_branch: int, group_size: int) -> list[dict]:
  """`per_branch` completions of each branch of the step's native rollouts, as JSON records."""
  rollouts = info.native
  rows = spread_rows(len(rollouts.examples[0]), group_size)[:per_branch]
  texts = rollouts.texts_of(rows)   # several processes: gathers these rows' tokens only
  out = []
  for k, name in enumerate(names):
    for j, i in enumerate(rows):
      example = rollouts.examples[k][i]
      out.append({'step': info.step, 'cycle': info.cycle, 'phase': info.phase, 'branch': name,
                  'domain': example.domain, 'prompt': example.prompt,
                  'completion': texts[k][j], 'reward': float(rollouts.rewards[k, i]),
                  'answer': str(example.answer)})
  return out


def spread_rows(num_rows: int, group_size: int) -> list[int]:
  """Row order that visits every prompt group before a group's second completion."""
  groups = max(num_rows // group_size, 1)
  return [g * group_size + j for j in range(group_size) for g in range(groups)
          if g * group_size + j < num_rows]


def markdown(records: list[dict]) -> str:
  """A TensorBoard text block: one section per completion (prompt, completion, reward)."""
  parts = []
  for r in records:
    parts.append(f"**reward {r['reward']:.2f}** ({r['domain']}, answer `{r['answer']}`)\n\n"
                 f"prompt:\n\n    {_indent(r['prompt'])}\n\ncompletion:\n\n    "
                 f"{_indent(r['completion'])}")
  return '\n\n---\n\n'.join(parts)


def _indent(text: str) -> str:
  """Text as a markdown code block body (4-space indent on every line)."""
  return text.replace('\n', '\n    ')
