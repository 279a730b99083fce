"""Hugging Face folders <-> copd_jax Qwen3 parameters.

Reading streams tensor by tensor out of (possibly sharded) safetensors into preallocated stacked
numpy arrays, so peak host memory is about one copy of the model; `load_params_sharded` instead
places each (layer-stacked) tensor on the devices with its sharding as soon as it is read, so the
host holds about one stacked tensor and each device only its shards. Only safetensors are read;
pickled `.bin` checkpoints are refused. Writing produces config.json + safetensors (sharded with
an index above `max_shard_bytes`) that `transformers.AutoModelForCausalLM.from_pretrained` loads.

Folders may be local or remote (gs://...; see copd_jax/storage.py). Remote safetensors are read
with one ranged read per tensor; a remote export writes its files in place with config.json, then
the completion marker, last.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import struct
import tempfile
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save, save_file

from copd_jax import mesh as mesh_lib
from copd_jax import finite, output_paths, storage
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
  path = storage.join(folder, 'config.json')
  if not storage.is_dir(folder):
    raise HFFormatError(f'{folder}: not a directory (expected a Hugging Face model folder)')
  if not storage.is_file(path):
    raise HFFormatError(f'{path}: missing config.json (expected a Hugging Face model folder)')
  try:
    raw = json.loads(storage.read_text(path))
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
  index = storage.join(folder, 'model.safetensors.index.json')
  single = storage.join(folder, 'model.safetensors')
  if storage.is_file(index):
    try:
      weight_map = json.loads(storage.read_text(index))['weight_map']
    except (json.JSONDecodeError, KeyError) as e:
      raise HFFormatError(f'{index}: not a valid safetensors index ({e})') from None
    return {name: storage.join(folder, file) for name, file in weight_map.items()}
  if storage.is_file(single):
    try:
      with open_safetensors(single) as f:
        return {name: single for name in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a corrupt header
      raise HFFormatError(f'{single}: unreadable safetensors file ({e})') from None
  if any(name.endswith('.bin') for name in storage.listdir(folder)):
    raise HFFormatError(f'{folder}: only pickle (.bin) weights found; copd_jax reads safetensors '
                        'only (convert with transformers: save_pretrained(safe_serialization=True))')
  raise HFFormatError(f'{folder}: no model.safetensors or model.safetensors.index.json')


_SAFETENSORS_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16,
                       'BF16': ml_dtypes.bfloat16, 'I64': np.int64, 'I32': np.int32,
                       'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_}


class _StreamedSafetensors:
  """A safetensors file read through a seekable file object (remote files): the header once,
  then each tensor with one ranged read into its own array. The `safe_open` methods we use."""

  def __init__(self, path: str):
    self._file = storage.as_path(path).open('rb')
    try:
      (size,) = struct.unpack('<Q', self._file.read(8))
      header = json.loads(self._file.read(size))
    except Exception:
      self._file.close()
      raise
    header.pop('__metadata__', None)
    self._header, self._data_start = header, 8 + size

  def keys(self) -> list[str]:
    return list(self._header)

  def get_tensor(self, name: str) -> np.ndarray:
    info = self._header[name]
    begin, end = info['data_offsets']
    out = np.empty(info['shape'], _SAFETENSORS_DTYPES[info['dtype']])
    if out.nbytes != end - begin:
      raise ValueError(f'tensor {name}: {end - begin} bytes for shape {info["shape"]} '
                       f'{info["dtype"]}')
    self._file.seek(self._data_start + begin)
    view, done = memoryview(out.reshape(-1).view(np.uint8)), 0
    while done < out.nbytes:
      n = self._file.readinto(view[done:])
      if not n:
        raise ValueError(f'tensor {name}: file ends after {done} of {out.nbytes} bytes')
      done += n
    return out

  def close(self) -> None:
    self._file.close()

  def __enter__(self) -> '_StreamedSafetensors':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def open_safetensors(path: str):
  """A reader with `keys()` and `get_tensor(name)` (numpy): safetensors' memory-mapped `safe_open`
  for local files, ranged reads for remote ones. Use it as a context manager."""
  if storage.is_remote(path):
    return _StreamedSafetensors(path)
  return safe_open(path, framework='numpy')


class _TensorReader:
  """Reads HF tensors by name from a folder's safetensors files, opening each file once; errors
  name the file and the tensor."""

  def __init__(self, files: dict[str, str]):
    self._files = files
    self._open: dict[str, Any] = {}
    self._stack = contextlib.ExitStack()

  def get(self, name: str) -> np.ndarray:
    path = self._files[name]
    try:
      if path not in self._open:
        if not storage.is_file(path):
          raise HFFormatError(f'{path}: missing safetensors shard (needed for tensor {name})')
        self._open[path] = self._stack.enter_context(open_safetensors(path))
      return self._open[path].get_tensor(name)
    except HFFormatError:
      raise
    except Exception as e:
      raise HFFormatError(f'{path}: cannot read tensor {name} ({e})') from None

  def __enter__(self) -> '_TensorReader':
    return self

  def __exit__(self, *exc) -> None:
    self._stack.close()


def _as_float_numpy(x: np.ndarray, dtype) -> np.ndarray:
  # safetensors' numpy backend returns bf16 as ml_dtypes.bfloat16; casting goes through float32.
  return np.asarray(x).astype(np.float32).astype(dtype) if x.dtype != dtype else x


def _checked_files(folder: str, config: Qwen3Config) -> dict[str, str]:
  """tensor_files(folder), after checking that every tensor the config needs is listed."""
  files = tensor_files(folder)
  wanted = [hf for hf, _, _ in top_mapping(config).values()]
  for i in range(config.num_layers):
    wanted += [f'model.layers.{i}.{hf}' for hf, _, _ in layer_mapping(config).values()]
  missing = [n for n in wanted if n not in files]
  if missing:
    where = sorted(set(files.values())) or [folder]
    raise HFFormatError(f'{where[0]}: missing tensor {missing[0]}'
                        + (f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''))
  return files


def iter_params(folder: str, config: Qwen3Config | None = None, param_dtype=np.float32
                ) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
  """(key path, host array) for every parameter of the folder's model, one at a time, in the
  layout of `nnx.state(Qwen3, Param)`: top-level tensors, then each per-layer tensor stacked over
  the layers [L, ...]. Holds one stacked tensor (plus one HF tensor) at a time."""
  config = config or read_config(folder)
  files = _checked_files(folder, config)
  shapes = _expected_shapes(config)
  with _TensorReader(files) as reader:
    for ours, (hf_name, to_ours, _) in top_mapping(config).items():
      value = _convert(reader.get(hf_name), to_ours, shapes[ours], hf_name, files[hf_name])
      yield (ours,), _as_float_numpy(value, param_dtype)
    for ours, (hf, to_ours, _) in layer_mapping(config).items():
      stacked = np.empty(shapes['layers'][ours], param_dtype)
      for i in range(config.num_layers):
        hf_name = f'model.layers.{i}.{hf}'
        value = _convert(reader.get(hf_name), to_ours, stacked.shape[1:], hf_name, files[hf_name])
        stacked[i] = _as_float_numpy(value, param_dtype)
      yield ('layers', ours), stacked


def load_params(folder: str, config: Qwen3Config | None = None,
                param_dtype=np.float32) -> dict[str, Any]:
  """Reads the folder's safetensors into the nested dict layout of `nnx.state(Qwen3, Param)`."""
  params: dict[str, Any] = {}
  for path, value in iter_params(folder, config, param_dtype):
    _set(params, path, value)
  return params


def load_params_sharded(folder: str, shardings: Mapping[str, Any],
                        config: Qwen3Config | None = None, param_dtype=jnp.float32
                        ) -> dict[str, Any]:
  """The folder's parameters as jax.Arrays placed with `shardings` as they are read.

  shardings: a jax.sharding.Sharding per parameter, in the nested layout `load_params` returns
  (a pure dict, or the nnx.State that `copd_jax.mesh.state_shardings` gives for the model's
  Params). Each (layer-stacked) tensor is read on the host, every addressable device receives
  only its shard of it (`jax.make_array_from_callback`), and the host copy is dropped before the
  next tensor: host memory stays near one stacked tensor and no device holds the whole model.
  On several hosts each process reads every tensor and places only its own devices' shards.
  Raises HFFormatError as `load_params` does.
  """
  if isinstance(shardings, nnx.State):
    shardings = nnx.to_pure_dict(shardings)
  dtype = np.dtype(param_dtype)
  params: dict[str, Any] = {}
  for path, value in iter_params(folder, config, dtype):
    sharding = shardings
    try:
      for key in path:
        sharding = sharding[key]
    except (KeyError, TypeError):
      raise ValueError(f'shardings: no sharding for parameter {".".join(path)}') from None
    _set(params, path, jax.make_array_from_callback(value.shape, sharding,
                                                    lambda index, v=value: v[index]))
    del value  # the next tensor is read only after this one's host copy is released
  return params


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _convert(array, to_ours, target_shape, hf_name, path):
  try:
    value = to_ours(array)
  except ValueError:
    value = None
  if value is None or tuple(value.shape) != tuple(target_shape):
    raise HFFormatError(f'{path}: tensor {hf_name} has shape {tuple(array.shape)}, which does not '
                        f'match config.json (expected {_hf_shape_hint(target_shape, hf_name)})')
  check_weight_values(array, hf_name, path)
  return value


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


def _hf_shape_hint(target_shape, hf_name) -> str:
  return f'a tensor that maps to {tuple(target_shape)} for {hf_name.rsplit(".", 1)[0]}'


def _expected_shapes(config: Qwen3Config) -> dict[str, Any]:
  """Shape tuple of every parameter, in the nested layout of `nnx.state(Qwen3, Param)`."""
  abstract = nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0)))
  state = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  def shapes(tree):
    return {k: shapes(v) if isinstance(v, Mapping) else tuple(v.shape) for k, v in tree.items()}
  return shapes(state)


def load_model(folder: str, *, param_dtype=jnp.float32, compute_dtype=jnp.float32,
               remat: bool = False, scan_layers: bool = True, mesh=None,
               rules: Mapping[str, str | None] | None = None, attention: str = 'auto',
               attention_block: int = 512) -> Qwen3:
  """A Qwen3 module holding the folder's weights: on the default device, or with `mesh` sharded
  by the model's logical axes (`copd_jax.mesh.state_shardings`, `rules` defaulting to its
  DEFAULT_RULES) and loaded with `load_params_sharded`."""
  config = read_config(folder)
  model = nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0), param_dtype=param_dtype,
                                       compute_dtype=compute_dtype, remat=remat,
                                       scan_layers=scan_layers, attention=attention,
                                       attention_block=attention_block))
  state = nnx.state(model, nnx.Param)
  if mesh is None:
    params = jax.tree.map(jnp.asarray, load_params(folder, config, np.dtype(param_dtype)))
  else:
    shardings = mesh_lib.state_shardings(state, mesh, rules or mesh_lib.DEFAULT_RULES)
    params = load_params_sharded(folder, shardings, config, param_dtype)
  nnx.replace_by_pure_dict(state, params)
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


def _shard_plan(params: dict[str, Any], config: Qwen3Config, dtype,
                max_shard_bytes: int) -> list[list[str]]:
  """HF tensor names per safetensors file, in `params_to_hf_tensors` order, from shapes alone: a
  file is closed before the tensor that would take it past max_shard_bytes."""
  itemsize = np.dtype(dtype).itemsize
  sizes = [(hf, int(np.prod(np.shape(params[ours]))) * itemsize)
           for ours, (hf, _, _) in top_mapping(config).items()]
  for i in range(config.num_layers):
    sizes += [(f'model.layers.{i}.{hf}',
               int(np.prod(np.shape(params['layers'][ours])[1:])) * itemsize)
              for ours, (hf, _, _) in layer_mapping(config).items()]
  plan: list[list[str]] = [[]]
  filled = 0
  for name, size in sizes:
    if plan[-1] and filled + size > max_shard_bytes:
      plan.append([])
      filled = 0
    plan[-1].append(name)
    filled += size
  return plan


def save_hf_folder(params: dict[str, Any], config: Qwen3Config, out_dir: str, *,
                   tokenizer_from: str | None = None, tokenizer=None, dtype=np.float32,
                   max_shard_bytes: int = 5 * 2**30, generation: dict[str, Any] | None = None,
                   output_of: str | None = None):
  """Writes a Hugging Face folder (local or remote) with `storage.publish_dir`: locally built under
  a temporary name and renamed into place; remotely written in place, config.json and then the
  completion marker last. Either way an interrupted export never leaves a complete-looking half
  model. Shards are written as soon as they fill: host memory stays near one shard. output_of:
  the command whose output this is, recorded in the folder's marker file
  (copd_jax/output_paths.py: what `--overwrite` may replace)."""
  plan = _shard_plan(params, config, dtype, max_shard_bytes)
  files = (['model.safetensors'] if len(plan) == 1 else
           [f'model-{k + 1:05d}-of-{len(plan):05d}.safetensors' for k in range(len(plan))])
  metadata = {'format': 'pt'}

  def write_shard(path: str, tensors: dict[str, np.ndarray]) -> None:
    if storage.is_remote(path):
      storage.write_bytes(path, save(tensors, metadata=metadata))
    else:
      save_file(tensors, path, metadata=metadata)

  def build(folder: str) -> None:
    storage.makedirs(folder)
    shard: dict[str, np.ndarray] = {}
    k, total = 0, 0
    for name, array in params_to_hf_tensors(params, config, dtype):
      shard[name] = array
      total += array.nbytes
      if len(shard) == len(plan[k]):
        write_shard(storage.join(folder, files[k]), shard)
        shard, k = {}, k + 1
    if len(plan) > 1:
      weight_map = {name: file for file, names in zip(files, plan) for name in names}
      storage.write_text(storage.join(folder, 'model.safetensors.index.json'), json.dumps(
          {'metadata': {'total_size': total}, 'weight_map': weight_map}, indent=2))

    token_ids = {}
    copied = set()
    if tokenizer_from:
      for file in TOKENIZER_FILES:
        src = storage.join(tokenizer_from, file)
        if storage.is_file(src):
          storage.copy_file(src, storage.join(folder, file))
          copied.add(file)
    if tokenizer is not None:
      with tempfile.TemporaryDirectory() as staging:  # transformers writes local files only
        tokenizer.save_pretrained(staging)
        for file in sorted(os.listdir(staging)):
          storage.copy_file(os.path.join(staging, file), storage.join(folder, file))
      token_ids = {k: getattr(tokenizer, f'{k}_id', None) for k in ('bos_token', 'eos_token',
                                                                    'pad_token')}
    extra = {f'{k}_id': v for k, v in token_ids.items() if v is not None}
    extra.update(generation or {})
    if tokenizer_from:  # the source model's own ids win (its bos_token_id, eos list, ...)
      extra.update(source_token_ids(tokenizer_from))
    if 'generation_config.json' not in copied and extra:
      import transformers
      storage.write_text(storage.join(folder, 'generation_config.json'),
                         transformers.GenerationConfig(**extra).to_json_string(use_diff=True))
    dtype_name = np.dtype(dtype).name if dtype is not jnp.bfloat16 else 'bfloat16'
    storage.write_text(storage.join(folder, 'config.json'),
                       json.dumps(config_to_hf_dict(config, dtype=dtype_name, **extra), indent=2))
    if output_of:
      output_paths.write_marker(folder, output_of)

  storage.publish_dir(out_dir, build)


def source_token_ids(folder: str) -> dict[str, Any]:
  """Every special-token id ('*_token_id': bos, eos (an int or a list), pad, ...) that a model
  folder's config.json or generation_config.json sets; config.json's win. An export writes
  them back, so the exported model starts and stops generating like its source."""
  ids: dict[str, Any] = {}
  for name in ('generation_config.json', 'config.json'):
    path = storage.join(folder, name)
    if not storage.is_file(path):
      continue
    try:
      raw = json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
      raise HFFormatError(f'{path}:{e.lineno}: invalid JSON: {e.msg}') from None
    ids.update({k: v for k, v in raw.items() if k.endswith('_token_id') and v is not None})
  return ids


def model_params_dict(model: Qwen3) -> dict[str, Any]:
  """Pure nested dict of the model's parameter arrays (the layout `save_hf_folder` takes)."""
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))
