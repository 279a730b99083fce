"""Hugging Face Qwen3VLForConditionalGeneration folders -> copd_jax Qwen3VL parameters.

Tensor names are transformers': the decoder under `model.language_model.` (the Qwen3 layer
mapping of `hf_io`, reused), the vision tower under `model.visual.`, `lm_head.weight` unless the
embeddings are tied. Reading reuses `hf_io`'s safetensors reader, shape checks and NaN / dtype
checks, so errors name the file and the tensor. Export is not written yet.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from copd_jax.models import hf_io
from copd_jax.models.hf_io import HFFormatError
from copd_jax.models.hf_io import read as hf_read
from copd_jax.models.hf_io.format import read_config_json
from copd_jax.models.qwen3 import Qwen3Config
from copd_jax.models.qwen3_vl import Qwen3VL, Qwen3VLConfig
from copd_jax.models.qwen3_vl_vision import VisionConfig
from copd_jax.tree_paths import set_path

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


def vl_config_from_hf_dict(raw: dict[str, Any], source: str = 'config.json') -> Qwen3VLConfig:
  archs = raw.get('architectures') or []
  if raw.get('model_type') != 'qwen3_vl' and not set(archs) & set(VL_ARCHITECTURES):
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

def _vision_block_mapping(c: VisionConfig) -> dict[str, tuple[str, Callable]]:
  D, H, hd = c.hidden_size, c.num_heads, c.head_dim
  same, t = (lambda x: x), (lambda w: w.T)
  return {
      'norm1_scale': ('norm1.weight', same), 'norm1_bias': ('norm1.bias', same),
      'qkv': ('attn.qkv.weight', lambda w: w.T.reshape(D, 3, H, hd)),
      'qkv_bias': ('attn.qkv.bias', lambda b: b.reshape(3, H, hd)),
      'proj': ('attn.proj.weight', lambda w: w.T.reshape(H, hd, D)),
      'proj_bias': ('attn.proj.bias', same),
      'norm2_scale': ('norm2.weight', same), 'norm2_bias': ('norm2.bias', same),
      'fc1': ('mlp.linear_fc1.weight', t), 'fc1_bias': ('mlp.linear_fc1.bias', same),
      'fc2': ('mlp.linear_fc2.weight', t), 'fc2_bias': ('mlp.linear_fc2.bias', same),
  }


def _merger_mapping() -> dict[str, tuple[str, Callable]]:
  same, t = (lambda x: x), (lambda w: w.T)
  return {'norm_scale': ('norm.weight', same), 'norm_bias': ('norm.bias', same),
          'fc1': ('linear_fc1.weight', t), 'fc1_bias': ('linear_fc1.bias', same),
          'fc2': ('linear_fc2.weight', t), 'fc2_bias': ('linear_fc2.bias', same)}


def tensor_plan(config: Qwen3VLConfig) -> list[tuple[tuple[str, ...], list[str], Callable]]:
  """(our parameter path, HF names (several = stacked on a leading axis), converter) for every
  parameter of `Qwen3VL`, in the nested layout of `nnx.state(Qwen3VL, Param)`."""
  tc, vc = config.text, config.vision
  plan = []
  for ours, (hf, conv, _) in hf_io.top_mapping(tc).items():
    name = hf if hf == 'lm_head.weight' else _TEXT + hf[len('model.'):]
    plan.append((('text', ours), [name], conv))
  for ours, (hf, conv, _) in hf_io.layer_mapping(tc).items():
    plan.append((('text', 'layers', ours),
                 [f'{_TEXT}layers.{i}.{hf}' for i in range(tc.num_layers)], conv))
  D = vc.hidden_size
  plan.append((('vision', 'patch_embed'), [_VISION + 'patch_embed.proj.weight'],
               lambda w: w.reshape(D, -1).T))
  plan.append((('vision', 'patch_bias'), [_VISION + 'patch_embed.proj.bias'], lambda b: b))
  plan.append((('vision', 'pos_embed'), [_VISION + 'pos_embed.weight'], lambda w: w))
  for ours, (hf, conv) in _vision_block_mapping(vc).items():
    plan.append((('vision', 'blocks', ours),
                 [f'{_VISION}blocks.{i}.{hf}' for i in range(vc.depth)], conv))
  for ours, (hf, conv) in _merger_mapping().items():
    plan.append((('vision', 'merger', ours), [f'{_VISION}merger.{hf}'], conv))
  n_ds = len(vc.deepstack_visual_indexes)
  if n_ds:
    for ours, (hf, conv) in _merger_mapping().items():
      plan.append((('vision', 'deepstack', ours),
                   [f'{_VISION}deepstack_merger_list.{j}.{hf}' for j in range(n_ds)], conv))
  return plan


def _expected_shapes(config: Qwen3VLConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  abstract = nnx.eval_shape(lambda: Qwen3VL(config, rngs=nnx.Rngs(0)))
  flat = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
  return {tuple(path): tuple(v.shape) for path, v in flat}


def load_vl_params(folder: str, config: Qwen3VLConfig | None = None,
                   param_dtype=np.float32) -> dict[str, Any]:
  """The folder's tensors in the nested dict layout of `nnx.state(Qwen3VL, Param)`."""
  config = config or read_vl_config(folder)
  files = hf_io.tensor_files(folder)
  plan = tensor_plan(config)
  missing = [n for _, names, _ in plan for n in names if n not in files]
  if missing:
    where = sorted(set(files.values())) or [folder]
    raise HFFormatError(f'{where[0]}: missing tensor {missing[0]}'
                        + (f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''))
  shapes = _expected_shapes(config)
  params: dict[str, Any] = {}
  with hf_read.TensorReader(files) as reader:
    for path, names, conv in plan:
      shape = shapes[path]
      stacked = _is_stacked(path)
      inner = shape[1:] if stacked else shape
      values = [hf_read.as_float_numpy(
          hf_read.convert_tensor(reader.get(n), conv, inner, n, files[n]), np.dtype(param_dtype))
          for n in names]
      set_path(params, path, np.stack(values) if stacked else values[0])
  return params


def _is_stacked(path: tuple[str, ...]) -> bool:
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
