"""Qwen3-VL on a real processed video (needs torchvision for transformers' video processor; skipped
without): frames through copd_jax's video path (vision_inputs) into copd_jax's model, against
the same frames through transformers' Qwen3VLProcessor into Qwen3VLForConditionalGeneration's
top-level forward: logits within tests/test_qwen3_vl.py's fp32 bounds, greedy tokens equal to
transformers' generate, and `generate --video` on a saved folder printing transformers' text."""
import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from copd_jax import vision_inputs as vi
from copd_jax.models import hf_io_vl
from copd_jax.models.qwen3_vl import VisualInput, forward
from copd_jax.models.tokenizer import load_tokenizer
from copd_jax.sampling import SamplingParams, generate
from copd_jax.scoring import split_model
from tests.hf_vl_fixtures import save_hf_vl_folder_with_tokenizer
from tests.qwen3_fixture import qwen3_tokenizer_dir
from tests.test_qwen3_vl import _check
from tests.video_fixtures import (reference_processor, video_frames, write_video,
                                  write_video_processor_config)

pytest.importorskip('torchvision')

PROMPT = 'Which way does the square move?'
NEW_TOKENS = 24


def _folder(tmp_path, name, patch_size):
  """A tiny Qwen3-VL folder over the Qwen3 vocabulary with its image and video processor files
  (a video's frames together at most 6 x 64 x 64 pixels)."""
  folder = tmp_path / 'vl'
  hf = save_hf_vl_folder_with_tokenizer(name, folder, qwen3_tokenizer_dir())
  write_video_processor_config(folder, patch_size=patch_size)
  return hf, str(folder)


def _chat_text(tokenizer, num_images=0):
  """The chat prompt `generate --chat` renders: the placeholders, then the text, as one user
  turn of the tokenizer's own template."""
  return tokenizer.apply_chat_template(
      [{'role': 'user', 'content': vi.placeholders(num_images, 1) + PROMPT}], tokenize=False,
      add_generation_prompt=True)


def _ours(folder, tokenizer, text, frames):
  """copd_jax's path: its processors, pad expansion and timestamps (vision_inputs)."""
  from PIL import Image
  return vi.encode_vision_prompt(text, [], vi.load_vision_processor(folder), tokenizer,
                                 videos=[[Image.fromarray(f) for f in frames]])


def _theirs(folder, tokenizer, text, frames):
  """transformers' Qwen3VLProcessor on the same text and frames (pre-sampled frames: no frame
  sampling, as copd_jax takes a row's frames)."""
  return reference_processor(folder, tokenizer)(text=[text], videos=[frames],
                                                do_sample_frames=False, return_tensors='pt')


@pytest.mark.parametrize('name, patch_size, shape', [
    ('gqa_untied_ds2', 16, (5, 50, 70)),   # odd frame count, resized up to the 32-pixel grid
    ('mha_bias_ds3', 4, (4, 30, 22)),      # patch 4: a larger grid, frames resized down
])
def test_processed_video_logits_match_transformers(tmp_path, name, patch_size, shape):
  hf, folder = _folder(tmp_path, name, patch_size)
  tokenizer = load_tokenizer(folder)
  frames = video_frames(*shape, seed=3)
  text = _chat_text(tokenizer)
  ours, theirs = _ours(folder, tokenizer, text, frames), _theirs(folder, tokenizer, text, frames)
  assert ours.input_ids.tolist() == theirs['input_ids'][0].tolist()
  assert int(np.prod(ours.video_grid_thw[0])) >= 12   # several frames' patches reach the model

  model = hf_io_vl.load_vl_model(folder)
  tokens = ours.input_ids[None]
  videos = VisualInput.of(ours.pixel_values_videos, ours.video_grid_thw)
  positions = model.position_ids(tokens, videos=videos)
  our_logits = np.asarray(forward(model, jnp.asarray(tokens), jnp.asarray(positions), None,
                                  videos))
  with torch.no_grad():
    their_logits = hf(**theirs).logits.numpy()
  _check(f'{name} processed video', their_logits, our_logits)


def test_greedy_video_prompt_equals_transformers_generate(tmp_path):
  hf, folder = _folder(tmp_path, 'tied_mqa_ds1', 8)
  tokenizer = load_tokenizer(folder)
  frames = video_frames(5, 40, 56, seed=4)
  text = _chat_text(tokenizer)
  ours, theirs = _ours(folder, tokenizer, text, frames), _theirs(folder, tokenizer, text, frames)
  with torch.no_grad():
    expected = hf.generate(**theirs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                           do_sample=False, eos_token_id=None, pad_token_id=0)
  expected = expected[0, theirs['input_ids'].shape[1]:].numpy()

  model = hf_io_vl.load_vl_model(folder)
  graphdef, params = split_model(model)
  tokens = ours.input_ids[None]
  never = (hf.config.text_config.vocab_size,)   # every token generated: no EOS can stop it
  out = generate(graphdef, params, tokens, np.ones(tokens.shape, bool), jax.random.key(0),
                 SamplingParams(max_new_tokens=NEW_TOKENS, greedy=True), eos_ids=never,
                 pad_id=0, videos=VisualInput.of(ours.pixel_values_videos, ours.video_grid_thw))
  np.testing.assert_array_equal(np.asarray(out.tokens)[0, tokens.shape[1]:], expected)
  assert len(set(expected.tolist())) > 1   # a real sequence, not one token repeated


def test_generate_fps_gives_transformers_timestamps(tmp_path):
  """`generate --video PATH --fps 2`'s encoding (commands.generate.encode_pictures) equals
  transformers' Qwen3VLProcessor given that rate in the video's metadata."""
  from transformers.video_utils import VideoMetadata
  from copd_jax.commands.generate import encode_pictures, video_frames as frame_paths
  _, folder = _folder(tmp_path, 'tied_mqa_ds1', 8)
  tokenizer = load_tokenizer(folder)
  frames = video_frames(6, 40, 56, seed=6)
  text = _chat_text(tokenizer)
  path = str(tmp_path / write_video(tmp_path, 'clip', frames, 'npy'))
  ours = encode_pictures(folder, text, tokenizer, [], [path], video_fps=2.0)
  theirs = reference_processor(folder, tokenizer)(
      text=[text], videos=[frames], do_sample_frames=False, return_tensors='pt',
      video_metadata=[VideoMetadata(total_num_frames=6, fps=2.0, frames_indices=list(range(6)))])
  assert ours.input_ids.tolist() == theirs['input_ids'][0].tolist()
  assert '<2.2 seconds>' in tokenizer.decode(ours.input_ids) and frame_paths(path) == [path]


@pytest.mark.slow   # two generate runs and transformers' generate: about 25 s on 2 busy cores
def test_generate_cli_with_a_video_prints_transformers_text(tmp_path, capsys):
  """`generate --model DIR --video PATH --chat --prompt TEXT --greedy`, the video as a frame
  folder and as a .npy array: both print what transformers' generate gives on its
  Qwen3VLProcessor's inputs for the same chat."""
  from copd_jax.__main__ import main as cli_main
  hf, folder = _folder(tmp_path, 'tied_mqa_ds1', 8)
  tokenizer = load_tokenizer(folder)
  frames = video_frames(5, 40, 56, seed=5)
  theirs = _theirs(folder, tokenizer, _chat_text(tokenizer), frames)
  with torch.no_grad():
    out = hf.generate(**theirs, max_new_tokens=16, do_sample=False,
                      eos_token_id=[tokenizer.eos_token_id], pad_token_id=tokenizer.eos_token_id)
  expected = tokenizer.decode(out[0, theirs['input_ids'].shape[1]:], skip_special_tokens=True)
  assert expected.strip()
  capsys.readouterr()
  for form in ('folder', 'npy'):
    path = tmp_path / write_video(tmp_path, f'clip_{form}', frames, form)
    code = cli_main(['generate', '--model', folder, '--video', str(path), '--chat', '--prompt',
                     PROMPT, '--greedy', '--max-new-tokens', '16'])
    assert code == 0
    assert capsys.readouterr().out == expected + '\n', form
