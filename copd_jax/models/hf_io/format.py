"""The Hugging Face side of a Qwen3 model: config.json <-> Qwen3Config, and the mapping between
HF tensor names and layouts and ours (each entry converts in both directions)."""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import ml_dtypes
import numpy as np

from copd_jax import finite, storage
from copd_jax.errors import UserInputError
from copd_jax.models.qwen3 import Qwen3Config

SUPPORTED_ARCHITECTURES = ('Qwen3ForCausalLM',)
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
                   'vocab.json', 'merges.txt', 'chat_template.jinja', 'generation_config.json',
                   'added_tokens.json')
# A vision-language model's image / video processor files, copied with the tokenizer's.
PROCESSOR_FILES = ('preprocessor_config.json', 'video_preprocessor_config.json',
                   'processor_config.json', 'chat_template.json')


class HFFormatError(UserInputError):
  """A Hugging Face folder that cannot be read as a Qwen3 model; the message names file and tensor."""


# ---------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------

def read_config(folder: str) -> Qwen3Config:
  return config_from_hf_dict(*read_config_json(folder))


def read_config_json(folder: str) -> tuple[dict[str, Any], str]:
  """(the folder's config.json as a dict, its path); errors name the folder or file and line."""
  path = storage.join(folder, 'config.json')
  if not storage.is_dir(folder):
    raise HFFormatError(f'{folder}: not a directory (expected a Hugging Face model folder)')
  if not storage.is_file(path):
    raise HFFormatError(f'{path}: missing config.json (expected a Hugging Face model folder)')
  try:
    return json.loads(storage.read_text(path)), path
  except json.JSONDecodeError as e:
    raise HFFormatError(f'{path}:{e.lineno}: invalid JSON: {e.msg}') from None


def config_from_hf_dict(raw: dict[str, Any], source: str = 'config.json') -> Qwen3Config:
  archs = raw.get('architectures') or []
  if raw.get('model_type') != 'qwen3' and not set(archs) & set(SUPPORTED_ARCHITECTURES):
    raise HFFormatError(
        f'{source}: unsupported architecture (model_type={raw.get("model_type")!r}, '
        f'architectures={archs}); supported: {", ".join(SUPPORTED_ARCHITECTURES)}')
  rope = raw.get('rope_parameters') or raw.get('rope_scaling') or {}
  rope_type = rope.get('rope_type', rope.get('type', 'default'))
  if rope_type != 'default':
    raise HFFormatError(f'{source}: rope type {rope_type!r} is not supported (only "default")')
  if raw.get('use_sliding_window'):
    raise HFFormatError(f'{source}: use_sliding_window=true is not supported')
  if raw.get('hidden_act', 'silu') != 'silu':
    raise HFFormatError(f'{source}: hidden_act {raw["hidden_act"]!r} is not supported (only silu)')
  try:
    heads = raw['num_attention_heads']
    return Qwen3Config(
        vocab_size=raw['vocab_size'],
        hidden_size=raw['hidden_size'],
        num_layers=raw['num_hidden_layers'],
        num_heads=heads,
        num_kv_heads=raw.get('num_key_value_heads', heads),
        head_dim=raw.get('head_dim') or raw['hidden_size'] // heads,
        intermediate_size=raw['intermediate_size'],
        rope_theta=float(rope.get('rope_theta', raw.get('rope_theta', 1_000_000.0))),
        rms_norm_eps=float(raw.get('rms_norm_eps', 1e-6)),
        tie_word_embeddings=bool(raw.get('tie_word_embeddings', False)),
        attention_bias=bool(raw.get('attention_bias', False)),
        max_position_embeddings=int(raw.get('max_position_embeddings', 40_960)),
    )
  except KeyError as e:
    raise HFFormatError(f'{source}: missing field {e.args[0]!r}') from None
  except ValueError as e:
    raise HFFormatError(f'{source}: {e}') from None


def config_to_hf_dict(config: Qwen3Config, *, dtype: str = 'float32', **extra) -> dict[str, Any]:
  import transformers  # the installed transformers writes the config format it reads back
  hf = transformers.Qwen3Config(
      vocab_size=config.vocab_size, hidden_size=config.hidden_size,
      num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
      num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
      intermediate_size=config.intermediate_size, rope_theta=config.rope_theta,
      rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=config.tie_word_embeddings,
      attention_bias=config.attention_bias,
      max_position_embeddings=config.max_position_embeddings, **extra)
  raw = hf.to_dict()
  raw['architectures'] = ['Qwen3ForCausalLM']
  raw['torch_dtype'] = raw['dtype'] = dtype
  return raw


# ---------------------------------------------------------------------------------------------
# Tensor-name mapping. Each entry: our name -> (HF name within a layer or at top level,
# function HF array -> our array, function our array -> HF array).
# ---------------------------------------------------------------------------------------------

def layer_mapping(c: Qwen3Config) -> dict[str, tuple[str, Callable, Callable]]:
  D, H, K, hd = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
  same = lambda x: x
  def proj_in(heads):   # HF [heads*hd, D] -> ours [D, heads, hd]
    return (lambda w: w.T.reshape(D, heads, hd)), (lambda p: p.reshape(D, heads * hd).T)
  def bias(heads):
    return (lambda b: b.reshape(heads, hd)), (lambda p: p.reshape(heads * hd))
  m = {
      'input_norm': ('input_layernorm.weight', same, same),
      'q_proj': ('self_attn.q_proj.weight', *proj_in(H)),
      'k_proj': ('self_attn.k_proj.weight', *proj_in(K)),
      'v_proj': ('self_attn.v_proj.weight', *proj_in(K)),
      'o_proj': ('self_attn.o_proj.weight', lambda w: w.T.reshape(H, hd, D),
                 lambda p: p.reshape(H * hd, D).T),
      'q_norm': ('self_attn.q_norm.weight', same, same),
      'k_norm': ('self_attn.k_norm.weight', same, same),
      'post_attention_norm': ('post_attention_layernorm.weight', same, same),
      'gate_proj': ('mlp.gate_proj.weight', lambda w: w.T, lambda p: p.T),
      'up_proj': ('mlp.up_proj.weight', lambda w: w.T, lambda p: p.T),
      'down_proj': ('mlp.down_proj.weight', lambda w: w.T, lambda p: p.T),
  }
  if c.attention_bias:
    m.update({
        'q_bias': ('self_attn.q_proj.bias', *bias(H)),
        'k_bias': ('self_attn.k_proj.bias', *bias(K)),
        'v_bias': ('self_attn.v_proj.bias', *bias(K)),
        'o_bias': ('self_attn.o_proj.bias', lambda b: b, lambda p: p),
    })
  return m


def top_mapping(c: Qwen3Config) -> dict[str, tuple[str, Callable, Callable]]:
  m = {'embed': ('model.embed_tokens.weight', lambda w: w, lambda p: p),
       'final_norm': ('model.norm.weight', lambda w: w, lambda p: p)}
  if not c.tie_word_embeddings:
    m['lm_head'] = ('lm_head.weight', lambda w: w.T, lambda p: p.T)
  return m



@dataclasses.dataclass(frozen=True)
class TensorLayout:
  """How our array of a mapping entry lays out the HF tensor's values, as data, so a block of
  ours can be read without the rest (hf_io/read.py's sliced reads): the HF tensor, transposed
  when `transposed` (2-D), with its axis `split` cut into two axes of ours (e.g. heads x
  head_dim); tests/test_hf_io.py checks every entry against its to_ours function."""
  transposed: bool = False
  split: int | None = None


def layer_layouts(c: Qwen3Config) -> dict[str, TensorLayout]:
  """The `TensorLayout` of every `layer_mapping` entry."""
  out = {name: TensorLayout() for name in layer_mapping(c)}
  out.update({name: TensorLayout(transposed=True, split=1)
              for name in ('q_proj', 'k_proj', 'v_proj')})
  out['o_proj'] = TensorLayout(transposed=True, split=0)
  out.update({name: TensorLayout(transposed=True)
              for name in ('gate_proj', 'up_proj', 'down_proj')})
  if c.attention_bias:
    out.update({name: TensorLayout(split=0) for name in ('q_bias', 'k_bias', 'v_bias')})
  return out


def top_layouts(c: Qwen3Config) -> dict[str, TensorLayout]:
  """The `TensorLayout` of every `top_mapping` entry."""
  out = {name: TensorLayout() for name in top_mapping(c)}
  if 'lm_head' in out:
    out['lm_head'] = TensorLayout(transposed=True)
  return out


def check_weight_values(array, hf_name: str, path: str) -> None:
  """Refuses a weight that is not floating point (integer tensors would be used as floats) or
  holds NaN / inf (every output would be NaN), naming the tensor and its file."""
  dtype = np.asarray(array).dtype
  if not (np.issubdtype(dtype, np.floating) or dtype == ml_dtypes.bfloat16):
    raise HFFormatError(f'{path}: tensor {hf_name} has dtype {dtype}; weights must be floating '
                        'point')
  bad = finite.nonfinite_count(array)
  if bad:
    raise HFFormatError(f'{path}: tensor {hf_name} has {bad:,} of {np.asarray(array).size:,} '
                        'values NaN or inf')
