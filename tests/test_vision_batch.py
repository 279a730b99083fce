"""copd_jax.vision_batch on the host: which merged token each prompt position reads, M-RoPE
positions of prompt and completion equal to those of the whole row, one copy of a group's
pictures, patch buckets, and packs joined for an OPD step."""
import numpy as np
import pytest

from copd_jax.models.qwen3 import Qwen3Config
from copd_jax.models.qwen3_vl import Qwen3VLConfig
from copd_jax.models.qwen3_vl_positions import mrope_position_ids
from copd_jax.models.qwen3_vl_vision import VisionConfig, grid_layout
from copd_jax.vision_batch import (PromptPictures, build_vision_batch, concat_packs,
                                   pad_patches, patch_bucket)
from tests.hf_vl_fixtures import IMAGE, VEND, VIDEO, VSTART, vision_tokens

VISION = VisionConfig(depth=1, hidden_size=16, intermediate_size=16, num_heads=2,
                      out_hidden_size=16, num_position_embeddings=16, patch_size=4)
CONFIG = Qwen3VLConfig(Qwen3Config(vocab_size=160, hidden_size=16, num_layers=1, num_heads=2,
                                   num_kv_heads=1, head_dim=8, intermediate_size=16),
                       VISION, mrope_section=(2, 1, 1), image_token_id=IMAGE,
                       video_token_id=VIDEO, vision_start_token_id=VSTART,
                       vision_end_token_id=VEND)


def _pictures(images=(), videos=(), seed=0):
  n = sum(int(np.prod(g)) for g in (*images, *videos))
  pixels = np.random.default_rng(seed).standard_normal((n, VISION.patch_dim)).astype(np.float32)
  return PromptPictures.of(pixels, np.array(images).reshape(-1, 3), None,
                           np.array(videos).reshape(-1, 3))


def _left_padded(rows, P):
  tokens, valid = np.zeros((len(rows), P), np.int32), np.zeros((len(rows), P), bool)
  for b, ids in enumerate(rows):
    tokens[b, P - len(ids):], valid[b, P - len(ids):] = ids, True
  return tokens, valid


def test_slots_positions_and_one_copy_per_group():
  image = _pictures(images=[(1, 4, 6), (1, 2, 4)], seed=1)
  video = _pictures(videos=[(2, 2, 4)], seed=2)
  image_row = [1, 2] + vision_tokens((1, 4, 6), IMAGE) + [3] + vision_tokens((1, 2, 4), IMAGE) + [4]
  video_row = [5] + sum(([6] + vision_tokens((1, 2, 4), VIDEO) for _ in range(2)), []) + [7, 8]
  rows = [image_row, image_row, video_row, [9, 10, 11]]   # a group of two, a video, text
  pictures = [image, image, video, None]
  P, N = 24, 3
  tokens, valid = _left_padded(rows, P)
  vision = build_vision_batch(tokens[None], valid[None], [pictures], N, CONFIG)
  # 24 + 8 + 16 patches (the group's pictures once) -> the 64-patch bucket
  assert vision.patches.pixels.shape == (1, 64, VISION.patch_dim)
  np.testing.assert_array_equal(vision.patches.pixels[0, :32], image.pixels)
  np.testing.assert_array_equal(vision.patches.pixels[0, 32:48], video.pixels)
  assert not vision.patches.pixels[0, 48:].any() and not vision.patches.segment[0, 48:].any()
  layout = grid_layout(np.array([(1, 4, 6), (1, 2, 4), (2, 2, 4)]), VISION)
  np.testing.assert_array_equal(vision.patches.segment[0, :48], layout.segment + 1)
  np.testing.assert_array_equal(vision.patches.rope_hw[0, :48], layout.rope_hw)
  slots = vision.visual_slot[0]
  for b in (0, 1):   # both rows of the group read merged tokens 1..8 of the one copy
    np.testing.assert_array_equal(slots[b, :P][tokens[b] == IMAGE], np.arange(1, 9))
  np.testing.assert_array_equal(slots[2, :P][tokens[2] == VIDEO], np.arange(9, 13))
  assert not slots[3].any() and not slots[:, P:].any()
  # Positions: those of the whole row (prompt + N text tokens) from the reference function.
  full = np.concatenate([tokens, np.full((4, N), 20, np.int32)], axis=1)
  full_valid = np.concatenate([valid, np.ones((4, N), bool)], axis=1)
  for b, pic in enumerate(pictures):
    expected, _ = mrope_position_ids(
        full[b][None], image_token_id=IMAGE, video_token_id=VIDEO, spatial_merge_size=2,
        image_grid_thw=None if pic is None else pic.image_grids,
        video_grid_thw=None if pic is None else pic.video_grids, token_valid=full_valid[b][None])
    np.testing.assert_array_equal(vision.positions[0, b], expected[:, 0])


def test_pad_runs_must_match_the_pictures_and_buckets_are_powers_of_two():
  image = _pictures(images=[(1, 4, 4)])
  tokens, valid = _left_padded([[1] + vision_tokens((1, 4, 6), IMAGE)], 16)
  with pytest.raises(ValueError, match='6 image pad tokens but its images merge to 4'):
    build_vision_batch(tokens[None], valid[None], [[image]], 2, CONFIG)
  assert [patch_bucket(n) for n in (1, 64, 65, 1000)] == [64, 64, 128, 1024]


def test_joined_packs_shift_slots_and_segments():
  a = build_vision_batch(*(x[None] for x in _left_padded(
      [[1] + vision_tokens((1, 4, 4), IMAGE)], 8)), [[_pictures(images=[(1, 4, 4)])]], 1, CONFIG)
  b = pad_patches(a, 128)
  joined = concat_packs([a, b], VISION.merge_unit)
  assert joined[0].patches.pixels.shape == (1, 192, VISION.patch_dim)
  np.testing.assert_array_equal(joined[0].visual_slot, a.visual_slot)
  np.testing.assert_array_equal(np.asarray(joined[1].visual_slot),
                                np.where(a.visual_slot > 0, a.visual_slot + 16, 0))
  segments = np.asarray(joined[0].patches.segment[0])
  assert set(segments[:16]) == {1} and set(segments[64:80]) == {65}
  assert not segments[16:64].any() and not segments[80:].any()
