"""The image- and video-prompt workloads of benchmarks/sampler.py (`--prompts image|video`): a
random tiny Qwen3-VL saved once as a Hugging Face folder, the same prompts and pixels on both
sides, and the two workers, copd_jax's `sampling.generate` with images / videos and
transformers' `generate` (PyTorch, CPU) on the same weights, both greedy so their tokens can be
compared.

Workload: text decoder hidden 256, 4 layers, 8 q / 4 kv heads, head_dim 32, intermediate 768,
vocab 256, M-RoPE sections (4, 6, 6); vision tower depth 4, hidden 128, patch 16, two deepstack
taps; fp32; an EOS id outside the vocabulary so every row generates all its tokens. Every
prompt is 8 text tokens, its pictures, 8 text tokens, with 256 patches of pictures either way:
  image: one 256x256 image (16x16 patches -> 64 merged tokens between <|vision_start|> /
         <|vision_end|>; 82 tokens);
  video: 4 frames of 256x128 (2 temporal patches of 16x8 patches, 32 merged tokens each), laid
         out as transformers' Qwen3VLProcessor lays out a video: <|vision_start|>, per temporal
         patch 3 timestamp text tokens then <|vision_start|> pads <|vision_end|>, then
         <|vision_end|> (92 tokens); the tower attends within each frame (two 128-patch
         blocks), M-RoPE gives each frame its own grid.
"""
from __future__ import annotations

import hashlib

import numpy as np

VOCAB = 256
IMAGE, VIDEO, VSTART, VEND = 250, 251, 252, 253
GRIDS = {'image': (1, 16, 16), 'video': (2, 16, 8)}
TIMESTAMP_TOKENS = 3   # '<0.0 seconds>'-like text before each temporal patch of a video
TEXT_BEFORE = TEXT_AFTER = 8
TEXT = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4, head_dim=32, vocab_size=VOCAB,
            rope_parameters=dict(rope_type='default', rope_theta=1_000_000.0,
                                 mrope_section=[4, 6, 6], mrope_interleaved=True))
VISION = dict(depth=4, hidden_size=128, intermediate_size=384, num_heads=4,
              num_position_embeddings=256, deepstack_visual_indexes=[1, 3], patch_size=16,
              temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=256)


def save_folder(folder: str) -> None:
  """The random model (torch seed 0) as a Hugging Face folder both workers load."""
  import torch
  import transformers
  torch.manual_seed(0)
  config = transformers.Qwen3VLConfig(
      text_config=TEXT, vision_config=VISION, image_token_id=IMAGE, video_token_id=VIDEO,
      vision_start_token_id=VSTART, vision_end_token_id=VEND, tie_word_embeddings=False)
  transformers.Qwen3VLForConditionalGeneration(config).save_pretrained(folder)


def _pictures(rng: np.random.RandomState, kind: str) -> list[int]:
  """The token run of one prompt's picture: an image's pads, or a video's frames with their
  timestamp text (module docstring)."""
  t, h, w = GRIDS[kind]
  if kind == 'image':
    return [VSTART] + [IMAGE] * (t * h * w // 4) + [VEND]
  frames = [rng.randint(3, IMAGE, TIMESTAMP_TOKENS).tolist() + [VSTART]
            + [VIDEO] * (h * w // 4) + [VEND] for _ in range(t)]
  return [VSTART] + sum(frames, []) + [VEND]


def prompts(batch: int, kind: str = 'image') -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(token ids [batch, 82 or 92], pixel rows [batch * 256, 1536] fp32, grids [batch, 3]) of
  image or video prompts."""
  rng = np.random.RandomState(0)
  rows = [rng.randint(3, IMAGE, TEXT_BEFORE).tolist() + _pictures(rng, kind)
          + rng.randint(3, IMAGE, TEXT_AFTER).tolist() for _ in range(batch)]
  patch_dim = 3 * VISION['temporal_patch_size'] * VISION['patch_size'] ** 2
  grid = GRIDS[kind]
  pixels = rng.randn(batch * int(np.prod(grid)), patch_dim).astype(np.float32)
  return np.array(rows), pixels, np.array([grid] * batch)


def digest(tokens: np.ndarray) -> str:
  """A short hash of generated tokens: equal on both sides when the samplers agree."""
  return hashlib.sha256(np.asarray(tokens, np.int64).tobytes()).hexdigest()[:16]


def ours_worker(folder: str, batch: int, new_tokens: int, kind: str = 'image'):
  import jax
  from copd_jax.models import hf_io_vl
  from copd_jax.models.qwen3_vl import VisualInput
  from copd_jax.sampling import SamplingParams, generate
  from copd_jax.scoring import split_model

  graphdef, params = split_model(hf_io_vl.load_vl_model(folder))
  tokens, pixels, grids = prompts(batch, kind)
  valid = np.ones(tokens.shape, bool)
  pictures = {'images' if kind == 'image' else 'videos': VisualInput.of(pixels, grids)}
  sampling = SamplingParams(max_new_tokens=new_tokens, greedy=True)

  def run(rep: int):
    out = generate(graphdef, params, tokens, valid, jax.random.key(rep), sampling,
                   eos_ids=(VOCAB,), pad_id=0, **pictures)
    generated = np.asarray(out.tokens)[:, tokens.shape[1]:]
    return int(np.asarray(out.completion_mask).sum()), digest(generated)
  return run


def transformers_worker(folder: str, batch: int, new_tokens: int, kind: str = 'image'):
  import torch
  import transformers

  torch.set_grad_enabled(False)
  model = transformers.Qwen3VLForConditionalGeneration.from_pretrained(
      folder, dtype=torch.float32).eval()
  tokens, pixels, grids = prompts(batch, kind)
  inputs = dict(input_ids=torch.tensor(tokens),
                attention_mask=torch.ones(tokens.shape, dtype=torch.long),
                mm_token_type_ids=torch.tensor(
                    ((tokens == IMAGE) + 2 * (tokens == VIDEO)).astype(np.int64)))
  if kind == 'image':
    inputs.update(pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grids))
  else:
    inputs.update(pixel_values_videos=torch.tensor(pixels), video_grid_thw=torch.tensor(grids))

  def run(rep: int):
    out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
    generated = out[:, tokens.shape[1]:].numpy()
    return int(generated.size), digest(generated)
  return run
