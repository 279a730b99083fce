"""Writing a Hugging Face folder that `transformers.AutoModelForCausalLM.from_pretrained` loads:
config.json + safetensors (sharded with an index above `max_shard_bytes`), the tokenizer files
and the special-token ids of the source model, published so that an interrupted export never
leaves a complete-looking half model."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable, Iterator, Sequence

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save, save_file

from copd_jax import output_paths, storage
from copd_jax.models.hf_io.format import (TOKENIZER_FILES, HFFormatError, config_to_hf_dict,
                                          layer_mapping, top_mapping)
from copd_jax.models.qwen3 import Qwen3Config

def params_to_hf_tensors(params: dict[str, Any], config: Qwen3Config,
                         dtype=np.float32) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (HF name, array) one tensor at a time from a pure-dict parameter tree."""
  for ours, (hf, _, to_hf) in top_mapping(config).items():
    yield hf, np.ascontiguousarray(to_hf(np.asarray(params[ours])).astype(dtype))
  for i in range(config.num_layers):
    for ours, (hf, _, to_hf) in layer_mapping(config).items():
      layer_value = np.asarray(params['layers'][ours][i])
      yield f'model.layers.{i}.{hf}', np.ascontiguousarray(to_hf(layer_value).astype(dtype))


def _text_tensor_sizes(params: dict[str, Any], config: Qwen3Config,
                       itemsize: int) -> list[tuple[str, int]]:
  """(HF name, bytes) of every tensor, in `params_to_hf_tensors` order, from shapes alone."""
  sizes = [(hf, int(np.prod(np.shape(params[ours]))) * itemsize)
           for ours, (hf, _, _) in top_mapping(config).items()]
  for i in range(config.num_layers):
    sizes += [(f'model.layers.{i}.{hf}',
               int(np.prod(np.shape(params['layers'][ours])[1:])) * itemsize)
              for ours, (hf, _, _) in layer_mapping(config).items()]
  return sizes


def shard_plan(sizes: Sequence[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
  """HF tensor names per safetensors file, in the order of `sizes` ((name, bytes) pairs): a file
  is closed before the tensor that would take it past max_shard_bytes."""
  plan: list[list[str]] = [[]]
  filled = 0
  for name, size in sizes:
    if plan[-1] and filled + size > max_shard_bytes:
      plan.append([])
      filled = 0
    plan[-1].append(name)
    filled += size
  return plan


def dtype_name(dtype) -> str:
  """The name config.json's `torch_dtype` gives a tensor dtype."""
  return 'bfloat16' if dtype is jnp.bfloat16 else np.dtype(dtype).name


def save_hf_folder(params: dict[str, Any], config: Qwen3Config, out_dir: str, *,
                   tokenizer_from: str | None = None, tokenizer=None, dtype=np.float32,
                   max_shard_bytes: int = 5 * 2**30, generation: dict[str, Any] | None = None,
                   output_of: str | None = None):
  """Writes a Qwen3ForCausalLM Hugging Face folder (local or remote) with `write_model_folder`."""
  write_model_folder(
      out_dir, tensors=lambda: params_to_hf_tensors(params, config, dtype),
      sizes=_text_tensor_sizes(params, config, np.dtype(dtype).itemsize),
      config_json=lambda extra: config_to_hf_dict(config, dtype=dtype_name(dtype), **extra),
      tokenizer_from=tokenizer_from, tokenizer=tokenizer, max_shard_bytes=max_shard_bytes,
      generation=generation, output_of=output_of)


def write_model_folder(out_dir: str, *, tensors: Callable[[], Iterator[tuple[str, np.ndarray]]],
                    sizes: Sequence[tuple[str, int]],
                    config_json: Callable[[dict[str, Any]], dict[str, Any]],
                    tokenizer_from: str | None = None, tokenizer=None,
                    copy_files: Sequence[str] = TOKENIZER_FILES,
                    max_shard_bytes: int = 5 * 2**30, generation: dict[str, Any] | None = None,
                    output_of: str | None = None):
  """The one Hugging Face folder writer (text and VL models): safetensors of `tensors()` ((HF
  name, array) one at a time, in the order of `sizes`), `copy_files` of tokenizer_from (tokenizer,
  generation and processor files) or `tokenizer.save_pretrained`, generation_config.json, and
  config.json = config_json(special-token ids and generation settings).

  Published with `storage.publish_dir`: locally built under a temporary name and renamed into
  place; remotely written in place, config.json and then the completion marker last. Either way
  an interrupted export never leaves a complete-looking half model. Shards are written as soon as
  they fill: host memory stays near one shard. output_of: the command whose output this is,
  recorded in the folder's marker file (copd_jax/output_paths.py: what `--overwrite` may
  replace)."""
  plan = shard_plan(sizes, max_shard_bytes)
  files = (['model.safetensors'] if len(plan) == 1 else
           [f'model-{k + 1:05d}-of-{len(plan):05d}.safetensors' for k in range(len(plan))])
  metadata = {'format': 'pt'}

  def write_shard(path: str, shard: dict[str, np.ndarray]) -> None:
    if storage.is_remote(path):
      storage.write_bytes(path, save(shard, metadata=metadata))
    else:
      save_file(shard, path, metadata=metadata)

  def build(folder: str) -> None:
    storage.makedirs(folder)
    shard: dict[str, np.ndarray] = {}
    k, total = 0, 0
    for name, array in tensors():
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
      for file in copy_files:
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
    storage.write_text(storage.join(folder, 'config.json'),
                       json.dumps(config_json(extra), indent=2))
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
