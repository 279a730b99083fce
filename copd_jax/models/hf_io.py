"""Hugging Face folders <-> copd_jax Qwen3 parameters.

Reading streams tensor by tensor out of (possibly sharded) safetensors into preallocated stacked
numpy arrays, so peak host memory is about one copy of the model. Only safetensors are read;
pickled `.bin` checkpoints are refused. Writing produces config.json + safetensors (sharded with
an index above `max_shard_bytes`) that `transformers.AutoModelForCausalLM.from_pretrained` loads.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from copd_jax.errors import UserInputError
from copd_jax.models.qwen3 import Qwen3, Qwen3Config

SUPPORTED_ARCHITECTURES = ('Qwen3ForCausalLM',)
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
                   'vocab.json', 'merges.txt', 'chat_template.jinja', 'generation_config.json',
                   'added_tokens.json')
_LAYER_RE = re.compile(r'^model\.layers\.(\d+)\.(.+)$')


class HFFormatError(UserInputError):
  """A Hugging Face folder that cannot be read as a Qwen3 model; the message names file and tensor."""


# ---------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------

def read_config(folder: str) -> Qwen3Config:
  path = os.path.join(folder, 'config.json')
  if not os.path.isdir(folder):
    raise HFFormatError(f'{folder}: not a directory (expected a Hugging Face model folder)')
  if not os.path.isfile(path):
    raise HFFormatError(f'{path}: missing config.json (expected a Hugging Face model folder)')
  try:
    with open(path) as f:
      raw = json.load(f)
  except json.JSONDecodeError as e:
    raise HFFormatError(f'{path}:{e.lineno}: invalid JSON: {e.msg}') from None
  return config_from_hf_dict(raw, path)


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


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

def tensor_files(folder: str) -> dict[str, str]:
  """HF tensor name -> safetensors file path."""
  index = os.path.join(folder, 'model.safetensors.index.json')
  single = os.path.join(folder, 'model.safetensors')
  if os.path.isfile(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)['weight_map']
    except (json.JSONDecodeError, KeyError) as e:
      raise HFFormatError(f'{index}: not a valid safetensors index ({e})') from None
    return {name: os.path.join(folder, file) for name, file in weight_map.items()}
  if os.path.isfile(single):
    try:
      with safe_open(single, framework='numpy') as f:
        return {name: single for name in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a corrupt header
      raise HFFormatError(f'{single}: unreadable safetensors file ({e})') from None
  if any(name.endswith('.bin') for name in os.listdir(folder)):
    raise HFFormatError(f'{folder}: only pickle (.bin) weights found; copd_jax reads safetensors '
                        'only (convert with transformers: save_pretrained(safe_serialization=True))')
  raise HFFormatError(f'{folder}: no model.safetensors or model.safetensors.index.json')


def _read_tensors(files: dict[str, str], wanted: list[str]) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (name, array) for `wanted` names, opening each file once."""
  by_file: dict[str, list[str]] = {}
  for name in wanted:
    by_file.setdefault(files[name], []).append(name)
  for path, names in by_file.items():
    if not os.path.isfile(path):
      raise HFFormatError(f'{path}: missing safetensors shard (needed for tensor {names[0]})')
    try:
      with safe_open(path, framework='numpy') as f:
        for name in names:
          yield name, f.get_tensor(name)
    except HFFormatError:
      raise
    except Exception as e:
      raise HFFormatError(f'{path}: cannot read tensor {names[0]} ({e})') from None


def _as_float_numpy(x: np.ndarray, dtype) -> np.ndarray:
  # safetensors' numpy backend returns bf16 as ml_dtypes.bfloat16; casting goes through float32.
  return np.asarray(x).astype(np.float32).astype(dtype) if x.dtype != dtype else x


def load_params(folder: str, config: Qwen3Config | None = None,
                param_dtype=np.float32) -> dict[str, Any]:
  """Reads the folder's safetensors into the nested dict layout of `nnx.state(Qwen3, Param)`."""
  config = config or read_config(folder)
  files = tensor_files(folder)
  top, per_layer = top_mapping(config), layer_mapping(config)
  expected = _expected_shapes(config)
  params: dict[str, Any] = {'layers': {}}
  for name, (shape, _, _) in expected['layers'].items():
    params['layers'][name] = np.empty(shape, param_dtype)

  wanted = [hf for hf, _, _ in top.values()]
  for i in range(config.num_layers):
    wanted += [f'model.layers.{i}.{hf}' for hf, _, _ in per_layer.values()]
  missing = [n for n in wanted if n not in files]
  if missing:
    where = sorted(set(files.values())) or [folder]
    raise HFFormatError(f'{where[0]}: missing tensor {missing[0]}'
                        + (f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''))
  hf_to_ours = {hf: (ours, to_ours) for ours, (hf, to_ours, _) in top.items()}
  layer_hf_to_ours = {hf: (ours, to_ours) for ours, (hf, to_ours, _) in per_layer.items()}

  for hf_name, array in _read_tensors(files, wanted):
    layer_match = _LAYER_RE.match(hf_name)
    if layer_match:
      i, rest = int(layer_match.group(1)), layer_match.group(2)
      ours, to_ours = layer_hf_to_ours[rest]
      target_shape = expected['layers'][ours][0][1:]
    else:
      ours, to_ours = hf_to_ours[hf_name]
      target_shape = expected[ours][0]
    value = _convert(array, to_ours, target_shape, hf_name, files[hf_name])
    if layer_match:
      params['layers'][ours][i] = _as_float_numpy(value, param_dtype)
    else:
      params[ours] = _as_float_numpy(value, param_dtype)
  return params


def _convert(array, to_ours, target_shape, hf_name, path):
  try:
    value = to_ours(array)
  except ValueError:
    value = None
  if value is None or tuple(value.shape) != tuple(target_shape):
    raise HFFormatError(f'{path}: tensor {hf_name} has shape {tuple(array.shape)}, which does not '
                        f'match config.json (expected {_hf_shape_hint(target_shape, hf_name)})')
  return value


def _hf_shape_hint(target_shape, hf_name) -> str:
  return f'a tensor that maps to {tuple(target_shape)} for {hf_name.rsplit(".", 1)[0]}'


def _expected_shapes(config: Qwen3Config) -> dict[str, Any]:
  abstract = nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0)))
  state = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  out = jax.tree.map(lambda s: (tuple(s.shape), None, None), state)
  return out


def load_model(folder: str, *, param_dtype=jnp.float32, compute_dtype=jnp.float32,
               remat: bool = False, scan_layers: bool = True) -> Qwen3:
  """A Qwen3 module holding the folder's weights (on the default device)."""
  config = read_config(folder)
  model = nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0), param_dtype=param_dtype,
                                       compute_dtype=compute_dtype, remat=remat,
                                       scan_layers=scan_layers))
  params = load_params(folder, config, np.dtype(param_dtype))
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  nnx.update(model, state)
  return model


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def params_to_hf_tensors(params: dict[str, Any], config: Qwen3Config,
                         dtype=np.float32) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (HF name, array) one tensor at a time from a pure-dict parameter tree."""
  for ours, (hf, _, to_hf) in top_mapping(config).items():
    yield hf, np.ascontiguousarray(to_hf(np.asarray(params[ours])).astype(dtype))
  for i in range(config.num_layers):
    for ours, (hf, _, to_hf) in layer_mapping(config).items():
      layer_value = np.asarray(params['layers'][ours][i])
      yield f'model.layers.{i}.{hf}', np.ascontiguousarray(to_hf(layer_value).astype(dtype))


def save_hf_folder(params: dict[str, Any], config: Qwen3Config, out_dir: str, *,
                   tokenizer_from: str | None = None, tokenizer=None, dtype=np.float32,
                   max_shard_bytes: int = 5 * 2**30, generation: dict[str, Any] | None = None):
  """Writes a Hugging Face folder. The folder is built under a temporary name and renamed into
  place, so an interrupted export never leaves a complete-looking half model."""
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f'.{os.path.basename(os.path.abspath(out_dir))}.tmp-{os.getpid()}')
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)

  # Shards are written as soon as they fill (host memory stays near one shard), under
  # provisional names that are fixed once the shard count is known.
  written: list[tuple[str, list[str], int]] = []   # (file, tensor names, bytes)
  shard: dict[str, np.ndarray] = {}
  metadata = {'format': 'pt'}

  def flush():
    file = f'shard-{len(written):05d}.safetensors'
    save_file(shard, os.path.join(tmp, file), metadata=metadata)
    written.append((file, list(shard), sum(a.nbytes for a in shard.values())))
    shard.clear()

  for name, array in params_to_hf_tensors(params, config, dtype):
    if shard and sum(a.nbytes for a in shard.values()) + array.nbytes > max_shard_bytes:
      flush()
    shard[name] = array
  flush()
  if len(written) == 1:
    os.replace(os.path.join(tmp, written[0][0]), os.path.join(tmp, 'model.safetensors'))
  else:
    weight_map = {}
    for k, (file, names, _) in enumerate(written):
      final = f'model-{k + 1:05d}-of-{len(written):05d}.safetensors'
      os.replace(os.path.join(tmp, file), os.path.join(tmp, final))
      weight_map.update({name: final for name in names})
    with open(os.path.join(tmp, 'model.safetensors.index.json'), 'w') as f:
      json.dump({'metadata': {'total_size': sum(b for _, _, b in written)},
                 'weight_map': weight_map}, f, indent=2)

  token_ids = {}
  if tokenizer_from:
    for file in TOKENIZER_FILES:
      src = os.path.join(tokenizer_from, file)
      if os.path.isfile(src):
        shutil.copy(src, tmp)
  if tokenizer is not None:
    tokenizer.save_pretrained(tmp)
    token_ids = {k: getattr(tokenizer, f'{k}_id', None) for k in ('bos_token', 'eos_token',
                                                                  'pad_token')}
  extra = {f'{k}_id': v for k, v in token_ids.items() if v is not None}
  extra.update(generation or {})
  dtype_name = np.dtype(dtype).name if dtype is not jnp.bfloat16 else 'bfloat16'
  with open(os.path.join(tmp, 'config.json'), 'w') as f:
    json.dump(config_to_hf_dict(config, dtype=dtype_name, **extra), f, indent=2)

  if os.path.exists(out_dir):
    shutil.rmtree(out_dir)
  os.replace(tmp, out_dir)


def model_params_dict(model: Qwen3) -> dict[str, Any]:
  """Pure nested dict of the model's parameter arrays (the layout `save_hf_folder` takes)."""
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))
