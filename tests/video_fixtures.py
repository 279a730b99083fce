"""Videos for the tests: frames written as a data row holds them (a folder of frame images, a list
of frame paths, a `.npy` array), the video processor settings a released Qwen3-VL folder has,
and transformers' own Qwen3VLProcessor built from a folder's pieces as the reference."""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

# A Qwen3-VL-style chat template: per content item an image / video placeholder or the text.
VL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.content is string %}{{ m.content }}{% else %}{% for item in m.content %}"
    "{% if item.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item.type == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item.type == 'text' %}{{ item.text }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def video_frames(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
  """Random RGB frames [T, H, W, 3] uint8."""
  rng = np.random.RandomState(seed)
  return rng.randint(0, 256, (num_frames, height, width, 3), dtype=np.uint8)


def write_video(folder, name: str, frames: np.ndarray, form: str):
  """`frames` stored under folder/name as a row's video field takes them; returns the field
  value (relative to folder). form: 'folder' (frame_1.png ... frame_T.png, numbers not
  zero-padded, so name order is not number order past 9), 'frame_list' (the same files listed
  in order) or 'npy' (one array file)."""
  if form == 'npy':
    np.save(os.path.join(str(folder), f'{name}.npy'), frames)
    return f'{name}.npy'
  os.makedirs(os.path.join(str(folder), name))
  paths = [f'{name}/frame_{i + 1}.png' for i in range(len(frames))]
  for path, frame in zip(paths, frames):
    Image.fromarray(frame).save(os.path.join(str(folder), path))
  return name if form == 'folder' else paths


def write_video_processor_config(folder, patch_size: int = 16, max_pixels: int = 6 * 64 * 64,
                                 min_pixels: int = 32 * 32) -> None:
  """video_preprocessor_config.json as Qwen3-VL releases have it (transformers'
  Qwen3VLVideoProcessor), with small pixel bounds so test videos give small grids: a video's
  frames together hold at most max_pixels after resizing."""
  settings = dict(video_processor_type='Qwen3VLVideoProcessor', patch_size=patch_size,
                  temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                  size={'shortest_edge': min_pixels, 'longest_edge': max_pixels},
                  processor_class='Qwen3VLProcessor')
  with open(os.path.join(str(folder), 'video_preprocessor_config.json'), 'w') as f:
    json.dump(settings, f)


def reference_processor(folder, tokenizer):
  """transformers' Qwen3VLProcessor of a model folder, built with transformers' own loaders."""
  import transformers
  return transformers.Qwen3VLProcessor(
      image_processor=transformers.AutoImageProcessor.from_pretrained(str(folder)),
      tokenizer=tokenizer,
      video_processor=transformers.AutoVideoProcessor.from_pretrained(str(folder)))
