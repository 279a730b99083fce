"""Data loss and corruption probes (issue 21, points 1-5 and 13): outputs aimed at their own
inputs, --overwrite of what a command did not write, NaN merges and exports, two `train`
commands on one workdir, a damaged metrics.jsonl on resume, a fresh start in another run's
workdir, and a resume on a data file that changed (the same number of rows, or one fewer). Every probe runs the real command line in a fresh interpreter on a
tiny run, and checks that nothing was lost: inputs byte for byte, outputs against an
uninterrupted run."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import time
from typing import Callable

from copd_jax.workdir_lock import LOCK_FILE
from scripts.faults import report, runs
from scripts.faults.checkpoints import partial_run
from scripts.faults.cli import ROOT, CliResult, cli_subprocess


@dataclasses.dataclass
class Probe:
  label: str
  code: int | str
  line: str
  problems: list[str]
  kept: str            # what the check found intact

  @property
  def ok(self) -> bool:
    return not self.problems


def snapshot(path: str) -> dict[str, bytes]:
  """{relative path: bytes} of every file under a folder (or of one file)."""
  if os.path.isfile(path):
    with open(path, 'rb') as f:
      return {'': f.read()}
  out = {}
  for dirpath, _, files in os.walk(path):
    for name in files:
      full = os.path.join(dirpath, name)
      with open(full, 'rb') as f:
        out[os.path.relpath(full, path)] = f.read()
  return out


def _refusal(label: str, argv: list[str], env: dict[str, str], guarded: list[str],
             expect: str, written: str | None = None) -> Probe:
  """A command that must exit 2 with one line containing `expect`, leaving every path of
  `guarded` byte for byte as it was and `written` (if given) not created."""
  before = {p: snapshot(p) for p in guarded}
  code, line = cli_subprocess(argv, env)
  problems = []
  if code != 2 or expect not in line:
    problems.append(f'exit {code}, expected 2 with {expect!r}')
  problems += [f'{p} changed' for p in guarded if snapshot(p) != before[p]]
  if written and os.path.exists(written):
    problems.append(f'{written} was written')
  files = sum(len(s) for s in before.values())
  return Probe(label, code, line, problems, f'{files} files unchanged')


def _copy(src: str, dst: str) -> str:
  shutil.rmtree(dst, ignore_errors=True)
  shutil.copytree(src, dst)
  return dst


def output_probes(folder: str, env: dict[str, str], partial: str) -> list[Probe]:
  """Points 1 and 4: outputs overlapping inputs, --overwrite of foreign paths, NaN."""
  parent = os.path.join(folder, 'runs_parent')
  run = _copy(partial, os.path.join(parent, 'run'))
  _copy(partial, os.path.join(parent, 'sibling'))
  probes = [
      _refusal('`merge --out` = the input workdir, `--overwrite`',
               ['merge', '--workdir', run, '--out', run, '--overwrite'], env, [parent],
               'is the input --workdir'),
      _refusal('`merge --out` = the folder holding the run (and a sibling run), `--overwrite`',
               ['merge', '--workdir', run, '--out', parent, '--overwrite'], env, [parent],
               'contains the input --workdir'),
      _refusal('`export-hf --out` = the input workdir, `--overwrite`',
               ['export-hf', '--checkpoint', run, '--branch', '0', '--out', run, '--overwrite'],
               env, [parent], 'is the input --checkpoint'),
      _refusal('`export-hf --out` inside the input (its checkpoints/), `--overwrite`',
               ['export-hf', '--checkpoint', run, '--branch', '0', '--out',
                os.path.join(run, 'checkpoints'), '--overwrite'], env, [parent],
               'lies inside the input --checkpoint'),
  ]
  a_file = os.path.join(folder, 'notes.txt')
  with open(a_file, 'w') as f:
    f.write('not a model\n')
  probes.append(_refusal('`export-hf --overwrite` onto an existing file',
                         ['export-hf', '--checkpoint', run, '--branch', '0', '--out', a_file,
                          '--overwrite'], env, [a_file, parent], 'is a file'))
  foreign = os.path.join(folder, 'my_models')
  os.makedirs(foreign, exist_ok=True)
  with open(os.path.join(foreign, 'important.bin'), 'wb') as f:
    f.write(b'\1' * 64)
  probes.append(_refusal('`merge --overwrite` onto a folder `merge` did not write',
                         ['merge', '--workdir', run, '--out', foreign, '--overwrite'], env,
                         [foreign, parent], 'not an output of `merge`'))
  nan_out = os.path.join(folder, 'nan_merge')
  probes.append(_refusal('`merge --method task_arithmetic --lambda nan`',
                         ['merge', '--workdir', run, '--method', 'task_arithmetic', '--lambda',
                          'nan', '--out', nan_out], env, [parent], '--lambda: must be a finite',
                         written=nan_out))
  nan_ckpt = nan_params_checkpoint(run, os.path.join(folder, 'nan_params'))
  hf_out = os.path.join(folder, 'nan_hf')
  probes.append(_refusal('`export-hf` of a checkpoint whose `embed` is all NaN',
                         ['export-hf', '--checkpoint', nan_ckpt, '--out', hf_out], env,
                         [nan_ckpt], 'tensor embed has', written=hf_out))
  probes.append(_refusal('`merge` of a run branch with that NaN checkpoint',
                         ['merge', '--inputs', f'{run}:0', nan_ckpt, '--out', nan_out], env,
                         [nan_ckpt, parent], 'NaN or inf', written=nan_out))
  return probes


def nan_params_checkpoint(run: str, out: str) -> str:
  """A params-only checkpoint of branch 0 of `run` with every `embed` entry NaN."""
  import numpy as np
  from copd_jax import checkpoint as ckpt
  source = ckpt.open_source(run)
  params = source.read_all(0)
  params['embed'] = np.full_like(params['embed'], np.nan)
  shutil.rmtree(out, ignore_errors=True)
  ckpt.save_params_checkpoint(out, params, {ckpt.META_MODEL_CONFIG: source.meta['model_config'],
                                            ckpt.META_TOKENIZER_DIR: source.tokenizer_dir})
  return out


def two_trains(folder: str, env: dict[str, str], reference: str) -> Probe:
  """Point 2: two `train` commands started together on one new workdir."""
  workdir = os.path.join(folder, 'two_trains')
  shutil.rmtree(workdir, ignore_errors=True)
  procs = [subprocess.Popen(runs.train_argv(workdir), cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
  results = [(p.wait(timeout=1800), *p.communicate()) for p in procs]
  codes = sorted(code for code, _, _ in results)
  refused = [CliResult(code, err) for code, _, err in results if code == 2]
  problems = [] if codes == [0, 2] else [f'exit codes {codes}, expected one 0 and one 2']
  line = refused[0].message if refused else ''
  if refused and not (refused[0].one_error_line and 'in use by another run' in line):
    problems.append('the refused run did not print one line naming the holder')
  winner = [p.pid for p, (code, _, _) in zip(procs, results) if code == 0]
  with open(os.path.join(workdir, LOCK_FILE)) as f:
    if winner and json.loads(f.read()).get('pid') != winner[0]:
      problems.append("the lock file no longer holds the holder's record")
  if runs.finished(workdir):
    problems += runs.compare_runs(workdir, reference)
  else:
    problems.append('no run finished')
  return Probe('two `train` commands on one workdir at once', ' and '.join(map(str, codes)),
               line, problems, 'the run that holds the lock ends identical to an uninterrupted '
               "run (params, metrics, eval.json, merge); the lock file keeps the holder's record")


def damaged_metrics(folder: str, env: dict[str, str], partial: str, reference: str) -> Probe:
  """Point 3: one garbled line in the middle of metrics.jsonl, then resume to the end."""
  workdir = _copy(partial, os.path.join(folder, 'damaged_metrics'))
  path = os.path.join(workdir, 'metrics.jsonl')
  with open(path) as f:
    lines = f.read().splitlines()
  damaged_step = json.loads(lines[1])['step']
  lines[1] = lines[1][:len(lines[1]) // 2] + '\x00garbled'
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  result = runs.train_process(workdir, env)
  text = result.stdout + result.stderr
  line = next((l.strip() for l in text.splitlines() if 'unreadable line' in l), '')
  problems = [] if result.returncode == 0 else [f'exit {result.returncode}']
  if 'line 2' not in line:
    problems.append('no warning naming line 2')
  if result.returncode == 0:
    from copd_jax.metrics import read_metrics
    strip = lambda records: [{k: v for k, v in r.items() if 'seconds' not in k} for r in records]
    want = [r for r in strip(read_metrics(reference)) if r['step'] != damaged_step]
    if strip(read_metrics(workdir)) != want:
      problems.append('metrics.jsonl lost readable records')
    with open(path + '.damaged') as f:
      if f.read() != lines[1] + '\n':
        problems.append('the damaged line was not kept aside')
  return Probe('resume with one garbled line in the middle of metrics.jsonl',
               result.returncode, line, problems,
               'every readable record (the ones after the damaged line too) equal to an '
               'uninterrupted run; the damaged line kept in metrics.jsonl.damaged')


def foreign_workdir(folder: str, env: dict[str, str]) -> Probe:
  """Point 3: a fresh start in a workdir holding another run's logs."""
  workdir = os.path.join(folder, 'foreign_workdir')
  shutil.rmtree(workdir, ignore_errors=True)
  os.makedirs(workdir)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.write('{"step": 0, "native/reward/b0_count": 0.5}\n')
  argv = runs.train_argv(workdir)[3:]   # without the interpreter and '-m copd_jax'
  return _refusal('fresh `train` in a workdir holding another run\'s metrics.jsonl', argv, env,
                  [workdir], 'not empty (metrics.jsonl)')


def changed_data(folder: str, env: dict[str, str]) -> list[Probe]:
  """Point 5: a file-domain run stopped after 2 steps, its train file changed keeping its row
  count, then resumed: refused naming the file; one row fewer with --accept-changed-data:
  refused naming the file (point 13); the same rows with --accept-changed-data: a warning."""
  from copd_jax.data.synthetic import synthetic_domain
  train, evaluation = synthetic_domain('sort', 1000, 200, 8)
  data = os.path.join(folder, 'data')
  os.makedirs(data, exist_ok=True)
  paths = {}
  for split, examples in (('train', train), ('eval', evaluation)):
    paths[split] = os.path.join(data, f'sort_{split}.jsonl')
    with open(paths[split], 'w') as f:
      f.writelines(json.dumps({'prompt': e.prompt, 'answer': e.answer}) + '\n' for e in examples)
  extra = ['--config.domains.sort.source=file',
           f'--config.domains.sort.train_path={paths["train"]}',
           f'--config.domains.sort.eval_path={paths["eval"]}']
  workdir = os.path.join(folder, 'changed_data')
  shutil.rmtree(workdir, ignore_errors=True)
  runs.run_train(workdir, env, [*extra, '--stop-after=2'])
  with open(paths['train']) as f:
    rows = f.read().splitlines()
  rows[0] = json.dumps({'prompt': train[0].prompt, 'answer': train[0].answer + '0'})
  with open(paths['train'], 'w') as f:
    f.write('\n'.join(rows) + '\n')
  contents = lambda: snapshot(workdir)   # the lock file too: a refused run restores its record
  before = contents()
  refused = runs.train_process(workdir, env, extra)
  cli = CliResult(refused.returncode, refused.stderr)
  problems = [] if cli.one_error_line and 'changed since the checkpoint of step 1' in \
      cli.message and paths['train'] in cli.message else ['no one-line refusal naming the file']
  if contents() != before:
    problems.append('the workdir changed')
  first = Probe('resume after the train file changed (same row count)', refused.returncode,
                cli.message, problems, 'the workdir byte for byte (its lock file too)')
  fewer = fewer_rows(workdir, env, extra, paths['train'], rows)
  accepted = runs.train_process(workdir, env, [*extra, '--accept-changed-data'])
  text = accepted.stdout + accepted.stderr
  warning = next((l.strip() for l in text.splitlines() if l.startswith('warning: config.')), '')
  problems = [] if accepted.returncode == 0 and runs.finished(workdir) else [
      f'exit {accepted.returncode}']
  if '--accept-changed-data' not in warning:
    problems.append('no warning')
  second = Probe('the same with `--accept-changed-data`', accepted.returncode, warning, problems,
                 'the run resumes from step 1 and finishes')
  return [first, fewer, second]


def fewer_rows(workdir: str, env: dict[str, str], extra: list[str], train_path: str,
               rows: list[str]) -> Probe:
  """Point 13: the train file loses its last row and the resume passes --accept-changed-data:
  the data loader cannot continue its order on another number of examples, so the resume must
  exit 2 with one `error:` line naming branch 0 and the file (besides the warning the flag asks
  for), before the warm start, leaving the workdir byte for byte. The file is put back
  (`rows`) afterwards."""
  with open(train_path, 'w') as f:
    f.write('\n'.join(rows[:-1]) + '\n')
  before = snapshot(workdir)
  refused = runs.train_process(workdir, env, [*extra, '--accept-changed-data'])
  with open(train_path, 'w') as f:
    f.write('\n'.join(rows) + '\n')
  cli = CliResult(refused.returncode, refused.stderr)
  others = [l for l in cli.lines if not l.startswith('error:')]
  problems = []
  if not (refused.returncode == 2 and len(cli.errors) == 1 and 'branch 0 had 200 training '
          f'examples at the checkpoint and has 199 now from {train_path};' in cli.message):
    problems.append(f'exit {refused.returncode}, expected 2 with one line naming the file')
  if len(others) != 1 or '(--accept-changed-data)' not in others[0]:
    problems.append(f'other stderr lines: {others}')
  if 'warm-starting' in refused.stdout:
    problems.append('the base model was warm-started again before the refusal')
  if snapshot(workdir) != before:
    problems.append('the workdir changed')
  return Probe('the same, the train file one row shorter, with `--accept-changed-data`',
               refused.returncode, cli.message, problems, 'the workdir byte for byte (its lock '
               'file too); no warm start (the warning the flag asks for comes first)')


def experiment(folder: str, log: Callable[[str], None] = print) -> list[Probe]:
  env = runs.run_env(folder)
  reference = runs.reference_run(folder, env)
  partial = partial_run(folder, env)
  probes = output_probes(folder, env, partial)
  log('workdirs: output probes done')
  probes.append(two_trains(folder, env, reference))
  probes.append(damaged_metrics(folder, env, partial, reference))
  probes.append(foreign_workdir(folder, env))
  probes += changed_data(folder, env)
  for p in probes:
    log(f'{p.label}: {"ok" if p.ok else p.problems}')
  return probes


def markdown(folder: str) -> report.Section:
  started = time.perf_counter()
  probes = experiment(folder, log=report.log_stderr)
  short = lambda text: report.cell(report.without_folders(str(text), folder, ROOT), 240)
  lines = ['### Data loss and corruption probes (tiny run stopped after 3 steps)', '',
           '| # | probe | exit | what the program said | nothing lost: checked |',
           '|---|---|---|---|---|']
  for i, p in enumerate(probes, 1):
    lines.append(f'| {i} | {p.label} | {p.code} | `{short(p.line)}` | '
                 f'{p.kept if p.ok else "**CHECK FAILED**: " + report.cell("; ".join(p.problems))}'
                 ' |')
  lines.append(f'\n{len(probes)} probes in {time.perf_counter() - started:.0f} s.')
  rows = [('data loss and corruption (outputs onto inputs, --overwrite, NaN merges, two trains, '
           'damaged metrics, foreign workdir, changed data and row count)', len(probes),
           sum(p.ok for p in probes),
           'exit 2 with one line naming the path, flag, holder or file; the locked run and '
           'resumes go on', 'nothing: inputs byte for byte, runs identical to an uninterrupted '
           'one')]
  return '\n'.join(lines), all(p.ok for p in probes), rows
