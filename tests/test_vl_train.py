"""End to end on a Qwen3-VL base: `train` on a text domain and a toy image domain (K=2, one
cycle of GRPO + OPD with pictures), then the merge, the evaluation of base / branches / merge
and the merged Hugging Face folder, which loads as a Qwen3-VL model; the `evaluate` command on
the run's checkpoint sees the pictures too."""
import argparse
import json
import os

import pytest

from copd_jax.configs.base import base_config, synthetic_domain
from tests.hf_vl_fixtures import save_hf_vl_folder_with_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILE = """import sys
sys.path.insert(0, {root!r})
from tests.test_vl_train import _config


def get_config():
  return _config({base!r})
"""
TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '..',
                         'shared', 'fixtures', 'qwen3_tokenizer')


def _config(base: str):
  c = base_config()
  c.branches = ('sort', 'compare')
  c.domains['compare'] = synthetic_domain(num_train=16, num_eval=2)
  c.domains.compare.source = 'synthetic_vision'
  c.domains.sort.update(num_train=16, num_eval=2)
  return one_tiny_cycle(c, base, c.branches)


def one_tiny_cycle(c, base: str, domains):
  """`c` on the Qwen3-VL folder `base`, its `domains` without a chat template, shrunk to one
  cycle of GRPO + OPD on two prompts and a two-prompt evaluation."""
  for name in domains:
    c.domains[name].use_chat_template = False
  c.model.source, c.model.hf_path = 'hf', base
  c.copd.update(num_cycles=1, s_rl=1, s_opd=1)
  c.grpo.update(prompts_per_step=2, group_size=2, logits_chunk=16)
  c.opd.update(prompts_per_step=2, samples_per_prompt=2)
  c.sampling.max_new_tokens = 3
  c.eval.update(num_examples=2, samples_k=1)
  return c


@pytest.mark.slow   # a tiny Qwen3-VL over the real Qwen3 vocabulary: a few minutes on 2 cores
def test_train_merge_evaluate_with_an_image_domain(tmp_path):
  from copd_jax.driver import train
  from copd_jax.models import hf_io_vl
  if not os.path.isdir(TOKENIZER):
    pytest.skip('the Qwen3 tokenizer fixture is not here')
  base = tmp_path / 'base'
  save_hf_vl_folder_with_tokenizer('tied_mqa_ds1', base, TOKENIZER)
  lines = []
  result = train(_config(str(base)), str(tmp_path / 'run'), log=lines.append, progress=False)
  assert result.steps_done == 2
  for model in ('base', 'branch0:sort', 'branch1:compare', 'merge'):
    assert model in result.table, result.table
  scores = json.loads((tmp_path / 'run' / 'eval.json').read_text())
  assert scores
  merged = str(tmp_path / 'run' / 'merged_hf')
  assert hf_io_vl.is_vl_folder(merged)
  assert hf_io_vl.read_vl_config(merged) == hf_io_vl.read_vl_config(str(base))
  # The evaluate command on the run: the same models, every domain, pictures included.
  from copd_jax.commands import evaluate
  config_file = tmp_path / 'vl_config.py'
  config_file.write_text(CONFIG_FILE.format(root=ROOT, base=str(base)))
  out = tmp_path / 'evaluate.json'
  assert evaluate.run(argparse.Namespace(config=str(config_file), checkpoint=str(tmp_path / 'run'),
                                         merge_method='mean', out=str(out), extra=[])) == 0
  text = out.read_text()
  for name in ('compare', 'sort', 'merged:mean'):
    assert name in text, text[:400]
