"""Reading a Hugging Face folder: tensor by tensor out of (possibly sharded, possibly remote)
safetensors into the stacked layout of `nnx.state(Qwen3, Param)`, on the host (`load_params`) or
placed on the devices block by block, each read from only its bytes (`load_params_sharded`,
`load_model`; blocks.py)."""
from __future__ import annotations

import contextlib
import functools
import json
import re
import struct
import warnings
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open

from copd_jax import mesh as mesh_lib
from copd_jax import storage
from copd_jax.models.hf_io import blocks as hf_blocks
from copd_jax.models.hf_io.format import (HFFormatError, TensorLayout, check_weight_values,
                                          layer_layouts, layer_mapping, read_config,
                                          top_layouts, top_mapping)
from copd_jax.models.qwen3 import Qwen3, Qwen3Config
from copd_jax.tree_paths import set_path

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
    return self._read_into(out, self._data_start + begin, name)

  def _read_into(self, out: np.ndarray, offset: int, name: str) -> np.ndarray:
    """Fills `out` with the file's bytes from `offset` (a stream may return short reads)."""
    self._file.seek(offset)
    view, done = memoryview(out.reshape(-1).view(np.uint8)), 0
    while done < out.nbytes:
      n = self._file.readinto(view[done:])
      if not n:
        raise ValueError(f'tensor {name}: file ends after {done} of {out.nbytes} bytes')
      done += n
    return out

  def get_slice(self, name: str) -> '_StreamedSlice':
    return _StreamedSlice(self, name)

  def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of the tensor's first axis, with one ranged read."""
    info = self._header[name]
    shape, dtype = tuple(info['shape']), np.dtype(_SAFETENSORS_DTYPES[info['dtype']])
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    out = np.empty((stop - start,) + shape[1:], dtype)
    return self._read_into(out, self._data_start + info['data_offsets'][0] + start * row_bytes,
                           name)

  def close(self) -> None:
    self._file.close()

  def __enter__(self) -> '_StreamedSafetensors':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class _StreamedSlice:
  """safe_open's `get_slice` for a remote file: the shape and dtype from the header, and a
  slice read as the one byte range of its first-axis rows (the rest cut out in memory)."""

  def __init__(self, file: _StreamedSafetensors, name: str):
    self._file, self._name = file, name
    self._info = file._header[name]

  def get_shape(self) -> list[int]:
    return list(self._info['shape'])

  def get_dtype(self) -> str:
    return self._info['dtype']

  def __getitem__(self, index) -> np.ndarray:
    index = index if isinstance(index, tuple) else (index,)
    shape = self.get_shape()
    if not shape:
      return self._file.get_tensor(self._name)[index]
    start, stop, _ = index[0].indices(shape[0])
    rows = self._file.read_rows(self._name, start, max(start, stop))
    return rows[(slice(None),) + tuple(index[1:])]


def open_safetensors(path: str):
  """A reader with `keys()` and `get_tensor(name)` (numpy): safetensors' memory-mapped `safe_open`
  for local files, ranged reads for remote ones. Use it as a context manager."""
  if storage.is_remote(path):
    return _StreamedSafetensors(path)
  return safe_open(path, framework='numpy')


class TensorReader:
  """Reads HF tensors by name from a folder's safetensors files, opening each file once; errors
  name the file and the tensor. `bytes_read` counts the bytes of every tensor or slice read."""

  def __init__(self, files: dict[str, str]):
    self._files = files
    self._open: dict[str, Any] = {}
    self._stack = contextlib.ExitStack()
    self.bytes_read = 0

  def _call(self, name: str, fn):
    """fn(the open file holding `name`), with errors naming the file and the tensor."""
    path = self._files[name]
    try:
      if path not in self._open:
        if not storage.is_file(path):
          raise HFFormatError(f'{path}: missing safetensors shard (needed for tensor {name})')
        self._open[path] = self._stack.enter_context(open_safetensors(path))
      return fn(self._open[path])
    except HFFormatError:
      raise
    except Exception as e:
      raise HFFormatError(f'{path}: cannot read tensor {name} ({e})') from None

  def get(self, name: str) -> np.ndarray:
    out = self._call(name, lambda f: f.get_tensor(name))
    self.bytes_read += out.nbytes
    return out

  def info(self, name: str) -> tuple[tuple[int, ...], str]:
    """(shape, safetensors dtype code such as 'F32') of tensor `name` from its file's header,
    reading no values."""
    shape, code = self._call(name, lambda f: (lambda sl: (sl.get_shape(), sl.get_dtype()))(
        f.get_slice(name)))
    return tuple(shape), str(code)

  def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
    """The slice `index` (step-1 slices) of tensor `name`, reading only its bytes' span."""
    out = np.asarray(self._call(name, lambda f: f.get_slice(name)[tuple(index)]))
    self.bytes_read += out.nbytes
    return out

  def __enter__(self) -> 'TensorReader':
    return self

  def __exit__(self, *exc) -> None:
    self._stack.close()


def as_float_numpy(x: np.ndarray, dtype) -> np.ndarray:
  # safetensors' numpy backend returns bf16 as ml_dtypes.bfloat16; casting goes through float32.
  return np.asarray(x).astype(np.float32).astype(dtype) if x.dtype != dtype else x


# Per-layer tensors by index; buffers some exporters store that hold no weights.
_LAYER = re.compile(r'model\.layers\.(\d+)\.')
_NEVER_READ = ('rotary_emb.inv_freq',)


def check_tensors(folder: str, config: Qwen3Config) -> None:
  """The tensor-list checks of loading (missing tensors, layers past config.json, unused
  tensors), without reading any tensor: for callers that stop before a model is loaded."""
  _checked_files(folder, config)


def _checked_files(folder: str, config: Qwen3Config) -> dict[str, str]:
  """tensor_files(folder), after checking that every tensor the config needs is listed and that
  no layer lies beyond config.json's num_hidden_layers (it would be dropped); other tensors the
  model does not use are named in one warning."""
  files = tensor_files(folder)
  wanted = [hf for hf, _, _ in top_mapping(config).values()]
  for i in range(config.num_layers):
    wanted += [f'model.layers.{i}.{hf}' for hf, _, _ in layer_mapping(config).values()]
  missing = [n for n in wanted if n not in files]
  if missing:
    where = sorted(set(files.values())) or [folder]
    raise HFFormatError(f'{where[0]}: missing tensor {missing[0]}'
                        + (f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''))
  unused = sorted(set(files) - set(wanted) - {n for n in files if n.endswith(_NEVER_READ)})
  beyond = sorted({int(m.group(1)) for m in map(_LAYER.match, unused) if m
                   and int(m.group(1)) >= config.num_layers})
  if beyond:
    first = next(n for n in unused if n.startswith(f'model.layers.{beyond[0]}.'))
    span = f'model.layers.{beyond[0]}.*' + (f' to model.layers.{beyond[-1]}.*'
                                             if len(beyond) > 1 else '')
    raise HFFormatError(f'{files[first]}: tensors of {len(beyond)} layer(s) past config.json\'s '
                        f'num_hidden_layers={config.num_layers} ({span}, e.g. {first}); loading '
                        'would drop them: fix num_hidden_layers in config.json')
  if unused:
    shown = ', '.join(unused[:8]) + (f' and {len(unused) - 8} more' if len(unused) > 8 else '')
    # stacklevel 1: one location, so a folder checked twice in a process warns once.
    warnings.warn(f'{folder}: {len(unused)} tensor(s) the model does not use, ignored: {shown}',
                  stacklevel=1)
  return files


def iter_params(folder: str, config: Qwen3Config | None = None, param_dtype=np.float32
                ) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
  """(key path, host array) for every parameter of the folder's model, one at a time, in the
  layout of `nnx.state(Qwen3, Param)`: top-level tensors, then each per-layer tensor stacked over
  the layers [L, ...]. Holds one stacked tensor (plus one HF tensor) at a time."""
  config = config or read_config(folder)
  files = _checked_files(folder, config)
  shapes = _expected_shapes(config)
  with TensorReader(files) as reader:
    for ours, (hf_name, to_ours, from_ours) in top_mapping(config).items():
      value = convert_tensor(reader.get(hf_name), to_ours, shapes[ours], hf_name, files[hf_name],
                             from_ours)
      yield (ours,), as_float_numpy(value, param_dtype)
      del value  # so a caller that drops its copy holds one tensor at a time
    for ours, (hf, to_ours, from_ours) in layer_mapping(config).items():
      stacked = np.empty(shapes['layers'][ours], param_dtype)
      for i in range(config.num_layers):
        hf_name = f'model.layers.{i}.{hf}'
        value = convert_tensor(reader.get(hf_name), to_ours, stacked.shape[1:], hf_name,
                               files[hf_name], from_ours)
        stacked[i] = as_float_numpy(value, param_dtype)
      yield ('layers', ours), stacked
      del stacked  # released (once the caller drops it too) before the next is allocated


def load_params(folder: str, config: Qwen3Config | None = None,
                param_dtype=np.float32) -> dict[str, Any]:
  """Reads the folder's safetensors into the nested dict layout of `nnx.state(Qwen3, Param)`."""
  params: dict[str, Any] = {}
  for path, value in iter_params(folder, config, param_dtype):
    set_path(params, path, value)
  return params


def load_params_sharded(folder: str, shardings: Mapping[str, Any],
                        config: Qwen3Config | None = None, param_dtype=jnp.float32,
                        reader: TensorReader | None = None) -> dict[str, Any]:
  """The folder's parameters as jax.Arrays placed with `shardings`, each device block read from
  only the bytes that hold it.

  shardings: a jax.sharding.Sharding per parameter, in the nested layout `load_params` returns
  (a pure dict, or the nnx.State that `copd_jax.mesh.state_shardings` gives for the model's
  Params). Parameter by parameter, every tensor's shape and dtype are checked from the file
  headers, then each distinct block that an addressable device holds is read (`blocks.py`:
  a slice of each HF tensor, of the block's layers only), cast, checked for NaN / inf, and
  handed to its devices before the next block is read (`place_blocks`): the host holds about
  one block, no device the whole model, and on several hosts a process reads only its own
  devices' blocks (a tensor none of them needs not at all). The values equal `load_params`'
  bit for bit. Raises HFFormatError as `load_params` does (a NaN only where some process reads
  it). reader: the TensorReader of the folder's files to use (tests count its bytes_read).
  """
  if isinstance(shardings, nnx.State):
    shardings = nnx.to_pure_dict(shardings)
  config = config or read_config(folder)
  files = _checked_files(folder, config)
  shapes = _expected_shapes(config)
  dtype = np.dtype(param_dtype)
  params: dict[str, Any] = {}
  with contextlib.ExitStack() as stack:
    reader = reader or stack.enter_context(TensorReader(files))
    for path, names, layout, from_ours in param_sources(config):
      shape = shapes
      sharding = shardings
      try:
        for key in path:
          shape, sharding = shape[key], sharding[key]
      except (KeyError, TypeError):
        raise ValueError(f'shardings: no sharding for parameter {".".join(path)}') from None
      stacked = path[0] == 'layers'
      one = shape[1:] if stacked else shape
      for name in names:
        _check_stored(reader, name, hf_blocks.hf_shape(layout, one), one, from_ours, files[name])

      def convert(read, name):
        check_weight_values(read, name, files[name])
        return as_float_numpy(read, dtype)
      block = functools.partial(hf_blocks.read_block, reader, names, layout, shape,
                                stacked=stacked, convert=convert)
      set_path(params, path, place_blocks(shape, sharding, block))
  return params


def param_sources(config: Qwen3Config) -> Iterator[tuple[tuple[str, ...], list[str],
                                                         TensorLayout, Any]]:
  """(our key path, its HF tensor names (one per layer for a layer-stacked parameter), layout,
  from_ours) of every parameter, in `iter_params`' order."""
  layouts = top_layouts(config)
  for ours, (hf_name, _, from_ours) in top_mapping(config).items():
    yield (ours,), [hf_name], layouts[ours], from_ours
  layouts = layer_layouts(config)
  for ours, (hf, _, from_ours) in layer_mapping(config).items():
    yield (('layers', ours), [f'model.layers.{i}.{hf}' for i in range(config.num_layers)],
           layouts[ours], from_ours)


def _check_stored(reader: TensorReader, name: str, want: tuple[int, ...], ours: tuple[int, ...],
                  from_ours, path: str) -> None:
  """The checks `convert_tensor` makes, from the header alone: the shape config.json implies,
  a floating-point dtype."""
  shape, code = reader.info(name)
  if shape != tuple(want):
    raise HFFormatError(_shape_problem(shape, from_ours, ours, name, path))
  dtype = _SAFETENSORS_DTYPES.get(code)
  if dtype is None or not (np.issubdtype(dtype, np.floating) or dtype == ml_dtypes.bfloat16):
    shown = np.dtype(dtype).name if dtype is not None else code
    raise HFFormatError(f'{path}: tensor {name} has dtype {shown}; weights must be floating '
                        'point')


def place_blocks(shape: tuple[int, ...], sharding, block) -> jax.Array:
  """The global jax.Array of `shape` placed with `sharding` whose shard at each index is
  `block(index)` (a host array), made one distinct block at a time: every device holding that
  block receives it and the host copy is dropped before the next is made. So the host holds
  one block beyond the caller's data, where `jax.make_array_from_callback` stages a contiguous
  copy for every device at once (on 8 devices of one process, twice a tensor split 4 ways)."""
  indices = sharding.addressable_devices_indices_map(tuple(shape))
  groups: dict[str, tuple[Any, list]] = {}
  for device, index in indices.items():
    groups.setdefault(repr(index), (index, []))[1].append(device)
  shards = {}
  for index, devices in groups.values():
    host = np.ascontiguousarray(block(index))
    placed = [jax.device_put(host, device) for device in devices]
    jax.block_until_ready(placed)
    shards.update(zip(devices, placed))
    del host, placed
  return jax.make_array_from_single_device_arrays(tuple(shape), sharding,
                                                  [shards[d] for d in indices])


def convert_tensor(array, to_ours, target_shape, hf_name, path, from_ours=None):
  """An HF tensor in our layout (`to_ours`), checked against the shape config.json implies and
  for non-finite values; `from_ours` (our layout -> HF) lets the error give the HF shape."""
  try:
    value = to_ours(array)
  except ValueError:
    value = None
  if value is None or tuple(value.shape) != tuple(target_shape):
    raise HFFormatError(_shape_problem(tuple(array.shape), from_ours, target_shape, hf_name,
                                       path))
  check_weight_values(array, hf_name, path)
  return value


def _shape_problem(shape: tuple, from_ours, target_shape, hf_name: str, path: str) -> str:
  """The message for a tensor whose shape config.json does not allow: the shape it has, the HF
  shape config.json implies, and whether it is that shape transposed."""
  if from_ours is None:
    return (f'{path}: tensor {hf_name} has shape {shape}; config.json implies a tensor that '
            f'maps to {tuple(target_shape)}')
  expected = tuple(jax.eval_shape(from_ours, jax.ShapeDtypeStruct(tuple(target_shape),
                                                                  jnp.float32)).shape)
  transposed = len(shape) == 2 and shape[::-1] == expected
  return (f'{path}: tensor {hf_name} has shape {shape}; config.json implies {expected}'
          + (' (the tensor is stored transposed)' if transposed else ''))


def _expected_shapes(config: Qwen3Config) -> dict[str, Any]:
  """Shape tuple of every parameter, in the nested layout of `nnx.state(Qwen3, Param)`."""
  abstract = nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0)))
  state = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  def shapes(tree):
    return {k: shapes(v) if isinstance(v, Mapping) else tuple(v.shape) for k, v in tree.items()}
  return shapes(state)


def abstract_model(folder: str, *, param_dtype=jnp.float32, compute_dtype=jnp.float32,
                   remat: bool = False, scan_layers: bool = True, attention: str = 'auto',
                   attention_block: int = 512) -> Qwen3:
  """The folder's Qwen3 (config.json) with abstract parameters (`nnx.eval_shape`: shapes and
  dtypes, nothing read or allocated), for callers that place the weights themselves."""
  config = read_config(folder)
  return nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0), param_dtype=param_dtype,
                                      compute_dtype=compute_dtype, remat=remat,
                                      scan_layers=scan_layers, attention=attention,
                                      attention_block=attention_block))


def load_model(folder: str, *, param_dtype=jnp.float32, compute_dtype=jnp.float32,
               remat: bool = False, scan_layers: bool = True, mesh=None,
               rules: Mapping[str, str | None] | None = None, attention: str = 'auto',
               attention_block: int = 512) -> Qwen3:
  """A Qwen3 module holding the folder's weights: on the default device, or with `mesh` sharded
  by the model's logical axes (`copd_jax.mesh.state_shardings`, `rules` defaulting to its
  DEFAULT_RULES) and loaded with `load_params_sharded`."""
  model = abstract_model(folder, param_dtype=param_dtype, compute_dtype=compute_dtype,
                         remat=remat, scan_layers=scan_layers, attention=attention,
                         attention_block=attention_block)
  config = model.config
  state = nnx.state(model, nnx.Param)
  if mesh is None:
    params = jax.tree.map(jnp.asarray, load_params(folder, config, np.dtype(param_dtype)))
  else:
    shardings = mesh_lib.state_shardings(state, mesh, rules or mesh_lib.DEFAULT_RULES)
    params = load_params_sharded(folder, shardings, config, param_dtype)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  return model



def model_params_dict(model: Qwen3) -> dict[str, Any]:
  """Pure nested dict of the model's parameter arrays (the layout `save_hf_folder` takes)."""
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))
