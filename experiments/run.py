"""Runs the paper's experiments at toy scale through the ordinary driver and writes the tables
and figures.

  python -m experiments.run table1|table2|table3|conflict|phase_ratio|pilot|overlap_schedule|all \
      --seeds 3 --out experiments/results [--work runs/experiments]

overlap_schedule needs the finished phase-ratio sweep at the same --sweep-updates: its
thresholds are computed from the sweep's logged O_k (experiments/thresholds.py).

Each run is `python -m copd_jax train --config FILE --workdir WORK/seed<s>/<run> ...` (methods.py
lists them). Heavy workdirs (checkpoints) stay under --work; each finished run's eval.json,
metrics.jsonl and run_info.json (command, wall time, machine) are copied to
OUT/runs/seed<s>/<run>/, and a run already complete there is skipped (resumable). Runs of one seed
over the same domains share one warm-started base (copied in before the run; the driver reuses it
when its warmstart.json matches). A run that cannot be made (no schedule for its budget, no
thresholds yet, or a failed run) is reported as not run (exit status 2) and its table cells say why.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from typing import Callable, Sequence

from experiments import methods as M
from experiments import thresholds as T

COMMANDS = ('table1', 'table3', 'phase_ratio', 'table2', 'conflict', 'pilot', 'overlap_schedule')
COPIED = ('eval.json', 'metrics.jsonl')


class RunFailed(RuntimeError):
  pass


def result_dir(out: str, seed: int, run: str) -> str:
  return os.path.join(out, 'runs', f'seed{seed}', run)


def work_dir(work: str, seed: int, run: str) -> str:
  return os.path.join(work, f'seed{seed}', run)


def is_complete(out: str, seed: int, run: str) -> bool:
  return os.path.isfile(os.path.join(result_dir(out, seed, run), 'eval.json'))


def has_checkpoint(workdir: str) -> bool:
  folder = os.path.join(workdir, 'checkpoints')
  return os.path.isdir(folder) and bool(os.listdir(folder))


def machine() -> str:
  try:
    import jax
    devices = f'{jax.device_count()} x {jax.devices()[0].device_kind}'
  except Exception:  # jax missing or broken: still record the host
    devices = 'unknown devices'
  return f'{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, {devices}'


def code_commit() -> str:
  """The commit the run's code came from; '+local changes' when copd_jax/, configs/ or
  experiments/ differ from it (the run then used code no commit holds)."""
  def git(*args: str) -> str:
    return subprocess.run(['git', *args], cwd=M.ROOT, capture_output=True, text=True,
                          check=False).stdout.strip()
  commit = git('rev-parse', '--short', 'HEAD') or 'unknown (not a git checkout)'
  dirty = git('status', '--porcelain', '--', 'copd_jax', 'configs', 'experiments/methods.py',
              'experiments/run.py')
  return commit + (' +local changes' if dirty else '')


def train_argv(spec: M.RunSpec, workdir: str, seed: int, run_dir: Callable[[str], str]
               ) -> list[str]:
  # --overwrite: the runner owns its workdirs and writes train.log (and a shared warm-start
  # base/) there before `train` starts; a workdir with checkpoints still resumes.
  return [sys.executable, '-m', 'copd_jax', 'train', '--config', spec.config, '--workdir', workdir,
          '--no-progress', '--overwrite', f'--config.seed={seed}', *spec.resolved(run_dir)]


def _share_base(work: str, seed: int, spec: M.RunSpec, workdir: str, direction: str) -> None:
  cache = os.path.join(work, f'seed{seed}', '_bases', '+'.join(sorted(spec.domains)))
  base = os.path.join(workdir, 'base')
  if direction == 'in' and os.path.isdir(cache) and not os.path.isdir(base):
    os.makedirs(workdir, exist_ok=True)
    shutil.copytree(cache, base)
  elif direction == 'out' and os.path.isdir(base) and not os.path.isdir(cache):
    shutil.copytree(base, cache)


def execute(spec: M.RunSpec, seed: int, out: str, work: str, log: Callable[[str], None] = print,
            timeout_s: float = 7200) -> dict:
  """Runs one driver invocation to the end and copies its results to OUT; returns run_info."""
  workdir = work_dir(work, seed, spec.name)
  run_dir = lambda name: os.path.abspath(work_dir(work, seed, name))
  argv = train_argv(spec, os.path.abspath(workdir), seed, run_dir)
  _share_base(work, seed, spec, workdir, 'in')
  os.makedirs(workdir, exist_ok=True)
  # The runs of a seed share most program shapes: JAX's persistent compilation cache (under
  # --work) saves about 40% of a toy run's wall time and leaves its numbers unchanged.
  env = dict(os.environ, PYTHONPATH=M.ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''),
             XLA_FLAGS='--xla_force_host_platform_device_count=1',
             JAX_COMPILATION_CACHE_DIR=os.path.abspath(os.path.join(work, '_jax_cache')),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  log(f'[seed {seed}] {spec.name}: ' + shlex.join(argv[1:]))
  commit = code_commit()
  t0 = time.time()
  with open(os.path.join(workdir, 'train.log'), 'a') as f:
    proc = subprocess.run(argv, cwd=M.ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                          timeout=timeout_s)
  wall = time.time() - t0
  if proc.returncode != 0:
    with open(os.path.join(workdir, 'train.log')) as f:
      tail = ''.join(f.readlines()[-25:])
    raise RunFailed(f'[seed {seed}] {spec.name} failed (exit {proc.returncode}); '
                    f'{workdir}/train.log ends:\n{tail}')
  _share_base(work, seed, spec, workdir, 'out')
  dest = result_dir(out, seed, spec.name)
  os.makedirs(dest, exist_ok=True)
  for name in COPIED:
    shutil.copy(os.path.join(workdir, name), os.path.join(dest, name))
  info = {'run': spec.name, 'seed': seed, 'command': shlex.join(['python'] + argv[1:]).replace(
      os.path.abspath(work), '$WORK'), 'commit': commit, 'wall_seconds': round(wall, 1), 'machine': machine(),
      'finished': time.strftime('%Y-%m-%d %H:%M:%S')}
  with open(os.path.join(dest, 'run_info.json'), 'w') as f:
    json.dump(info, f, indent=2)
  log(f'[seed {seed}] {spec.name}: done in {wall:.0f} s')
  return info


def ensure_runs(names: Sequence[str], runs: dict[str, M.RunSpec], seeds: Sequence[int], out: str,
                work: str, log: Callable[[str], None] = print) -> dict[str, list[str]]:
  """Runs what is not complete yet, seed by seed; -> {run: [why]} of runs not run."""
  not_run: dict[str, list[str]] = {}
  for name in names:
    if name not in runs:
      log(f'{name}: NOT RUN -- {M.absent_reason(name)}')
      not_run[name] = [M.absent_reason(name)]
  names = [n for n in names if n in runs]
  for seed in seeds:
    for name in names:
      spec = runs[name]
      if is_complete(out, seed, name):
        continue
      try:
        for dep in spec.after:  # branch_init reads the dependency's checkpoints from its workdir
          if not is_complete(out, seed, dep) or not has_checkpoint(work_dir(work, seed, dep)):
            execute(runs[dep], seed, out, work, log)
        execute(spec, seed, out, work, log)
      except (RunFailed, subprocess.TimeoutExpired) as e:  # go on with the other runs
        log(str(e))
        not_run[f'{name} (seed {seed})'] = ['failed, see its train.log']
  return not_run


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('command', choices=COMMANDS + ('all',))
  parser.add_argument('--seeds', type=int, default=3)
  parser.add_argument('--out', default='experiments/results')
  parser.add_argument('--work', default='runs/experiments', help='heavy run workdirs')
  parser.add_argument('--num-cycles', type=int, default=M.Profile.num_cycles)
  parser.add_argument('--s-rl', type=int, default=M.Profile.s_rl)
  parser.add_argument('--s-opd', type=int, default=M.Profile.s_opd)
  parser.add_argument('--eval-examples', type=int, default=M.Profile.eval_examples)
  parser.add_argument('--sweep-seeds', type=int, default=None,
                      help='seeds of the phase-ratio sweep (default: --seeds)')
  parser.add_argument('--sweep-updates', type=int, default=60,
                      help='updates per branch of every phase-ratio run')
  parser.add_argument('--override', action='append', default=[],
                      help='extra --config.x=y for every run (repeatable)')
  parser.add_argument('--no-run', action='store_true', help='only rebuild tables and figures')
  parser.add_argument('--run-seeds', default=None,
                      help='comma list: run only these seeds (tables still cover --seeds); lets '
                           'several runner processes share one machine or one --out')
  args = parser.parse_args(argv)
  profile = M.Profile(args.num_cycles, args.s_rl, args.s_opd, args.eval_examples,
                      tuple(args.override))
  commands = COMMANDS if args.command == 'all' else (args.command,)
  not_run: dict[str, list[str]] = {}
  for command in commands:
    seeds = range(args.sweep_seeds if command == 'phase_ratio' and args.sweep_seeds else args.seeds)
    # The overlap-driven run's thresholds come from the finished sweep's O_k (thresholds.py).
    limits = T.load_or_compute(args.out, list(seeds), args.sweep_updates) \
        if command == 'overlap_schedule' else None
    runs = M.all_runs(profile, args.sweep_updates, limits)
    if not args.no_run:
      run_seeds = [s for s in seeds if args.run_seeds is None
                   or s in {int(x) for x in args.run_seeds.split(',')}]
      not_run.update(ensure_runs(M.command_runs(command, args.sweep_updates), runs, run_seeds,
                                 args.out, args.work))
    from experiments import figures, tables
    written = tables.write_command(command, args.out, list(seeds), profile, runs,
                                   args.sweep_updates)
    written += figures.write_command(command, args.out, list(seeds), runs, args.work,
                                     args.sweep_updates)
    for path in written:
      print('wrote', path)
  if not_run:
    print('NOT RUN: ' + '; '.join(
        f'{r}: {", ".join(f)}' for r, f in sorted(not_run.items())), file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
