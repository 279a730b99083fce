"""Hugging Face Qwen3VLForConditionalGeneration folders -> copd_jax Qwen3VL parameters.

Tensor names are transformers': the decoder under `model.language_model.` (the Qwen3 layer
mapping of `hf_io`, reused), the vision tower under `model.visual.`, `lm_head.weight` unless the
embeddings are tied. Reading reuses `hf_io`'s safetensors reader, shape checks and NaN / dtype
checks, so errors name the file and the tensor. Export (`save_vl_hf_folder`) goes through the
same plan backwards and `hf_io`'s one folder writer, adding the processor files to what it copies
from the source folder.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from copd_jax.models import hf_io
from copd_jax.models.hf_io import HFFormatError
from copd_jax.models.hf_io import read as hf_read
from copd_jax.models.hf_io import write as hf_write
from copd_jax.models.hf_io.format import read_config_json
from copd_jax.models.qwen3 import Qwen3Config
from copd_jax.models.qwen3_vl import Qwen3VL, Qwen3VLConfig
from copd_jax.models.qwen3_vl_vision import VisionConfig
from copd_jax.tree_paths import flatten_paths, get_path, set_path

VL_ARCHITECTURES = ('Qwen3VLForConditionalGeneration',)
_TEXT = 'model.language_model.'
_VISION = 'model.visual.'


def is_vl_folder(folder: str) -> bool:
  """Whether the folder's config.json describes a Qwen3-VL model (errors name the file)."""
  raw, _ = read_config_json(folder)
  archs = raw.get('architectures') or []
  return raw.get('model_type') == 'qwen3_vl' or bool(set(archs) & set(VL_ARCHITECTURES))


def read_vl_config(folder: str) -> Qwen3VLConfig:
  return vl_config_from_hf_dict(*read_config_json(folder))


def is_vl_config(raw: dict[str, Any]) -> bool:
  """Whether a config.json (as a dict) describes a Qwen3-VL model."""
  return (raw.get('model_type') == 'qwen3_vl'
          or bool(set(raw.get('architectures') or []) & set(VL_ARCHITECTURES)))


def vl_config_from_fields(raw: dict[str, Any]) -> Qwen3VLConfig:
  """The Qwen3VLConfig that `dataclasses.asdict` gave (a checkpoint meta's model_config)."""
  fields = dict(raw)   # JSON gave lists where the dataclasses hold tuples
  vision = dict(fields.pop('vision'))
  vision['deepstack_visual_indexes'] = tuple(vision.get('deepstack_visual_indexes', ()))
  fields['mrope_section'] = tuple(fields['mrope_section'])
  return Qwen3VLConfig(text=Qwen3Config(**fields.pop('text')), vision=VisionConfig(**vision),
                       **fields)


def vl_config_from_hf_dict(raw: dict[str, Any], source: str = 'config.json') -> Qwen3VLConfig:
  archs = raw.get('architectures') or []
  if not is_vl_config(raw):
    raise HFFormatError(f'{source}: not a Qwen3-VL model (model_type={raw.get("model_type")!r}, '
                        f'architectures={archs})')
  text = dict(raw.get('text_config') or {})
  vision = dict(raw.get('vision_config') or {})
  rope = text.get('rope_parameters') or text.get('rope_scaling') or {}
  # Older checkpoints keep tie_word_embeddings in text_config; the top level wins when present.
  tied = raw.get('tie_word_embeddings', text.get('tie_word_embeddings', False))
  text_raw = {**text, 'model_type': 'qwen3', 'tie_word_embeddings': tied,
              'rope_parameters': {'rope_type': rope.get('rope_type', rope.get('type', 'default')),
                                  'rope_theta': rope.get('rope_theta', 500_000.0)}}
  text_config: Qwen3Config = hf_io.config_from_hf_dict(text_raw, f'{source} (text_config)')
  if vision.get('hidden_act', 'gelu_pytorch_tanh') != 'gelu_pytorch_tanh':
    raise HFFormatError(f'{source}: vision hidden_act {vision["hidden_act"]!r} is not supported')
  vision_rope = vision.get('rope_parameters') or {}
  try:
    vision_config = VisionConfig(
        depth=vision['depth'], hidden_size=vision['hidden_size'],
        intermediate_size=vision['intermediate_size'], num_heads=vision['num_heads'],
        out_hidden_size=vision['out_hidden_size'],
        num_position_embeddings=vision['num_position_embeddings'],
        deepstack_visual_indexes=tuple(vision.get('deepstack_visual_indexes', ())),
        in_channels=vision.get('in_channels', 3), patch_size=vision.get('patch_size', 16),
        temporal_patch_size=vision.get('temporal_patch_size', 2),
        spatial_merge_size=vision.get('spatial_merge_size', 2),
        rope_theta=float(vision_rope.get('rope_theta', 10_000.0)))
    return Qwen3VLConfig(
        text=text_config, vision=vision_config,
        mrope_section=tuple(rope.get('mrope_section', (24, 20, 20))),
        image_token_id=raw.get('image_token_id', 151655),
        video_token_id=raw.get('video_token_id', 151656),
        vision_start_token_id=raw.get('vision_start_token_id', 151652),
        vision_end_token_id=raw.get('vision_end_token_id', 151653))
  except KeyError as e:
    raise HFFormatError(f'{source}: missing vision_config field {e.args[0]!r}') from None
  except ValueError as e:
    raise HFFormatError(f'{source}: {e}') from None


# ---------------------------------------------------------------------------------------------
# Tensor-name mapping: our path -> (HF name, HF array -> our array). Per-layer entries use '{i}'.
# ---------------------------------------------------------------------------------------------

def _vision_block_mapping(c: VisionConfig) -> dict[str, tuple[str, Callable, Callable]]:
  D, H, hd = c.hidden_size, c.num_heads, c.head_dim
  same, t = (lambda x: x), (lambda w: w.T)
  return {
      'norm1_scale': ('norm1.weight', same, same), 'norm1_bias': ('norm1.bias', same, same),
      'qkv': ('attn.qkv.weight', lambda w: w.T.reshape(D, 3, H, hd),
              lambda p: p.reshape(D, 3 * H * hd).T),
      'qkv_bias': ('attn.qkv.bias', lambda b: b.reshape(3, H, hd), lambda p: p.reshape(-1)),
      'proj': ('attn.proj.weight', lambda w: w.T.reshape(H, hd, D),
               lambda p: p.reshape(H * hd, D).T),
      'proj_bias': ('attn.proj.bias', same, same),
      'norm2_scale': ('norm2.weight', same, same), 'norm2_bias': ('norm2.bias', same, same),
      'fc1': ('mlp.linear_fc1.weight', t, t), 'fc1_bias': ('mlp.linear_fc1.bias', same, same),
      'fc2': ('mlp.linear_fc2.weight', t, t), 'fc2_bias': ('mlp.linear_fc2.bias', same, same),
  }


def _merger_mapping() -> dict[str, tuple[str, Callable, Callable]]:
  same, t = (lambda x: x), (lambda w: w.T)
  return {'norm_scale': ('norm.weight', same, same), 'norm_bias': ('norm.bias', same, same),
          'fc1': ('linear_fc1.weight', t, t), 'fc1_bias': ('linear_fc1.bias', same, same),
          'fc2': ('linear_fc2.weight', t, t), 'fc2_bias': ('linear_fc2.bias', same, same)}


def tensor_plan(config: Qwen3VLConfig
                ) -> list[tuple[tuple[str, ...], list[str], Callable, Callable]]:
  """(our parameter path, HF names (several = stacked on a leading axis), HF -> ours converter,
  ours -> HF converter) for every parameter of `Qwen3VL`, in the nested layout of
  `nnx.state(Qwen3VL, Param)`. Import and export both follow it."""
  tc, vc = config.text, config.vision
  plan = []
  for ours, (hf, conv, back) in hf_io.top_mapping(tc).items():
    name = hf if hf == 'lm_head.weight' else _TEXT + hf[len('model.'):]
    plan.append((('text', ours), [name], conv, back))
  for ours, (hf, conv, back) in hf_io.layer_mapping(tc).items():
    plan.append((('text', 'layers', ours),
                 [f'{_TEXT}layers.{i}.{hf}' for i in range(tc.num_layers)], conv, back))
  D, same = vc.hidden_size, (lambda x: x)
  patch = (vc.in_channels, vc.temporal_patch_size, vc.patch_size, vc.patch_size)
  plan.append((('vision', 'patch_embed'), [_VISION + 'patch_embed.proj.weight'],
               lambda w: w.reshape(D, -1).T, lambda p: p.T.reshape(D, *patch)))
  plan.append((('vision', 'patch_bias'), [_VISION + 'patch_embed.proj.bias'], same, same))
  plan.append((('vision', 'pos_embed'), [_VISION + 'pos_embed.weight'], same, same))
  for ours, (hf, conv, back) in _vision_block_mapping(vc).items():
    plan.append((('vision', 'blocks', ours),
                 [f'{_VISION}blocks.{i}.{hf}' for i in range(vc.depth)], conv, back))
  for ours, (hf, conv, back) in _merger_mapping().items():
    plan.append((('vision', 'merger', ours), [f'{_VISION}merger.{hf}'], conv, back))
  n_ds = len(vc.deepstack_visual_indexes)
  if n_ds:
    for ours, (hf, conv, back) in _merger_mapping().items():
      plan.append((('vision', 'deepstack', ours),
                   [f'{_VISION}deepstack_merger_list.{j}.{hf}' for j in range(n_ds)], conv,
                   back))
  return plan


def vl_config_to_hf_dict(config: Qwen3VLConfig, *, dtype: str = 'float32',
                         **extra) -> dict[str, Any]:
  """config.json of a Qwen3VLForConditionalGeneration (text_config, vision_config, the vision
  token ids), written by the installed transformers' Qwen3VLConfig so that it reads it back;
  `extra` (special-token ids, generation settings) goes to the top level."""
  import transformers
  tc, vc = config.text, config.vision
  text = transformers.Qwen3VLTextConfig(
      vocab_size=tc.vocab_size, hidden_size=tc.hidden_size, num_hidden_layers=tc.num_layers,
      num_attention_heads=tc.num_heads, num_key_value_heads=tc.num_kv_heads,
      head_dim=tc.head_dim, intermediate_size=tc.intermediate_size,
      rms_norm_eps=tc.rms_norm_eps, attention_bias=tc.attention_bias,
      max_position_embeddings=tc.max_position_embeddings,
      rope_parameters=dict(rope_type='default', rope_theta=tc.rope_theta,
                           mrope_section=list(config.mrope_section), mrope_interleaved=True))
  vision = transformers.Qwen3VLVisionConfig(
      depth=vc.depth, hidden_size=vc.hidden_size, intermediate_size=vc.intermediate_size,
      num_heads=vc.num_heads, out_hidden_size=vc.out_hidden_size,
      num_position_embeddings=vc.num_position_embeddings,
      deepstack_visual_indexes=list(vc.deepstack_visual_indexes), in_channels=vc.in_channels,
      patch_size=vc.patch_size, temporal_patch_size=vc.temporal_patch_size,
      spatial_merge_size=vc.spatial_merge_size,
      rope_parameters=dict(rope_type='axial', rope_theta=vc.rope_theta))
  # The model's own vision token ids win over any the source folder lists in `extra`.
  vision_ids = dict(image_token_id=config.image_token_id, video_token_id=config.video_token_id,
                    vision_start_token_id=config.vision_start_token_id,
                    vision_end_token_id=config.vision_end_token_id)
  hf = transformers.Qwen3VLConfig(
      text_config=text.to_dict(), vision_config=vision.to_dict(),
      tie_word_embeddings=tc.tie_word_embeddings, **{**extra, **vision_ids})
  raw = hf.to_dict()
  raw['architectures'] = list(VL_ARCHITECTURES)
  raw['torch_dtype'] = raw['dtype'] = dtype
  return raw


def vl_params_to_hf_tensors(params: dict[str, Any], config: Qwen3VLConfig, dtype=np.float32
                            ) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, array) one tensor at a time from a pure-dict Qwen3VL parameter tree."""
  for path, names, _, to_hf in tensor_plan(config):
    value = np.asarray(get_path(params, path))
    for i, name in enumerate(names):
      one = value[i] if is_stacked(path) else value
      yield name, np.ascontiguousarray(to_hf(one).astype(dtype))


def save_vl_hf_folder(params: dict[str, Any], config: Qwen3VLConfig, out_dir: str, *,
                      tokenizer_from: str | None = None, dtype=np.float32,
                      max_shard_bytes: int = 5 * 2**30, generation: dict[str, Any] | None = None,
                      output_of: str | None = None) -> None:
  """A Qwen3VLForConditionalGeneration folder that transformers loads: safetensors with its
  tensor names, config.json (vision_config and every special-token id of the source), and the
  tokenizer, generation and processor files of `tokenizer_from` (hf_io.write.write_model_folder)."""
  itemsize = np.dtype(dtype).itemsize
  sizes = [(name, int(np.prod(np.shape(get_path(params, path))[1 if is_stacked(path) else 0:]))
            * itemsize)
           for path, names, _, _ in tensor_plan(config) for name in names]
  hf_write.write_model_folder(
      out_dir, tensors=lambda: vl_params_to_hf_tensors(params, config, dtype), sizes=sizes,
      config_json=lambda extra: vl_config_to_hf_dict(config, dtype=hf_write.dtype_name(dtype),
                                                     **extra),
      tokenizer_from=tokenizer_from, copy_files=hf_io.TOKENIZER_FILES + hf_io.PROCESSOR_FILES,
      max_shard_bytes=max_shard_bytes, generation=generation, output_of=output_of)


def abstract_vl_params(config: Qwen3VLConfig) -> dict[str, Any]:
  """ShapeDtypeStructs of every Qwen3VL parameter, in the nested pure-dict layout."""
  abstract = nnx.eval_shape(lambda: Qwen3VL(config, rngs=nnx.Rngs(0)))
  return nnx.to_pure_dict(nnx.state(abstract, nnx.Param))


def _expected_shapes(config: Qwen3VLConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  return {path: tuple(v.shape) for path, v in flatten_paths(abstract_vl_params(config))}


def load_vl_params(folder: str, config: Qwen3VLConfig | None = None,
                   param_dtype=np.float32) -> dict[str, Any]:
  """The folder's tensors in the nested dict layout of `nnx.state(Qwen3VL, Param)`."""
  config = config or read_vl_config(folder)
  files = hf_io.tensor_files(folder)
  plan = tensor_plan(config)
  missing = [n for _, names, _, _ in plan for n in names if n not in files]
  if missing:
    where = sorted(set(files.values())) or [folder]
    raise HFFormatError(f'{where[0]}: missing tensor {missing[0]}'
                        + (f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''))
  shapes = _expected_shapes(config)
  params: dict[str, Any] = {}
  with hf_read.TensorReader(files) as reader:
    for path, names, conv, _ in plan:
      shape = shapes[path]
      stacked = is_stacked(path)
      inner = shape[1:] if stacked else shape
      values = [hf_read.as_float_numpy(
          hf_read.convert_tensor(reader.get(n), conv, inner, n, files[n]), np.dtype(param_dtype))
          for n in names]
      set_path(params, path, np.stack(values) if stacked else values[0])
  return params


def is_stacked(path: tuple[str, ...]) -> bool:
  """Whether the parameter is stacked over layers (one HF tensor per layer)."""
  return path[:2] == ('text', 'layers') or path[:2] in (('vision', 'blocks'),
                                                        ('vision', 'deepstack'))


def load_vl_model(folder: str, *, param_dtype=jnp.float32, compute_dtype=jnp.float32,
                  remat: bool = False) -> Qwen3VL:
  """A Qwen3VL module holding the folder's weights on the default device."""
  config = read_vl_config(folder)
  model = nnx.eval_shape(lambda: Qwen3VL(config, rngs=nnx.Rngs(0), param_dtype=param_dtype,
                                         compute_dtype=compute_dtype, remat=remat))
  state = nnx.state(model, nnx.Param)
  params = jax.tree.map(jnp.asarray, load_vl_params(folder, config, np.dtype(param_dtype)))
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  return model
