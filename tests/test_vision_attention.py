"""The vision tower attends within each frame under static shapes (issue 19): a pack of many
frames of different sizes gives every frame what the tower gives that frame alone, joined OPD
packs give each pack's own output, and the compiled forward holds attention scores of the
frames' own sizes, never a [S, S] array over the whole pack."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from copd_jax.models.qwen3_vl_vision import (GridLayout, VisionConfig, VisionTower,
                                             first_fit_rows, grid_layout)
from copd_jax.models.qwen3_vl_vision import attention_rows
from copd_jax.vision_batch import (PatchPack, PromptPictures, VisionBatch, _pack,
                                   attention_row_count, concat_packs, pad_patches, row_length)

VISION = VisionConfig(depth=2, hidden_size=16, intermediate_size=24, num_heads=2,
                      out_hidden_size=16, num_position_embeddings=16, patch_size=4,
                      deepstack_visual_indexes=(0,))


def _tower(config: VisionConfig = VISION) -> VisionTower:
  return VisionTower(config, rngs=nnx.Rngs(0), init_std=0.2)


def _pictures(grids, seed):
  n = sum(int(np.prod(g)) for g in grids)
  pixels = np.random.default_rng(seed).standard_normal((n, VISION.patch_dim)).astype(np.float32)
  return PromptPictures.of(pixels, np.array(grids).reshape(-1, 3))


def _pack_of(prompts, size):
  """One branch's PatchPack of `prompts` (as build_vision_batch packs a branch), its prompts'
  first merged tokens and frames (start, patches)."""
  arrays, starts, spans = _pack(prompts, size, VISION)
  length = row_length(max(n for _, n in spans))
  num_rows = attention_row_count(len(set(first_fit_rows([n for _, n in spans], length))),
                                 size, length)
  rows = attention_rows([s for s, _ in spans], [n for _, n in spans], length, num_rows)
  return PatchPack(*arrays, rows), starts, spans


def _run(tower, pack: PatchPack):
  layout = GridLayout(pack.interp_index, pack.interp_weight, pack.rope_hw, pack.segment,
                      pack.attention_rows)
  tokens, features = jax.jit(lambda p, lay: tower(p, lay))(pack.pixels, layout)
  return np.asarray(tokens), np.asarray(features)


# Frames of 4 .. 32 patches, one a two-frame video: several small frames share a row.
PROMPTS = [[(1, 4, 6), (1, 2, 2)], [(1, 2, 4)], [(2, 2, 4)], [(1, 4, 8)], [(1, 2, 2), (1, 2, 4)]]


def test_a_pack_gives_every_frame_what_the_tower_gives_it_alone():
  tower = _tower()
  prompts = [_pictures(g, seed) for seed, g in enumerate(PROMPTS)]
  pack, starts, spans = _pack_of(prompts, 128)
  rows = np.asarray(pack.attention_rows)
  # 96 patches, the largest frame 32: rows of 32 (32 | 24 + 8 | 8 + 8 + 8 + 4 + 4), R = 128 / 32
  assert rows.shape == (4, 32) and (rows[3] == -1).all()
  assert sorted(rows[rows >= 0].tolist()) == list(range(96))
  tokens, features = _run(tower, pack)
  forward = jax.jit(lambda pixels, layout: tower(pixels, layout))
  frame = 0
  for prompt, start in zip(prompts, starts):
    at = start
    for t, h, w in prompt.image_grids.tolist():
      for _ in range(t):   # each temporal patch alone: a (1, h, w) image of its own pixels
        begin = spans[frame][0]
        alone = grid_layout(np.array([(1, h, w)]), VISION)
        want_tokens, want_features = forward(pack.pixels[begin:begin + h * w], alone)
        m = h * w // 4
        np.testing.assert_allclose(tokens[at:at + m], want_tokens, atol=2e-6, rtol=1e-5)
        np.testing.assert_allclose(features[:, at:at + m], want_features, atol=2e-6, rtol=1e-5)
        at, frame = at + m, frame + 1


@pytest.mark.slow
def test_joined_and_padded_packs_give_each_pack_its_own_output():
  """An OPD step joins the native pack and the rounds' packs (rows of different lengths are
  widened to the longest) and pads rounds to a common shape: the tower's output on the joined
  pack is each pack's own output."""
  tower = _tower()
  a, _, _ = _pack_of([_pictures(g, seed) for seed, g in enumerate(PROMPTS)], 128)
  b, _, _ = _pack_of([_pictures([(1, 2, 4), (2, 2, 2)], 7)], 64)
  as_batch = lambda pack: VisionBatch(pack, np.zeros((1, 4), np.int32),
                                      np.zeros((1, 3, 4), np.int32))
  assert b.attention_rows.shape == (4, 16)
  wider = pad_patches(as_batch(b), 128, (3, 32)).patches
  assert wider.attention_rows.shape == (3, 32) and wider.pixels.shape[0] == 128
  joined = concat_packs([as_batch(a), as_batch(b)], VISION.merge_unit)[0].patches
  assert joined.attention_rows.shape == (6, 32)   # a's 4 rows of 32, b's 4 x 16 end to end
  own = [_run(tower, p) for p in (a, b, wider)]
  both = _run(tower, joined)
  real_a, real_b = 96 // 4, 16 // 4
  for got, want in ((both[0][:real_a], own[0][0][:real_a]),
                    (both[0][32:32 + real_b], own[1][0][:real_b]),
                    (own[2][0][:real_b], own[1][0][:real_b]),
                    (both[1][:, 32:32 + real_b], own[1][1][:, :real_b])):
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)


def _compiled_forward_temp_bytes(frames: int, frame_patches: int) -> int:
  """Temporary bytes of the compiled tower forward on a pack of `frames` frames of
  `frame_patches` patches each (abstract inputs: compile only)."""
  config = VisionConfig(depth=1, hidden_size=32, intermediate_size=32, num_heads=4,
                        out_hidden_size=32, num_position_embeddings=16, patch_size=4)
  graphdef, params = nnx.split(nnx.eval_shape(lambda: VisionTower(config, rngs=nnx.Rngs(0))))
  S = frames * frame_patches
  length = row_length(frame_patches)
  spec = jax.ShapeDtypeStruct
  layout = GridLayout(spec((S, 4), jnp.int32), spec((S, 4), jnp.float32),
                      spec((S, 2), jnp.int32), spec((S,), jnp.int32),
                      spec((S // length, length), jnp.int32))
  fn = jax.jit(lambda p, pixels, lay: nnx.merge(graphdef, p)(pixels, lay))
  compiled = fn.lower(params, spec((S, config.patch_dim), jnp.float32), layout).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_attention_memory_follows_the_frames_not_the_pack():
  """2,048 patches as 128 frames of 16: far below one [H, S, S] fp32 score array (64 MB); twice
  the frames, about twice the memory; the same patches as 8 frames of 256 (16x the per-row
  score area, 1/16 the rows) cost more than as small frames."""
  small = _compiled_forward_temp_bytes(128, 16)
  assert small < 4 * 2048 * 2048 * 4 / 16
  assert 1.6 < _compiled_forward_temp_bytes(256, 16) / small < 2.4
  assert _compiled_forward_temp_bytes(8, 256) > 2 * small
