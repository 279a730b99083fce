"""Config files: every shipped config loads, and a field the schema lacks -- a typo inside a
config *file*, not only in a --config override -- fails at load with the file and line."""
import glob
import os
import shutil
import textwrap

import pytest

from copd_jax.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The test session has 8 CPU devices: a mesh that any K divides, sampling on the same layout.
MESH = ('--config.mesh.branch=1', '--config.mesh.fsdp=-1', '--config.mesh_sampling.branch=0',
        '--config.mesh_sampling.fsdp=0', '--config.mesh_sampling.tensor=0')


@pytest.mark.parametrize('path', sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py'))),
                         ids=os.path.basename)
def test_every_shipped_config_loads(path):
  if os.path.basename(path) in ('base.py', 'example_rewards.py'):
    pytest.skip('the schema re-export and a reward module define no get_config()')
  config = load_config(path, MESH, check_files=False)
  assert config.branches


def _config_file(tmp_path, body: str) -> str:
  shutil.copy(os.path.join(ROOT, 'configs', 'base.py'), tmp_path / 'base.py')
  path = tmp_path / 'run.py'
  path.write_text(textwrap.dedent('''\
      import os, sys
      sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
      from base import base_config, synthetic_domain

      def get_config():
        c = base_config()
      ''') + textwrap.indent(textwrap.dedent(body), '  ') + '  return c\n')
  return str(path)


@pytest.mark.parametrize('body, line, field', [
    ('c.optimizer.learnin_rate = 1e-5\n', 7, 'learnin_rate'),
    ('c.seeds = 3\n', 7, 'seeds'),
    ("c.domains.math = synthetic_domain()\nc.domains.math.trian_path = 'x.jsonl'\n", 8,
     'trian_path'),
])
def test_unknown_field_in_a_config_file_names_file_and_line(tmp_path, body, line, field):
  path = _config_file(tmp_path, body)
  with pytest.raises(ConfigError) as error:
    load_config(path)
  message = str(error.value)
  assert message.startswith(f'--config {path}:{line}: ') and f'"{field}"' in message, message
  assert len(message.splitlines()) == 1


def test_new_domains_and_known_fields_are_accepted(tmp_path):
  path = _config_file(tmp_path, '''\
      c.domains.math = synthetic_domain(num_train=50, num_eval=10)
      c.domains.math.use_chat_template = False
      c.branches = ('math', 'sort')
      c.optimizer.learning_rate = 1e-5
      ''')
  config = load_config(path, MESH)
  assert config.domains.math.num_train == 50 and config.optimizer.learning_rate == 1e-5


def test_resume_differences_name_changed_and_added_fields():
  from copd_jax.config import resume_differences
  saved = {'seed': 0, 'branches': ['count', 'sort'],
           'grpo': {'epsilon_low': 0.2, 'epsilon_high': 0.28, 'gone': 1},
           'copd': {'num_cycles': 6}}
  current = {'seed': 0, 'branches': ('count', 'sort'),
             'grpo': {'epsilon_low': 0.2, 'epsilon_high': 0.3},
             'copd': {'num_cycles': 6, 'schedule': 'fixed'}, 'opd': {'beta': 1.0}}
  changed, added = resume_differences(saved, current, ('seed', 'branches', 'grpo', 'copd', 'opd'))
  assert changed == ['config.grpo.epsilon_high', 'config.grpo.gone']
  assert added == ['config.copd.schedule', 'config.opd']
  assert resume_differences(saved, saved) == ([], ['config.domains', 'config.model',
                                                   'config.warmstart', 'config.opd',
                                                   'config.sampling', 'config.optimizer'])


def test_memory_only_fields_may_change_on_resume():
  from copd_jax.config import resume_differences
  saved = {'grpo': {'micro_batches': 1, 'logits_chunk': 0, 'epsilon_low': 0.2}}
  current = {'grpo': {'micro_batches': 4, 'logits_chunk': 128, 'epsilon_low': 0.2}}
  assert resume_differences(saved, current, ('grpo',)) == ([], [])
  current['grpo']['epsilon_low'] = 0.1
  assert resume_differences(saved, current, ('grpo',)) == (['config.grpo.epsilon_low'], [])


@pytest.mark.parametrize('body, message', [
    ("c.domains.count.reward = 'no_such_module_xyz:score'\n",
     "config.domains.count.reward: cannot import 'no_such_module_xyz' (ModuleNotFoundError"),
    ("c.domains.count.reward = 'tests.reward_functions:nope'\n",
     "config.domains.count.reward: 'tests.reward_functions' ("),
    ("c.domains.count.reward = 'regex'\n",
     "config.domains.count.reward: must be one of exact, math or 'package.module:function'"),
    ("c.domains.count.answer_extraction = 'first_line'\n",
     'config.domains.count.answer_extraction: must be one of final, boxed, last_number'),
    ("c.domains.count.use_chat_template = False\nc.domains.count.system_prompt = 'Be brief.'\n",
     'config.domains.count.system_prompt: needs use_chat_template=True'),
    ('c.domains.count.reward_timeout_s = 0.0\n',
     'config.domains.count.reward_timeout_s: must be a finite number > 0'),
])
def test_bad_reward_and_prompting_fields_stop_at_load(tmp_path, body, message):
  path = _config_file(tmp_path, body)
  with pytest.raises(ConfigError) as error:
    load_config(path, MESH)
  text = str(error.value)
  assert text.startswith(message) and len(text.splitlines()) == 1, text


def test_reward_module_next_to_the_config_file_resolves(tmp_path):
  (tmp_path / 'my_scoring_17.py').write_text('def score(response, reference, example):\n'
                                             '  return 1.0\n')
  path = _config_file(tmp_path, "c.domains.count.reward = 'my_scoring_17:score'\n")
  assert load_config(path, MESH).domains.count.reward == 'my_scoring_17:score'
