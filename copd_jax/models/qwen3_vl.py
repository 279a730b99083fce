"""Qwen3-VL (vision tower + Qwen3 decoder) in Flax NNX, matching transformers'
Qwen3VLForConditionalGeneration forward.

The text side is the existing Qwen3 decoder: its parameters (`Qwen3` module) and its
`decoder_layer`, unchanged. What Qwen3-VL adds around it:
- token embeddings at `<|image_pad|>` / `<|video_pad|>` positions are replaced by the vision
  tower's merged tokens, in order (transformers' `masked_scatter`);
- rotary tables come from three position rows (t, h, w) interleaved over the frequencies
  (`qwen3_vl_positions`), computed on the host from the token ids and grids;
- deepstack: after decoder layer i < len(deepstack_visual_indexes), the i-th deepstack
  feature of each visual token is added to that token's hidden state (after the first layers of
  the decoder, not at the vision indexes). The decoder runs as two scans: the deepstack layers
  with their per-layer additions as scanned inputs, then the rest.

Pixels and grids travel together in a `VisualInput`; grids are host numpy (they fix shapes).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from copd_jax.fields import Fields
from copd_jax.models.qwen3 import Qwen3, Qwen3Config, causal_mask, decoder_layer, rms_norm
from copd_jax.models.qwen3_vl_positions import mrope_position_ids, mrope_tables
from copd_jax.models.qwen3_vl_vision import (GridLayout, TowerOutput, VisionConfig, VisionTower,
                                             grid_layout)
from copd_jax.tracing import TRACE_COUNTS


@dataclasses.dataclass(frozen=True)
class Qwen3VLConfig:
  """A Qwen3-VL model: text decoder, vision tower, M-RoPE layout and special token ids."""
  text: Qwen3Config
  vision: VisionConfig
  mrope_section: tuple[int, int, int] = (24, 20, 20)
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653

  def __post_init__(self):
    check = Fields('Qwen3VLConfig')
    section = tuple(self.mrope_section)
    check.check(len(section) == 3 and all(isinstance(s, int) and s >= 0 for s in section),
                'mrope_section', f'must be three non-negative ints, got {list(section)}')
    check.check(self.vision.out_hidden_size == self.text.hidden_size, 'vision.out_hidden_size',
                f'must equal the text hidden_size {self.text.hidden_size}, got '
                f'{self.vision.out_hidden_size}')
    check.check(len(self.vision.deepstack_visual_indexes) <= self.text.num_layers,
                'vision.deepstack_visual_indexes',
                f'has more entries than the decoder has layers ({self.text.num_layers})')


@functools.partial(jax.tree_util.register_dataclass, data_fields=['pixels'],
                   meta_fields=['grid_thw'])
@dataclasses.dataclass(frozen=True)
class VisualInput:
  """Packed patch rows of every image (video) in the batch, in prompt order, with their grids.
  pixels [N, patch_dim]; grid_thw: ((t, h, w), ...) in patches, a static (hashable) pytree field
  because the grids fix every shape of the vision tower."""
  pixels: jax.Array
  grid_thw: tuple[tuple[int, int, int], ...]

  @classmethod
  def of(cls, pixels, grid_thw) -> 'VisualInput':
    grids = tuple(tuple(int(v) for v in g) for g in np.asarray(grid_thw).reshape(-1, 3))
    return cls(jnp.asarray(pixels), grids)


class Qwen3VL(nnx.Module):
  """Qwen3VLForConditionalGeneration: `text` is a Qwen3 decoder, `vision` the vision tower."""

  def __init__(self, config: Qwen3VLConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
               compute_dtype=jnp.float32, remat: bool = False, init_std: float = 0.02):
    self.config = config
    self.compute_dtype = compute_dtype
    self.remat = remat
    self.text = Qwen3(config.text, rngs=rngs, param_dtype=param_dtype,
                      compute_dtype=compute_dtype, remat=remat, init_std=init_std)
    self.vision = VisionTower(config.vision, rngs=rngs, param_dtype=param_dtype,
                              compute_dtype=compute_dtype, init_std=init_std, remat=remat)

  def position_ids(self, tokens, *, images: VisualInput | None = None,
                   videos: VisualInput | None = None, token_valid=None) -> np.ndarray:
    """Host-side M-RoPE position ids [3, B, T] of a prompt batch (transformers' get_rope_index)."""
    c = self.config
    positions, _ = mrope_position_ids(
        np.asarray(tokens), image_token_id=c.image_token_id, video_token_id=c.video_token_id,
        spatial_merge_size=c.vision.spatial_merge_size,
        image_grid_thw=None if images is None else images.grid_thw,
        video_grid_thw=None if videos is None else videos.grid_thw,
        token_valid=None if token_valid is None else np.asarray(token_valid))
    return positions

  def __call__(self, tokens: jax.Array, *, images: VisualInput | None = None,
               videos: VisualInput | None = None, positions: jax.Array | None = None,
               token_valid: jax.Array | None = None) -> jax.Array:
    """tokens [B, T] -> fp32 logits [B, T, vocab] (a full causal forward, no cache).

    positions [3, B, T] default to `position_ids` (needs concrete tokens). token_valid [B, T]
    marks real tokens (default all)."""
    if positions is None:
      positions = self.position_ids(tokens, images=images, videos=videos, token_valid=token_valid)
    hidden = self.hidden_states(tokens, positions, images=images, videos=videos,
                                token_valid=token_valid)
    return self.text.logits(hidden)

  def encode_visual(self, visual: VisualInput) -> tuple[jax.Array, jax.Array | None]:
    """The vision tower on one packed VisualInput: (tokens [M, D], deepstack [n_ds, M, D])."""
    TRACE_COUNTS['vision_tower'] += 1   # once per trace of a program that runs the tower
    return self.vision(visual.pixels, grid_layout(visual.grid_thw, self.config.vision))

  def embed_inputs(self, tokens, *, images: VisualInput | None = None,
                   videos: VisualInput | None = None) -> tuple[jax.Array, jax.Array | None]:
    """The decoder's input: token embeddings [B, T, D] (compute dtype) with the vision tower's
    merged tokens at the image / video pad positions, and the deepstack additions
    [n_ds, B, T, D] (zero off the visual tokens; None when the config has no deepstack taps).
    The only place the vision tower runs: the sampler's prefill calls it too."""
    c, dt = self.config, self.compute_dtype
    h = jnp.take(self.text.embed[...], tokens, axis=0).astype(dt)
    n_ds = len(c.vision.deepstack_visual_indexes)
    deepstack = jnp.zeros((n_ds,) + h.shape, dt) if n_ds else None
    for visual, token_id in ((images, c.image_token_id), (videos, c.video_token_id)):
      if visual is None:
        continue
      merged, features = self.encode_visual(visual)
      slots = tokens == token_id
      h = scatter_tokens(h, slots, merged.astype(dt))
      if features is not None:
        deepstack = jax.vmap(lambda acc, f: scatter_tokens(acc, slots, f.astype(dt)))(
            deepstack, features)
    return h, deepstack

  def encode_pack(self, patches) -> TowerOutput:
    """The vision tower on a padded pack `patches` (a vision_batch.PatchPack)."""
    TRACE_COUNTS['vision_tower'] += 1
    layout = GridLayout(patches.interp_index, patches.interp_weight, patches.rope_hw,
                        patches.segment, patches.attention_rows)
    return self.vision(patches.pixels, layout)

  def embed_packed(self, tokens, visual_slot, patches) -> tuple[jax.Array, jax.Array | None]:
    """`embed_inputs` for pictures as static-shaped data (`vision_batch`): the tower runs on the
    padded pack `patches` (a vision_batch.PatchPack; or `patches` is its TowerOutput, computed
    once for several calls), and position t of row b takes merged token visual_slot[b, t] - 1
    (0: the token's own embedding) and its deepstack features."""
    dt = self.compute_dtype
    encoded = patches if isinstance(patches, TowerOutput) else self.encode_pack(patches)
    merged, features = encoded
    h = jnp.take(self.text.embed[...], tokens, axis=0).astype(dt)
    visual = (visual_slot > 0)[..., None]
    index = jnp.maximum(visual_slot - 1, 0)
    h = jnp.where(visual, jnp.take(merged.astype(dt), index, axis=0), h)
    if features is None:
      return h, None
    deepstack = jnp.where(visual[None], jnp.take(features.astype(dt), index, axis=1), 0)
    return h, deepstack

  def packed_hidden_states(self, tokens, token_valid, vision=None) -> jax.Array:
    """Final-normed hidden states [B, T, D] of rows tokens [B, T] whose pictures come as a
    `vision_batch.VisionBatch` of one branch (positions [B, 3, T]); vision None: text rows,
    plain positions on all three M-RoPE rows (what transformers gives a text-only prompt)."""
    if vision is None:
      h = jnp.take(self.text.embed[...], tokens, axis=0).astype(self.compute_dtype)
      plain = jnp.maximum(jnp.cumsum(token_valid.astype(jnp.int32), axis=-1) - 1, 0)
      return self._decode(h, None, jnp.broadcast_to(plain[None], (3,) + plain.shape),
                          token_valid)
    h, deepstack = self.embed_packed(tokens, vision.visual_slot, vision.patches)
    return self._decode(h, deepstack, jnp.moveaxis(vision.positions, -2, 0), token_valid)

  def hidden_states(self, tokens, positions, *, images=None, videos=None, token_valid=None):
    """Final-normed hidden states [B, T, D] in the compute dtype."""
    if token_valid is None:
      token_valid = jnp.ones(tokens.shape, bool)
    h, deepstack = self.embed_inputs(tokens, images=images, videos=videos)
    return self._decode(h, deepstack, positions, token_valid)

  def _decode(self, h, deepstack, positions, token_valid):
    """The decoder stack on input embeddings h [B, T, D] (deepstack additions or None, M-RoPE
    positions [3, B, T]) -> final-normed hidden states."""
    c, dt = self.config, self.compute_dtype
    tc = c.text
    cos, sin = mrope_tables(jnp.asarray(positions), tc.head_dim, tc.rope_theta, c.mrope_section)
    mask = causal_mask(token_valid)
    h = decoder_stack(self.text.layers.as_dict(), h, cos, sin, mask, deepstack, tc, dt,
                      remat=self.remat)
    return rms_norm(h, self.text.final_norm[...], tc.rms_norm_eps)


@nnx.jit
def forward(model: Qwen3VL, tokens, positions, images=None, videos=None, token_valid=None):
  """Jitted `Qwen3VL.__call__` with explicit positions [3, B, T] (from `model.position_ids`):
  fp32 logits [B, T, vocab]. Recompiles per distinct grids (static in VisualInput)."""
  return model(tokens, images=images, videos=videos, positions=positions,
               token_valid=token_valid)


def scatter_tokens(h: jax.Array, slots: jax.Array, values: jax.Array) -> jax.Array:
  """h [B, T, D] with the positions where slots [B, T] is True replaced, in row-major order,
  by values [M, D] (transformers' masked_scatter). M must equal slots.sum()."""
  flat = slots.reshape(-1)
  index = jnp.clip(jnp.cumsum(flat) - 1, 0, values.shape[0] - 1)
  picked = jnp.take(values, index, axis=0).reshape(h.shape)
  return jnp.where(slots[..., None], picked, h)


def decoder_stack(layer_params, h, cos, sin, mask, deepstack, c: Qwen3Config, dtype, *,
                  remat: bool = False):
  """All decoder layers; after layer i < len(deepstack), deepstack[i] ([B, T, D], zero off the
  visual tokens) is added to the hidden states."""
  def plain(h, p):
    h, _ = decoder_layer(p, h, cos, sin, mask, None, c, dtype)
    return h, None

  def with_deepstack(h, xs):
    p, extra = xs
    h, _ = decoder_layer(p, h, cos, sin, mask, None, c, dtype)
    return h + extra, None

  if remat:
    plain, with_deepstack = jax.checkpoint(plain), jax.checkpoint(with_deepstack)
  n_ds = 0 if deepstack is None else deepstack.shape[0]
  if n_ds:
    first = jax.tree.map(lambda a: a[:n_ds], layer_params)
    h, _ = jax.lax.scan(with_deepstack, h, (first, deepstack))
  if n_ds < c.num_layers:
    h, _ = jax.lax.scan(plain, h, jax.tree.map(lambda a: a[n_ds:], layer_params))
  return h
