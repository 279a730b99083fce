"""The built-in toy Qwen3-VL (`model.source='toy_vl'`): the toy character decoder (`model.toy`)
with a small vision tower (`model.toy_vision`), the character tokenizer with Qwen-VL's vision
tokens, and transformers' Qwen-VL image / video processor settings for the toy pictures.

Its base folder (<workdir>/base, written by copd_jax/warmstart_vl.py) is an ordinary Hugging Face
Qwen3-VL folder: weights and config.json (`hf_io_vl.save_vl_hf_folder`), the tokenizer with its
chat template, preprocessor_config.json (Qwen2VLImageProcessor) and
video_preprocessor_config.json (Qwen3VLVideoProcessor). Pictures are resized, normalised and
patched by those transformers processors (`vision_inputs.load_vision_processor` reads them back),
never here: a 96 x 96 image becomes a 6 x 6 grid of 16 x 16 patches, 9 merged tokens; a video of
4 frames of 64 x 64 two temporal patches of 4 x 4, 4 merged tokens each.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import numpy as np

from copd_jax.fields import named_by_config
from copd_jax.models.presets import toy_model_config
from copd_jax.models.qwen3_vl import Qwen3VLConfig
from copd_jax.models.qwen3_vl_vision import VisionConfig
from copd_jax.models.tokenizer import VISION_TOKENS, char_tokenizer
from copd_jax.vision_inputs import VisionProcessor, load_vision_processor

TOY_VISION_FIELDS = ('depth', 'hidden_size', 'intermediate_size', 'num_heads', 'patch_size',
                     'num_position_embeddings', 'deepstack_visual_indexes', 'mrope_section',
                     'max_image_pixels')
# Images and frames are normalised to [-1, 1] (the fixtures' and Qwen3-VL's own mean / std).
_MEAN_STD = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
TEMPORAL_PATCH, MERGE = 2, 2


def toy_vl_model_config(toy, toy_vision) -> Qwen3VLConfig:
  """The toy Qwen3-VL's architecture from config.model.toy (decoder) and config.model.toy_vision
  (tower); a bad value raises naming its config field."""
  text = toy_model_config(toy)
  tokenizer_ids = dict(zip(('vision_start_token_id', 'vision_end_token_id', 'image_token_id',
                            'video_token_id'),
                           char_tokenizer(vision=True).convert_tokens_to_ids(list(VISION_TOKENS))))
  names = {name: f'model.toy_vision.{name}' for name in TOY_VISION_FIELDS}
  names['vision.deepstack_visual_indexes'] = 'model.toy_vision.deepstack_visual_indexes'
  with named_by_config(names):
    vision = VisionConfig(
        depth=toy_vision.depth, hidden_size=toy_vision.hidden_size,
        intermediate_size=toy_vision.intermediate_size, num_heads=toy_vision.num_heads,
        out_hidden_size=text.hidden_size,
        num_position_embeddings=toy_vision.num_position_embeddings,
        deepstack_visual_indexes=tuple(toy_vision.deepstack_visual_indexes), in_channels=3,
        patch_size=toy_vision.patch_size, temporal_patch_size=TEMPORAL_PATCH,
        spatial_merge_size=MERGE)
    return Qwen3VLConfig(text=text, vision=vision,
                         mrope_section=tuple(toy_vision.mrope_section), **tokenizer_ids)


def processor_files(toy_vision) -> dict[str, dict]:
  """preprocessor_config.json and video_preprocessor_config.json of the toy model: transformers'
  Qwen-VL processors with the tower's patch size and pictures capped at
  toy_vision.max_image_pixels (per image; per frame for a video), never upscaled past their
  size (the minimum is one merged token)."""
  factor = toy_vision.patch_size * MERGE
  common = dict(patch_size=toy_vision.patch_size, temporal_patch_size=TEMPORAL_PATCH,
                merge_size=MERGE, **_MEAN_STD)
  image = dict(image_processor_type='Qwen2VLImageProcessor',
               size={'shortest_edge': factor * factor,
                     'longest_edge': int(toy_vision.max_image_pixels)}, **common)
  # The video processor's size bounds are over all frames (t x h x w); the rows give their own
  # frames (vision_inputs samples none), so a 4-frame clip may have 4 x max_image_pixels.
  video = dict(video_processor_type='Qwen3VLVideoProcessor', do_sample_frames=False,
               size={'shortest_edge': factor * factor * TEMPORAL_PATCH,
                     'longest_edge': int(toy_vision.max_image_pixels) * 4},
               cap_pixels_per_frame=False, **common)
  return {'preprocessor_config.json': image, 'video_preprocessor_config.json': video}


def write_processor_files(folder: str, toy_vision) -> None:
  for name, content in processor_files(toy_vision).items():
    with open(os.path.join(folder, name), 'w') as f:
      json.dump(content, f, indent=2)


def toy_vision_processor(toy_vision) -> VisionProcessor:
  """transformers' processors of the toy model, as `load_vision_processor` reads them from its
  base folder (written to a temporary folder and read back the same way)."""
  with tempfile.TemporaryDirectory() as folder:
    write_processor_files(folder, toy_vision)
    processor = load_vision_processor(folder)
  # Why videos cannot be used names the model, not the temporary folder.
  return dataclasses.replace(processor, video_problem=processor.video_problem.replace(
      f'of {folder}', "of the toy Qwen3-VL (model.source='toy_vl')"))


def save_toy_vl_folder(params: dict, config: Qwen3VLConfig, out_dir: str, toy_vision) -> None:
  """The toy Qwen3-VL as a complete Hugging Face folder: weights, config.json, the tokenizer
  with its chat template, and the processor files."""
  from copd_jax.models import hf_io_vl
  tokenizer = char_tokenizer(vision=True)
  with tempfile.TemporaryDirectory() as staging:
    tokenizer.save_pretrained(staging)
    write_processor_files(staging, toy_vision)
    ids = {f'{k}_id': getattr(tokenizer, f'{k}_id') for k in ('bos_token', 'eos_token',
                                                              'pad_token')}
    hf_io_vl.save_vl_hf_folder(params, config, out_dir, tokenizer_from=staging, dtype=np.float32,
                               generation=ids)
