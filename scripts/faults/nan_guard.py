"""NaN injection (copd_jax.hooks.NanInjection, through scripts/faults/nan_train.py) into one
branch of the tiny run: the numerical guard must skip that branch's update and log it, let the
clean branch train as in a clean run, and stop the run with exit status 3 after max_bad_steps
consecutive bad steps."""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from typing import Callable

from scripts.faults import report, runs
from scripts.faults.cli import CliResult

# (label, injection 'BRANCH:STEP,...', overrides, expected exit status: 0 = the run finishes,
# 3 = the guard stops it)
NAN_CASES: tuple[tuple[str, str, tuple[str, ...], int], ...] = (
    ('NaN in branch 1 at step 1', '1:1', (), 0),
    ('NaN in branch 0 at steps 1 and 2, max_bad_steps=2', '0:1,0:2',
     ('--config.guard.max_bad_steps=2',), 3),
)


@dataclasses.dataclass
class NanOutcome:
  label: str
  injection: str
  overrides: tuple[str, ...]
  code: int
  guard_lines: list[str]
  final_line: str
  newest_step: int | None
  problems: list[str]

  @property
  def ok(self) -> bool:
    return not self.problems


def nan_problems(result: subprocess.CompletedProcess, expected_code: int, workdir: str,
                 reference: str, guard_lines: list[str], messages: list[str]) -> list[str]:
  """What went wrong in one NaN run (`messages`: its stderr without logging noise)."""
  import numpy as np
  text = (result.stdout + result.stderr).splitlines()
  steps = runs.committed_steps(workdir)
  step_dir = lambda s: os.path.join(workdir, 'checkpoints', str(s))
  problems = []
  if result.returncode != expected_code:
    problems.append(f'exit {result.returncode}, expected {expected_code}: {text[-3:]}')
  poisoned = 1 if expected_code == 0 else 0
  if len(guard_lines) != (1 if expected_code == 0 else 2):
    problems.append(f'guard log lines: {guard_lines}')
  if steps[:2] == [0, 1]:
    before, after = (runs.branch_params(step_dir(s), poisoned) for s in (0, 1))
    if before.keys() != after.keys() or runs.differing_leaves(after, before):
      problems.append(f'branch {poisoned} moved at its poisoned step 1')
  if steps and not all(np.isfinite(v).all() for branch in (0, 1)
                       for v in runs.branch_params(step_dir(steps[-1]), branch).values()):
    problems.append('non-finite parameters in the newest checkpoint')
  if expected_code == 0:
    other = runs.branch_params(step_dir(1), 0)
    theirs = runs.branch_params(os.path.join(reference, 'checkpoints', '1'), 0)
    if not all(np.allclose(other[p], theirs[p], rtol=1e-6, atol=1e-7) for p in theirs):
      problems.append('the clean branch 0 differs from the uninterrupted run at step 1')
    if not runs.finished(workdir):
      problems.append('the run did not finish')
  else:
    final = messages[-1] if messages else ''
    if len(messages) != 1 or not final.startswith('stopped: 2 consecutive steps'):
      problems.append(f'stderr: {messages}')
    if steps != [0, 1]:
      problems.append(f'checkpoints {steps}, expected [0, 1]')
  return problems


def nan_experiment(folder: str, cache_dir: str | None = None,
                   log: Callable[[str], None] = print) -> list[NanOutcome]:
  """NaN advantages injected into one branch of the tiny run (NanInjection): once at one
  step (the update of that branch is skipped, the other branch and the run go on), and at
  max_bad_steps consecutive steps (the run stops cleanly with exit status 3)."""
  env = runs.run_env(folder, cache_dir)
  reference = runs.reference_run(folder, env)
  outcomes = []
  for i, (label, injection, overrides, expected_code) in enumerate(NAN_CASES):
    workdir = os.path.join(folder, f'nan_{i}')
    shutil.rmtree(workdir, ignore_errors=True)
    result = runs.train_process(workdir, env, overrides, inject_nan=injection)
    guard_lines = [l for l in (result.stdout + result.stderr).splitlines()
                   if 'update skipped' in l]
    messages = CliResult(result.returncode, result.stderr).lines
    problems = nan_problems(result, expected_code, workdir, reference, guard_lines, messages)
    steps = runs.committed_steps(workdir)
    outcomes.append(NanOutcome(label, injection, overrides, result.returncode, guard_lines,
                               messages[-1] if messages else '', steps[-1] if steps else None,
                               problems))
    log(f'{label}: {"ok" if not problems else problems}')
  return outcomes


def markdown(folder: str) -> report.Section:
  """Every case of NAN_CASES, as a table."""
  outcomes = nan_experiment(folder, log=report.log_stderr)
  lines = ['### NaN injected into a chosen branch (`copd_jax.hooks.NanInjection`)', '',
           '| # | injection | exit | guard log lines | last line on stderr | newest checkpoint | '
           'checks |', '|---|---|---|---|---|---|---|']
  for i, o in enumerate(outcomes, 1):
    lines.append(f'| {i} | {o.label} (`{" ".join(("nan_train " + o.injection,) + o.overrides)}`) '
                 f'| {o.code} | '
                 f'{"<br>".join(f"`{report.cell(l, 160)}`" for l in o.guard_lines)} | '
                 f'`{report.cell(report.without_folders(o.final_line, folder), 260)}` | '
                 f'step {o.newest_step} | '
                 f'{"all held" if o.ok else report.cell("; ".join(o.problems))} |')
  rows = [('NaN advantages in a chosen branch', len(outcomes), sum(o.ok for o in outcomes),
           'that branch\'s update skipped and logged with step and branch; after max_bad_steps '
           'consecutive bad steps the run stops with exit 3 and one line',
           'nothing: the clean branch trains as in a clean run, checkpoints stay finite')]
  return '\n'.join(lines), all(o.ok for o in outcomes), rows
