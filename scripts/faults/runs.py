"""Tiny toy runs (the TINY run of tests/test_driver.py) in subprocesses, and comparing what two
finished runs produced."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Sequence

from scripts.faults.cli import ROOT, TOY_CONFIG, module_command


def tiny_overrides() -> list[str]:
  """The tiny toy run of tests/test_driver.py (K=2, one cycle of 2 RL + 2 OPD steps)."""
  from tests.test_driver import TINY
  return list(TINY)


def run_env(folder: str, cache_dir: str | None = None) -> dict[str, str]:
  """Environment of a tiny run: 2 CPU devices and a persistent compilation cache
  (`cache_dir`, else `folder`/jax_cache) shared by the runs, which changes no result."""
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  env.update(JAX_COMPILATION_CACHE_DIR=cache_dir or os.path.join(folder, 'jax_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return env


def train_argv(workdir: str, extra: Sequence[str] = (), inject_nan: str = '') -> list[str]:
  """The tiny run's command line; inject_nan 'BRANCH:STEP[,...]' runs it through
  scripts/faults/nan_train.py, which poisons those branches' batches at those steps."""
  args = ['--config', TOY_CONFIG, '--workdir', workdir, '--no-progress', *tiny_overrides(),
          *extra]
  if inject_nan:
    return [sys.executable, '-m', 'scripts.faults.nan_train', inject_nan, *args]
  return module_command(['train', *args])


def train_process(workdir: str, env: dict[str, str], extra: Sequence[str] = (),
                  timeout: float = 1800, inject_nan: str = '') -> subprocess.CompletedProcess:
  """The tiny run in `workdir` to its end, whatever its exit status."""
  return subprocess.run(train_argv(workdir, extra, inject_nan), cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def run_train(workdir: str, env: dict[str, str], extra: Sequence[str] = (),
              timeout: float = 1800) -> subprocess.CompletedProcess:
  """train_process, raising RuntimeError unless the run succeeds."""
  result = train_process(workdir, env, extra, timeout)
  if result.returncode != 0:
    raise RuntimeError(f'train in {workdir} failed ({result.returncode}):\n'
                       f'{(result.stdout + result.stderr)[-4000:]}')
  return result


def finished(workdir: str) -> bool:
  """Whether the run got to its end (eval.json is its last output)."""
  return os.path.isfile(os.path.join(workdir, 'eval.json'))


def reference_run(folder: str, env: dict[str, str], name: str = 'reference_tiny',
                  extra: Sequence[str] = ()) -> str:
  """`folder`/`name`: an uninterrupted tiny run, made unless a finished one is there."""
  reference = os.path.join(folder, name)
  if not finished(reference):
    shutil.rmtree(reference, ignore_errors=True)
    run_train(reference, env, extra)
  return reference


def committed_steps(workdir: str) -> list[int]:
  """Steps of the run's complete checkpoints, ascending."""
  folder = os.path.join(workdir, 'checkpoints')
  names = os.listdir(folder) if os.path.isdir(folder) else []
  return sorted(int(n) for n in names if n.isdigit())


def branch_params(path: str, branch: int) -> dict:
  """Parameters of one branch of a checkpoint (a run workdir: its newest), {path: array}."""
  from copd_jax import checkpoint as ckpt
  return dict(ckpt.flatten_paths(ckpt.open_source(path).read_all(branch)))


def differing_leaves(ours: dict, theirs: dict) -> list[tuple[str, ...]]:
  """Paths of `theirs` that `ours` lacks or holds with other values (bit for bit)."""
  import numpy as np
  return [path for path, value in theirs.items()
          if path not in ours or not np.array_equal(ours[path], value)]


def run_outputs(workdir: str) -> dict:
  """What a finished run produced: final params of every branch (flat {path: array}), the step,
  metrics.jsonl without timing keys, eval.json, and the merged model's params."""
  from copd_jax import checkpoint as ckpt
  from copd_jax.metrics import read_metrics
  source = ckpt.open_source(workdir)
  params = {k: branch_params(workdir, k) for k in range(source.num_branches)}
  merged = os.path.join(workdir, 'merged')
  with open(os.path.join(workdir, 'eval.json')) as f:
    evaluation = json.load(f)
  return {
      'step': source.meta['step'], 'params': params,
      'metrics': [{k: v for k, v in r.items() if 'seconds' not in k}
                  for r in read_metrics(workdir)],
      'eval': evaluation,
      'merged': dict(ckpt.flatten_paths(ckpt.load_params_checkpoint(merged)[0]))
      if os.path.isdir(merged) else None,
  }


def compare_runs(workdir: str, reference: str) -> list[str]:
  """Differences between two finished runs (empty: identical, bit for bit)."""
  ours, theirs = run_outputs(workdir), run_outputs(reference)
  problems = []
  if ours['step'] != theirs['step']:
    problems.append(f'final step {ours["step"]} != {theirs["step"]}')
  for k, leaves in theirs['params'].items():
    for path in differing_leaves(ours['params'].get(k, {}), leaves):
      problems.append(f'branch {k} parameter {".".join(path)} differs')
  if ours['metrics'] != theirs['metrics']:
    problems.append(f'metrics.jsonl differs ({len(ours["metrics"])} vs {len(theirs["metrics"])} '
                    'records)')
  if ours['eval'] != theirs['eval']:
    problems.append('eval.json differs')
  if (ours['merged'] is None) != (theirs['merged'] is None) or (
      ours['merged'] and differing_leaves(ours['merged'], theirs['merged'])):
    problems.append('merged model differs')
  return problems


def summary_counts(workdir: str) -> str:
  """What compare_runs compares, counted: '2 branches (N tensors), merged model, ...'."""
  out = run_outputs(workdir)
  tensors = sum(len(v) for v in out['params'].values())
  return (f'{len(out["params"])} branches ({tensors} tensors), merged model, '
          f'{len(out["metrics"])} metrics records, eval.json')
