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
  if os.path.basename(path) in ('base.py', 'example_rewards.py', 'paper.py'):
    pytest.skip('the schema re-export, a reward module and the paper recipe define no '
                'get_config()')
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
  assert resume_differences(saved, saved) == ([], ['config.domains', 'config.data',
                                                   'config.model', 'config.warmstart', 'config.opd',
                                                   'config.sampling', 'config.optimizer'])


def test_memory_only_fields_may_change_on_resume():
  from copd_jax.config import resume_differences
  saved = {'grpo': {'micro_batches': 1, 'logits_chunk': 0, 'epsilon_low': 0.2}}
  current = {'grpo': {'micro_batches': 4, 'logits_chunk': 128, 'epsilon_low': 0.2}}
  assert resume_differences(saved, current, ('grpo',)) == ([], [])
  current['grpo']['epsilon_low'] = 0.1
  assert resume_differences(saved, current, ('grpo',)) == (['config.grpo.epsilon_low'], [])
  # The decoder and its cache budget change the schedule of rows, not the samples.
  saved = {'sampling': {'decoder': 'static', 'kv_token_budget': 0, 'top_k': 0}}
  current = {'sampling': {'decoder': 'engine', 'kv_token_budget': 4096, 'top_k': 0,
                          'prefill_prompts': 8, 'prefill_chunk': 256}}
  assert resume_differences(saved, current, ('sampling',)) == ([], [])


TOY = os.path.join(ROOT, 'configs', 'toy_copd.py')


@pytest.mark.parametrize('override, field', [
    # StepConfig (grpo, opd, copd.freeze)
    ('--config.opd.beta=0', 'opd.beta'),
    ('--config.opd.delta_clamp=-1.0', 'opd.delta_clamp'),
    ('--config.grpo.epsilon_low=1.0', 'grpo.epsilon_low'),
    ('--config.grpo.entropy_coef=-0.1', 'grpo.entropy_coef'),
    ('--config.grpo.aggregation=mean', 'grpo.aggregation'),
    ('--config.grpo.logits_chunk=-1', 'grpo.logits_chunk'),
    ('--config.copd.freeze=5', 'copd.freeze'),
    # SamplingParams
    ('--config.sampling.top_p=1.5', 'sampling.top_p'),
    ('--config.sampling.max_new_tokens=0', 'sampling.max_new_tokens'),
    # EngineSettings
    ('--config.sampling.decoder=paged', 'sampling.decoder'),
    ('--config.sampling.kv_token_budget=-1', 'sampling.kv_token_budget'),
    # the optimizer
    ('--config.optimizer.b2=1.0', 'optimizer.b2'),
    ('--config.optimizer.weight_decay=nan', 'optimizer.weight_decay'),
    # the meshes
    ('--config.mesh.tensor=3', 'mesh'),
    ('--config.mesh_sampling.branch=1', 'mesh_sampling'),
    # the toy model's Qwen3Config
    ('--config.model.toy.head_dim=15', 'model.toy.head_dim'),
    ('--config.model.toy.num_kv_heads=3', 'model.toy.num_heads'),
    # checked by config_checks itself
    ('--config.merge.method=median', 'merge.method'),
    ('--config.copd.topology=ring', 'copd.topology'),
    ('--config.warmstart.wrong_share=1.0', 'warmstart.wrong_share'),
    ('--config.warmstart.examples_per_domain=0', 'warmstart.examples_per_domain'),
])
def test_a_bad_value_names_its_config_field(override, field):
  with pytest.raises(ConfigError) as error:
    load_config(TOY, MESH + (override,), check_files=False)
  assert str(error.value).startswith(f'config.{field}'), str(error.value)


def test_objects_built_directly_name_their_own_fields():
  from copd_jax.models.qwen3 import Qwen3Config
  from copd_jax.sampling import SamplingConfigError, SamplingParams
  from copd_jax.step_config import StepConfig
  with pytest.raises(ConfigError, match=r'^StepConfig.opd_beta: must be a finite number > 0'):
    StepConfig(opd_beta=0.0)
  with pytest.raises(SamplingConfigError, match=r'^SamplingParams.top_p: '):
    SamplingParams(max_new_tokens=4, top_p=2.0)
  with pytest.raises(ValueError, match=r'^Qwen3Config.head_dim: must be even'):
    Qwen3Config(vocab_size=8, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
                head_dim=3, intermediate_size=8)


def test_opd_settings_live_in_the_opd_section():
  from copd_jax.step_config import StepConfig
  config = load_config(TOY, MESH + ('--config.opd.beta=0.5', '--config.opd.delta_clamp=2.0'),
                       check_files=False)
  assert 'beta' not in config.copd and 'delta_clamp' not in config.copd
  step = StepConfig.from_config(config, prompt_length=16)
  assert (step.opd_beta, step.opd_clamp, step.prompt_length) == (0.5, 2.0, 16)
  config = load_config(TOY, MESH, check_files=False)
  assert StepConfig.from_config(config).opd_clamp is None   # delta_clamp 0 = off
  with pytest.raises(ConfigError, match='unknown field config.copd.beta'):
    load_config(TOY, MESH + ('--config.copd.beta=2.0',), check_files=False)


def _saved_before_the_opd_move(config) -> dict:
  """`config` as a checkpoint written when beta and delta_clamp were in copd stores it."""
  saved = config.to_dict()
  saved['copd']['beta'] = saved['opd'].pop('beta')
  saved['copd']['delta_clamp'] = saved['opd'].pop('delta_clamp')
  return saved


def test_a_checkpoint_with_copd_beta_still_resumes():
  from copd_jax.config import resume_differences
  from copd_jax.run_setup import check_resume_compatible
  config = load_config(TOY, MESH, check_files=False)
  saved = _saved_before_the_opd_move(config)
  assert resume_differences(saved, config.to_dict()) == ([], [])
  notes = []
  check_resume_compatible(saved, config, notes.append)
  assert notes == []
  changed = load_config(TOY, MESH + ('--config.opd.beta=0.5',), check_files=False)
  assert resume_differences(saved, changed.to_dict()) == (['config.opd.beta'], [])
  with pytest.raises(ConfigError, match=r'^config.opd.beta: differs from the checkpoint'):
    check_resume_compatible(saved, changed, notes.append)


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
    ("c.domains.count.video_fps = 0\n",
     'config.domains.count.video_fps: must be a finite number > 0'),
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
