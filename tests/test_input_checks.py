"""Bad input caught before any compute with one line naming field, file or tensor (issue 21,
points 6, 9-13): NaN and integer HF weights named at load, an HF folder without a usable
tokenizer, layers past config.json, unused and transposed tensors, a seed past uint32,
overlap_top_k wider than the vocabulary, a partial config or one calling sys.exit, an absurd
plan --devices; and none leaves a half-made workdir."""
import json
import os
import re

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from copd_jax.models import hf_io
from scripts.faults import cli, model_inputs


def _hf_folder(tmp_path):
  """A tiny HF folder with the char tokenizer (100 tokens; 128 embedding rows)."""
  return model_inputs.hf_folder(str(tmp_path))


def _rewrite_tensor(folder, name, change):
  path = os.path.join(folder, 'model.safetensors')
  tensors = load_file(path)
  tensors[name] = change(tensors[name])
  save_file(tensors, path, metadata={'format': 'pt'})


def _train_on(folder, workdir, *extra):
  return cli.run_cli(['train', '--config', cli.TOY_CONFIG, '--workdir', workdir, '--no-progress',
                      *cli.BASE_OVERRIDES, '--config.model.source=hf',
                      f'--config.model.hf_path={folder}', *extra])


@pytest.mark.parametrize('change, expect', [
    (lambda t: np.where(np.arange(t.size).reshape(t.shape) == 3, np.nan, t).astype(t.dtype),
     'has 1 of'),
    (lambda t: np.full_like(t, np.inf), 'NaN or inf'),
    (lambda t: t.astype(np.int32), 'has dtype int32; weights must be floating point'),
])
def test_bad_hf_weights_are_named_at_load(tmp_path, change, expect):
  folder = _hf_folder(tmp_path)
  name = 'model.layers.1.mlp.down_proj.weight'
  _rewrite_tensor(folder, name, change)
  exported = cli.run_cli(['export-hf', '--checkpoint', folder, '--out', str(tmp_path / 'x')])
  assert exported.one_error_line, exported.stderr
  assert f'tensor {name}' in exported.message and expect in exported.message, exported.message
  workdir = str(tmp_path / 'w')
  trained = _train_on(folder, workdir)
  assert trained.one_error_line and f'tensor {name}' in trained.message, trained.stderr
  assert not os.path.exists(workdir)   # nothing half made
  with pytest.raises(hf_io.HFFormatError, match=expect):
    hf_io.load_params(folder)


@pytest.mark.parametrize('remove, expect', [
    (('tokenizer.json',), 'tokenizer_config.json alone holds no vocabulary'),
    (('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json'), 'no tokenizer in'),
])
def test_an_hf_folder_without_a_usable_tokenizer_is_refused_before_compute(tmp_path, remove,
                                                                           expect):
  folder = _hf_folder(tmp_path)
  for name in remove:
    if os.path.exists(os.path.join(folder, name)):
      os.remove(os.path.join(folder, name))
  workdir = str(tmp_path / 'w')
  with cli.tripwire('copd_jax.driver.train'):
    result = _train_on(folder, workdir)
  assert result.one_error_line, result.stderr
  assert result.message.startswith('error: config.model.hf_path: ') and expect in \
      result.message, result.message
  assert not os.path.exists(workdir)


@pytest.mark.parametrize('override, field', [
    ('--config.seed=99999999999999999999', 'config.seed: must be at most 2,147,483,647'),
    ('--config.metrics.overlap_top_k=100000', 'config.metrics.overlap_top_k: must be at most'),
])
def test_sizes_that_would_fail_mid_run_are_refused_up_front(tmp_path, override, field):
  workdir = str(tmp_path / 'w')
  with cli.tripwire('copd_jax.driver.train'):
    result = cli.run_cli(['train', '--config', cli.TOY_CONFIG, '--workdir', workdir,
                          *cli.BASE_OVERRIDES, override])
  assert result.one_error_line and field in result.message, result.stderr
  assert not os.path.exists(workdir)


def test_the_largest_seed_is_accepted(tmp_path):
  with cli.tripwire('copd_jax.driver.train'):
    result = cli.run_cli(['train', '--config', cli.TOY_CONFIG, '--workdir', str(tmp_path / 'w'),
                          *cli.BASE_OVERRIDES, '--config.seed=2147483647'])
  assert result.code == 'compute started', result.stderr


@pytest.mark.parametrize('devices', ['100000000', '0', '10241'])
def test_plan_refuses_absurd_device_counts_without_starting_them(devices):
  result = cli.run_cli(['plan', '--config', cli.TOY_CONFIG, '--devices', devices])
  assert result.one_error_line and '--devices must be an integer in [1, 10,240]' in \
      result.message, result.stderr


@pytest.mark.parametrize('body, expect', [
    ("  c = base_config()\n  c.unlock()\n  del c['merge']\n  return c\n",
     'get_config() returned a config without config.merge;'),
    ("  c = base_config()\n  c.grpo.unlock()\n  del c.grpo['group_size']\n  return c\n",
     'get_config() returned a config without config.grpo.group_size;'),
    ('  import sys\n  sys.exit(3)\n', 'get_config() called sys.exit(3)'),
])
def test_partial_configs_and_exits_are_named(tmp_path, body, expect):
  from copd_jax.config import ConfigError, read_config
  path = tmp_path / 'c.py'
  path.write_text('from copd_jax.configs.base import base_config\n\ndef get_config():\n' + body)
  with pytest.raises(ConfigError, match=re.escape(expect)):
    read_config(str(path))


def test_a_config_file_exiting_at_import_is_an_error_not_an_exit(tmp_path):
  path = tmp_path / 'c.py'
  path.write_text('import sys\nsys.exit(0)\n')
  result = cli.run_cli(['train', '--config', str(path), '--workdir', str(tmp_path / 'w')])
  assert result.one_error_line and f'{path}:2: the config file called sys.exit(0)' in \
      result.message, result.stderr


def test_layers_past_config_json_are_refused_naming_them(tmp_path):
  folder = _hf_folder(tmp_path)
  config = json.loads(open(os.path.join(folder, 'config.json')).read())
  config['num_hidden_layers'] = 1
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(config, f)
  with pytest.raises(hf_io.HFFormatError, match=r"tensors of 1 layer\(s\) past config.json's "
                                                r'num_hidden_layers=1 \(model.layers.1.\*'):
    hf_io.load_params(folder)


def test_unused_tensors_are_named_in_one_warning(tmp_path):
  folder = _hf_folder(tmp_path)
  _rewrite_tensor(folder, 'model.layers.0.mlp.up_proj.weight', lambda t: t)
  tensors = load_file(os.path.join(folder, 'model.safetensors'))
  tensors['model.mtp.weight'] = np.zeros(2, np.float32)
  tensors['model.layers.0.self_attn.rotary_emb.inv_freq'] = np.zeros(2, np.float32)  # a buffer
  save_file(tensors, os.path.join(folder, 'model.safetensors'), metadata={'format': 'pt'})
  with pytest.warns(UserWarning, match=r'1 tensor\(s\) the model does not use, ignored: '
                                       r'model.mtp.weight$'):
    hf_io.load_params(folder)


def test_a_transposed_tensor_is_called_so(tmp_path):
  folder = _hf_folder(tmp_path)
  name = 'model.layers.0.mlp.down_proj.weight'
  _rewrite_tensor(folder, name, lambda t: np.ascontiguousarray(t.T))
  with pytest.raises(hf_io.HFFormatError, match=rf'tensor {name} has shape \(32, 16\); config.json '
                                                r'implies \(16, 32\) \(the tensor is stored '
                                                r'transposed\)'):
    hf_io.load_params(folder)
