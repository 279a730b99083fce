"""The model's cached forward as the decode program runs it, in two decode modes:

'layerwise' (the default): the decoder blocks unrolled over per-layer weights and per-layer KV
cache buffers, prepared once per sampler call, so no decode step slices a stacked weight or
cache. 'model': `Qwen3.hidden_states` as the model is configured (scan over layers, or
unrolled), kept as the reference the other mode is tested and benchmarked against.

A Qwen3-VL model runs through the same code ('layerwise' only): its decoder is the Qwen3
decoder (`text_model`), and its prefill additionally takes the prompts' images / videos
(`VisionPrefill`): the vision tower runs there, once per call, its merged tokens replace the
pad tokens' embeddings, deepstack features are added after the first decoder layers and the
rotary tables come from M-RoPE positions [3, B, T]. Decode steps feed text tokens only, whose
three M-RoPE rows are equal, so they use the text tables at positions shifted by the prompt's
`rope_deltas` (`decode.py`).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from copd_jax.models import qwen3
from copd_jax.models.qwen3 import KVCache
from copd_jax.models.qwen3_vl import Qwen3VL, VisualInput
from copd_jax.models.qwen3_vl_positions import mrope_position_ids, mrope_tables

DECODE_MODES = ('layerwise', 'model')


class LayerCaches(NamedTuple):
  """The model's KVCache split into one buffer per layer (k [B, kv_heads, head_dim, S], v
  [B, kv_heads, S, head_dim]): a step updates each in place and attends to it whole, with no
  slice or reshape of a stacked buffer (either makes XLA copy the cache every step)."""
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  valid: jax.Array       # [B, S]
  index: jax.Array       # scalar int32


class VisionPrefill(NamedTuple):
  """The visual side of a Qwen3-VL prompt batch, read by the prefill only. images / videos: the
  prompts' pictures packed in prompt order (`qwen3_vl.VisualInput`, or None); positions
  [3, B, P] int32: M-RoPE positions of the prompt tokens as laid out in the input
  (`qwen3_vl_positions.mrope_position_ids`, 0 at padding); deltas [B] int32: max position + 1 -
  real tokens per prompt, the offset of every position after the prompt.

  The branch-stacked sampler gives the pictures as static-shaped data instead
  (`vision_batch`): images / videos / deltas None, `patches` a vision_batch.PatchPack and
  visual_slot [B, P] which merged token each prompt position reads."""
  images: VisualInput | None
  videos: VisualInput | None
  positions: jax.Array
  deltas: jax.Array | None
  patches: Any = None
  visual_slot: jax.Array | None = None


def vision_prefill(model: Qwen3VL, tokens: np.ndarray, valid: np.ndarray,
                   images: VisualInput | None, videos: VisualInput | None) -> VisionPrefill:
  """The VisionPrefill of host prompts tokens, valid [B, P] (raises ValueError naming the row
  when pad-token runs and grids do not match)."""
  if not isinstance(model, Qwen3VL):
    raise ValueError(f'images / videos need a Qwen3-VL model, got {type(model).__name__}')
  c = model.config
  positions, deltas = mrope_position_ids(
      tokens, image_token_id=c.image_token_id, video_token_id=c.video_token_id,
      spatial_merge_size=c.vision.spatial_merge_size,
      image_grid_thw=None if images is None else images.grid_thw,
      video_grid_thw=None if videos is None else videos.grid_thw, token_valid=valid)
  return VisionPrefill(images, videos, jnp.asarray(positions), jnp.asarray(deltas))


def text_model(model) -> qwen3.Qwen3:
  """The Qwen3 decoder the cache belongs to: the model itself, or a Qwen3-VL model's text side."""
  return model.text if isinstance(model, Qwen3VL) else model


class Weights(NamedTuple):
  """What `Forward` reads, prepared once per sampler call (`Forward.prepare`)."""
  params: Any            # the model's nnx.State
  layers: Any            # per-layer weight dicts ('layerwise'): given, or sliced once per call
  head: Any              # the output projection in the compute dtype ('layerwise'); or None
  rope: Any              # (cos, sin) [slots, head_dim] for positions 0..slots-1 ('layerwise')


class Forward:
  """The model's cached forward: (weights, tokens [B, T], positions [B, T], token_valid [B, T],
  cache) -> (fp32 logits of the last position [B, V], updated cache). Two modes, same function:

  'model': `Qwen3.hidden_states` as the model is configured (scan over layers, or unrolled).
  'layerwise': the same decoder blocks (`qwen3.decoder_layer`) unrolled over per-layer weights,
  sliced once before the decode loop (`prepare`), and per-layer cache buffers, so no step
  re-slices a stacked weight or cache (slices are copies on CPU; see BENCHMARKS.md). Sliced in
  the program (GPU / TPU) they are a second copy of the layer weights for the duration of the
  call; on CPU the matmul weights come in as views of the stacked ones
  (`placement.unstacked_layers`).
  """

  def __init__(self, graphdef, mode: str):
    if mode not in DECODE_MODES:
      raise ValueError(f'unknown decode mode {mode!r}; known: {DECODE_MODES}')
    self.graphdef = graphdef
    self.mode = mode

  def prepare(self, params, layers=None, *, slots: int) -> Weights:
    """slots: the cache length (every RoPE position is below it). layers: per-layer dicts of
    weights given as program inputs (`placement.unstacked_layers`), or None; the rest are
    sliced here."""
    if self.mode == 'model':
      return Weights(params, None, None, None)
    model = text_model(nnx.merge(self.graphdef, params))
    dtype = model.compute_dtype
    stacked = model.layers.as_dict()
    given = layers or [{}] * model.config.num_layers
    layers = [{name: layer[name] if name in layer else w[i] for name, w in stacked.items()}
              for i, layer in enumerate(given)]
    # Matmul weights are cast to the compute dtype here, once per call, instead of in every
    # decode step (fp32 master weights with bf16 compute would otherwise be read at 4 bytes per
    # parameter per token). Same values: the decoder block casts them the same way; norm scales
    # are read in their own dtype there, so they stay as they are.
    layers = [{name: w if 'norm' in name else w.astype(dtype) for name, w in layer.items()}
              for layer in layers]
    # RoPE tables for every position, looked up per step: computed from the step's positions
    # instead, XLA fuses the sin / cos into each layer's consumers and evaluates them there.
    rope = qwen3.rope_tables(jnp.arange(slots), model.config.head_dim, model.config.rope_theta)
    return Weights(params, layers, model.head_weight(), rope)

  def empty_cache(self, weights: Weights, batch: int, slots: int):
    model = text_model(nnx.merge(self.graphdef, weights.params))
    cache = KVCache.empty(model.config, batch, slots, dtype=model.compute_dtype)
    if self.mode == 'model':
      return cache
    layers = range(model.config.num_layers)
    return LayerCaches(tuple(cache.k[i] for i in layers), tuple(cache.v[i] for i in layers),
                        cache.valid, cache.index)

  def __call__(self, weights: Weights, tokens, positions, token_valid, cache,
               vision: VisionPrefill | None = None):
    """vision (a Qwen3-VL prefill, 'layerwise'): positions are then M-RoPE [3, B, T]."""
    full = nnx.merge(self.graphdef, weights.params)
    model = text_model(full)
    if self.mode == 'model':
      hidden, cache = model.hidden_states(tokens, positions=positions, token_valid=token_valid,
                                          cache=cache)
      return model.logits(hidden[:, -1:])[:, 0], cache
    # Mirrors the cached branch of Qwen3.hidden_states, layer by layer.
    c, dtype = model.config, model.compute_dtype
    valid = jax.lax.dynamic_update_slice(cache.valid, token_valid, (0, cache.index))
    mask = qwen3.cached_mask(valid, cache.index, tokens.shape[1])
    if vision is None:
      h = jnp.take(model.embed[...], tokens, axis=0).astype(dtype)
      cos, sin = (jnp.take(table, positions, axis=0) for table in weights.rope)
      deepstack = ()
    else:
      if vision.patches is not None:
        h, deepstack = full.embed_packed(tokens, vision.visual_slot, vision.patches)
      else:
        h, deepstack = full.embed_inputs(tokens, images=vision.images, videos=vision.videos)
      cos, sin = mrope_tables(positions, c.head_dim, c.rope_theta, full.config.mrope_section)
      deepstack = () if deepstack is None else deepstack
    ks, vs = [], []
    last = len(weights.layers) - 1
    for i, (p, k, v) in enumerate(zip(weights.layers, cache.k, cache.v)):
      h, (k, v) = qwen3.decoder_layer(p, h, cos, sin, mask, (k, v, None, cache.index), c, dtype,
                                      last_query_only=i == last, attention=model.attention)
      if i < len(deepstack):   # Qwen3-VL: after layer i, deepstack feature i (last rows of h)
        h = h + deepstack[i][:, -h.shape[1]:]
      ks.append(k)
      vs.append(v)
    h = qwen3.rms_norm(h, model.final_norm[...], c.rms_norm_eps)
    cache = LayerCaches(tuple(ks), tuple(vs), valid, cache.index + tokens.shape[1])
    return qwen3.head_logits(h, weights.head, c.tie_word_embeddings)[:, 0], cache

