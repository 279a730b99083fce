"""Rewards: exact and math-verify scoring, adversarial outputs, time bounds, worker recovery."""
import sys
import threading
import time

import numpy as np
import pytest

from copd_jax import rewards
from copd_jax.rewards import pool as reward_pool
from copd_jax.rewards import worker as reward_worker
from copd_jax.data import Example
from copd_jax.errors import UserInputError

TIMEOUT_S = 0.5
GRACE_S = 1.0
# A correctness bound, not a benchmark: generous for a loaded 2-core machine, far below a hang.
SLACK_S = 4.0


@pytest.fixture(scope='module')
def pool():
  p = rewards.MathVerifierPool(num_workers=2)
  p.score(['\\boxed{1}'], ['1'])  # start-up (sympy import) outside the timed calls
  yield p
  p.close()


def _ex(answer, reward='math'):
  return Example(prompt='q', answer=answer, domain='d', id='d:0', reward=reward)


def test_exact_match():
  fn = rewards.reward_fn('exact')
  assert fn('46', _ex('46', 'exact')) == 1.0
  assert fn(' 46\n', _ex('46', 'exact')) == 1.0
  assert fn('47', _ex('46', 'exact')) == 0.0
  assert fn('', _ex('46', 'exact')) == 0.0
  assert fn('4 6', _ex('46', 'exact')) == 0.0
  assert fn('46' * 500_000, _ex('46', 'exact')) == 0.0


def test_bound_completion():
  assert rewards.bound_completion('') is None
  assert rewards.bound_completion('  \n') is None
  assert rewards.bound_completion('x = \\boxed{\\frac{1}{2}}') == 'x = \\boxed{\\frac{1}{2}}'
  assert rewards.bound_completion('\\boxed{' + '{' * 12 + '1' + '}' * 13) is None
  assert rewards.brace_depth('}}{a{b}c{d{e}}}') == 3
  long = 'word ' * 2000 + 'so \\boxed{7}'
  tail = rewards.bound_completion(long, max_chars=100)
  assert tail.endswith('\\boxed{7}') and len(tail) <= 100 and tail.startswith('word')
  # A cut never leaves a partial token: the tail of a huge number is not a number.
  assert rewards.bound_completion('1' + '0' * 100_000, max_chars=4096) is None
  assert rewards.bound_completion('a ' + '9' * 5000, max_chars=4096) is None


def test_gold_and_prediction_text():
  assert reward_worker._gold_text('Natalia sold 48/2 = 24 clips.\n#### 72') == '72'
  assert reward_worker._gold_text('#### 1,234') == '1234'
  assert reward_worker._gold_text('2\\sqrt{3}') == '\\boxed{2\\sqrt{3}}'
  assert reward_worker._gold_text('so $x=3$') == 'so $x=3$'
  assert reward_worker._pred_text('work 41\n#### 42\nthanks 9') == '42'
  assert reward_worker._pred_text('#### 5 \\boxed{6}') == '#### 5 \\boxed{6}'


@pytest.mark.parametrize('completion, answer, expected', [
    ('The answer is \\boxed{42}.', '42', 1.0),
    ('The answer is \\boxed{41}.', '42', 0.0),
    ('48/2 = 24 and 24+48 = 72\n#### 72', 'Natalia sold 24 clips.\n#### 72', 1.0),
    ('48/2 = 24 and 24+48 = 72\n#### 71', 'Natalia sold 24 clips.\n#### 72', 0.0),
    ('So we get \\boxed{\\frac{1}{2}}', '0.5', 1.0),
    ('So we get \\boxed{\\sqrt{12}}', '2\\sqrt{3}', 1.0),
    ('So we get \\boxed{\\sqrt{13}}', '2\\sqrt{3}', 0.0),
    ('Final answer: $x^2 + 2x + 1$', '(x+1)^2', 1.0),
    ('The final answer is 1,234', '\\boxed{1234}', 1.0),
])
def test_math_correct_and_incorrect(pool, completion, answer, expected):
  got = rewards.score_math([completion], [answer], TIMEOUT_S * 4, pool=pool)
  assert got.dtype == np.float32 and got.tolist() == [expected]


def _adversarial(marker):
  return [
      '',
      '10**100000',
      '10**100000000',
      '\\boxed{10^{10^{10}}}',
      '1' + '0' * 100_000,
      '{' * 100_000,
      '\\boxed{' + '{' * 11 + '1' + '}' * 12,
      'x' * 1_000_000,
      ('\\frac{1}{2} ' * 90_000)[:1_000_000],
      f"__import__('os').system('touch {marker}')",
      f"\\boxed{{__import__('os').system('touch {marker}')}}",
      f"$__import__('os').system('touch {marker}')$",
      f"The answer is {marker!r}.__class__.__mro__[1].__subclasses__()",
  ]


def test_math_adversarial_outputs_are_bounded_and_never_executed(pool, tmp_path):
  marker = tmp_path / 'executed'
  timeouts_before = pool.timeouts
  for completion in _adversarial(marker):
    start = time.monotonic()
    got = rewards.score_math([completion], ['42'], TIMEOUT_S, pool=pool)
    elapsed = time.monotonic() - start
    assert got.tolist() == [0.0], completion[:60]
    assert elapsed < TIMEOUT_S + GRACE_S + SLACK_S, (completion[:60], elapsed)
  assert not marker.exists()
  assert pool.timeouts - timeouts_before >= 2  # the deadline, not luck, stopped the slow ones


def test_score_completions_mixes_kinds_and_batches(pool, monkeypatch):
  monkeypatch.setattr(reward_pool, '_POOL', pool)  # reward_fn uses the process-wide pool
  examples = [_ex('46', 'exact'), _ex('7'), _ex('7'), _ex('ab', 'exact')] * 3
  completions = ['46', '\\boxed{7}', '\\boxed{8}', 'ba'] * 3
  got = rewards.score_completions(None, completions, examples, timeout_s=2.0, pool=pool)
  assert got.shape == (12,) and got.tolist() == [1.0, 1.0, 0.0, 0.0] * 3
  # A forced kind overrides every example's own kind.
  assert rewards.score_completions('exact', ['\\boxed{7}'], [_ex('7')]).tolist() == [0.0]
  assert rewards.reward_fn('math')('\\boxed{7}', _ex('7')) == 1.0
  with pytest.raises(UserInputError, match='unknown reward kind'):
    rewards.reward_fn('regex')
  with pytest.raises(ValueError, match='2 completions but 1 examples'):
    rewards.score_completions('exact', ['a', 'b'], [_ex('a')])


def test_math_works_off_the_main_thread(pool):
  # math-verify's own signal timeouts refuse to run here; the worker pool does not care.
  out = {}
  thread = threading.Thread(
      target=lambda: out.setdefault('r', rewards.score_math(['\\boxed{3}'], ['3'], pool=pool)))
  thread.start()
  thread.join(30)
  assert out['r'].tolist() == [1.0]


def _fake_worker(body):
  """A worker command that reports ready, then runs `body` on each request line."""
  code = ('import signal, sys, time\n'
          'signal.signal(signal.SIGALRM, signal.SIG_IGN)\n'
          'sys.stdout.write(\'{"ready": true}\\n\'); sys.stdout.flush()\n'
          'for line in sys.stdin:\n'
          f'  {body}\n')
  return [sys.executable, '-c', code]


def test_hung_worker_is_killed_within_the_bound_and_replaced():
  hung = rewards.MathVerifierPool(num_workers=1, worker_argv=_fake_worker('time.sleep(600)'))
  try:
    start = time.monotonic()
    got = hung.score(['\\boxed{1}', '\\boxed{2}'], ['1', '2'], timeout_s=0.2, grace_s=0.3)
    elapsed = time.monotonic() - start
    assert got.tolist() == [0.0, 0.0]
    assert hung.restarts == 2 and hung.timeouts == 2
    assert elapsed < 2 * (0.2 + 0.3) + SLACK_S
  finally:
    hung.close()


def test_crashing_worker_scores_zero_and_is_replaced():
  crash = rewards.MathVerifierPool(num_workers=1, worker_argv=_fake_worker('sys.exit(3)'))
  try:
    got = crash.score(['\\boxed{1}', '\\boxed{2}', '\\boxed{3}'], ['1', '2', '3'], timeout_s=5.0)
    assert got.tolist() == [0.0, 0.0, 0.0] and crash.restarts == 3
  finally:
    crash.close()


def test_worker_that_cannot_start_is_reported():
  broken = rewards.MathVerifierPool(num_workers=1,
                                    worker_argv=[sys.executable, '-c', 'raise SystemExit("nope")'])
  try:
    with pytest.raises(RuntimeError, match='failed to start:\n.*nope'):
      broken.score(['1'], ['1'])
  finally:
    broken.close()


# ---------------------------------------------------------------------------------------------
# the final answer, not the reasoning (issue 17.4)

def test_math_scores_the_final_text_not_the_think_block(pool, monkeypatch):
  monkeypatch.setattr(reward_pool, '_POOL', pool)
  unsure = '<think>\nLet me see. 2+3, so the answer is 5.\n</think>\n\nI am not sure.'
  sure = '<think>\nthe answer is 4?\n</think>\n\nThe answer is \\boxed{5}.'
  cut = '<think>\nthe answer is 5 ... and then'  # reasoning cut at the token limit
  assert rewards.score_completions('math', [unsure, sure, cut], [_ex('5')] * 3,
                                   timeout_s=2.0).tolist() == [0.0, 1.0, 0.0]


def test_exact_normalises_and_skips_the_think_block():
  fn = rewards.reward_fn('exact')
  assert fn('<think>\n\n</think>\n\n3', _ex('3', 'exact')) == 1.0
  assert fn('3.', _ex('3', 'exact')) == 1.0
  assert fn(' 3 \n', _ex('3.', 'exact')) == 1.0
  assert fn('<think>it is 3</think>4', _ex('3', 'exact')) == 0.0
  assert fn('<think>3', _ex('3', 'exact')) == 0.0


@pytest.mark.parametrize('extraction, completion, reward', [
    ('boxed', '<think>\\boxed{9}</think>So \\boxed{12}.', 1.0),
    ('boxed', 'So 12.', 0.0),                                   # no box: no answer
    ('boxed', '\\boxed{\\frac{1}{2}} then \\boxed{12}', 1.0),   # the last box
    ('last_number', '<think>12</think>There are 1,2 or 12 apples.', 1.0),
    ('last_number', 'twelve', 0.0),
    ('final', '<think>x</think>\n12.\n', 1.0),
])
def test_answer_extraction_modes(extraction, completion, reward):
  spec = rewards.RewardSpec('exact', extraction)
  assert rewards.score_completions(spec, [completion], [_ex('12', 'exact')]).tolist() == [reward]


def test_boxed_extraction_with_math(pool, monkeypatch):
  monkeypatch.setattr(reward_pool, '_POOL', pool)
  spec = rewards.RewardSpec('math', 'boxed')
  got = rewards.score_completions(spec, ['so \\boxed{\\frac{1}{2}}', 'so 0.5'],
                                  [_ex('0.5')] * 2, timeout_s=2.0)
  assert got.tolist() == [1.0, 0.0]


# ---------------------------------------------------------------------------------------------
# the user's own reward function (issue 17.5)

def _fn_spec(name, timeout_s=2.0, extraction='final'):
  return rewards.RewardSpec(f'tests.reward_functions:{name}', extraction, timeout_s)


@pytest.fixture
def function_pools():
  yield
  with reward_pool._POOL_LOCK:
    pools, reward_pool._POOLS = dict(reward_pool._POOLS), {}
  for p in pools.values():
    p.close()


def test_user_function_scores_the_extracted_answer(function_pools):
  completions = ['<think>maybe 7</think>It is 7', '<think>7</think>no idea', 'plain 7']
  got = rewards.score_completions(_fn_spec('mentions_reference'), completions,
                                  [_ex('7', 'tests.reward_functions:mentions_reference')] * 3)
  assert got.tolist() == [1.25, 0.25, 1.0]  # the response is the final text; example has all


@pytest.mark.parametrize('name, reason', [
    ('crashes', 'ValueError: no parser for this'),
    ('sleeps', 'took longer than 0.5 s'),
    ('kills_its_process', 'the worker process died (exit status 7)'),
    ('returns_text', "TypeError: returned str 'yes', not a finite number"),
])
def test_failing_user_function_scores_zero_with_a_logged_reason(function_pools, caplog, name,
                                                                reason):
  start = time.monotonic()
  with caplog.at_level('WARNING', logger='copd_jax.rewards'):
    got = rewards.score_completions(_fn_spec(name, timeout_s=0.5), ['a 1', 'b 1'],
                                    [_ex('1')] * 2)
  assert got.tolist() == [0.0, 0.0]
  assert time.monotonic() - start < 2 * (0.5 + rewards.DEFAULT_GRACE_S) + 30  # start-up incl.
  (record,) = [r for r in caplog.records if r.name == 'copd_jax.rewards']
  assert f'reward tests.reward_functions:{name}: 2 of 2 completions scored 0' in record.message
  assert reason in record.message


def test_shipped_custom_reward_example_scores_through_the_worker(function_pools):
  from copd_jax.config import load_config
  root = __import__('os').path.dirname(__import__('os').path.dirname(__file__))
  config = load_config(f'{root}/configs/custom_reward_example.py',
                       ('--config.mesh.branch=1', '--config.mesh.fsdp=-1'))
  spec = rewards.reward_spec(config.domains.count)
  assert spec == rewards.RewardSpec('example_rewards:count_close', 'last_number', 2.0)
  got = rewards.score_completions(spec, ['3', '<think>3</think>4', 'none'], [_ex('3')] * 3)
  assert got.tolist() == [1.0, 0.5, 0.0]
