"""Tiny randomly initialised Hugging Face Qwen3-VL folders (transformers.Qwen3VLConfig +
save_pretrained) and prompts with images / a video laid out as transformers' processor lays them."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import torch
import transformers

from tests.video_fixtures import write_video_processor_config

IMAGE, VIDEO, VSTART, VEND = 150, 151, 152, 153
VOCAB = 160

TINY_VL_CONFIGS = {
    # GQA 2:1, untied, two deepstack taps (first and last block), mrope (2, 3, 3).
    'gqa_untied_ds2': dict(
        text=dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16,
                  rope_parameters=dict(rope_type='default', rope_theta=5_000.0,
                                       mrope_section=[2, 3, 3], mrope_interleaved=True)),
        vision=dict(depth=3, hidden_size=32, intermediate_size=56, num_heads=2,
                    num_position_embeddings=16, deepstack_visual_indexes=[0, 2], patch_size=16),
        tie_word_embeddings=False),
    # Tied embeddings, multi-query (4:1), one deepstack tap, 6x6 position table, mrope (4, 4, 4).
    'tied_mqa_ds1': dict(
        text=dict(hidden_size=40, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=24,
                  rope_parameters=dict(rope_type='default', rope_theta=500_000.0,
                                       mrope_section=[4, 4, 4], mrope_interleaved=True)),
        vision=dict(depth=2, hidden_size=24, intermediate_size=40, num_heads=2,
                    num_position_embeddings=36, deepstack_visual_indexes=[1], patch_size=8),
        tie_word_embeddings=True),
    # MHA with attention biases, three deepstack taps, 8x8 table, mrope (6, 5, 5), 4 vision heads.
    'mha_bias_ds3': dict(
        text=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=32, attention_bias=True, rms_norm_eps=1e-5,
                  rope_parameters=dict(rope_type='default', rope_theta=1_000_000.0,
                                       mrope_section=[6, 5, 5], mrope_interleaved=True)),
        vision=dict(depth=4, hidden_size=32, intermediate_size=40, num_heads=4,
                    num_position_embeddings=64, deepstack_visual_indexes=[0, 1, 3], patch_size=4),
        tie_word_embeddings=False),
}


def make_hf_vl_model(name: str, seed: int = 0, vocab: int = VOCAB,
                     special: tuple[int, int, int, int] = (IMAGE, VIDEO, VSTART, VEND)):
  """special: the image, video, vision start and vision end token ids."""
  spec = TINY_VL_CONFIGS[name]
  torch.manual_seed(seed)
  # A wide initialiser so that logits spread over several nats and a rotary or deepstack slip
  # shows far above float noise (the default 0.02 gives near-uniform logits).
  text = dict(vocab_size=vocab, initializer_range=0.2, **spec['text'])
  vision = dict(out_hidden_size=text['hidden_size'], temporal_patch_size=2, spatial_merge_size=2,
                initializer_range=0.2, **spec['vision'])
  config = transformers.Qwen3VLConfig(
      text_config=text, vision_config=vision, image_token_id=special[0],
      video_token_id=special[1], vision_start_token_id=special[2], vision_end_token_id=special[3],
      tie_word_embeddings=spec['tie_word_embeddings'])
  model = transformers.Qwen3VLForConditionalGeneration(config).eval()
  with torch.no_grad():  # random norms and biases so the test sees each one used correctly
    for pname, p in model.named_parameters():
      if 'norm' in pname or pname.endswith('bias'):
        p.add_(0.1 * torch.randn_like(p))
      if 'pos_embed' in pname:
        p.normal_(0.0, 0.5)
  return model


def save_hf_vl_model(name: str, folder, seed: int = 0):
  model = make_hf_vl_model(name, seed)
  model.save_pretrained(str(folder))
  return model


# The Qwen3 tokenizer's vocabulary size and Qwen-VL special ids (image, video, start, end).
QWEN3_VOCAB, QWEN3_VL_SPECIAL = 151_936, (151_655, 151_656, 151_652, 151_653)


def save_hf_vl_folder_with_tokenizer(name: str, folder, tokenizer_dir: str, seed: int = 0,
                                     max_pixels: int = 64 * 64):
  """A tiny Qwen3-VL folder as a user has one: model weights over the real Qwen3 vocabulary,
  the tokenizer, the preprocessor_config.json of transformers' Qwen-VL image processor
  (patch size of the config, images resized to at most `max_pixels`) and the
  video_preprocessor_config.json of its Qwen3VLVideoProcessor, as a released Qwen3-VL folder has
  them (each processor's save_pretrained file; without the video one transformers'
  AutoVideoProcessor falls back to the image settings and builds a Qwen2VLVideoProcessor)."""
  model = make_hf_vl_model(name, seed, vocab=QWEN3_VOCAB, special=QWEN3_VL_SPECIAL)
  model.save_pretrained(str(folder))
  for file in ('tokenizer.json', 'tokenizer_config.json'):
    shutil.copy(os.path.join(tokenizer_dir, file), os.path.join(str(folder), file))
  v = model.config.vision_config
  preprocessor = {'image_processor_type': 'Qwen2VLImageProcessor', 'patch_size': v.patch_size,
                  'merge_size': v.spatial_merge_size,
                  'temporal_patch_size': v.temporal_patch_size,
                  'size': {'shortest_edge': 16 * 16, 'longest_edge': max_pixels},
                  'image_mean': [0.5, 0.5, 0.5], 'image_std': [0.5, 0.5, 0.5]}
  with open(os.path.join(str(folder), 'preprocessor_config.json'), 'w') as f:
    json.dump(preprocessor, f)
  write_video_processor_config(folder, patch_size=v.patch_size)
  return model


def vision_tokens(grid, token_id: int) -> list[int]:
  """<|vision_start|> pads <|vision_end|> for one image grid (t, h, w) with 2x2 merging."""
  t, h, w = grid
  return [VSTART] + [token_id] * (t * h * w // 4) + [VEND]


def text_tokens(rng: np.random.RandomState, n: int) -> list[int]:
  return rng.randint(0, IMAGE, n).tolist()


def image_prompt(grids, text_lengths, seed: int = 0) -> list[int]:
  """Text, then each image with text after it: text_lengths has len(grids) + 1 entries."""
  rng = np.random.RandomState(seed)
  tokens = text_tokens(rng, text_lengths[0])
  for grid, n in zip(grids, text_lengths[1:]):
    tokens += vision_tokens(grid, IMAGE) + text_tokens(rng, n)
  return tokens


def video_prompt(grid, text_before: int, text_after: int, seed: int = 0) -> list[int]:
  """A video as transformers' processor lays it out: per frame, timestamp text then
  <|vision_start|> frame pads <|vision_end|>."""
  rng = np.random.RandomState(seed)
  t, h, w = grid
  tokens = text_tokens(rng, text_before)
  for _ in range(t):
    tokens += text_tokens(rng, 3) + vision_tokens((1, h, w), VIDEO)
  return tokens + text_tokens(rng, text_after)


def random_pixels(grids, config, seed: int = 0) -> np.ndarray:
  """Packed patch rows [sum t*h*w, C*T*P*P] of the right shape for the grids."""
  v = config.vision_config
  rows = sum(int(np.prod(g)) for g in grids)
  dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
  return np.random.RandomState(seed + 100).randn(rows, dim).astype(np.float32)


def hf_inputs(tokens: np.ndarray, images=None, videos=None, attention_mask=None) -> dict:
  """transformers' Qwen3-VL keyword inputs for token ids [B, T] and (pixels, grid_thw) pairs."""
  kwargs = dict(input_ids=torch.tensor(tokens),
                mm_token_type_ids=torch.tensor((tokens == IMAGE) + 2 * (tokens == VIDEO)))
  if images is not None:
    kwargs.update(pixel_values=torch.tensor(images[0]), image_grid_thw=torch.tensor(images[1]))
  if videos is not None:
    kwargs.update(pixel_values_videos=torch.tensor(videos[0]),
                  video_grid_thw=torch.tensor(videos[1]))
  if attention_mask is not None:
    kwargs['attention_mask'] = torch.tensor(np.asarray(attention_mask).astype(np.int64))
  return kwargs
