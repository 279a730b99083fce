"""Random SIGKILLs: the tiny toy run (plus --cycles) is killed at random points (shortly after a
random checkpoint or warm-start event, or at a random time) and resumed; its final parameters of
every branch, the merged model, metrics.jsonl (timing keys aside) and eval.json must equal an
uninterrupted run's. The runs share a persistent JAX compilation cache (written by the
uninterrupted run, only read by the killed ones), so a restart costs seconds, not minutes."""
from __future__ import annotations

import dataclasses
import os
import random
import shutil
import signal
import subprocess
import time
from typing import Callable, Sequence

from scripts.faults import report, runs
from scripts.faults.cli import ROOT


def has_base(workdir: str) -> bool:
  """Whether the warm-started base model is written."""
  return os.path.isfile(os.path.join(workdir, 'base', 'warmstart.json'))


def progress_events(workdir: str) -> set[str]:
  """Observable milestones of a run: the warm-started base, each committed checkpoint."""
  events = {f'checkpoint {s}' for s in runs.committed_steps(workdir)}
  if has_base(workdir):
    events.add('base model')
  return events


def describe_moment(workdir: str, before: set[str]) -> str:
  """What the run was doing, judged from its files at the moment of a kill (`before`: the
  milestones present when this attempt started)."""
  steps = runs.committed_steps(workdir)
  folder = os.path.join(workdir, 'checkpoints')
  saving = os.path.isdir(folder) and any('tmp' in n for n in os.listdir(folder))
  if not has_base(workdir):
    return 'start-up / warm start of the base model'
  if runs.finished(workdir):
    return 'after eval.json was written'
  where = f'checkpoints on disk: steps {", ".join(map(str, steps))}' if steps else \
      'no checkpoint yet'
  if progress_events(workdir) == before:
    where = 'no new milestone in this attempt yet (start-up, restore, compilation); ' + where
  if saving:
    where += '; a checkpoint save in progress'
  hidden = [n for n in os.listdir(workdir) if '.tmp-' in n]
  if hidden:
    where += f'; writing {", ".join(sorted(hidden))}'
  elif os.path.isdir(os.path.join(workdir, 'merged')):
    where += '; merged model written (evaluating)'
  return where


@dataclasses.dataclass
class KillRecord:
  attempt: int
  seconds: float
  trigger: str
  moment: str
  landed: bool


def run_with_kills(workdir: str, kills: int, seed: int, env: dict[str, str],
                   extra: Sequence[str] = (), max_time_s: float = 60.0,
                   log: Callable[[str], None] = print) -> list[KillRecord]:
  """Starts the run `kills` times and SIGKILLs it: with probability 0.7 between 0 and 2 s after
  its next new milestone (progress_events), otherwise at a random time in [1, max_time_s] s.
  Then runs it once more to the end. An attempt that finishes before its kill ends the loop."""
  rng = random.Random(seed)
  records: list[KillRecord] = []
  for attempt in range(1, kills + 1):
    before = progress_events(workdir)
    by_event = rng.random() < 0.7
    delay = rng.uniform(0.0, 2.0) if by_event else rng.uniform(1.0, max_time_s)
    log_path = os.path.join(os.path.dirname(workdir) or '.', f'kill_attempt_{attempt}.log')
    with open(log_path, 'w') as out:
      process = subprocess.Popen(runs.train_argv(workdir, extra), cwd=ROOT, env=env, stdout=out,
                                 stderr=subprocess.STDOUT)
      start = time.monotonic()
      fire_at = None if by_event else start + delay
      trigger = ''
      while process.poll() is None:
        now = time.monotonic()
        if fire_at is None:
          new = sorted(progress_events(workdir) - before)
          if new:
            fire_at, trigger = now + delay, f'{delay:.2f} s after {new[0]}'
        elif now >= fire_at:
          break
        time.sleep(0.02)
      if not trigger:
        trigger = f'at {delay:.1f} s'
      if process.poll() is not None:
        if process.returncode != 0:
          raise RuntimeError(f'attempt {attempt} failed with {process.returncode}; see '
                             f'{out.name}')
        records.append(KillRecord(attempt, time.monotonic() - start, trigger,
                                  'the run finished before the kill', False))
        break
      moment = describe_moment(workdir, before)
      process.send_signal(signal.SIGKILL)
      process.wait()
      records.append(KillRecord(attempt, time.monotonic() - start, trigger, moment, True))
      log(f'kill {attempt}: {trigger}, {records[-1].seconds:.1f} s after start: {moment}')
  runs.run_train(workdir, env, extra)
  return records


@dataclasses.dataclass
class KillReport:
  records: list[KillRecord]
  problems: list[str]
  reference_seconds: float
  counts: str
  leftovers: list[str]

  @property
  def ok(self) -> bool:
    return not self.problems and sum(r.landed for r in self.records) >= 1


def kill_experiment(folder: str, kills: int = 5, seed: int = 0, cycles: int = 2,
                    cache_dir: str | None = None, log: Callable[[str], None] = print) -> KillReport:
  """Uninterrupted reference run, then the killed-and-resumed run, compared."""
  extra = [f'--config.copd.num_cycles={cycles}']
  env = runs.run_env(folder, cache_dir)
  start = time.monotonic()
  reference = runs.reference_run(folder, env, 'reference', extra)
  reference_seconds = time.monotonic() - start
  log(f'reference run: {reference_seconds:.0f} s')
  # The killed attempts run with the compilation cache warm, several times faster than the
  # reference: time one warm run so that random kill times fall inside an attempt.
  start = time.monotonic()
  runs.reference_run(folder, env, 'reference_warm', extra)
  warm_seconds = time.monotonic() - start
  log(f'warm run: {warm_seconds:.0f} s')
  workdir = os.path.join(folder, 'killed')
  shutil.rmtree(workdir, ignore_errors=True)
  records = run_with_kills(workdir, kills, seed, env, extra,
                           max_time_s=max(5.0, 0.8 * warm_seconds), log=log)
  problems = runs.compare_runs(workdir, reference)
  leftovers = sorted(n for n in os.listdir(workdir) if '.tmp-' in n)
  leftovers += sorted(n for n in os.listdir(os.path.join(workdir, 'checkpoints')) if 'tmp' in n)
  return KillReport(records, problems, reference_seconds, runs.summary_counts(reference),
                    leftovers)


def markdown(folder: str, kills: int, seed: int, cycles: int) -> report.Section:
  """The killed run's kills, as a table, and how its outputs compare."""
  result = kill_experiment(folder, kills, seed, cycles, log=report.log_stderr)
  landed = sum(r.landed for r in result.records)
  lines = [f'### {landed} random SIGKILLs in one run (tiny toy run, {cycles} cycles, seed {seed})',
           '', '| kill | trigger | seconds after start | what the run was doing |',
           '|---|---|---|---|']
  for r in result.records:
    lines.append(f'| {r.attempt} | {r.trigger} | {r.seconds:.1f} | {r.moment} |')
  verdict = 'identical to the uninterrupted run: ' + result.counts if not result.problems else \
      'DIFFERENT: ' + '; '.join(result.problems)
  lines += ['', f'Final outputs after resuming: {verdict}.',
            f'Uninterrupted run: {result.reference_seconds:.0f} s '
            '(the compilation cache is warm after it).',
            f'Left behind: {", ".join(result.leftovers) or "nothing"}.']
  rows = [('SIGKILL at random points of one run', landed, landed if result.ok else 0,
           'the next `train` resumes from the newest committed checkpoint',
           'nothing: final params, merge, metrics, eval.json identical to an uninterrupted run'
           if not result.problems else 'SEE TABLE')]
  return '\n'.join(lines), result.ok, rows
