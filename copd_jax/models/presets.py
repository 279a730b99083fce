"""Models by name: the released Qwen3 and Qwen3-VL architectures (`model.preset`), the built-in
toy character model (`model.toy`) and the dtype names of `model.compute_dtype` / `param_dtype`."""
from __future__ import annotations

import jax.numpy as jnp

from copd_jax.fields import named_by_config
from copd_jax.models.qwen3 import Qwen3Config
from copd_jax.models.qwen3_vl import Qwen3VLConfig
from copd_jax.models.qwen3_vl_vision import VisionConfig
from copd_jax.models.tokenizer import char_vocab_size

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def _qwen3(hidden: int, layers: int, heads: int, mlp: int, tied: bool) -> Qwen3Config:
  return Qwen3Config(vocab_size=151_936, hidden_size=hidden, num_layers=layers, num_heads=heads,
                     num_kv_heads=8, head_dim=128, intermediate_size=mlp, rope_theta=1_000_000.0,
                     rms_norm_eps=1e-6, tie_word_embeddings=tied, max_position_embeddings=40_960)


# Architectures of the released Qwen3 dense models (their config.json files). Parameter counts
# (Qwen3Config.num_params): 0.6B 596,049,920; 1.7B 1,720,574,976; 4B 4,022,468,096;
# 8B 8,190,735,360.
QWEN3_PRESETS: dict[str, Qwen3Config] = {
    'qwen3-0.6b': _qwen3(1024, 28, 16, 3072, tied=True),
    'qwen3-1.7b': _qwen3(2048, 28, 16, 6144, tied=True),
    'qwen3-4b': _qwen3(2560, 36, 32, 9728, tied=True),
    'qwen3-8b': _qwen3(4096, 36, 32, 12288, tied=False),
}

# Qwen3-VL-4B-Instruct's config.json (text_config, vision_config, rope_scaling.mrope_section):
# 4,437,815,808 parameters (Qwen3VLForConditionalGeneration's, vision tower included).
QWEN3_VL_PRESETS: dict[str, Qwen3VLConfig] = {
    'qwen3-vl-4b': Qwen3VLConfig(
        text=Qwen3Config(vocab_size=151_936, hidden_size=2560, num_layers=36, num_heads=32,
                         num_kv_heads=8, head_dim=128, intermediate_size=9728,
                         rope_theta=5_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                         max_position_embeddings=262_144),
        vision=VisionConfig(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                            out_hidden_size=2560, num_position_embeddings=2304,
                            deepstack_visual_indexes=(5, 11, 17), in_channels=3, patch_size=16,
                            temporal_patch_size=2, spatial_merge_size=2),
        mrope_section=(24, 20, 20)),
}

# Every `model.preset` name.
MODEL_PRESETS: dict[str, Qwen3Config | Qwen3VLConfig] = {**QWEN3_PRESETS, **QWEN3_VL_PRESETS}


def preset_text_config(name: str) -> Qwen3Config:
  """The decoder of preset `name` (a Qwen3-VL preset's text side)."""
  model = MODEL_PRESETS[name]
  return model.text if isinstance(model, Qwen3VLConfig) else model


TOY_FIELDS = ('hidden_size', 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim',
              'intermediate_size')


def toy_model_config(toy) -> Qwen3Config:
  """The built-in character model's architecture from config.model.toy; a bad value raises
  naming its config.model.toy field."""
  with named_by_config({name: f'model.toy.{name}' for name in TOY_FIELDS}):
    return Qwen3Config(vocab_size=char_vocab_size(), rope_theta=10_000.0,
                       tie_word_embeddings=True, max_position_embeddings=512,
                       **{name: toy[name] for name in TOY_FIELDS})
