"""Text + pictures -> a Qwen3-VL prompt: token ids with the right runs of `<|image_pad|>` /
`<|video_pad|>` tokens, and the packed pixel rows and grids the vision tower reads.

Pixels always come from transformers' Qwen-VL processors, configured by the model folder's
`preprocessor_config.json` (their resizing, normalisation and patch order; nothing here resizes):
- images: `AutoImageProcessor` (the PIL backend when torchvision is absent); each placeholder
  `<|image_pad|>` of the text then becomes t*h*w / merge^2 pad tokens, transformers'
  `Qwen3VLProcessor.replace_image_token` rule (`expand_image_pads`);
- videos: the whole `AutoProcessor` of the folder (frame sampling, timestamp text between the
  frames, pad expansion), which needs torchvision; without it a video is refused in one line.

A prompt text marks where each picture goes with `IMAGE_PLACEHOLDER` / `VIDEO_PLACEHOLDER` (as
the Qwen3-VL chat template renders an image / video item); `placeholders` builds that prefix.
Data pipelines (JSONL rows with image paths) can reuse `load_image`, `preprocess_images` and
`expand_image_pads` the same way: render the row's text with placeholders, tokenize, process the
row's images, expand.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from copd_jax.errors import UserInputError
from copd_jax.models.qwen3_vl import Qwen3VLConfig

IMAGE_PLACEHOLDER = '<|vision_start|><|image_pad|><|vision_end|>'
# The processor replaces the bare video pad with `<t seconds><|vision_start|>pads<|vision_end|>`
# per temporal patch (Qwen3VLProcessor.replace_video_token), so the marker is the pad alone.
VIDEO_PLACEHOLDER = '<|video_pad|>'
_PREPROCESSOR = 'preprocessor_config.json'


@dataclasses.dataclass(frozen=True)
class VisualPrompt:
  """One prompt: token ids and the pictures' packed pixel rows [N, patch_dim] and grids [n, 3]
  (None when the prompt has no image / no video), in prompt order."""
  input_ids: list[int]
  image_pixels: np.ndarray | None = None
  image_grid_thw: np.ndarray | None = None
  video_pixels: np.ndarray | None = None
  video_grid_thw: np.ndarray | None = None


def placeholders(num_images: int, num_videos: int = 0) -> str:
  """The text before a user prompt that places its images, then its videos."""
  return IMAGE_PLACEHOLDER * num_images + VIDEO_PLACEHOLDER * num_videos


def load_image(path: str, flag: str = '--image'):
  """A PIL RGB image; a missing, unreadable or oversized (decompression bomb) file is one line
  naming it."""
  from PIL import Image, UnidentifiedImageError
  if not os.path.isfile(path):
    raise UserInputError(f'{flag} {path}: no such file')
  try:
    with Image.open(path) as image:
      return image.convert('RGB')
  except Image.DecompressionBombError as e:
    raise UserInputError(f'{flag} {path}: refused, too many pixels ({e})') from None
  except (UnidentifiedImageError, OSError) as e:
    raise UserInputError(f'{flag} {path}: not a readable image ({e})') from None


def _require_preprocessor(folder: str, flag: str) -> None:
  if not os.path.isfile(os.path.join(folder, _PREPROCESSOR)):
    raise UserInputError(f'{flag}: {os.path.join(folder, _PREPROCESSOR)} is missing (the Qwen-VL '
                         'processor settings of the model folder)')


def preprocess_images(folder: str, images: list) -> tuple[np.ndarray, np.ndarray]:
  """(pixel rows [N, patch_dim] fp32, grids [n, 3] int) of PIL images, by the folder's image
  processor."""
  import transformers
  _require_preprocessor(folder, '--image')
  processor = transformers.AutoImageProcessor.from_pretrained(folder)
  out = processor(images=images, return_tensors='np')
  return (np.asarray(out['pixel_values'], np.float32),
          np.asarray(out['image_grid_thw'], np.int64).reshape(-1, 3))


def expand_image_pads(ids: list[int], grids: np.ndarray, config: Qwen3VLConfig) -> list[int]:
  """Each image pad token of `ids` (one per image, in order) -> t*h*w / merge^2 of them."""
  pad, merge = config.image_token_id, config.vision.spatial_merge_size
  found = sum(1 for i in ids if i == pad)
  if found != len(grids):
    raise UserInputError(f'--prompt: the text places {found} image(s) (<|image_pad|> tokens) '
                         f'but {len(grids)} were given')
  counts = iter(int(np.prod(g)) // merge ** 2 for g in grids)
  out: list[int] = []
  for i in ids:
    out.extend([pad] * next(counts) if i == pad else [i])
  return out


def _video_frames(path: str):
  """A folder of frame images (sorted by name) as one [T, H, W, 3] uint8 array, or a video file's
  path (decoded by transformers' video loader)."""
  if not os.path.isdir(path):
    if not os.path.isfile(path):
      raise UserInputError(f'--video {path}: no such file or folder')
    return path
  names = sorted(n for n in os.listdir(path) if not n.startswith('.'))
  if not names:
    raise UserInputError(f'--video {path}: the folder holds no frames')
  frames = [np.asarray(load_image(os.path.join(path, n), '--video')) for n in names]
  if len({f.shape for f in frames}) != 1:
    raise UserInputError(f'--video {path}: frames of different sizes')
  return np.stack(frames)


def encode_with_processor(folder: str, text: str, images: list, video_paths: list[str]
                          ) -> VisualPrompt:
  """Tokens and pixels of `text` (with placeholders) through the folder's whole AutoProcessor,
  as transformers prepares a Qwen3-VL video prompt."""
  import transformers
  _require_preprocessor(folder, '--video')
  try:
    processor = transformers.AutoProcessor.from_pretrained(folder)
  except (ImportError, AttributeError, ValueError, OSError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserInputError(f'--video: transformers cannot build the Qwen3-VL processor of {folder} '
                         f'(its video processor needs torchvision): {first}') from None
  videos = [_video_frames(p) for p in video_paths]
  out = processor(text=[text], images=images or None, videos=videos, return_tensors='np')
  grid = lambda key: None if key not in out else np.asarray(out[key], np.int64).reshape(-1, 3)
  pixels = lambda key: None if key not in out else np.asarray(out[key], np.float32)
  return VisualPrompt([int(i) for i in out['input_ids'][0]], pixels('pixel_values'),
                      grid('image_grid_thw'), pixels('pixel_values_videos'),
                      grid('video_grid_thw'))


def encode_visual_prompt(folder: str, config: Qwen3VLConfig, text: str, ids: list[int],
                         image_paths: list[str], video_paths: list[str] = ()) -> VisualPrompt:
  """The prompt of `text` (rendered, with placeholders; `ids` its tokens) with the images and
  videos at those paths, in order."""
  images = [load_image(p) for p in image_paths]
  if video_paths:
    return encode_with_processor(folder, text, images, list(video_paths))
  if not images:
    return VisualPrompt(list(ids))
  pixels, grids = preprocess_images(folder, images)
  return VisualPrompt(expand_image_pads(list(ids), grids, config), pixels, grids)
