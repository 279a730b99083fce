"""End to end: the CoPD driver on a tiny config (K=2, one cycle), and exact resume after SIGKILL."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from copd_jax import checkpoint as ckpt
from copd_jax.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    '--config.copd.num_cycles=1', '--config.copd.s_rl=2', '--config.copd.s_opd=2',
    '--config.warmstart.steps=30', '--config.grpo.prompts_per_step=2', '--config.grpo.group_size=4',
    '--config.opd.prompts_per_step=2', '--config.opd.samples_per_prompt=2',
    '--config.sampling.max_new_tokens=6', '--config.eval.num_examples=4', '--config.eval.samples_k=2',
    '--config.checkpoint.every_steps=1', '--config.domains.reverse.num_train=200',
    '--config.domains.sort.num_train=200', '--config.domains.reverse.num_eval=8',
    '--config.domains.sort.num_eval=8', '--config.model.toy.hidden_size=32',
    '--config.model.toy.intermediate_size=64',
]


def train_command(workdir, *extra):
  return [sys.executable, '-m', 'copd_jax', 'train', '--config', 'configs/toy_copd.py',
          '--workdir', str(workdir), '--no-progress', *TINY, *extra]


def run_train(workdir, *extra, check=True):
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  return subprocess.run(train_command(workdir, *extra), cwd=ROOT, env=env, capture_output=True,
                        text=True, check=check, timeout=900)


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('reference')
  result = run_train(workdir)
  return workdir, result.stdout + result.stderr


def final_params(workdir):
  source = ckpt.open_source(str(workdir))
  return {k: source.read_all(k) for k in range(source.num_branches)}, source.meta['step']


def comparable_metrics(workdir):
  return [{k: v for k, v in record.items() if 'seconds' not in k} for record in read_metrics(workdir)]


@pytest.mark.slow   # end to end: tiny train runs in subprocesses
def test_end_to_end_tiny_copd_run(reference_run):
  workdir, output = reference_run
  # Checkpoint written at the end of the run (step index 3 = 4 steps).
  _, step = final_params(workdir)
  assert step == 3
  records = read_metrics(workdir)
  assert [r['step'] for r in records] == [0, 1, 2, 3]
  opd = [r for r in records if r['phase_is_opd'] == 1.0]
  assert len(opd) == 2
  for edge in ('b0_sort<-b1_reverse', 'b1_reverse<-b0_sort'):
    for r in opd:
      assert 0.0 <= r[f'behaviour/overlap_top8/{edge}'] <= 1.0
      assert r[f'behaviour/symmetric_kl/{edge}'] >= 0.0
  assert all(np.isfinite(r['train/loss/b0_sort']) for r in records)
  table = (workdir / 'eval.md').read_text()
  for row in ('base', 'branch0:sort', 'branch1:reverse', 'merged:mean'):
    assert f'| {row} |' in table
  results = json.loads((workdir / 'eval.json').read_text())['results']
  assert set(results['merged:mean']) == {'reverse', 'sort'}
  assert (workdir / 'merged_hf' / 'config.json').exists()
  assert (workdir / 'tensorboard').is_dir()


@pytest.mark.slow   # end to end: tiny train runs in subprocesses
def test_sigkill_mid_run_then_resume_is_bitwise_identical(reference_run, tmp_path):
  reference, _ = reference_run
  workdir = tmp_path / 'killed'
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  process = subprocess.Popen(train_command(workdir), cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  # Kill as soon as the first checkpoint (step 0) is committed: mid-run, often mid-save of step 1.
  deadline = time.time() + 600
  while time.time() < deadline and process.poll() is None:
    steps = os.listdir(workdir / 'checkpoints') if (workdir / 'checkpoints').is_dir() else []
    if any(s.isdigit() for s in steps):
      break
    time.sleep(0.05)
  assert process.poll() is None, 'the run ended before it could be killed'
  process.send_signal(signal.SIGKILL)
  process.wait()
  run_train(workdir)  # resumes from the newest complete checkpoint
  ours, step = final_params(workdir)
  theirs, ref_step = final_params(reference)
  assert step == ref_step
  for k in ours:
    flat_ours = ckpt.flatten_paths(ours[k])
    flat_theirs = dict(ckpt.flatten_paths(theirs[k]))
    for path, value in flat_ours:
      np.testing.assert_array_equal(value, flat_theirs[path], err_msg=f'branch {k} {path}')
  assert comparable_metrics(workdir) == comparable_metrics(reference)
  assert json.loads((workdir / 'eval.json').read_text()) == \
      json.loads((reference / 'eval.json').read_text())


@pytest.mark.slow   # end to end (in process, before compute: test_workdir_safety)
def test_resume_with_different_branches_is_refused(reference_run, tmp_path):
  reference, _ = reference_run
  result = run_train(reference, '--config.branches=arithmetic,sort', check=False)
  assert result.returncode == 2
  assert 'config.branches: differs from the checkpoint' in result.stderr


def test_bad_override_fails_before_compute(tmp_path):
  result = run_train(tmp_path / 'w', '--config.copd.s_rll=3', check=False)
  assert result.returncode == 2
  assert 'unknown field config.copd.s_rll' in result.stderr
  assert not (tmp_path / 'w').exists()


@pytest.mark.slow
def test_hooks_see_every_step_and_a_nan_hook_stops_the_run_with_checkpoints_intact(tmp_path):
  """In process: a hook sees each step once, in order, with its phase and the state after it;
  NaN advantages in branch 0 at steps 1 and 2 (hooks.NanInjection) with max_bad_steps=2 make the
  guard skip both updates and stop the run before step 2 is saved: checkpoints 0 and 1, branch
  0 unchanged by its poisoned step 1, every parameter finite."""
  from copd_jax.config import load_config
  from copd_jax.driver import train
  from copd_jax.errors import TrainingHalted
  from copd_jax.hooks import Hook, NanInjection

  seen = []

  class Recorder(Hook):
    def after_step(self, info):
      seen.append((info.step, info.phase, np.asarray(info.metrics['skipped_nonfinite']).tolist(),
                   int(np.asarray(info.state.step)[1])))

  # 8 test devices (conftest): fsdp=4 leaves branch=2 for the K=2 branches.
  config = load_config(os.path.join(ROOT, 'configs/toy_copd.py'),
                       TINY + ['--config.mesh.fsdp=4', '--config.guard.max_bad_steps=2'])
  logs = []
  with pytest.raises(TrainingHalted, match='2 consecutive steps .* stopped before saving step 2'):
    train(config, str(tmp_path), log=logs.append, progress=False,
          hooks=[NanInjection.parse('0:1,0:2'), Recorder()])
  assert seen == [(0, 'rl', [0.0, 0.0], 1), (1, 'rl', [1.0, 0.0], 2), (2, 'opd', [1.0, 0.0], 3)]
  assert [l for l in logs if 'update skipped' in l] == [
      "step 1: non-finite loss or gradient in branch(es) ['b0_sort']; update skipped "
      '(1/2 consecutive)',
      "step 2: non-finite loss or gradient in branch(es) ['b0_sort']; update skipped "
      '(2/2 consecutive)']
  assert sorted(int(s) for s in os.listdir(tmp_path / 'checkpoints') if s.isdigit()) == [0, 1]
  assert [r['step'] for r in read_metrics(str(tmp_path))] == [0, 1]
  before, after = (ckpt.open_source(str(tmp_path / 'checkpoints' / s)).read_all(0)
                   for s in ('0', '1'))
  for (path, a), (_, b) in zip(ckpt.flatten_paths(after), ckpt.flatten_paths(before)):
    np.testing.assert_array_equal(a, b, err_msg=str(path))
    assert np.isfinite(a).all()


# Periodic evaluation every 2 steps and 3 sample completions per branch every step.
WATCH = ['--config.eval.every_steps=2', '--config.metrics.samples_every=1',
         '--config.metrics.samples_per_branch=3']


@pytest.fixture(scope='module', params=['fixed', 'overlap'])
def extended_runs(request, tmp_path_factory):
  """Per schedule: the tiny run to the end of num_cycles=1 (merged and evaluated there), then
  resumed with num_cycles=2; and an uninterrupted num_cycles=2 run. Both WATCH."""
  schedule = f'--config.copd.schedule={request.param}'
  resumed = tmp_path_factory.mktemp(f'resumed_{request.param}')
  first = run_train(resumed, *WATCH, schedule)
  second = run_train(resumed, *WATCH, schedule, '--config.copd.num_cycles=2')
  straight = tmp_path_factory.mktemp(f'straight_{request.param}')
  run_train(straight, *WATCH, schedule, '--config.copd.num_cycles=2')
  return (request.param, resumed, straight, first.stdout + first.stderr,
          second.stdout + second.stderr)


def tensorboard_tags(workdir):
  from tests.test_observability import read_events
  return {(tag, kind) for tag, kind, _ in read_events(workdir / 'tensorboard')}


@pytest.mark.slow
def test_samples_lengths_and_periodic_eval_are_logged(extended_runs):
  schedule, _, straight, _, _ = extended_runs
  if schedule != 'fixed':
    pytest.skip('checked on the fixed schedule')
  samples = [json.loads(l) for l in (straight / 'samples.jsonl').read_text().splitlines()]
  assert len(samples) == 8 * 2 * 3   # steps x branches x samples_per_branch
  assert {(r['step'], r['branch']) for r in samples} == {
      (s, b) for s in range(8) for b in ('b0_sort', 'b1_reverse')}
  for r in samples:
    assert {'prompt', 'completion', 'reward', 'branch', 'step', 'phase', 'cycle'} <= set(r)
    assert isinstance(r['completion'], str) and 0.0 <= r['reward'] <= 1.0
  records = read_metrics(straight)
  assert [r['step'] for r in records if any(k.startswith('eval/') for k in r)] == [1, 3, 5, 7]
  evals = {k for k in records[3] if k.startswith('eval/')}
  assert evals == {f'eval/{d}/{m}/{b}' for d in ('reverse', 'sort') for m in ('pass@1', 'avg@k')
                   for b in ('b0_sort', 'b1_reverse')}
  for r in records:
    for b in ('b0_sort', 'b1_reverse'):
      assert 0 < r[f'native/length/{b}'] <= r[f'native/max_length/{b}'] <= 6
      assert 0.0 <= r[f'native/truncated/{b}'] <= 1.0
  tags = tensorboard_tags(straight)
  for tag in ('behaviour/overlap_top8/sort<-reverse', 'eval/sort/pass@1/sort',
              'native/truncated/reverse'):
    assert (tag, 'scalar') in tags
  assert ('samples/reverse', 'text') in tags


@pytest.mark.slow
def test_extending_num_cycles_on_resume_equals_an_uninterrupted_run(extended_runs):
  """Stopped (merged, evaluated) at the end of num_cycles=1, resumed with num_cycles=2: the
  extra cycle runs and params, metrics, samples and the final evaluation equal a run that
  planned two cycles from the start."""
  _, resumed, straight, first, second = extended_runs
  assert '| merged:mean |' in first
  assert 'resume: config.copd.num_cycles 1 -> 2: the schedule now ends after step 7' in second
  ours, step = final_params(resumed)
  theirs, ref_step = final_params(straight)
  assert step == ref_step == 7
  for k in ours:
    flat_theirs = dict(ckpt.flatten_paths(theirs[k]))
    for path, value in ckpt.flatten_paths(ours[k]):
      np.testing.assert_array_equal(value, flat_theirs[path], err_msg=f'branch {k} {path}')
  assert comparable_metrics(resumed) == comparable_metrics(straight)
  assert (resumed / 'samples.jsonl').read_text() == (straight / 'samples.jsonl').read_text()
  assert json.loads((resumed / 'eval.json').read_text()) == \
      json.loads((straight / 'eval.json').read_text())


@pytest.mark.slow
def test_shrinking_num_cycles_below_what_is_trained_is_refused(extended_runs):
  schedule, resumed, _, _, _ = extended_runs
  if schedule != 'fixed':
    pytest.skip('checked on the fixed schedule')
  result = run_train(resumed, *WATCH, check=False)   # TINY's num_cycles=1 < 8 steps done
  assert result.returncode == 2
  lines = [l for l in result.stderr.splitlines() if 'num_cycles' in l]
  assert len(lines) == 1 and lines[0].endswith(
      'config.copd.num_cycles: 1 cycles (4 steps) is fewer than the 8 steps the checkpoint in '
      'this workdir has trained (saved num_cycles 2); resume with num_cycles >= 2 or use a new '
      '--workdir')


@pytest.mark.slow   # end to end: a tiny train run in a subprocess
def test_a_run_with_the_kl_term_scores_against_the_base_it_started_from(tmp_path):
  """grpo.kl_coef > 0: the k3 reference is the base model (run_setup.starting_state keeps that
  one copy); the first update's policy is the base, so its KL to the reference is 0, and the
  updates move it away."""
  run_train(tmp_path, '--config.grpo.kl_coef=0.1')
  records = [r for r in read_metrics(tmp_path) if r['phase_is_opd'] == 0.0]
  for name in ('b0_sort', 'b1_reverse'):
    kl = [r[f'train/ref_kl/{name}'] for r in records]
    # Exactly 0 where the policy is the reference (k3 of equal log-probs); a reference that were
    # not the base would be far from it, one that followed the policy would stay at 0.
    assert kl[0] == 0.0 and kl[-1] > 0.0, kl
  assert (tmp_path / 'eval.md').exists()
