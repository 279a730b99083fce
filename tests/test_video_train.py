"""`train` with video rows on a Qwen3-VL base: a text branch and a video branch (the toy video
domains `motion` and `appear`, source 'synthetic_vision', mixed with a JSONL file whose rows'
videos are a frame folder and a `.npy` array), one cycle of GRPO + OPD, merge, evaluation, then
the `evaluate` command on the run. With torchvision (transformers' video processor) it trains;
without, the run stops at set-up with one line naming the row and torchvision, before any
compute and without a workdir."""
import argparse
import importlib.util
import json
import os

import numpy as np
import pytest

from copd_jax.configs.base import base_config, synthetic_domain
from copd_jax.errors import UserInputError
from tests.hf_vl_fixtures import save_hf_vl_folder_with_tokenizer
from tests.qwen3_fixture import qwen3_tokenizer_dir
from tests.test_vl_train import one_tiny_cycle
from tests.video_fixtures import video_frames, write_video, write_video_processor_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILE = """import sys
sys.path.insert(0, {root!r})
from tests.test_video_train import _config


def get_config():
  return _config({base!r}, {data!r})
"""


def _config(base: str, data: str):
  c = base_config()
  c.branches = ('sort', 'motion+appear+clips')
  c.domains.sort.update(num_train=16, num_eval=2)
  for name in ('motion', 'appear'):
    c.domains[name] = synthetic_domain(num_train=16, num_eval=2)
    c.domains[name].source = 'synthetic_vision'
  c.domains['clips'] = synthetic_domain()
  c.domains.clips.update(source='file', train_path=data, eval_path=data, reward='exact')
  return one_tiny_cycle(c, base, ('sort', 'motion', 'appear', 'clips'))


def _inputs(tmp_path):
  """A tiny Qwen3-VL folder (patch 8) with a video processor config, and a JSONL file of two
  video rows: 4 frames of 32 x 32 as a folder, 5 frames of 24 x 40 as a .npy array."""
  base = tmp_path / 'base'
  save_hf_vl_folder_with_tokenizer('tied_mqa_ds1', base, qwen3_tokenizer_dir())
  write_video_processor_config(base, patch_size=8)
  rows = [{'prompt': 'Which way does it move? ', 'answer': 'left',
           'video': write_video(tmp_path, 'clip_a', video_frames(4, 32, 32, seed=1), 'folder')},
          {'prompt': 'In which frame does it appear? ', 'answer': '3',
           'video': write_video(tmp_path, 'clip_b', video_frames(5, 24, 40, seed=2), 'npy')}]
  data = tmp_path / 'clips.jsonl'
  data.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return str(base), str(data)


@pytest.mark.slow   # a tiny Qwen3-VL over the real Qwen3 vocabulary: a few minutes on 2 cores
def test_train_merge_evaluate_with_video_domains(tmp_path):
  pytest.importorskip('torchvision')
  from copd_jax.driver import train
  from copd_jax.models import hf_io_vl
  base, data = _inputs(tmp_path)
  lines = []
  result = train(_config(base, data), str(tmp_path / 'run'), log=lines.append, progress=False)
  assert result.steps_done == 2
  for model in ('base', 'branch0:sort', 'branch1:motion+appear+clips', 'merge'):
    assert model in result.table, result.table
  scores = json.loads((tmp_path / 'run' / 'eval.json').read_text())
  for domain in ('motion', 'appear', 'clips'):
    assert domain in json.dumps(scores), domain
  merged = str(tmp_path / 'run' / 'merged_hf')
  assert hf_io_vl.read_vl_config(merged) == hf_io_vl.read_vl_config(base)
  assert os.path.isfile(os.path.join(merged, 'video_preprocessor_config.json'))
  # Video pixels reached the updates: the only pictures of the run are videos, and the merge's
  # vision tower differs from the base's (the text branch's tower gets no gradient).
  merged_tower, base_tower = _vision_tensors(merged), _vision_tensors(base)
  assert merged_tower.keys() == base_tower.keys() and merged_tower
  assert any(not np.array_equal(merged_tower[k], base_tower[k]) for k in base_tower)
  print(result.table)
  # The evaluate command on the run's checkpoint: every domain, the videos included.
  from copd_jax.commands import evaluate
  config_file = tmp_path / 'video_config.py'
  config_file.write_text(CONFIG_FILE.format(root=ROOT, base=base, data=data))
  out = tmp_path / 'evaluate.json'
  assert evaluate.run(argparse.Namespace(config=str(config_file), checkpoint=str(tmp_path / 'run'),
                                         merge_method='mean', out=str(out), extra=[])) == 0
  for name in ('motion', 'appear', 'clips', 'sort', 'merged:mean'):
    assert name in out.read_text(), name


def _vision_tensors(folder: str) -> dict[str, np.ndarray]:
  """The vision tower's tensors of a Hugging Face folder, by name."""
  import glob

  from safetensors.numpy import load_file
  tensors = {}
  for file in glob.glob(os.path.join(folder, '*.safetensors')):
    tensors.update({k: v for k, v in load_file(file).items() if '.visual.' in k})
  return tensors


def test_video_rows_without_torchvision_stop_train_in_one_line(tmp_path):
  if importlib.util.find_spec('torchvision') is not None:
    pytest.skip('torchvision is installed here: videos train')
  from scripts.faults import cli
  base, data = _inputs(tmp_path)
  config_file = tmp_path / 'video_config.py'
  config_file.write_text(CONFIG_FILE.format(root=ROOT, base=base, data=data))
  workdir = str(tmp_path / 'run')
  result = cli.run_cli(['train', '--config', str(config_file), '--workdir', workdir,
                        '--no-progress'])
  assert result.one_error_line, result.stderr
  assert ("domains.appear: source 'synthetic_vision' gives video rows, but transformers' video "
          'processor') in result.message, result.message
  assert 'torchvision (requirements-video.txt)' in result.message, result.message
  assert not os.path.exists(workdir)
  # A file row: named by its file and line, with the field that trains on the rest of it.
  from copd_jax.rollouts import VisionEncoding
  from copd_jax.run_setup import check_visual_rows, load_domains
  from copd_jax.vision_inputs import load_vision_processor
  config = _config(base, data)
  config.branches = ('clips',)
  with pytest.raises(UserInputError, match=f"{data}:1: the row has a video, but .*torchvision "
                                           r"\(requirements-video.txt\)\); "
                                           "domains.clips.video_field='' trains on the rest"):
    check_visual_rows(load_domains(config), VisionEncoding(load_vision_processor(base), None))
