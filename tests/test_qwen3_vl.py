"""Qwen3-VL parity with transformers' Qwen3VLForConditionalGeneration (its top-level forward),
fp32, on tiny random configs: logits max |diff| <= 1e-4 and per-token KL <= 1e-6."""
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import jax.numpy as jnp

from copd_jax.models import hf_io_vl
from copd_jax.models.hf_io import HFFormatError
from copd_jax.models.qwen3_vl import VisualInput, forward
from copd_jax.models.qwen3_vl_positions import mrope_position_ids
from tests.hf_vl_fixtures import (IMAGE, VIDEO, TINY_VL_CONFIGS, hf_inputs, image_prompt,
                                  random_pixels, save_hf_vl_model, video_prompt)

MAX_ABS = 1e-4
MAX_KL = 1e-6


def _kl(reference: np.ndarray, ours: np.ndarray) -> np.ndarray:
  """Per-token KL(reference || ours) of logits, in float64."""
  def log_softmax(x):
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
  lp, lq = log_softmax(reference), log_softmax(ours)
  return (np.exp(lp) * (lp - lq)).sum(-1)


def _hf_logits(hf, tokens, images=None, videos=None, attention_mask=None):
  with torch.no_grad():
    return hf(**hf_inputs(tokens, images, videos, attention_mask)).logits.numpy()


def _our_logits(model, tokens, images=None, videos=None, token_valid=None):
  images = None if images is None else VisualInput.of(*images)
  videos = None if videos is None else VisualInput.of(*videos)
  positions = model.position_ids(tokens, images=images, videos=videos, token_valid=token_valid)
  valid = None if token_valid is None else jnp.asarray(token_valid)
  return np.asarray(forward(model, jnp.asarray(tokens), jnp.asarray(positions), images, videos,
                            valid))


def _check(name, reference, ours, valid=None):
  keep = np.ones(reference.shape[:2], bool) if valid is None else valid
  diff = np.abs(reference - ours)[keep].max()
  kl = _kl(reference, ours)[keep].max()
  print(f'{name}: max |diff| {diff:.2e}, max KL {kl:.2e}')
  assert diff <= MAX_ABS and kl <= MAX_KL, (name, diff, kl)
  assert np.abs(reference).max() > 1.0   # logits spread enough for the tolerance to mean much


def _two_image_batch(seed: int = 0):
  """Row 0: ≥ 500 tokens, text / image / text / image / text with non-square grids; row 1: the
  same length with one image. Images in prompt order over the batch."""
  grids = [(1, 8, 12), (1, 12, 6), (1, 6, 6)]
  row0 = image_prompt(grids[:2], [180, 200, 150], seed)
  row1 = image_prompt(grids[2:], [300, 0], seed + 1)
  row1 += image_prompt([], [len(row0) - len(row1)], seed + 2)
  return np.array([row0, row1]), grids


@pytest.mark.parametrize('name', sorted(TINY_VL_CONFIGS))
def test_two_image_prompt_logits_match_transformers(tmp_path, name):
  hf = save_hf_vl_model(name, tmp_path)
  model = hf_io_vl.load_vl_model(str(tmp_path))
  tokens, grids = _two_image_batch()
  assert tokens.shape[1] >= 500
  images = (random_pixels(grids, hf.config), np.array(grids))
  _check(name, _hf_logits(hf, tokens, images=images), _our_logits(model, tokens, images=images))


def test_image_processor_pixels_and_left_padding_match_transformers(tmp_path):
  """Pixels from transformers' own Qwen-VL image processor (patch 16, merge 2), and a batch whose
  second row is left-padded (positions skip the padding)."""
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
  hf = save_hf_vl_model('gqa_untied_ds2', tmp_path)
  model = hf_io_vl.load_vl_model(str(tmp_path))
  rng = np.random.RandomState(3)
  pictures = [Image.fromarray(rng.randint(0, 255, shape, dtype=np.uint8))
              for shape in [(70, 130, 3), (150, 90, 3), (64, 64, 3)]]
  processor = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2,
                                       min_pixels=32 * 32, max_pixels=192 * 192)
  out = processor(images=pictures, return_tensors='np')
  pixels, grids = out['pixel_values'], out['image_grid_thw']
  row0 = image_prompt([tuple(g) for g in grids[:2]], [20, 30, 10], seed=5)
  row1 = image_prompt([tuple(grids[2])], [15, 12], seed=6)
  pad = len(row0) - len(row1)
  tokens = np.array([row0, [0] * pad + row1])
  valid = np.ones(tokens.shape, bool)
  valid[1, :pad] = False
  images = (pixels, grids)
  _check('processor+left-pad', _hf_logits(hf, tokens, images=images, attention_mask=valid),
         _our_logits(model, tokens, images=images, token_valid=valid), valid)


def test_image_and_video_prompt_logits_match_transformers(tmp_path):
  """An image, then a video of 3 temporal patches (frames with timestamp text between them):
  per-frame attention segments, per-frame M-RoPE grids, joint image + video deepstack."""
  hf = save_hf_vl_model('mha_bias_ds3', tmp_path, seed=1)
  model = hf_io_vl.load_vl_model(str(tmp_path))
  image_grid, video_grid = (1, 6, 10), (3, 8, 4)
  tokens = np.array([image_prompt([image_grid], [12, 5], seed=7)
                     + video_prompt(video_grid, 4, 9, seed=8)])
  images = (random_pixels([image_grid], hf.config, seed=1), np.array([image_grid]))
  videos = (random_pixels([video_grid], hf.config, seed=2), np.array([video_grid]))
  _check('image+video', _hf_logits(hf, tokens, images=images, videos=videos),
         _our_logits(model, tokens, images=images, videos=videos))


def test_position_ids_equal_transformers_get_rope_index():
  """Host-side M-RoPE ids against transformers' get_rope_index: images, a video, left padding."""
  config = transformers.Qwen3VLConfig(
      text_config=dict(vocab_size=160, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=8, intermediate_size=16),
      vision_config=dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=16,
                         out_hidden_size=16, num_position_embeddings=16),
      image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=152,
      vision_end_token_id=153)
  hf = transformers.Qwen3VLModel(config)
  image_grids, video_grid = [(1, 4, 10), (1, 8, 2)], (2, 6, 4)
  row0 = image_prompt(image_grids, [3, 4, 2], seed=1)
  row1 = video_prompt(video_grid, 2, 3, seed=2)
  width = max(len(row0), len(row1))
  tokens = np.zeros((2, width), np.int64)
  valid = np.zeros((2, width), bool)
  for b, row in enumerate([row0, row1]):
    tokens[b, width - len(row):], valid[b, width - len(row):] = row, True
  mm = (tokens == IMAGE) + 2 * (tokens == VIDEO)
  expected, deltas = hf.get_rope_index(
      torch.tensor(tokens), torch.tensor(mm), image_grid_thw=torch.tensor(image_grids),
      video_grid_thw=torch.tensor([video_grid]), attention_mask=torch.tensor(valid.astype(int)))
  ours, our_deltas = mrope_position_ids(
      tokens, image_token_id=IMAGE, video_token_id=VIDEO, spatial_merge_size=2,
      image_grid_thw=image_grids, video_grid_thw=[video_grid], token_valid=valid)
  np.testing.assert_array_equal(ours, expected.numpy())
  np.testing.assert_array_equal(our_deltas, deltas.numpy()[:, 0])


def test_missing_vision_tensor_is_named(tmp_path):
  from safetensors.numpy import load_file, save_file
  save_hf_vl_model('tied_mqa_ds1', tmp_path)
  tensors = load_file(str(tmp_path / 'model.safetensors'))
  del tensors['model.visual.deepstack_merger_list.0.linear_fc2.bias']
  save_file(tensors, str(tmp_path / 'model.safetensors'))
  with pytest.raises(HFFormatError, match='deepstack_merger_list.0.linear_fc2.bias'):
    hf_io_vl.load_vl_params(str(tmp_path))


@pytest.mark.parametrize('grids, tokens, why', [
    ([(1, 4, 4)], image_prompt([(1, 4, 2)], [2, 2]), 'shorter than its grid'),
    ([(1, 4, 4), (1, 2, 2)], image_prompt([(1, 4, 4)], [2, 2]), 'more image grids'),
    ([], image_prompt([(1, 2, 2)], [2, 2]), 'more vision pad runs'),
])
def test_pad_tokens_that_do_not_fit_the_grids_are_refused(grids, tokens, why):
  with pytest.raises(ValueError, match=why):
    mrope_position_ids(np.array([tokens]), image_token_id=IMAGE, video_token_id=VIDEO,
                       spatial_merge_size=2, image_grid_thw=grids or None)
