"""What a run shows while it trains: length / truncation scalars, readable dashboard names,
sample records, labelled progress, the optional W&B logger, and which num_cycles a resume
accepts. Fast unit tests; the tiny runs in tests/test_driver.py check them end to end."""
import struct
import sys
import types

import numpy as np
import pytest

from copd_jax.config import load_config
from copd_jax.data import Example
from copd_jax.errors import ConfigError
from copd_jax.hooks import ProgressBar, StepInfo
from copd_jax.metrics import MetricsLog, length_stats
from copd_jax.rollouts import Rollouts
from copd_jax.samples import sample_records, spread_rows
from copd_jax.tag_names import branch_labels, tag_namer
from tests.test_config import MESH, TOY

NAMES = ['b0_count', 'b1_sort']


def test_length_stats_on_a_constructed_batch():
  """max_new_tokens 4, EOS id 2. Branch 0: 4 tokens without EOS (cut), 4 tokens ending in EOS
  (finished on its last allowed token), 2 tokens, none. Branch 1: two cut rows, two of 1."""
  P, N, EOS = 2, 4, 2
  lengths = [[4, 4, 2, 0], [4, 4, 1, 1]]
  last = [[7, EOS, EOS, 0], [5, 6, 9, EOS]]
  tokens = np.full((2, 4, P + N), 3)
  mask = np.zeros((2, 4, P + N), bool)
  for k in range(2):
    for b in range(4):
      n = lengths[k][b]
      mask[k, b, P:P + n] = True
      if n:
        tokens[k, b, P + n - 1] = last[k][b]
  stats = length_stats(tokens, mask, N, eos_ids=(EOS, 99))
  np.testing.assert_allclose(stats['length'], [2.5, 2.5])
  np.testing.assert_array_equal(stats['max_length'], [4, 4])
  np.testing.assert_allclose(stats['truncated'], [0.25, 0.5])


def test_dashboard_names_are_readable_and_jsonl_keys_stay():
  tag = tag_namer(NAMES)
  assert tag('behaviour/overlap_top8/b0_count<-b1_sort') == 'behaviour/overlap_top8/count<-sort'
  assert tag('native/reward/b1_sort') == 'native/reward/sort'
  assert tag('eval/count/pass@1/b0_count') == 'eval/count/pass@1/count'
  assert tag('train/grad_norm') == 'train/grad_norm' and tag('cycle') == 'cycle'
  # Two branches on one domain keep their index.
  assert branch_labels(['b0_math', 'b1_math', 'b2_code']) == {
      'b0_math': 'b0:math', 'b1_math': 'b1:math', 'b2_code': 'b2:code'}


def read_events(folder):
  """(tag, kind) of every summary value in a TensorBoard folder (TFRecord framing parsed here)."""
  from tensorboardX.proto.event_pb2 import Event
  out = []
  for path in sorted(folder.glob('events.out.tfevents.*')):
    data = path.read_bytes()
    i = 0
    while i < len(data):
      (n,) = struct.unpack('<Q', data[i:i + 8])
      event = Event.FromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4
      for v in event.summary.value:
        out.append((v.tag, v.metadata.plugin_data.plugin_name or 'scalar', event.step))
  return out


def test_tensorboard_tags_are_written_as_readable_names(tmp_path):
  log = MetricsLog(str(tmp_path), tag=tag_namer(NAMES))
  log.write(3, {'behaviour/overlap_top8/b0_count<-b1_sort': 0.9, 'native/reward/b0_count': 0.5})
  log.text('samples/b1_sort', '**reward 1.00**', 3)
  log.close()
  events = read_events(tmp_path / 'tensorboard')
  assert ('behaviour/overlap_top8/count<-sort', 'scalar', 3) in events
  assert ('native/reward/count', 'scalar', 3) in events
  assert ('samples/sort', 'text', 3) in events
  # metrics.jsonl keeps the keys experiments/ and the figures read.
  assert 'b0_count<-b1_sort' in (tmp_path / 'metrics.jsonl').read_text()


def _rollouts(K=2, B=8, G=4):
  examples = [[Example(prompt=f'p{k}-{i // G}', answer=str(i // G), domain=['count', 'sort'][k],
                       id=f'{k}-{i // G}') for i in range(B)] for k in range(K)]
  texts = [[f'c{k}-{i}' for i in range(B)] for k in range(K)]
  rewards = np.arange(K * B, dtype=np.float32).reshape(K, B) / (K * B)
  return Rollouts(output=None, examples=examples, texts=texts, rewards=rewards)


def test_sample_records_spread_over_prompts_with_every_field():
  assert spread_rows(8, 4) == [0, 4, 1, 5, 2, 6, 3, 7]
  info = StepInfo(5, 1, 'opd', None, {}, {}, _rollouts())
  records = sample_records(info, NAMES, 3, group_size=4)
  assert len(records) == 6
  assert set(records[0]) == {'step', 'cycle', 'phase', 'branch', 'domain', 'prompt', 'completion',
                             'reward', 'answer'}
  first = [(r['branch'], r['prompt'], r['completion']) for r in records[:3]]
  assert first == [('b0_count', 'p0-0', 'c0-0'), ('b0_count', 'p0-1', 'c0-4'),
                   ('b0_count', 'p0-0', 'c0-1')]
  assert records[3]['branch'] == 'b1_sort' and records[3]['reward'] == pytest.approx(8 / 16)
  assert {(r['step'], r['cycle'], r['phase']) for r in records} == {(5, 1, 'opd')}


def test_progress_bar_labels_rewards_with_branch_names():
  bar = ProgressBar(10, 0, NAMES, enabled=False)
  info = StepInfo(4, 0, 'rl', None, {}, {'native/reward/b0_count': 0.625,
                                         'native/reward/b1_sort': 0.25})
  assert bar.describe(info) == 'cycle 1 rl | reward count 0.62 sort 0.25'
  bar.close()


def test_observability_defaults_and_checks():
  config = load_config(TOY, MESH, check_files=False)
  assert config.metrics.wandb is False and config.eval.every_steps == 0
  with pytest.raises(ConfigError, match=r'^config.metrics.samples_per_branch: must be a positive'):
    load_config(TOY, MESH + ('--config.metrics.samples_per_branch=0',), check_files=False)
  with pytest.raises(ConfigError, match=r'^config.eval.every_steps: must be a non-negative'):
    load_config(TOY, MESH + ('--config.eval.every_steps=-1',), check_files=False)


@pytest.mark.skipif('wandb' in sys.modules or __import__('importlib').util.find_spec('wandb')
                    is not None, reason='wandb is installed here')
def test_wandb_enabled_without_the_package_stops_with_one_line():
  with pytest.raises(ConfigError) as error:
    load_config(TOY, MESH + ('--config.metrics.wandb=True',), check_files=False)
  message = str(error.value)
  assert '\n' not in message and message.startswith('config.metrics.wandb: True needs the wandb')
  from copd_jax.wandb_log import import_wandb
  with pytest.raises(ConfigError, match='pip install wandb'):
    import_wandb()


def test_wandb_logger_sends_due_steps_under_readable_names(monkeypatch, tmp_path):
  """With a stand-in wandb module: init once (resumable id from the workdir), the log_every
  steps, the last step and steps a hook added scalars to, then finish."""
  calls = []

  class FakeRun:
    def log(self, data, step):
      calls.append(('log', step, dict(data)))

    def finish(self):
      calls.append(('finish',))

  fake = types.ModuleType('wandb')
  fake.init = lambda **kw: calls.append(('init', kw)) or FakeRun()
  monkeypatch.setitem(sys.modules, 'wandb', fake)
  from copd_jax.wandb_log import WandbLogger
  config = load_config(TOY, MESH, check_files=False)
  run = types.SimpleNamespace(names=NAMES, workdir=str(tmp_path), config=config)
  logger = WandbLogger(run, log_every=2, total_steps=4)
  for step in range(4):
    info = StepInfo(step, 0, 'rl', None, {}, {'native/reward/b0_count': float(step)})
    if step == 1:
      info.add_scalars({'eval/count/pass@1/b0_count': 0.5})
    logger.after_step(info)
  logger.close()
  assert calls[0][0] == 'init' and calls[0][1]['project'] == 'copd_jax'
  assert calls[0][1]['resume'] == 'allow' and calls[0][1]['id'].startswith('copd-')
  assert [c[1] for c in calls if c[0] == 'log'] == [0, 1, 2, 3]
  assert calls[2][2] == {'native/reward/count': 1.0, 'eval/count/pass@1/count': 0.5}
  assert calls[-1] == ('finish',)


def _saved(config, **copd):
  saved = config.to_dict()
  saved['copd'] = {**saved['copd'], **copd}
  return saved


def test_resume_may_extend_num_cycles_but_not_shrink_below_what_is_done():
  from copd_jax.run_setup import check_resume_compatible
  config = load_config(TOY, MESH + ('--config.copd.num_cycles=3',), check_files=False)
  per_cycle = config.copd.s_rl + config.copd.s_opd
  notes = []
  check_resume_compatible(_saved(config, num_cycles=2), config, notes.append,
                          steps_done=2 * per_cycle)
  assert notes == [f'resume: config.copd.num_cycles 2 -> 3: the schedule now ends after step '
                   f'{3 * per_cycle - 1}; the merge and final evaluation run there']
  # Fewer cycles than planned, but not fewer than trained: allowed.
  check_resume_compatible(_saved(config, num_cycles=6), config, notes.append,
                          steps_done=2 * per_cycle + 1)
  with pytest.raises(ConfigError) as error:
    check_resume_compatible(_saved(config, num_cycles=6), config, notes.append,
                            steps_done=3 * per_cycle + 1)
  assert str(error.value) == (
      f'config.copd.num_cycles: 3 cycles ({3 * per_cycle} steps) is fewer than the '
      f'{3 * per_cycle + 1} steps the checkpoint in this workdir has trained (saved num_cycles '
      '6); resume with num_cycles >= 4 or use a new --workdir')
  # Any other schedule field still has to match.
  with pytest.raises(ConfigError, match=r'^config.copd.s_rl: differs'):
    check_resume_compatible(_saved(config, num_cycles=2, s_rl=1), config, notes.append,
                            steps_done=1)
