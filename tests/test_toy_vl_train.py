"""The toy Qwen3-VL world end to end, shrunk: configs/toy_copd_vl_image.py (text hub + two image
domains) and, where torchvision is installed, configs/toy_copd_vl.py (text, image, video) run
warm start with pictures -> GRPO / hub-and-spoke OPD -> merge -> export -> evaluation table, and
a second run on the same workdir's base reuses it."""
import importlib.util
import os

import pytest

from copd_jax.config import load_config

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
SHRINK = ['--config.warmstart.steps=4', '--config.warmstart.examples_per_domain=12',
          '--config.warmstart.batch_size=6', '--config.copd.num_cycles=1', '--config.copd.s_rl=1',
          '--config.copd.s_opd=1', '--config.grpo.prompts_per_step=2', '--config.grpo.group_size=2',
          '--config.opd.prompts_per_step=2', '--config.opd.samples_per_prompt=2',
          '--config.sampling.max_new_tokens=6', '--config.eval.num_examples=3',
          '--config.eval.samples_k=1', '--config.metrics.samples_every=0']


@pytest.mark.slow   # about 2 minutes per config on 2 cores
@pytest.mark.parametrize('name', ['toy_copd_vl_image', 'toy_copd_vl'])
def test_toy_vl_world_end_to_end(tmp_path, name):
  import transformers
  from copd_jax.driver import train
  from copd_jax.models import hf_io_vl
  if name == 'toy_copd_vl' and importlib.util.find_spec('torchvision') is None:
    pytest.skip('the video domain needs torchvision (requirements-video.txt)')
  config = load_config(os.path.join(CONFIGS, f'{name}.py'), SHRINK)
  for domain in config.branches:
    config.domains[domain].update(num_train=8, num_eval=3)
  lines = []
  result = train(config, str(tmp_path / 'run'), log=lines.append, progress=False)
  assert result.steps_done == 2
  rows = ['base'] + [f'branch{k}:{d}' for k, d in enumerate(config.branches)] + ['merge']
  for row in rows:
    assert row in result.table, result.table
  assert any('warm-starting a toy Qwen3-VL' in line for line in lines), lines
  base = str(tmp_path / 'run' / 'base')
  merged = str(tmp_path / 'run' / 'merged_hf')
  for folder in (base, merged):
    assert hf_io_vl.is_vl_folder(folder)
    model = transformers.Qwen3VLForConditionalGeneration.from_pretrained(folder)
    assert model.config.image_token_id == 102
  assert hf_io_vl.read_vl_config(merged) == hf_io_vl.read_vl_config(base)
  # The same settings on a new workdir whose base is this one's: reused, not trained again.
  import shutil
  shutil.copytree(base, tmp_path / 'again' / 'base')
  config.copd.num_cycles = 1
  again = []
  train(config, str(tmp_path / 'again'), log=again.append, progress=False)
  assert any('base model: reusing' in line for line in again), again
