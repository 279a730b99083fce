"""The Qwen3-VL vision tower in Flax NNX, numerically matching `transformers`' Qwen3VLVisionModel.

What it computes (the facts from transformers' modeling_qwen3_vl.py and vision_utils.py):
- Pixels arrive packed as the image processor emits them: one row per patch of
  (channels x temporal_patch x patch x patch) values, patches of each image in 2x2-merge-block
  order, images (and video frames) one after another. The patch embedding is a Conv3d whose
  kernel equals its stride, i.e. one linear map of each row.
- A learned square table of position embeddings is bilinearly resampled (align_corners=True) to
  each frame's (h, w) grid and added.
- Blocks: pre-LayerNorm attention with 2-D rotary positions on (h, w) and full attention within
  each frame (transformers' cu_seqlens: block-diagonal over the packed patches), then a
  tanh-GELU MLP.
- The merger (LayerNorm over each patch -> concat 2x2 -> fc1 -> exact GELU -> fc2) gives one
  token per 2x2 block; the deepstack mergers (concat 2x2 -> LayerNorm -> fc1 -> GELU -> fc2) tap
  the outputs of the blocks in `deepstack_visual_indexes`.

Everything that depends only on the grids (`image_grid_thw`) is host-side numpy
(`grid_layout`): the grids fix the shapes anyway, so the jitted forward sees them as constants.

Attention per frame under static shapes: whole frames are packed into attention rows of a fixed
length (`attention_rows`: first fit, largest frame first), each row an [R, P] table of pack
indices. A block gathers q / k / v into those rows, attends within each row (a segment mask
keeps the frames sharing a row apart) and scatters the result back to pack order for the
merger. Scores are [R, H, P, P]: with P the largest frame (or its bucket) their size follows the
frames' own sizes (sum over rows of P^2, at most about 2 x patches x P), not the square of the
whole pack.
Block parameters are stacked on a leading 'layers' axis and run with `lax.scan`, one scan per
run of blocks between deepstack taps.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from copd_jax.fields import Fields
from copd_jax.models.qwen3 import apply_rope, init_param

_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_LN_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """Architecture of the vision tower (HF's `vision_config` fields we honour)."""
  depth: int
  hidden_size: int
  intermediate_size: int
  num_heads: int
  out_hidden_size: int
  num_position_embeddings: int
  deepstack_visual_indexes: tuple[int, ...] = ()
  in_channels: int = 3
  patch_size: int = 16
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  rope_theta: float = 10_000.0

  def __post_init__(self):
    check = Fields('VisionConfig')
    for name in ('depth', 'hidden_size', 'intermediate_size', 'num_heads', 'out_hidden_size',
                 'num_position_embeddings', 'in_channels', 'patch_size', 'temporal_patch_size',
                 'spatial_merge_size'):
      check.positive_int(name, getattr(self, name))
    check.check(self.hidden_size % self.num_heads == 0, 'hidden_size',
                f'must be a multiple of num_heads ({self.num_heads}), got {self.hidden_size}')
    check.check(self.head_dim % 4 == 0, 'hidden_size',
                f'hidden_size / num_heads must be a multiple of 4 (2-D rotary), got {self.head_dim}')
    side = int(round(self.num_position_embeddings ** 0.5))
    check.check(side * side == self.num_position_embeddings, 'num_position_embeddings',
                f'must be a perfect square, got {self.num_position_embeddings}')
    idx = tuple(self.deepstack_visual_indexes)
    check.check(list(idx) == sorted(set(idx)) and all(0 <= i < self.depth for i in idx),
                'deepstack_visual_indexes',
                f'must be increasing block indexes in [0, {self.depth}), got {list(idx)}')

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Values per packed patch row: channels x temporal x patch x patch."""
    return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

  @property
  def merge_unit(self) -> int:
    return self.spatial_merge_size ** 2

  @property
  def grid_side(self) -> int:
    return int(round(self.num_position_embeddings ** 0.5))


# ---------------------------------------------------------------------------------------------
# Grid layout (host-side numpy; depends only on the grids)
# ---------------------------------------------------------------------------------------------

class GridLayout(NamedTuple):
  """Per-patch constants of a packed batch of images / videos.
  interp_index, interp_weight [N, 4]: bilinear taps into the flattened position table.
  rope_hw [N, 2]: (row, column) of each patch for the 2-D rotary embedding.
  segment [N]: attention segment (one per frame).
  attention_rows [R, P]: the patches (indices into N) each attention row holds, -1 for an empty
  slot; every patch that is read appears once (`attention_rows`)."""
  interp_index: np.ndarray
  interp_weight: np.ndarray
  rope_hw: np.ndarray
  segment: np.ndarray
  attention_rows: np.ndarray


def _block_order_rows_cols(h: int, w: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
  """(row, col) of the h*w patches of one frame in the processor's merge-block order
  (block row, block col, row in block, col in block)."""
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
  shape = (h // merge, merge, w // merge, merge)
  return (rows.reshape(shape).transpose(0, 2, 1, 3).reshape(-1),
          cols.reshape(shape).transpose(0, 2, 1, 3).reshape(-1))


def _bilinear_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
  """Two taps and weights per target index on one axis: `F.interpolate(mode='bilinear',
  align_corners=True)` from `side` source points to `size` target points, in fp32 like torch."""
  src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
  floor = np.floor(src)
  offsets = np.arange(2, dtype=np.float32)
  taps = np.clip(floor.astype(np.int64)[:, None] + offsets.astype(np.int64), 0, side - 1)
  weights = np.maximum(np.float32(1) - np.abs(src[:, None] - floor[:, None] - offsets),
                       np.float32(0)).astype(np.float32)
  return taps, weights


def first_fit_rows(frame_sizes, row_length: int) -> list[int]:
  """The attention row of each frame when whole frames are packed into rows of `row_length`
  patches: first fit, largest frame first (ties in frame order), so the packing depends only on
  the sizes. First fit leaves no two rows that could be joined: any two rows hold more than
  `row_length` patches together, so n patches need fewer than 2 n / row_length + 1 rows."""
  sizes = [int(n) for n in frame_sizes]
  if sizes and max(sizes) > row_length:
    raise ValueError(f'a frame of {max(sizes)} patches does not fit an attention row of '
                     f'{row_length}')
  free, row_of = [], [0] * len(sizes)
  for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
    row = next((r for r, room in enumerate(free) if room >= sizes[i]), len(free))
    if row == len(free):
      free.append(row_length)
    free[row] -= sizes[i]
    row_of[i] = row
  return row_of


def attention_rows(frame_starts, frame_sizes, row_length: int, num_rows: int | None = None
                   ) -> np.ndarray:
  """[num_rows, row_length] int32 pack indices of the frames (frame i: patches frame_starts[i]
  .. + frame_sizes[i]) placed whole by `first_fit_rows`, -1 for empty slots. num_rows defaults
  to the rows the frames need."""
  row_of = first_fit_rows(frame_sizes, row_length)
  needed = max(row_of, default=-1) + 1
  num_rows = needed if num_rows is None else num_rows
  if needed > num_rows:
    raise ValueError(f'the frames need {needed} attention rows of {row_length}, got {num_rows}')
  rows = np.full((num_rows, row_length), -1, np.int32)
  filled = np.zeros(num_rows, np.int64)
  for start, size, row in zip(frame_starts, frame_sizes, row_of):
    rows[row, filled[row]:filled[row] + size] = np.arange(start, start + size)
    filled[row] += size
  return rows


def grid_layout(grid_thw: np.ndarray, config: VisionConfig) -> GridLayout:
  """The GridLayout of packed patches for grids [num_items, 3] of (t, h, w) in patches; the
  attention rows are as long as the largest frame (no padding when the frames are equal)."""
  m, side = config.spatial_merge_size, config.grid_side
  index, weight, rope, segment = [], [], [], []
  frames, sizes = 0, []
  for t, h, w in np.asarray(grid_thw, np.int64).reshape(-1, 3).tolist():
    if h % m or w % m:
      raise ValueError(f'grid (t={t}, h={h}, w={w}) is not a multiple of the merge size {m}')
    rows, cols = _block_order_rows_cols(h, w, m)
    h_taps, h_wts = _bilinear_taps(rows, h, side)
    w_taps, w_wts = _bilinear_taps(cols, w, side)
    frame_index = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    frame_weight = (h_wts[:, :, None] * w_wts[:, None, :]).reshape(-1, 4)
    for _ in range(t):
      index.append(frame_index)
      weight.append(frame_weight)
      rope.append(np.stack([rows, cols], axis=-1))
      segment.append(np.full(h * w, frames, np.int32))
      sizes.append(h * w)
      frames += 1
  starts = np.cumsum([0] + sizes[:-1])
  return GridLayout(np.concatenate(index).astype(np.int32), np.concatenate(weight),
                    np.concatenate(rope).astype(np.int32), np.concatenate(segment),
                    attention_rows(starts, sizes, max(sizes)))


def merged_token_counts(grid_thw: np.ndarray, config: VisionConfig) -> list[int]:
  """Language-model tokens each image / video becomes: t * h * w / merge^2."""
  g = np.asarray(grid_thw, np.int64).reshape(-1, 3)
  return (g.prod(-1) // config.merge_unit).tolist()


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------

def _block_param_specs(c: VisionConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...], str]]:
  L, D, F, H, hd = c.depth, c.hidden_size, c.intermediate_size, c.num_heads, c.head_dim
  return {
      'norm1_scale': ((L, D), ('layers', 'norm'), 'ones'),
      'norm1_bias': ((L, D), ('layers', 'norm'), 'zeros'),
      'qkv': ((L, D, 3, H, hd), ('layers', 'embed', None, 'q_heads', 'head_dim'), 'normal'),
      'qkv_bias': ((L, 3, H, hd), ('layers', None, 'q_heads', 'head_dim'), 'zeros'),
      'proj': ((L, H, hd, D), ('layers', 'q_heads', 'head_dim', 'embed'), 'normal'),
      'proj_bias': ((L, D), ('layers', 'embed'), 'zeros'),
      'norm2_scale': ((L, D), ('layers', 'norm'), 'ones'),
      'norm2_bias': ((L, D), ('layers', 'norm'), 'zeros'),
      'fc1': ((L, D, F), ('layers', 'embed', 'mlp'), 'normal'),
      'fc1_bias': ((L, F), ('layers', 'mlp'), 'zeros'),
      'fc2': ((L, F, D), ('layers', 'mlp', 'embed'), 'normal'),
      'fc2_bias': ((L, D), ('layers', 'embed'), 'zeros'),
  }


def _merger_param_specs(c: VisionConfig, count: int | None, norm_dim: int):
  """A patch merger's parameters; with `count`, stacked on a leading 'layers' axis."""
  M, O = c.hidden_size * c.merge_unit, c.out_hidden_size
  lead, lead_axes = ((count,), ('layers',)) if count is not None else ((), ())
  return {
      'norm_scale': (lead + (norm_dim,), lead_axes + ('norm',), 'ones'),
      'norm_bias': (lead + (norm_dim,), lead_axes + ('norm',), 'zeros'),
      'fc1': (lead + (M, M), lead_axes + ('embed', 'mlp'), 'normal'),
      'fc1_bias': (lead + (M,), lead_axes + ('mlp',), 'zeros'),
      'fc2': (lead + (M, O), lead_axes + ('mlp', 'embed'), 'normal'),
      'fc2_bias': (lead + (O,), lead_axes + ('embed',), 'zeros'),
  }


class _ParamGroup(nnx.Module):
  """A flat group of named parameters built from a spec dict."""

  def __init__(self, specs, *, rngs, param_dtype, init_std):
    for name, (shape, axes, kind) in specs.items():
      setattr(self, name, init_param(rngs, shape, axes, kind, param_dtype, init_std))

  def as_dict(self) -> dict[str, jax.Array]:
    return {name: value[...] for name, value in vars(self).items() if isinstance(value, nnx.Param)}


class TowerOutput(NamedTuple):
  """What the tower gives the decoder: merged tokens [M, out_hidden] and deepstack features
  [len(deepstack_visual_indexes), M, out_hidden] (None without deepstack taps)."""
  tokens: jax.Array
  features: jax.Array | None


class VisionTower(nnx.Module):
  """Qwen3VLVisionModel: packed patch rows -> TowerOutput (merged tokens, deepstack features)."""

  def __init__(self, config: VisionConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
               compute_dtype=jnp.float32, init_std: float = 0.02, remat: bool = False):
    c = config
    self.config = c
    self.compute_dtype = compute_dtype
    self.remat = remat   # checkpoint each block: the backward keeps block inputs only
    self.patch_embed = init_param(rngs, (c.patch_dim, c.hidden_size), (None, 'embed'), 'normal',
                             param_dtype, init_std)
    self.patch_bias = init_param(rngs, (c.hidden_size,), ('embed',), 'zeros', param_dtype, init_std)
    self.pos_embed = init_param(rngs, (c.num_position_embeddings, c.hidden_size), (None, 'embed'),
                           'normal', param_dtype, init_std)
    kw = dict(rngs=rngs, param_dtype=param_dtype, init_std=init_std)
    self.blocks = _ParamGroup(_block_param_specs(c), **kw)
    self.merger = _ParamGroup(_merger_param_specs(c, None, c.hidden_size), **kw)
    n_ds = len(c.deepstack_visual_indexes)
    if n_ds:
      self.deepstack = _ParamGroup(
          _merger_param_specs(c, n_ds, c.hidden_size * c.merge_unit), **kw)

  def __call__(self, pixels: jax.Array, layout: GridLayout) -> TowerOutput:
    """pixels [N, patch_dim] -> (tokens [N / merge^2, out_hidden], deepstack features
    [len(deepstack_visual_indexes), N / merge^2, out_hidden] or None)."""
    c, dt = self.config, self.compute_dtype
    x = jnp.dot(pixels.astype(dt), self.patch_embed[...].astype(dt)) + self.patch_bias[...].astype(dt)
    x = x + position_embedding(self.pos_embed[...], layout).astype(dt)
    cos, sin = vision_rope_tables(jnp.asarray(layout.rope_hw), c.head_dim, c.rope_theta)
    rows = frame_rows(jnp.asarray(layout.attention_rows), jnp.asarray(layout.segment))
    blocks = self.blocks.as_dict()

    def body(x, p):
      return vision_block(p, x, cos, sin, rows, dt), None

    if self.remat:
      body = jax.checkpoint(body)

    taps, start = [], 0
    for stop in [i + 1 for i in c.deepstack_visual_indexes]:
      x, _ = jax.lax.scan(body, x, jax.tree.map(lambda a: a[start:stop], blocks))
      taps.append(x)
      start = stop
    if start < c.depth:
      x, _ = jax.lax.scan(body, x, jax.tree.map(lambda a: a[start:], blocks))
    tokens = patch_merger(self.merger.as_dict(), x, c.merge_unit, postshuffle_norm=False, dtype=dt)
    if not taps:
      return TowerOutput(tokens, None)
    ds = self.deepstack.as_dict()
    features = jnp.stack([
        patch_merger(jax.tree.map(lambda a: a[j], ds), tap, c.merge_unit, postshuffle_norm=True,
                     dtype=dt) for j, tap in enumerate(taps)])
    return TowerOutput(tokens, features)


# ---------------------------------------------------------------------------------------------
# The maths (pure functions)
# ---------------------------------------------------------------------------------------------

def position_embedding(table: jax.Array, layout: GridLayout) -> jax.Array:
  """Learned positions bilinearly resampled to each patch: sum of 4 weighted table rows [N, D]."""
  rows = jnp.take(table.astype(jnp.float32), jnp.asarray(layout.interp_index), axis=0)
  return jnp.einsum('nkd,nk->nd', rows, jnp.asarray(layout.interp_weight))


def vision_rope_tables(rope_hw: jax.Array, head_dim: int, theta: float):
  """cos, sin [N, head_dim] (fp32) of the axial 2-D rotary embedding: the first quarter of the
  frequencies rotates by the row, the second by the column, repeated for both halves
  ('rotate_half' layout)."""
  quarter = head_dim // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(0, quarter, 2, dtype=jnp.float32) / quarter))
  angles = rope_hw.astype(jnp.float32)[..., None] * inv_freq          # [N, 2, head_dim / 4]
  angles = angles.reshape(angles.shape[0], -1)                         # [h freqs, w freqs]
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)



def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float = _LN_EPS):
  """LayerNorm over the last axis, in fp32, returned in x's dtype."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  out = (x32 - mean) * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
  return out.astype(x.dtype)


class FrameRows(NamedTuple):
  """The attention rows of a pack as the blocks use them (`frame_rows`)."""
  gather: jax.Array     # [R, P] pack index of each slot (0 for an empty slot)
  scatter: jax.Array    # [R, P] pack index of each slot, N (dropped) for an empty slot
  mask: jax.Array       # [R, P, P] bool: query slot and key slot hold the same frame


def frame_rows(rows: jax.Array, segment: jax.Array) -> FrameRows:
  """FrameRows of attention rows [R, P] (pack indices, -1 empty) over a pack with per-patch
  segments [N]. Empty slots form a segment of their own, so no real patch attends to them and
  their (dropped) rows of scores stay finite."""
  valid = rows >= 0
  gather = jnp.where(valid, rows, 0)
  row_segment = jnp.where(valid, jnp.take(segment, gather), -1)
  return FrameRows(gather, jnp.where(valid, rows, segment.shape[0]),
                   row_segment[:, :, None] == row_segment[:, None, :])


def frame_attention(q, k, v, rows: FrameRows):
  """Full (non-causal) attention among patches of the same frame, one attention row at a time.
  q, k, v [N, H, hd] -> [N, H, hd]; patches in no row get 0."""
  hd = q.shape[-1]
  take = lambda x: jnp.take(x, rows.gather, axis=0)                     # [R, P, H, hd]
  scores = jnp.einsum('rqhd,rkhd->rhqk', take(q), take(k),
                      preferred_element_type=jnp.float32) * hd ** -0.5
  scores = jnp.where(rows.mask[:, None], scores, _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum('rhqk,rkhd->rqhd', probs, take(v))
  return jnp.zeros_like(q).at[rows.scatter.reshape(-1)].set(
      out.reshape((-1,) + q.shape[1:]), mode='drop')


def vision_block(p: dict[str, jax.Array], x, cos, sin, rows: FrameRows, dtype):
  """One vision block: x + attn(norm1(x)); x + mlp(norm2(x)) with a tanh-GELU MLP."""
  w = {name: value.astype(dtype) for name, value in p.items()}
  y = layer_norm(x, p['norm1_scale'], p['norm1_bias'])
  qkv = jnp.einsum('nd,dshe->snhe', y, w['qkv']) + w['qkv_bias'][:, None]
  q, k, v = apply_rope(qkv[0], cos, sin), apply_rope(qkv[1], cos, sin), qkv[2]
  attn = frame_attention(q, k, v, rows)
  x = x + jnp.einsum('nhe,hed->nd', attn, w['proj']) + w['proj_bias']
  y = layer_norm(x, p['norm2_scale'], p['norm2_bias'])
  y = jax.nn.gelu(jnp.dot(y, w['fc1']) + w['fc1_bias'], approximate=True)
  return x + jnp.dot(y, w['fc2']) + w['fc2_bias']


def patch_merger(p: dict[str, jax.Array], x: jax.Array, merge_unit: int, *,
                 postshuffle_norm: bool, dtype) -> jax.Array:
  """x [N, D] -> [N / merge_unit, out]: concat each merge block's patches, fc1, exact GELU, fc2.
  The LayerNorm runs per patch (main merger) or over the concatenation (deepstack mergers)."""
  if postshuffle_norm:
    y = layer_norm(x.reshape(-1, x.shape[-1] * merge_unit), p['norm_scale'], p['norm_bias'])
  else:
    y = layer_norm(x, p['norm_scale'], p['norm_bias']).reshape(-1, x.shape[-1] * merge_unit)
  w = {name: value.astype(dtype) for name, value in p.items()}
  y = jax.nn.gelu(jnp.dot(y, w['fc1']) + w['fc1_bias'], approximate=False)
  return jnp.dot(y, w['fc2']) + w['fc2_bias']

