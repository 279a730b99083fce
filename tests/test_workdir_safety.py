"""A `train` never corrupts or deletes a run it does not own (issue 21, points 2, 3 and 5): an
exclusive workdir lock that dies with its process (a lease on gs://), shared by the processes of
one job; a fresh start refuses another run's non-empty workdir; resume keeps every readable
metrics record; a data file changed since the newest checkpoint is refused by name."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from copd_jax import checkpoint as ckpt
from copd_jax import data_digests, run_owner, workdir_claim, workdir_lock
from copd_jax import metrics as metrics_lib
from copd_jax.config import load_config
from copd_jax.run_setup import PromptSources, load_domains
from copd_jax.topology import topology_from_config
from scripts.faults import cli
from scripts.faults.workdirs import snapshot
from tests.test_checkpoint import make_state, meta_for
from tests.test_storage import fake_gcs  # noqa: F401  (a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOLD = textwrap.dedent('''
    import sys, time
    from copd_jax import workdir_lock
    lock = workdir_lock.acquire(sys.argv[1])
    print('locked', flush=True)
    time.sleep(600)
''')


@pytest.fixture
def holder(tmp_path):
  """Another process holding the lock of tmp_path/run: (workdir, its Popen)."""
  workdir = tmp_path / 'run'
  workdir.mkdir()
  proc = subprocess.Popen([sys.executable, '-c', HOLD, str(workdir)], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE,
                          text=True)
  assert proc.stdout.readline().strip() == 'locked'
  yield str(workdir), proc
  if proc.poll() is None:
    proc.kill()
    proc.wait()


def test_a_held_lock_refuses_naming_the_holder_and_dies_with_its_process(holder):
  workdir, proc = holder
  with pytest.raises(workdir_lock.WorkdirLocked) as refused:
    workdir_lock.acquire(workdir)
  message = str(refused.value)
  assert f'host {socket.gethostname()}, pid {proc.pid}, started ' in message, message
  proc.send_signal(signal.SIGKILL)   # no clean-up of any kind
  proc.wait()
  with workdir_lock.acquire(workdir):
    with pytest.raises(workdir_lock.WorkdirLocked, match='this process'):
      workdir_lock.acquire(workdir)   # one process, one lock per workdir
  workdir_lock.acquire(workdir).release()   # released on exit


def _train_argv(workdir, *extra):
  return ['train', '--config', cli.TOY_CONFIG, '--workdir', workdir, '--no-progress',
          *cli.BASE_OVERRIDES, *extra]


def test_a_second_train_on_a_locked_workdir_is_one_line_and_touches_nothing(holder):
  workdir, proc = holder
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.write('{"step": 0}\n')
  before = sorted(os.listdir(workdir))
  lock_file = os.path.join(workdir, workdir_lock.LOCK_FILE)
  with open(lock_file, 'rb') as f:
    record = f.read()
  with cli.tripwire('copd_jax.driver.train'):
    result = cli.run_cli(_train_argv(workdir))
  assert result.one_error_line, result.stderr
  assert 'in use by another run' in result.message and f'pid {proc.pid}' in result.message
  assert sorted(os.listdir(workdir)) == before
  with open(lock_file, 'rb') as f:
    assert f.read() == record   # the holder's record untouched
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    assert f.read() == '{"step": 0}\n'


def test_the_processes_of_one_job_share_the_lock(holder):
  workdir, _ = holder   # process 0 of the job holds it; the other processes take none
  config = load_config(cli.TOY_CONFIG, cli.BASE_OVERRIDES)
  with workdir_claim.claim(workdir, config, primary=False) as mode:
    assert mode == 'fresh'


def test_a_lease_on_an_object_store(fake_gcs, monkeypatch):  # noqa: F811
  import time
  monkeypatch.setattr(workdir_lock, 'SETTLE_SECONDS', 0.01)
  lease = fake_gcs / 'b' / 'run' / workdir_lock.LEASE_OBJECT
  with workdir_lock.acquire('gs://b/run'):
    record = json.loads(lease.read_text())
    assert record['pid'] == os.getpid() and record['expires'] > time.time()
  assert not lease.exists()   # released: deleted
  other = {'host': 'tpu-vm-7', 'pid': 4242, 'started': '2026-01-01T00:00:00+00:00',
           'token': 'x'}
  lease.write_text(json.dumps({**other, 'expires': time.time() + 60}))
  with pytest.raises(workdir_lock.WorkdirLocked, match='host tpu-vm-7, pid 4242'):
    workdir_lock.acquire('gs://b/run')
  lease.write_text(json.dumps({**other, 'expires': time.time() - 1}))   # expired: taken over
  workdir_lock.acquire('gs://b/run').release()


# ---------------------------------------------------------------------------------------------
# Fresh start, restart, resume
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def quick_train(monkeypatch):
  """copd_jax.driver.train replaced by a run that only logs one metrics record; returns the
  workdirs it ran in."""
  from copd_jax import driver
  ran = []

  def train(config, workdir, **kwargs):
    ran.append(workdir)
    metrics_lib.MetricsLog(workdir, tensorboard=False).write(0, {'x': 1.0})

  monkeypatch.setattr(driver, 'train', train)
  return ran


def test_a_fresh_start_refuses_another_runs_workdir_unless_asked(tmp_path, quick_train):
  workdir = str(tmp_path / 'theirs')
  os.makedirs(workdir)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.write('{"step": 0, "theirs": 1.0}\n')
  refused = cli.run_cli(_train_argv(workdir))
  assert refused.one_error_line and 'not empty (metrics.jsonl)' in refused.message, \
      refused.stderr
  assert sorted(os.listdir(workdir)) == ['metrics.jsonl']   # no lock or marker left behind
  assert quick_train == []
  assert cli.run_cli(_train_argv(workdir, '--overwrite')).code == 0
  assert run_owner.read_marker(workdir) is not None   # now this run's


def test_a_refused_start_leaves_the_last_holders_record_in_the_lock_file(tmp_path, quick_train):
  workdir = str(tmp_path / 'theirs')
  os.makedirs(workdir)
  record = json.dumps({'host': 'h', 'pid': 1, 'started': '2026-01-01T00:00:00+00:00',
                       'token': ''}).encode()
  with open(os.path.join(workdir, workdir_lock.LOCK_FILE), 'wb') as f:
    f.write(record)   # a run that ended: nobody holds the lock
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.write('{"step": 0, "theirs": 1.0}\n')
  refused = cli.run_cli(_train_argv(workdir))
  assert refused.one_error_line and 'not empty (metrics.jsonl)' in refused.message
  with open(os.path.join(workdir, workdir_lock.LOCK_FILE), 'rb') as f:
    assert f.read() == record
  assert quick_train == []


def test_a_restart_before_the_first_checkpoint_is_this_runs_and_another_config_is_not(
    tmp_path, quick_train):
  workdir = str(tmp_path / 'w')
  assert cli.run_cli(_train_argv(workdir)).code == 0
  assert cli.run_cli(_train_argv(workdir)).code == 0   # the same run, started again
  assert len(quick_train) == 2
  other = cli.run_cli(_train_argv(workdir, '--config.seed=5'))
  assert other.one_error_line and 'holds the start of another run' in other.message and \
      'config.seed differs' in other.message, other.stderr
  assert len(quick_train) == 2


def test_a_start_that_fails_before_writing_removes_what_it_added(tmp_path):
  workdir = tmp_path / 'empty'
  workdir.mkdir()
  with cli.tripwire('copd_jax.driver.train'):
    assert cli.run_cli(_train_argv(str(workdir))).code == 'compute started'
  assert os.listdir(workdir) == []


def test_a_failed_start_leaves_no_workdir_behind(tmp_path):
  workdir = str(tmp_path / 'w')
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"prompt": "1"\n')
  good = tmp_path / 'good.jsonl'
  good.write_text('{"prompt": "1+1", "answer": "2"}\n')
  result = cli.run_cli(_train_argv(
      workdir, '--config.domains.sort.source=file', f'--config.domains.sort.train_path={bad}',
      f'--config.domains.sort.eval_path={good}'))
  assert result.one_error_line and 'malformed JSON' in result.message
  assert not os.path.exists(workdir)


# ---------------------------------------------------------------------------------------------
# metrics.jsonl on resume
# ---------------------------------------------------------------------------------------------

def test_resume_keeps_every_readable_record_and_reports_damaged_lines(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  lines = [json.dumps({'step': s, 'loss': float(s)}) for s in range(6)]
  lines[2] = '{"step": 2, "loss": 2.0' + '\x00' * 5   # garbled in the middle
  lines.insert(4, 'not json at all')
  path.write_text('\n'.join(lines) + '\n{"step": 6, "lo')   # and a torn last line
  with pytest.warns(UserWarning, match=r'skipped 3 unreadable line\(s\) on resume '
                                       r'\(line 3, 5, 8\)'):
    log = metrics_lib.MetricsLog(str(tmp_path), resume_step=5, tensorboard=False)
  log.close()
  assert [r['step'] for r in metrics_lib.read_metrics(str(tmp_path))] == [0, 1, 3, 4]
  assert (tmp_path / 'metrics.jsonl.damaged').read_text().splitlines() == [
      lines[2], 'not json at all', '{"step": 6, "lo']


def test_records_before_never_drops_good_records_after_a_bad_one():
  kept, damaged = metrics_lib.records_before('{"step": 0}\n{"step": true}\n[1]\n{"step": 1}\n', 9)
  assert kept == ['{"step": 0}\n', '{"step": 1}\n']
  assert [n for n, _ in damaged] == [2, 3]


# ---------------------------------------------------------------------------------------------
# Data files changed between checkpoint and resume
# ---------------------------------------------------------------------------------------------

def _checkpointed_workdir(workdir: str, config, **meta) -> str:
  """`workdir` with one checkpoint (step 3) of `config`: its config and its data loaders' state
  in the meta, as `train` saves them, plus `meta`."""
  sources = PromptSources(config, load_domains(config), topology_from_config(config).rounds())
  with ckpt.RunCheckpointer(workdir) as saver:
    saver.save(3, make_state(2), {**meta_for(3), 'config': config.to_dict(),
                                  'data_state': sources.get_state(), **meta})
  return workdir


def _file_run(tmp_path, *more_overrides):
  """A workdir with one checkpoint whose meta records the digests of its data files, and the
  CLI overrides of that run (`more_overrides` among them)."""
  train_file, eval_file = tmp_path / 'train.jsonl', tmp_path / 'eval.jsonl'
  train_file.write_text('{"prompt": "1+1", "answer": "2"}\n{"prompt": "2+2", "answer": "4"}\n')
  eval_file.write_text('{"prompt": "3+3", "answer": "6"}\n')
  overrides = ['--config.domains.sort.source=file',
               f'--config.domains.sort.train_path={train_file}',
               f'--config.domains.sort.eval_path={eval_file}', *more_overrides]
  config = load_config(cli.TOY_CONFIG, [*cli.BASE_OVERRIDES, *overrides])
  recorded = data_digests.digests_of(config)
  assert set(recorded) == {'config.domains.sort.train_path', 'config.domains.sort.eval_path'}
  workdir = _checkpointed_workdir(str(tmp_path / 'run'), config,
                                  **{data_digests.META_KEY: recorded})
  return workdir, overrides, train_file


def test_resume_with_different_branches_is_refused_before_compute(tmp_path):
  """A workdir with a checkpoint resumes only under the config it was saved with: a changed
  training field stops `train` with one line naming it, before the base model is built."""
  config = load_config(cli.TOY_CONFIG, cli.BASE_OVERRIDES)
  workdir = _checkpointed_workdir(str(tmp_path / 'run'), config)
  with cli.tripwire('copd_jax.run_setup.base_model_path'):
    same = cli.run_cli(_train_argv(workdir))
    refused = cli.run_cli(_train_argv(workdir, '--config.branches=arithmetic,sort'))
  assert same.code == 'compute started', same.stderr
  assert refused.one_error_line, refused.stderr
  assert refused.message.startswith('error: config.branches: differs from the checkpoint'), \
      refused.message


def test_resume_on_a_changed_data_file_is_refused_by_name(tmp_path):
  workdir, overrides, train_file = _file_run(tmp_path)
  with cli.tripwire('copd_jax.driver.train'):
    assert cli.run_cli(_train_argv(workdir, *overrides)).code == 'compute started'
    # Same row count, one answer changed.
    train_file.write_text('{"prompt": "1+1", "answer": "3"}\n{"prompt": "2+2", "answer": "4"}\n')
    refused = cli.run_cli(_train_argv(workdir, *overrides))
    assert refused.one_error_line, refused.stderr
    assert refused.message.startswith(f'error: config.domains.sort.train_path: {train_file} '
                                      'changed since the checkpoint of step 3'), refused.message
    accepted = cli.run_cli(_train_argv(workdir, *overrides, '--accept-changed-data'))
  assert accepted.code == 'compute started'
  assert any(l.startswith('warning: config.domains.sort.train_path:') and
             '--accept-changed-data' in l for l in accepted.lines), accepted.stderr


@pytest.mark.slow  # two toy runs
def test_a_resume_on_accepted_changed_data_keeps_the_base_it_started_from(tmp_path, capsys):
  """With --accept-changed-data and the same row count the run resumes, on the base model its
  checkpoints were trained from: base/ (warm-started on the old rows) is not trained again on
  the new rows nor rewritten."""
  workdir, overrides, train_file = _file_run(
      tmp_path, '--config.warmstart.steps=1', '--config.warmstart.batch_size=4',
      '--config.warmstart.examples_per_domain=40', '--config.model.toy.num_layers=1')
  base = os.path.join(workdir, 'base')
  with cli.tripwire('copd_jax.run_setup.abstract_base_model'):   # right after the base
    capsys.readouterr()
    first = cli.run_cli(_train_argv(workdir, *overrides))
    assert first.code == 'compute started', first.stderr
    assert 'base model: warm-starting' in capsys.readouterr().out
    before = snapshot(base)
    train_file.write_text('{"prompt": "1+1", "answer": "3"}\n{"prompt": "2+2", "answer": "4"}\n')
    resumed = cli.run_cli(_train_argv(workdir, *overrides, '--accept-changed-data'))
  assert resumed.code == 'compute started', resumed.stderr
  out = capsys.readouterr().out
  assert 'base model: warm-starting' not in out, out
  assert f'base model: reusing {base}, the base this run started from' in out, out
  assert snapshot(base) == before


def test_resume_on_a_data_file_with_fewer_rows_is_one_line_before_compute(tmp_path):
  """Issue 21, point 13: --accept-changed-data accepts changed rows, but the data order cannot
  resume on another number of examples; the loader says so in one line naming the branch and
  the file, before the base model is built (the tripwire) and without touching the workdir."""
  workdir, overrides, train_file = _file_run(tmp_path)
  train_file.write_text('{"prompt": "1+1", "answer": "2"}\n')
  before = snapshot(workdir)
  with cli.tripwire('copd_jax.run_setup.base_model_path'):
    refused = cli.run_cli(_train_argv(workdir, *overrides, '--accept-changed-data'))
  assert refused.code == 2, refused.stderr
  assert refused.errors == [
      f'error: data loader state does not match this run: branch 0 had 2 training examples at '
      f'the checkpoint and has 1 now from {train_file}; a resume continues the data order of '
      'the checkpoint, which needs as many examples as then (changed rows can be accepted, '
      'added or removed ones cannot): restore the data or use a new --workdir'], refused.stderr
  # The only other line: the warning that --accept-changed-data asked for.
  assert [l for l in refused.lines if not l.startswith('error:')] == [
      l for l in refused.lines if l.startswith('warning: config.domains.sort.train_path:')
      and l.endswith('(--accept-changed-data)')], refused.stderr
  assert len(refused.lines) == 2, refused.stderr
  assert snapshot(workdir) == before


def test_checkpoints_without_recorded_digests_resume_unchecked(tmp_path):
  assert data_digests.check_resume(None, None, 0, False, print) is None
  assert data_digests.changed_files({'f': {'path': '/a', 'sha256': '1'}},
                                    {'f': {'path': '/b', 'sha256': '2'}}) == []
