"""The tiny Qwen3-VL folders the tests build hold what a released Qwen3-VL folder holds: the
image processor's preprocessor_config.json and the video processor's
video_preprocessor_config.json (the file name transformers' VIDEO_PROCESSOR_NAME, which
Qwen3VLVideoProcessor.save_pretrained writes)."""
import json
import os

import pytest

from tests.hf_vl_fixtures import save_hf_vl_folder_with_tokenizer
from tests.qwen3_fixture import qwen3_tokenizer_dir


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  out = tmp_path_factory.mktemp('vl')
  save_hf_vl_folder_with_tokenizer('tied_mqa_ds1', out, qwen3_tokenizer_dir())
  return str(out)


def test_the_folder_has_the_video_processor_file_of_its_patch_size(folder):
  from transformers.utils import VIDEO_PROCESSOR_NAME
  assert VIDEO_PROCESSOR_NAME == 'video_preprocessor_config.json'
  with open(os.path.join(folder, 'config.json')) as f:
    vision = json.load(f)['vision_config']
  with open(os.path.join(folder, VIDEO_PROCESSOR_NAME)) as f:
    video = json.load(f)
  assert video['video_processor_type'] == 'Qwen3VLVideoProcessor'
  assert (video['patch_size'], video['temporal_patch_size'], video['merge_size']) == (
      vision['patch_size'], vision['temporal_patch_size'], vision['spatial_merge_size'])


def test_transformers_loads_the_qwen3_vl_video_processor_from_it(folder):
  """Without the file, AutoVideoProcessor falls back to preprocessor_config.json and builds a
  Qwen2VLVideoProcessor; with it, the Qwen3-VL one (needs torchvision: skipped without)."""
  pytest.importorskip('torchvision')
  import transformers
  from copd_jax.vision_inputs import load_vision_processor
  processor = load_vision_processor(folder)
  assert isinstance(processor.video_processor, transformers.Qwen3VLVideoProcessor)
  assert processor.video_processor.patch_size == processor.image_processor.patch_size
