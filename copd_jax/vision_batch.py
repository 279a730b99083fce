"""The pictures of a rollout batch as static-shaped arrays: what the branch-stacked sampler and
the GRPO / OPD steps feed a Qwen3-VL model.

`qwen3_vl.VisualInput` keeps the grids as static metadata, so every distinct set of image sizes
is its own compiled program, and K branches (whose prompts hold different pictures) cannot be
vmapped together. Here the grid-dependent per-patch constants (`qwen3_vl_vision.grid_layout`:
bilinear taps of the position table, 2-D rotary rows / columns, attention segment) travel as
data next to the pixels, and each branch's packed patches are zero-padded to a static bucket
(`PATCH_BUCKETS`). Padding patches have segment 0 and sit in no attention row; no token reads
their merged outputs.

The tower attends within each frame (`qwen3_vl_vision.attention_rows`): the frames of a pack
are packed whole into R attention rows of P patches, an [R, P] table of pack indices that is
data too. P is the power-of-two bucket (`row_length`, at least `MIN_ROW_LENGTH`) of the largest
frame of any branch of the batch, R is S / P when every branch's frames fit that many rows and
2 S / P otherwise (first fit always fits 2 S / P rows), so a step compiles once per (token
length, patch bucket S, row length P, R in {S / P, 2 S / P}), and its attention costs R P^2
per head: about the frames' own sizes squared, never S^2.

Which language-model position reads which merged vision token is data too: `visual_slot`
[rows, T] holds m + 1 for merged token m of the branch's pack, 0 for text, so zero-padding a
batch (more columns, more rows) never invents a visual token, the rows of a GRPO group all
point at their prompt's one copy of the pictures (the tower runs once per prompt), and a
sampled `<|image_pad|>` in a completion stays text, as the sampler fed it. Images and videos
share one pack (videos are frames of the same tower). `positions` [rows, 3, T] are the M-RoPE
positions of every column: the prompt's from `qwen3_vl_positions.mrope_position_ids`, the
completion's continuing from the prompt's largest position + 1, as the sampler's decode does.
"""
from __future__ import annotations

import bisect
import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from copd_jax.models.qwen3_vl_positions import mrope_position_ids
from copd_jax.models.qwen3_vl_vision import (VisionConfig, attention_rows, first_fit_rows,
                                             grid_layout)

# Patch-count buckets (powers of two): a run compiles its steps for at most these pack sizes.
PATCH_BUCKETS: tuple[int, ...] = tuple(2 ** i for i in range(6, 21))
# Shortest attention row: frames smaller than this share rows.
MIN_ROW_LENGTH = 16


class PatchPack(NamedTuple):
  """One branch's packed patches (leading axes [..., S] with S a bucket): pixels and the
  per-patch constants of `qwen3_vl_vision.GridLayout` as data."""
  pixels: jax.Array          # [S, patch_dim] float32, zero rows after the real patches
  interp_index: jax.Array    # [S, 4] int32 taps into the position table
  interp_weight: jax.Array   # [S, 4] float32 (0 on padding)
  rope_hw: jax.Array         # [S, 2] int32 (row, column) of the 2-D rotary embedding
  segment: jax.Array         # [S] int32 attention segment, one per frame, from 1; 0 = padding
  attention_rows: jax.Array  # [R, P] int32 pack index of each attention row's slots, -1 empty


class VisionBatch(NamedTuple):
  """The pictures of a batch of rows: `patches` per branch, `visual_slot` / `positions` per row
  (leading [K] on the branch-stacked arrays, [R, K] for OPD rounds)."""
  patches: PatchPack
  visual_slot: jax.Array     # [N, T] int32: 1 + index of the merged token at that position, 0 text
  positions: jax.Array       # [N, 3, T] int32 M-RoPE positions (t, h, w)


@dataclasses.dataclass(frozen=True)
class PromptPictures:
  """One prompt's pictures as the processors give them: packed patch rows of its images, then
  of its videos, and their (t, h, w) grids."""
  pixels: np.ndarray          # [n, patch_dim]
  image_grids: np.ndarray     # [num_images, 3]
  video_grids: np.ndarray     # [num_videos, 3]

  @classmethod
  def of(cls, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
         video_grid_thw=None) -> 'PromptPictures':
    grids = lambda g: np.asarray(g if g is not None else np.zeros((0, 3)), np.int64).reshape(-1, 3)
    parts = [np.asarray(p, np.float32) for p in (pixel_values, pixel_values_videos)
             if p is not None and len(p)]
    return cls(np.concatenate(parts) if parts else None, grids(image_grid_thw),
               grids(video_grid_thw))

  @property
  def num_patches(self) -> int:
    return int(sum(np.prod(g) for g in (*self.image_grids, *self.video_grids)))


def patch_bucket(n: int, buckets: Sequence[int] = PATCH_BUCKETS) -> int:
  """The smallest bucket >= n."""
  i = bisect.bisect_left(buckets, n)
  if i == len(buckets):
    raise ValueError(f'{n} patches exceed the largest patch bucket {buckets[-1]}')
  return buckets[i]


def row_length(largest_frame: int) -> int:
  """The attention row length P for frames of at most `largest_frame` patches: the smallest
  power of two >= it, at least MIN_ROW_LENGTH."""
  return max(MIN_ROW_LENGTH, 1 << max(int(largest_frame) - 1, 0).bit_length())


def attention_row_count(needed: int, patches: int, length: int) -> int:
  """R for a pack of `patches` patches in rows of `length`: patches / length when `needed` rows
  (the most any branch's frames take) fit, else twice that, which first fit never exceeds."""
  base = max(1, -(-patches // length))
  if needed > 2 * base:
    raise ValueError(f'{needed} attention rows of {length} exceed twice a pack of {patches}')
  return base if needed <= base else 2 * base


def _pack(prompts: Sequence[PromptPictures], size: int, config: VisionConfig
          ) -> tuple[tuple[np.ndarray, ...], list[int], list[tuple[int, int]]]:
  """The PatchPack arrays but the attention rows of `prompts` (in order) padded to `size`
  patches, each prompt's first merged-token index in it, and each frame's (start, patches)."""
  pixels = np.zeros((size, config.patch_dim), np.float32)
  index = np.zeros((size, 4), np.int32)
  weight = np.zeros((size, 4), np.float32)
  rope = np.zeros((size, 2), np.int32)
  segment = np.zeros((size,), np.int32)
  starts, at, frames, spans = [], 0, 0, []
  for prompt in prompts:
    starts.append(at // config.merge_unit)
    grids = np.concatenate([prompt.image_grids, prompt.video_grids]).reshape(-1, 3)
    n = prompt.num_patches
    if not n:
      continue
    if prompt.pixels is None or prompt.pixels.shape != (n, config.patch_dim):
      got = None if prompt.pixels is None else prompt.pixels.shape
      raise ValueError(f'pictures of {n} patches of {config.patch_dim} values need pixels of that '
                       f'shape, got {got}')
    layout = grid_layout(grids, config)
    pixels[at:at + n] = prompt.pixels
    index[at:at + n], weight[at:at + n] = layout.interp_index, layout.interp_weight
    rope[at:at + n] = layout.rope_hw
    segment[at:at + n] = layout.segment + 1 + frames
    frames += int(layout.segment.max()) + 1
    for t, h, w in grids.tolist():
      spans += [(at + i * h * w, h * w) for i in range(t)]
      at += t * h * w
  return (pixels, index, weight, rope, segment), starts, spans


def _row_slots(tokens: np.ndarray, valid: np.ndarray, prompt: PromptPictures | None, start: int,
               image_token_id: int, video_token_id: int, merge_unit: int) -> np.ndarray:
  """visual_slot [P] of one prompt row: its image pads read merged tokens start + 1 .. in
  order, then its video pads those after the images'."""
  slots = np.zeros(tokens.shape, np.int32)
  n_image = 0 if prompt is None else int(sum(np.prod(g) for g in prompt.image_grids)) // merge_unit
  n_video = 0 if prompt is None else int(sum(np.prod(g) for g in prompt.video_grids)) // merge_unit
  for token_id, first, count, kind in ((image_token_id, start, n_image, 'image'),
                                       (video_token_id, start + n_image, n_video, 'video')):
    where = np.flatnonzero((tokens == token_id) & valid)
    if len(where) != count:
      raise ValueError(f'a prompt has {len(where)} {kind} pad tokens but its {kind}s merge to '
                       f'{count} tokens')
    slots[where] = first + 1 + np.arange(count)
  return slots


def build_vision_batch(prompt_tokens: np.ndarray, prompt_valid: np.ndarray,
                       pictures: Sequence[Sequence[PromptPictures | None]], completion_length: int,
                       model_config, patches: int | None = None) -> VisionBatch:
  """The VisionBatch [K, ...] of left-padded prompts tokens, valid [K, B, P] whose rows will be
  followed by `completion_length` sampled columns; pictures[k][b]: row b's pictures (None for a
  text row). Rows given the same PromptPictures object (a GRPO group) share one copy in the
  pack. patches: the pack size (default: the bucket of the largest branch's patches).
  model_config: a `qwen3_vl.Qwen3VLConfig`."""
  tokens, valid = np.asarray(prompt_tokens), np.asarray(prompt_valid, bool)
  K, B, P = tokens.shape
  vc = model_config.vision
  distinct = []
  for row in pictures:
    seen: dict[int, PromptPictures] = {}
    for p in row:
      if p is not None and p.num_patches and id(p) not in seen:
        seen[id(p)] = p
    distinct.append(list(seen.values()))
  largest = max(sum(p.num_patches for p in d) for d in distinct)
  size = patches or patch_bucket(max(largest, 1))
  if largest > size:
    raise ValueError(f'{largest} patches do not fit a pack of {size}')
  packed = [_pack(d, size, vc) for d in distinct]
  spans = [[s for s, _ in f] for _, _, f in packed], [[n for _, n in f] for _, _, f in packed]
  length = row_length(max((max(n, default=0) for n in spans[1]), default=0))
  needed = max(len(set(first_fit_rows(n, length))) for n in spans[1])
  num_rows = attention_row_count(needed, size, length)
  packs, slots = [], np.zeros((K, B, P + completion_length), np.int32)
  positions = np.zeros((K, B, 3, P + completion_length), np.int32)
  for k in range(K):
    arrays, starts, _ = packed[k]
    packs.append(PatchPack(*arrays, attention_rows(spans[0][k], spans[1][k], length, num_rows)))
    start_of = {id(p): s for p, s in zip(distinct[k], starts)}
    for b in range(B):
      picture = pictures[k][b]
      has = picture is not None and picture.num_patches > 0
      slots[k, b, :P] = _row_slots(tokens[k, b], valid[k, b], picture if has else None,
                                   start_of.get(id(picture), 0), model_config.image_token_id,
                                   model_config.video_token_id, vc.merge_unit)
      pos, delta = mrope_position_ids(
          tokens[k, b][None], image_token_id=model_config.image_token_id,
          video_token_id=model_config.video_token_id, spatial_merge_size=vc.spatial_merge_size,
          image_grid_thw=picture.image_grids if has else None,
          video_grid_thw=picture.video_grids if has else None, token_valid=valid[k, b][None])
      positions[k, b, :, :P] = pos[:, 0]
      after = int(valid[k, b].sum()) + int(delta[0])   # the sampler's rope start
      positions[k, b, :, P:] = after + np.arange(completion_length)
  stacked = PatchPack(*(np.stack(x) for x in zip(*packs)))
  return VisionBatch(stacked, slots, positions)


# ---------------------------------------------------------------------------------------------
# On the devices (inside the jitted steps)
# ---------------------------------------------------------------------------------------------

def text_positions(token_valid: jax.Array) -> jax.Array:
  """M-RoPE positions [..., 3, T] of text-only rows [..., T]: the plain positions on all rows."""
  plain = jnp.maximum(jnp.cumsum(token_valid.astype(jnp.int32), axis=-1) - 1, 0)
  return jnp.repeat(plain[..., None, :], 3, axis=-2)


def widen_rows(rows: jax.Array, length: int) -> jax.Array:
  """Attention rows [..., R, P] as rows of `length` >= P slots: consecutive rows laid end to end
  and cut every `length` slots (-1 fills the tail). A row then holds several old rows' frames,
  which the segment mask keeps apart: the same attention, at length / P times the old cost."""
  R, P = rows.shape[-2:]
  if length < P:
    raise ValueError(f'cannot narrow attention rows of {P} slots to {length}')
  if length == P:
    return rows
  flat = rows.reshape(rows.shape[:-2] + (R * P,))
  extra = -(R * P) % length
  flat = jnp.pad(flat, [(0, 0)] * (flat.ndim - 1) + [(0, extra)], constant_values=-1)
  return flat.reshape(rows.shape[:-2] + (-1, length))


def _pad_axis(x, axis, extra, value=0):
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def concat_packs(visions: Sequence[VisionBatch], merge_unit: int) -> list[VisionBatch]:
  """Several batches' pictures (each with its own pack of S_i patches, same leading axes) as one
  pack of sum S_i patches: the returned batches share the joined `patches`, their
  `visual_slot`s, segments and attention rows shifted past the packs before them; the rows
  are widened (`widen_rows`) to the longest and stacked."""
  offset, segments, rows, out = 0, [], [], []
  length = max(v.patches.attention_rows.shape[-1] for v in visions)
  for v in visions:
    seg = v.patches.segment
    # Segment ids count from 1 and are fewer than the pack's patches: shifting by the patch
    # offset keeps every frame's segment distinct.
    segments.append(jnp.where(seg > 0, seg + offset, 0))
    shifted = jnp.where(v.patches.attention_rows >= 0, v.patches.attention_rows + offset, -1)
    rows.append(widen_rows(shifted, length))
    out.append(v._replace(visual_slot=jnp.where(v.visual_slot > 0,
                                                v.visual_slot + offset // merge_unit, 0)))
    offset += seg.shape[-1]
  join = lambda name: jnp.concatenate([getattr(v.patches, name) for v in visions], axis=-2)
  joined = PatchPack(join('pixels'), join('interp_index'), join('interp_weight'), join('rope_hw'),
                     jnp.concatenate(segments, axis=-1), jnp.concatenate(rows, axis=-2))
  return [v._replace(patches=joined) for v in out]


def pack_shape(vision: VisionBatch) -> tuple[int, int, int]:
  """(patches S, attention rows R, row length P) of a batch's pack."""
  return (vision.patches.segment.shape[-1],) + tuple(vision.patches.attention_rows.shape[-2:])


def common_pack_shape(visions: Sequence[VisionBatch]) -> tuple[int, int, int]:
  """The smallest (S, R, P) that `pad_patches` can bring every one of these packs to."""
  S = max(pack_shape(v)[0] for v in visions)
  P = max(pack_shape(v)[2] for v in visions)
  R = max(widen_rows(v.patches.attention_rows, P).shape[-2] for v in visions)
  return S, R, P


def pad_patches(vision: VisionBatch, size: int, rows: tuple[int, int] | None = None
                ) -> VisionBatch:
  """The pack padded with zero patches (segment 0, in no attention row, never read) to `size`
  patches; with rows = (R, P) its attention rows widened to P slots and padded with empty rows
  to R."""
  p = vision.patches
  extra = size - p.segment.shape[-1]
  if extra < 0:
    raise ValueError(f'cannot pad a pack of {p.segment.shape[-1]} patches to {size}')
  table = p.attention_rows
  if rows is not None:
    table = widen_rows(table, rows[1])
    if table.shape[-2] > rows[0]:
      raise ValueError(f'{table.shape[-2]} attention rows do not fit {rows[0]}')
    table = _pad_axis(table, -2, rows[0] - table.shape[-2], -1)
  if extra:
    p = PatchPack(_pad_axis(p.pixels, -2, extra), _pad_axis(p.interp_index, -2, extra),
                  _pad_axis(p.interp_weight, -2, extra), _pad_axis(p.rope_hw, -2, extra),
                  _pad_axis(p.segment, -1, extra), table)
  return vision._replace(patches=p._replace(attention_rows=table))
