"""Multimodal rotary positions of Qwen3-VL (M-RoPE): position ids on the host, tables in jax.

Position ids are three rows (temporal, height, width) per token, as transformers'
`Qwen3VLModel.get_rope_index` builds them:
- a text token gets the same position on all three rows, one more than the previous token's;
- the tokens of one image (or one video frame) get (start + t, start + row, start + col) on its
  merged grid, where start is the position the next text token would have had;
- the text after it continues at start + max(h, w) / merge, one past the image's largest
  position. A video is split into its frames (transformers' processor puts timestamp text
  between frames), each frame placed like an image of one temporal step.
Padding (token_valid False) is skipped and gets position 0 on every row.

The rotary tables then interleave the three rows over the frequencies (`mrope_section`, HF's
interleaved layout): frequency i takes its angle from the height row if i % 3 == 1 and
i < 3 * section[1], from the width row if i % 3 == 2 and i < 3 * section[2], else from the
temporal row.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def frame_grids(image_grid_thw=None, video_grid_thw=None) -> tuple[list, list]:
  """(image grids, video frame grids) as lists of (t, h, w); each video becomes t grids of one
  temporal step, the order in which its frames' pad tokens appear."""
  images = [tuple(g) for g in np.asarray(image_grid_thw, np.int64).reshape(-1, 3).tolist()] \
      if image_grid_thw is not None else []
  frames = []
  if video_grid_thw is not None:
    for t, h, w in np.asarray(video_grid_thw, np.int64).reshape(-1, 3).tolist():
      frames += [(1, h, w)] * t
  return images, frames


def mrope_position_ids(tokens: np.ndarray, *, image_token_id: int, video_token_id: int,
                       spatial_merge_size: int, image_grid_thw=None, video_grid_thw=None,
                       token_valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(position ids [3, B, T] int32, deltas [B] int32) for token ids [B, T].

  Grids are consumed in order over the batch, row by row, one per run of image (video) pad
  tokens of the grid's merged size; `delta` = max position + 1 - number of real tokens, the
  offset decoding adds to plain token counts after the prompt."""
  tokens = np.asarray(tokens)
  B, T = tokens.shape
  valid = np.ones((B, T), bool) if token_valid is None else np.asarray(token_valid, bool)
  images, frames = frame_grids(image_grid_thw, video_grid_thw)
  queues = {image_token_id: iter(images), video_token_id: iter(frames)}
  m = spatial_merge_size
  positions = np.zeros((3, B, T), np.int64)
  deltas = np.zeros((B,), np.int64)
  for b in range(B):
    ids = tokens[b][valid[b]]
    out = np.zeros((3, len(ids)), np.int64)
    pos, i = 0, 0
    while i < len(ids):
      if ids[i] in queues:
        grid = next(queues[ids[i]], None)
        if grid is None:
          raise ValueError(f'row {b}: more vision pad runs than grids (token {i})')
        t, h, w = grid[0], grid[1] // m, grid[2] // m
        n = t * h * w
        if i + n > len(ids) or not np.all(ids[i:i + n] == ids[i]):
          raise ValueError(f'row {b}: vision pad run at token {i} is shorter than its grid '
                           f'(t={grid[0]}, h={grid[1]}, w={grid[2]}: {n} tokens)')
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing='ij')
        out[:, i:i + n] = np.stack([tt, hh, ww]).reshape(3, -1) + pos
        pos += max(h, w)
        i += n
      else:
        j = i
        while j < len(ids) and ids[j] not in queues:
          j += 1
        out[:, i:j] = np.arange(pos, pos + j - i)
        pos += j - i
        i = j
    positions[:, b, valid[b]] = out
    deltas[b] = (out.max() + 1 if len(ids) else 0) - len(ids)
  for token_id, queue in queues.items():
    if next(queue, None) is not None:
      kind = 'image' if token_id == image_token_id else 'video frame'
      raise ValueError(f'more {kind} grids than runs of {kind} pad tokens in the prompts')
  return positions.astype(np.int32), deltas.astype(np.int32)


def mrope_frequency_axis(half_dim: int, mrope_section: Sequence[int]) -> np.ndarray:
  """Which position row (0 = t, 1 = h, 2 = w) drives each of the head_dim / 2 frequencies, in
  HF's interleaved layout."""
  axis = np.zeros(half_dim, np.int32)
  for row in (1, 2):
    axis[row:mrope_section[row] * 3:3] = row
  return axis


def mrope_tables(positions: jax.Array, head_dim: int, theta: float,
                 mrope_section: Sequence[int]):
  """cos, sin [B, T, head_dim] in fp32 for positions [3, B, T] ('rotate_half' layout)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq        # [3, B, T, hd / 2]
  axis = jnp.asarray(mrope_frequency_axis(head_dim // 2, mrope_section))
  angles = _pick_rows(angles, axis)
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def _pick_rows(angles: jax.Array, axis: jax.Array) -> jax.Array:
  """angles [3, B, T, F], axis [F] -> [B, T, F] with frequency f from row axis[f]."""
  onehot = jax.nn.one_hot(axis, 3, dtype=bool).T                      # [3, F]
  return jnp.where(onehot[1], angles[1], jnp.where(onehot[2], angles[2], angles[0]))
